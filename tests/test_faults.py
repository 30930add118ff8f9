"""Faults during a run: a non-finite loss, a failing checkpoint write, Ctrl-C."""

import errno
import math
import os
import re
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
from project.models.nets import MLP
from tests.conftest import CONFIGS, ROOT, fast_args

MNIST = str(CONFIGS / "mnist.yaml")
SHORT = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", "--test_after_fit=false",
         "--model.init_args.net.init_args.hidden=[16]"]  # fmt: skip


class NaNAfter(MLP):
    """An MLP whose logits turn NaN on its ``nan_at``-th training forward pass (1-based)."""

    def __init__(self, *args, nan_at: int = 6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at:
                return logits * float("nan")
        return logits


def all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(capsys, mnist_root):
    # 4 steps per epoch: epoch 0 ends with checkpoints; the 6th training step (global step 5) produces NaN
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={MNIST}", *fast_args(mnist_root), *SHORT, "--trainer.max_epochs=3",
                  "--model.init_args.net.class_path=tests.test_faults.NaNAfter",
                  "--model.init_args.net.init_args.nan_at=6"])  # fmt: skip
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert "training loss is nan at step 5 (epoch 1)" in line
    assert "learning rate too high" in line and "bad data" in line and "fp16 overflow" in line
    checkpoints = Path("runs/mnist/version_0/checkpoints")
    assert f"last good checkpoint: {checkpoints / 'last.ckpt'}" in line
    saved = sorted(checkpoints.glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=000-val_acc=" + saved[0].name.split("=")[-1], "last.ckpt"]
    for path in saved:
        assert all_finite(path)
        assert torch.load(path, weights_only=True)["global_step"] == 4  # the end of epoch 0, nothing later


def test_huge_learning_rate_is_caught(capsys, mnist_root):
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={MNIST}", *fast_args(mnist_root), *SHORT, "--trainer.max_epochs=2",
                  "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1e30"])  # fmt: skip
    line = one_error_line(capsys)
    assert re.search(r"training loss is (nan|inf) at step [1-7] ", line), line
    for path in Path("runs/mnist/version_0/checkpoints").glob("*.ckpt"):
        assert all_finite(path)


# ---- atomic checkpoints ----------------------------------------------------------------------------------------
def failing_torch_save(after_bytes: int):
    """torch.save that writes ``after_bytes`` of the file and then fails as on a full disk."""

    def save(obj, f, *args, **kwargs):
        f.write(b"\x80" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device", getattr(f, "name", None))

    return save


def test_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    monkeypatch.setattr(project.checkpoint_io.torch, "save", failing_torch_save(100))
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "no partial file is left behind"
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_disk_full_during_fit_is_one_line_and_keeps_earlier_checkpoints(capsys, mnist_root, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # epoch 0: best and last
            return real_save(obj, f, *args, **kwargs)
        return failing_torch_save(1000)(obj, f)

    monkeypatch.setattr(project.checkpoint_io.torch, "save", save_then_fill_the_disk)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={MNIST}", *fast_args(mnist_root), *SHORT, "--trainer.max_epochs=2"])
    assert exit_info.value.code == 2
    line = one_error_line(capsys)
    assert line.startswith("error: disk full while writing") and "earlier files are intact" in line
    checkpoints = Path("runs/mnist/version_0/checkpoints")
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["epoch"] == 0


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------
class StepMarker(Callback):
    """Writes ``<folder>/step-<N>`` after each training step and slows steps down, so a signal lands mid-run."""

    def __init__(self, folder: str, delay: float = 0.05) -> None:
        self.folder = Path(folder)
        self.delay = delay

    def on_train_start(self, trainer, *args) -> None:
        (self.folder / f"start-{os.getpid()}").write_text(str(trainer.global_step))

    def on_train_batch_end(self, trainer, *args) -> None:
        time.sleep(self.delay)
        (self.folder / f"step-{trainer.global_step}").touch()


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"{path} never appeared (rc={process.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, mnist_root):
    markers = tmp_path / "markers"
    markers.mkdir()
    args = [sys.executable, "-m", "project", "fit", f"--config={MNIST}", *fast_args(mnist_root),
            "--trainer.max_epochs=2", "--data.init_args.batch_size=32", "--test_after_fit=false",
            "--model.init_args.net.init_args.hidden=[16]",
            f'--trainer.callbacks=[{{"class_path": "tests.test_faults.StepMarker", '
            f'"init_args": {{"folder": "{markers}"}}}}]']  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(markers / "step-3", process)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    resume_lines = [line for line in err.splitlines() if "resume with:" in line]
    assert len(resume_lines) == 1, err[-3000:]
    saved = tmp_path / "runs" / "mnist" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"saved {saved.relative_to(tmp_path)}" in resume_lines[0]
    assert "--config runs/mnist/version_0/config.yaml" in resume_lines[0].replace("-c ", "--config ")
    checkpoint = torch.load(saved, weights_only=True)
    step = checkpoint["global_step"]
    assert 3 <= step < 34 and all_finite(saved)

    # resume from it in-process, as the message says: training goes on from that step to the end
    os.chdir(tmp_path)
    cli = cli_main(["fit", "--config=runs/mnist/version_0/config.yaml", f"--ckpt_path={saved}",
                    "--trainer.callbacks=null"])  # fmt: skip
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 2
    assert cli.trainer.global_step == 34, "resumed at the saved step, not restarted from scratch"
    assert not math.isnan(float(cli.trainer.callback_metrics["val/acc"]))
