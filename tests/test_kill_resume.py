"""Kill and resume: ``fit`` is SIGKILLed at several random points (mid-epoch included) and resumed each time with
``--ckpt_path last``; the final weights are bit-identical to those of an uninterrupted run (CPU, fixed seed).

It needs two mechanisms, probed below; until both are present the test is skipped with the reason:
- a resumable training loader (``state_dict`` / ``load_state_dict``), so a mid-epoch resume sees the same batches;
- ``--ckpt_path last`` resolving the newest ``last.ckpt`` of the same experiment (an earlier version folder), and
  ``last.ckpt`` refreshed every ``--checkpoint.every_n_train_steps`` steps.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from project.cli import cli_main
from tests.conftest import CONFIGS, ROOT, fast_args
from tests.test_faults import wait_for

MNIST = str(CONFIGS / "mnist.yaml")
EPOCHS, BATCH, EVERY_N_STEPS = 3, 32, 3
STEPS_PER_EPOCH = 17  # 540 training samples of the fixture in batches of 32
TRAIN = ["--trainer.max_epochs=" + str(EPOCHS), f"--data.init_args.batch_size={BATCH}", "--test_after_fit=false",
         "--model.init_args.net.init_args.hidden=[16]", "--data.init_args.augment=standard",
         f"--checkpoint.every_n_train_steps={EVERY_N_STEPS}"]  # fmt: skip


def missing_mechanisms(mnist_root: Path, folder: Path) -> list[str]:
    missing = []
    cli = cli_main(["--config", MNIST, *fast_args(mnist_root)], run=False)
    cli.datamodule.setup("fit")
    loader = cli.datamodule.train_dataloader()
    if not (callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))):
        missing.append("the training loader is not resumable (no state_dict/load_state_dict; issue 6)")
        return missing  # no need to train for the second probe
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        quick = [*fast_args(mnist_root), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                 "--test_after_fit=false"]  # fmt: skip
        cli_main(["fit", "--config", MNIST, *quick, "--trainer.max_epochs=1"])
        resumed = cli_main(["fit", "--config", MNIST, *quick, "--trainer.max_epochs=2", "--ckpt_path=last"])
        used = resumed.trainer.ckpt_path
        if not (used and Path(used).name.startswith("last") and "version_0" in str(used)):
            missing.append("--ckpt_path last does not resume the previous run's last.ckpt (issue 4)")
    finally:
        os.chdir(cwd)
    return missing


def fit(folder: Path, mnist_root: Path, markers: Path, *extra: str) -> subprocess.Popen:
    callback = (
        f'[{{"class_path": "tests.test_faults.StepMarker", "init_args": {{"folder": "{markers}", "delay": 0.02}}}}]'
    )
    args = [sys.executable, "-m", "project", "fit", f"--config={MNIST}", *fast_args(mnist_root), *TRAIN,
            f"--trainer.callbacks={callback}", *extra]  # fmt: skip
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
    newest = max((folder / "runs").rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    checkpoint = torch.load(newest, weights_only=True)
    assert checkpoint["global_step"] == EPOCHS * STEPS_PER_EPOCH
    return checkpoint["state_dict"]


@pytest.mark.slow  # five fit subprocesses: about 2 minutes on 2 cores
def test_sigkill_and_resume_is_bit_identical(tmp_path, mnist_root):
    probe = tmp_path / "probe"
    probe.mkdir()
    missing = missing_mechanisms(mnist_root, probe)
    if missing:
        pytest.skip("; ".join(missing))

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for folder in (reference, killed):
        (folder / "markers").mkdir(parents=True)
    process = fit(reference, mnist_root, reference / "markers")
    assert process.wait(timeout=300) == 0, finish(process)

    # kill points: random steps, each after the previous one; most are not on an epoch or checkpoint boundary
    rng = random.Random(8)
    total = EPOCHS * STEPS_PER_EPOCH
    kill_steps = sorted(rng.sample(range(2, total - 2), 3))
    assert any(step % STEPS_PER_EPOCH not in (0, STEPS_PER_EPOCH - 1) for step in kill_steps)
    for i, step in enumerate(kill_steps):
        process = fit(killed, mnist_root, killed / "markers", *(["--ckpt_path=last"] if i else []))
        wait_for(killed / "markers" / f"step-{step}", process, timeout=300)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
    process = fit(killed, mnist_root, killed / "markers", "--ckpt_path=last")
    assert process.wait(timeout=300) == 0, finish(process)
    starts = sorted(int(p.read_text()) for p in (killed / "markers").glob("start-*"))
    assert len(starts) == len(kill_steps) + 1 and starts[0] == 0
    assert all(0 < start <= step for start, step in zip(starts[1:], kill_steps, strict=True)), (
        f"a resume restarted: {starts}"
    )

    expected, got = final_weights(reference), final_weights(killed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"weights differ after kill-and-resume: {different}"
