"""Faults during a run: non-finite gradients, a failing checkpoint write, Ctrl-C, SIGKILL; and resuming after them."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import project.checkpoint_io
from project.checkpoint_io import SafeCheckpointIO
from project.cli import cli_main
from project.errors import UserError
from project.models.nets import MLP
from tests.conftest import CONFIGS, CSV, QUIET, ROOT, fails, fit

SHORT = [
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--model.init_args.net.init_args.hidden=[16]",
]


class NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward: the loss stays finite while the gradients do not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNAfter(MLP):
    """An MLP whose gradients turn NaN at its ``nan_at``-th training step (1-based); the loss stays finite."""

    def __init__(self, *args, nan_at: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        logits = super().forward(x)
        return NaNGradient.apply(logits) if self.calls == self.nan_at and self.training else logits


def all_finite(path: Path) -> bool:
    return all(v.isfinite().all() for v in torch.load(path, weights_only=True)["state_dict"].values())


@pytest.mark.parametrize(("nan_at", "kept"), [(4, None), (7, 4)])
def test_non_finite_gradients_never_reach_a_checkpoint(nan_at, kept, capsys, mnist_root):
    """NaN gradients with a finite loss, at the last step of epoch 0 (nothing saved yet) or in epoch 1 (epoch 0's
    checkpoints, at step 4, are the last good ones): the run stops before the update, every file on disk is finite,
    and the message names a checkpoint only if it exists."""
    line = fails(
        [
            "fit",
            f"--config={CONFIGS / 'mnist.yaml'}",
            CSV,
            f"--data.init_args.data_dir={mnist_root}",
            *QUIET,
            *SHORT,
            "--trainer.max_epochs=3",
            "--model.init_args.net.class_path=tests.test_faults.NaNAfter",
            f"--model.init_args.net.init_args.nan_at={nan_at}",
        ],
        capsys,
    )
    assert f"gradients are not finite at step {nan_at - 1} (epoch {(nan_at - 1) // 4})" in line and "lr" in line
    saved = sorted(Path("runs/mnist/version_0/checkpoints").glob("*.ckpt"))
    if kept is None:
        assert saved == [] and "no checkpoint was written" in line
        return
    assert len(saved) == 2 and f"last good checkpoint: {saved[-1]}" in line  # the best and last.ckpt
    for path in saved:
        assert all_finite(path) and torch.load(path, weights_only=True)["global_step"] == kept


def test_huge_learning_rate_is_caught(capsys, mnist_root):
    line = fails(
        [
            "fit",
            f"--config={CONFIGS / 'mnist.yaml'}",
            CSV,
            f"--data.init_args.data_dir={mnist_root}",
            *QUIET,
            *SHORT,
            "--trainer.max_epochs=2",
            "--model.optimizer=torch.optim.SGD",
            "--model.optimizer.lr=1e30",
        ],
        capsys,
    )
    assert "are not finite at step" in line
    assert all(all_finite(p) for p in Path("runs/mnist/version_0/checkpoints").glob("*.ckpt"))


def failing_save(after_bytes: int):
    """torch.save that writes ``after_bytes`` of the file and then fails as on a full disk."""

    def save(obj, f, *args, **kwargs):
        f.write(b"\x80" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device", getattr(f, "name", None))

    return save


def test_checkpoint_writes_are_atomic_and_finite(tmp_path, monkeypatch):
    io, path = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    with pytest.raises(UserError, match="weights w are not finite"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    monkeypatch.setattr(project.checkpoint_io.torch, "save", failing_save(100))
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert info.value.errno == errno.ENOSPC and path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "no partial file is left behind"


def test_disk_full_during_fit_is_one_line_and_keeps_earlier_checkpoints(capsys, mnist_root, monkeypatch):
    real_save, calls = torch.save, []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls.append(1)
        return real_save(obj, f, *args, **kwargs) if len(calls) <= 2 else failing_save(1000)(obj, f)  # epoch 0 ok

    monkeypatch.setattr(project.checkpoint_io.torch, "save", save_then_fill_the_disk)
    line = fails(
        [
            "fit",
            f"--config={CONFIGS / 'mnist.yaml'}",
            CSV,
            f"--data.init_args.data_dir={mnist_root}",
            *QUIET,
            *SHORT,
            "--trainer.max_epochs=2",
        ],
        capsys,
    )
    assert line.startswith("error: disk full while writing") and "earlier files are intact" in line
    checkpoints = Path("runs/mnist/version_0/checkpoints")
    assert len(list(checkpoints.iterdir())) == 2 and torch.load(checkpoints / "last.ckpt")["global_step"] == 4


def test_resumed_run_is_bit_identical_and_last_ckpt_follows_every_epoch(mnist_root):
    """Dropout, shuffling and augmentation draw from the RNG: a run resumed from an end-of-epoch last.ckpt ends with
    the weights of an uninterrupted one (both loaders). lr=0 after epoch 0 would freeze the best checkpoint; last.ckpt
    still moves every epoch."""
    for loader in ("torchvision", "tensor"):
        common = [
            *SHORT,
            "--model.init_args.net.init_args.dropout=0.5",
            "--data.init_args.augment=standard",
            f"--data.init_args.loader={loader}",
            "--trainer.deterministic=true",
        ]
        straight = fit("mnist.yaml", mnist_root, *common, "--trainer.max_epochs=3")
        first = fit("mnist.yaml", mnist_root, *common, "--trainer.max_epochs=1")
        resumed = cli_main(
            [
                "fit",
                f"--config={Path(first.trainer.log_dir) / 'config.yaml'}",
                "--trainer.max_epochs=3",
                "--ckpt_path=last",
            ]
        )
        assert resumed.trainer.global_step == straight.trainer.global_step == 12
        a, b = straight.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after resume ({loader})"
    frozen = fit("mnist.yaml", mnist_root, *SHORT, "--trainer.max_epochs=3", "--model.optimizer.lr=0")
    checkpoints = Path(frozen.trainer.log_dir) / "checkpoints"
    assert "epoch=000" in frozen.config_init.fit.checkpoint.best_model_path
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2


class StepMarker(Callback):
    """Touches ``<folder>/step-<N>`` after each training step (slowed down, so a signal lands mid-run) and records
    the step training started from."""

    def __init__(self, folder: str, delay: float = 0.05) -> None:
        self.folder, self.delay = Path(folder), delay

    def on_train_start(self, trainer, *args) -> None:
        (self.folder / f"start-{os.getpid()}").write_text(str(trainer.global_step))

    def on_train_batch_end(self, trainer, *args) -> None:
        time.sleep(self.delay)
        (self.folder / f"step-{trainer.global_step}").touch()


def launch(cwd: Path, markers: Path, *args: str, delay: float = 0.05) -> subprocess.Popen:
    markers.mkdir(parents=True)
    marker = (
        f'{{"class_path": "tests.test_faults.StepMarker", "init_args": {{"folder": "{markers}", "delay": {delay}}}}}'
    )
    command = [sys.executable, "-m", "project", "fit", *args, f"--trainer.callbacks=[{marker}]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(
                f"{path} never appeared (rc={process.returncode}):\n{process.communicate()[1][-3000:]}"
            )
        time.sleep(0.05)


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, mnist_root):
    args = [
        f"--config={CONFIGS / 'mnist.yaml'}",
        CSV,
        f"--data.init_args.data_dir={mnist_root}",
        *QUIET,
        "--trainer.max_epochs=2",
        "--data.init_args.batch_size=32",
        "--model.init_args.net.init_args.hidden=[16]",
    ]
    process = launch(tmp_path, tmp_path / "markers", *args)
    wait_for(tmp_path / "markers" / "step-3", process)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode != 0
    (line,) = [line for line in err.splitlines() if "resume with:" in line]
    saved = Path("runs/mnist/version_0/checkpoints/last.ckpt")
    assert f"saved {saved}; resume with: python -m project fit -c runs/mnist/version_0/config.yaml" in line
    step = torch.load(saved, weights_only=True)["global_step"]
    assert 3 <= step < 34 and all_finite(saved)
    resumed = cli_main(
        ["fit", "-c", "runs/mnist/version_0/config.yaml", f"--ckpt_path={saved}", "--trainer.callbacks=null"]
    )
    assert resumed.trainer.global_step == 34, "resumed at the saved step, not restarted from scratch"


@pytest.mark.slow  # four fit processes
def test_sigkill_at_random_steps_and_resume_is_bit_identical(tmp_path, mnist_root):
    """SIGKILLed mid-epoch at random steps and resumed each time with `--ckpt_path last` from a shared checkpoint
    folder (last.ckpt refreshed every 3 steps; the tensor loader restores its position): each resume starts from a
    checkpoint at most 3 steps old (the kill may land before the save of the step it waited for), and the final
    weights equal those of an uninterrupted run."""
    epochs, every = 3, 3
    train = [
        f"--config={CONFIGS / 'mnist.yaml'}",
        CSV,
        f"--data.init_args.data_dir={mnist_root}",
        *QUIET,
        f"--trainer.max_epochs={epochs}",
        "--data.init_args.batch_size=32",
        "--data.init_args.augment=standard",
        "--data.init_args.loader=tensor",
        "--model.init_args.net.init_args.hidden=[16]",
        "--trainer.limit_val_batches=2",
        f"--last_checkpoint.every_n_train_steps={every}",
        f"--last_checkpoint.dirpath={tmp_path / 'checkpoints'}",
    ]
    assert torch.get_num_threads() == 1  # as in the processes (OMP_NUM_THREADS=1): the same order of float additions
    reference = fit("mnist.yaml", mnist_root, *train[3:-1])  # its own checkpoint folder
    total = reference.trainer.global_step
    kills = sorted(random.Random(8).sample(range(every + 1, total - 2), 2))
    for i, step in enumerate([*kills, None]):
        process = launch(tmp_path, tmp_path / f"markers-{i}", *train, *(["--ckpt_path=last"] if i else []), delay=0.02)
        if step is None:
            assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
            break
        wait_for(tmp_path / f"markers-{i}" / f"step-{step}", process)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    starts = [int(next((tmp_path / f"markers-{i}").glob("start-*")).read_text()) for i in range(3)]
    assert starts[0] == 0 and all(k - every <= s <= k + 2 for s, k in zip(starts[1:], kills, strict=True)), (
        starts,
        kills,
    )
    got = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == total
    expected = reference.model.state_dict()
    assert all(torch.equal(expected[k], got["state_dict"][k]) for k in expected), "weights differ after kill-and-resume"
