"""Kill and resume: ``fit`` is SIGKILLed at several random steps (mid-epoch included) and resumed each time with
``--ckpt_path last``; the final weights are bit-identical to those of an uninterrupted run (CPU, fixed seed).

Every attempt shares one checkpoint folder (``--checkpoint.dirpath``), so ``--ckpt_path last`` finds the
``last.ckpt`` of whichever attempt was killed last; ``--checkpoint.every_n_train_steps`` refreshes it mid-epoch and
the tensor loader (``--data.init_args.loader=tensor``) saves its position, so a mid-epoch resume sees the same batches.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from project.cli import cli_main
from tests.conftest import CONFIGS, ROOT, fast_args
from tests.test_faults import wait_for

MNIST = str(CONFIGS / "mnist.yaml")
EPOCHS, BATCH, EVERY_N_STEPS = 3, 32, 3
STEPS_PER_EPOCH = 17  # 540 training samples of the fixture in batches of 32
TRAIN = ["--trainer.max_epochs=" + str(EPOCHS), f"--data.init_args.batch_size={BATCH}", "--test_after_fit=false",
         "--model.init_args.net.init_args.hidden=[16]", "--data.init_args.augment=standard",
         "--data.init_args.loader=tensor", "--trainer.limit_val_batches=2",
         f"--checkpoint.every_n_train_steps={EVERY_N_STEPS}"]  # fmt: skip


class LastCheckpointStep(Callback):
    """Records, before each training step, the global step stored in ``<dirpath>/last.ckpt`` (None: no file yet)."""

    def __init__(self, dirpath: str) -> None:
        self.last = Path(dirpath) / "last.ckpt"
        self.seen: list[int | None] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.seen.append(torch.load(self.last, weights_only=True)["global_step"] if self.last.is_file() else None)


def test_last_ckpt_is_refreshed_every_n_train_steps_mid_epoch(tmp_path, mnist_root):
    """The monitored metric (val/acc) is absent mid-epoch, where Lightning alone would not write last.ckpt."""
    recorder = LastCheckpointStep(str(tmp_path / "checkpoints"))
    cli = cli_main([f"--config={MNIST}", *fast_args(mnist_root), "--trainer.max_epochs=2",
                    "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1", "--test_after_fit=false",
                    "--model.init_args.net.init_args.hidden=[16]", "--checkpoint.every_n_train_steps=2",
                    f"--checkpoint.dirpath={tmp_path / 'checkpoints'}"], run=False)  # fmt: skip
    cli.trainer.callbacks.insert(0, recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # steps 2 and 4 mid-epoch 0, 5 at its end, 6 and 8 mid-epoch 1
    assert recorder.seen == [None, None, 2, 2, 4, 5, 6, 6, 8, 8]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10


def test_tensor_loader_resumes_from_an_end_of_epoch_checkpoint(tmp_path, mnist_root):
    """Lightning restores no loader state from an end-of-epoch checkpoint: the loader takes the trainer's epoch."""
    quick = [*fast_args(mnist_root), *TRAIN, "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1"]

    def run(*extra: str, ckpt_path: Path | None = None):
        cli = cli_main([f"--config={MNIST}", *quick, *extra], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return cli

    straight = run("--trainer.max_epochs=2", f"--checkpoint.dirpath={tmp_path / 'a'}")
    run("--trainer.max_epochs=1", f"--checkpoint.dirpath={tmp_path / 'b'}")
    resumed = run(
        "--trainer.max_epochs=2", f"--checkpoint.dirpath={tmp_path / 'b'}", ckpt_path=tmp_path / "b" / "last.ckpt"
    )
    assert resumed.trainer.train_dataloader.epoch == 1 and resumed.trainer.global_step == 8
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after an end-of-epoch resume"


def fit(folder: Path, mnist_root: Path, markers: Path, *extra: str) -> subprocess.Popen:
    markers.mkdir(parents=True)
    callback = (
        f'[{{"class_path": "tests.test_faults.StepMarker", "init_args": {{"folder": "{markers}", "delay": 0.02}}}}]'
    )
    args = [sys.executable, "-m", "project", "fit", f"--config={MNIST}", *fast_args(mnist_root), *TRAIN,
            f"--checkpoint.dirpath={folder / 'checkpoints'}", f"--trainer.callbacks={callback}", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return err


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == EPOCHS * STEPS_PER_EPOCH
    return checkpoint["state_dict"]


@pytest.mark.slow  # five fit subprocesses
def test_sigkill_and_resume_is_bit_identical(tmp_path, mnist_root):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir()
    killed.mkdir()
    process = fit(reference, mnist_root, reference / "markers")
    assert process.wait(timeout=300) == 0, finish(process)

    # kill points: random steps after the first mid-epoch checkpoint, each after the previous one, most of them not
    # on an epoch or checkpoint boundary; every attempt has its own marker folder (steps repeat after a resume)
    rng = random.Random(8)
    total = EPOCHS * STEPS_PER_EPOCH
    kill_steps = sorted(rng.sample(range(EVERY_N_STEPS + 1, total - 2), 3))
    assert any(step % STEPS_PER_EPOCH not in (0, STEPS_PER_EPOCH - 1) for step in kill_steps)
    for i, step in enumerate(kill_steps):
        process = fit(killed, mnist_root, killed / f"markers-{i}", *(["--ckpt_path=last"] if i else []))
        wait_for(killed / f"markers-{i}" / f"step-{step}", process, timeout=300)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
    process = fit(killed, mnist_root, killed / f"markers-{len(kill_steps)}", "--ckpt_path=last")
    assert process.wait(timeout=300) == 0, finish(process)
    starts = [int(next((killed / f"markers-{i}").glob("start-*")).read_text()) for i in range(len(kill_steps) + 1)]
    assert starts[0] == 0
    # each resume continues from a checkpoint saved at most EVERY_N_STEPS (or an epoch end) before the kill
    # (the kill lands a step or two after the marker it waited for: the last step each attempt reached)
    reached = [
        max(int(p.name.split("-")[1]) for p in (killed / f"markers-{i}").glob("step-*")) for i in range(len(kill_steps))
    ]
    resumes = list(zip(starts[1:], kill_steps, reached, strict=True))
    assert all(step - EVERY_N_STEPS < start <= last for start, step, last in resumes), (
        f"a resume did not continue from the latest checkpoint: starts {starts}, kills {kill_steps}, reached {reached}"
    )

    expected, got = final_weights(reference), final_weights(killed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"weights differ after kill-and-resume: {different}"
