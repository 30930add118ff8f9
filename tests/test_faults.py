"""Faults during a run: non-finite gradients, a failing checkpoint write, Ctrl-C, SIGKILL; and resuming after them."""

import errno
import json
import os
import pickle
import re
import signal as signal_module
import subprocess
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

import project.checkpoint_io
from project.callbacks.nan_guard import NonFiniteGuard
from project.checkpoint_io import SafeCheckpointIO, load_checkpoint
from project.cli import cli_main
from project.errors import UserError
from project.models.nets import MLP
from tests.conftest import fails, fit, run_module
from tests.test_errors import mnist

HIDDEN = "--model.init_args.net.init_args.hidden=[16]"
SHORT = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", HIDDEN]


class NaNAfter(MLP):
    """An MLP whose gradients turn NaN at its ``nan_at``-th training step (1-based); the loss stays finite."""

    def __init__(self, *args, nan_at: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at, self.calls = nan_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        logits = super().forward(x)
        if self.calls == self.nan_at and self.training:
            logits.register_hook(lambda grad: grad * float("nan"))
        return logits


def all_finite(path: Path) -> bool:
    return all(v.isfinite().all() for v in torch.load(path, weights_only=True)["state_dict"].values())


NAN_NET = "--model.init_args.net.class_path=tests.test_faults.NaNAfter"
STEP_LR = ["--model.scheduler=torch.optim.lr_scheduler.StepLR", "--model.scheduler.step_size=1"]
HUGE_LR = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.1", *STEP_LR, "--model.scheduler.gamma=1e30"]


@pytest.mark.parametrize(
    ("extra", "where", "kept"),
    [
        ([NAN_NET, "--model.init_args.net.init_args.nan_at=4"], r"3 \(epoch 0", None),
        ([NAN_NET, "--model.init_args.net.init_args.nan_at=7"], r"6 \(epoch 1", 4),
        (HUGE_LR, r"[5-7] \(epoch 1", 4),
    ],
    ids=["nan_at_step_3", "nan_at_step_6", "huge_learning_rate"],
)
def test_non_finite_gradients_never_reach_a_checkpoint(extra, where, kept, capsys, mnist_root):
    """NaN gradients with a finite loss at epoch 0's last step (nothing saved yet) or in epoch 1, or SGD whose lr jumps
    to 1e29 after epoch 0 (then it stops in epoch 1): stopped before the update, every file on disk finite, the
    message naming a checkpoint only if it exists."""
    line = fails(["fit", *mnist(mnist_root, *SHORT, "--trainer.max_epochs=3", *extra)], capsys)
    assert re.search(rf"gradients are not finite at step {where}\)", line) and "lr" in line, line
    saved = sorted(Path("runs/mnist/version_0/checkpoints").glob("*.ckpt"))
    if kept is None:
        assert saved == [] and "no checkpoint was written" in line
    else:  # epoch 0's best and last.ckpt, finite
        assert len(saved) == 2 and f"last good checkpoint: {saved[-1]}" in line
        assert all(all_finite(path) and torch.load(path, weights_only=True)["global_step"] == kept for path in saved)


def test_fp16_gradient_scaler_is_left_to_skip_non_finite_steps():
    """Under ``16-mixed`` non-finite gradients are the gradient scaler's to skip; under ``bf16-mixed`` they stop it."""
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.tensor([1.0, float("nan")])
    optimizer = torch.optim.SGD([weight], lr=0.1)
    guard = NonFiniteGuard()
    guard.on_before_backward(None, None, torch.tensor(float("nan")))
    for precision, stops in [("16-mixed", False), ("bf16-mixed", True)]:
        plugin = MixedPrecision(precision, "cpu")
        trainer = SimpleNamespace(precision_plugin=plugin, checkpoint_callbacks=[], global_step=3, current_epoch=0)
        message = "training loss is nan and the gradients are not finite at step 3 "
        with pytest.raises(UserError, match=message) if stops else nullcontext():
            guard.on_before_optimizer_step(trainer, None, optimizer)


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
    nan = torch.tensor([1.0, float("nan")])
    with pytest.raises(UserError, match=r"last.ckpt: weights a, b, c are not finite \(NaN/inf\)$"):
        io.save_checkpoint({"state_dict": {"ok": torch.ones(1), **dict.fromkeys("abcd", nan)}}, path)
    monkeypatch.setattr(project.checkpoint_io.torch, "save", failing_save(100))
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert info.value.errno == errno.ENOSPC and path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "no partial file is left behind"


def test_checkpoint_reads_honour_the_device_remote_paths_and_name_what_is_wrong(tmp_path):
    """Tensors go where asked ("meta"), fsspec URLs (memory://) work, an unreadable file is one line saying why."""
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    for mmap in (False, True):
        assert SafeCheckpointIO(mmap).load_checkpoint(path, map_location="meta")["state_dict"]["w"].is_meta
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, "memory://runs/last.ckpt")
    assert torch.equal(load_checkpoint("memory://runs/last.ckpt")["state_dict"]["w"], torch.ones(2))
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"weights": [1.0]}))
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:200])
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")  # a model's bare state_dict
    for name, why in [
        ("weights.pt", "{} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by fit"),
        ("gone.ckpt", "checkpoint not found: {}"),
        ("other.pkl", "{} is not a readable checkpoint (damaged or not a checkpoint); pass a .ckpt from fit"),
        ("cut.ckpt", "{} is not a readable checkpoint (RuntimeError); pass a .ckpt from fit"),
    ]:
        with pytest.raises(UserError) as error:
            load_checkpoint(tmp_path / name)
        assert str(error.value) == why.format(tmp_path / name)
    torch.save({"state_dict": {}, "path": Path("x")}, tmp_path / "hostile.ckpt")  # a pickled class: could run code
    for mmap in (False, True):
        with pytest.raises(UserError, match="^refused to load .*hostile.ckpt: it contains Python objects"):
            load_checkpoint(tmp_path / "hostile.ckpt", mmap)


def test_a_checkpoint_read_is_handed_over_once_under_mmap_and_never_stale(tmp_path):
    """With ``mmap`` the CLI's read is handed to the next load of the same path, once; other loads read the file."""
    path = tmp_path / "last.ckpt"
    for mmap in (False, True):
        io = SafeCheckpointIO(mmap) if mmap else SafeCheckpointIO()
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
        first = io.load_checkpoint(path)
        io.save_checkpoint({"state_dict": {"w": torch.full((2,), 2.0)}}, path)
        again = io.load_checkpoint(path)
        assert (again is first) == mmap and torch.equal(again["state_dict"]["w"], torch.full((2,), 1.0 + (not mmap)))
        assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((2,), 2.0))


def test_disk_full_during_fit_is_one_line_and_keeps_earlier_checkpoints(capsys, mnist_root, monkeypatch):
    real_save, calls = torch.save, []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls.append(1)
        return real_save(obj, f, *args, **kwargs) if len(calls) <= 2 else failing_save(1000)(obj, f)  # epoch 0 ok

    monkeypatch.setattr(project.checkpoint_io.torch, "save", save_then_fill_the_disk)
    line = fails(["fit", *mnist(mnist_root, *SHORT, "--trainer.max_epochs=2")], capsys)
    assert line.startswith("error: disk full while writing") and "earlier files are intact" in line
    checkpoints = Path("runs/mnist/version_0/checkpoints")
    assert len(list(checkpoints.iterdir())) == 2 and torch.load(checkpoints / "last.ckpt")["global_step"] == 4


def test_resumed_run_is_bit_identical_and_last_ckpt_follows_every_epoch(mnist_root):
    """Resumed from an end-of-epoch last.ckpt (dropout, shuffling, augmentation), both loaders end with the weights of
    an uninterrupted run; with lr 0 the best checkpoint stays at epoch 0 while last.ckpt moves every epoch."""
    for loader in ("torchvision", "tensor"):
        common = [*SHORT, "--model.init_args.net.init_args.dropout=0.5", "--data.init_args.augment=standard"]
        common += [f"--data.init_args.loader={loader}", "--trainer.deterministic=true"]
        straight = fit("mnist.yaml", mnist_root, *common, "--trainer.max_epochs=3")
        first = fit("mnist.yaml", mnist_root, *common, "--trainer.max_epochs=1")
        config = Path(first.trainer.log_dir) / "config.yaml"
        resumed = cli_main(["fit", f"--config={config}", "--trainer.max_epochs=3", "--ckpt_path=last"])
        assert resumed.trainer.global_step == straight.trainer.global_step == 12
        a, b = straight.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after resume ({loader})"
    frozen = fit("mnist.yaml", mnist_root, *SHORT, "--trainer.max_epochs=3", "--model.optimizer.lr=0")
    checkpoints = Path(frozen.trainer.log_dir) / "checkpoints"
    assert "epoch=000" in frozen.config_init.fit.checkpoint.best_model_path
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2


class SignalAt(Callback):
    """Sends its own process ``signal`` after step ``at`` (before that step's checkpoints); records start steps."""

    def __init__(self, folder: str, at: int = -1, signal: str = "SIGKILL") -> None:
        self.folder, self.at, self.signal = Path(folder), at, getattr(signal_module, signal)

    def on_train_start(self, trainer, *args) -> None:
        (self.folder / f"start-{os.getpid()}").write_text(str(trainer.global_step))

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signal)


def launch(cwd: Path, folder: Path, *args: str, at: int = -1, signal: str = "SIGKILL") -> subprocess.CompletedProcess:
    """``python -m project fit`` as a process that signals itself after step ``at`` (see :class:`SignalAt`)."""
    folder.mkdir(parents=True)
    init = {"folder": str(folder), "at": at, "signal": signal}
    probe = {"class_path": "tests.test_faults.SignalAt", "init_args": init}
    return run_module("project", "fit", *args, f"--trainer.callbacks=[{json.dumps(probe)}]", cwd=cwd)


def started_at(folder: Path) -> int:
    (start,) = folder.glob("start-*")
    return int(start.read_text())


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, mnist_root):
    """SIGINT after step 3: last.ckpt holds it, exit code 1, the command that resumes; which goes on to step 34."""
    args = mnist(mnist_root, "--trainer.max_epochs=2", "--data.init_args.batch_size=32", HIDDEN)
    done = launch(tmp_path, tmp_path / "probe", *args, at=3, signal="SIGINT")
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "resume with:" in line]
    config, saved = "runs/mnist/version_0/config.yaml", Path("runs/mnist/version_0/checkpoints/last.ckpt")
    resume = f"python -m project fit -c {config} --ckpt_path {saved}"
    assert line == f"interrupted at epoch 0, step 3; saved {saved}; resume with: {resume}"
    assert torch.load(saved, weights_only=True)["global_step"] == 3 and all_finite(saved)
    resumed = cli_main(["fit", "-c", config, f"--ckpt_path={saved}", "--trainer.callbacks=null"])
    assert resumed.trainer.global_step == 34, "resumed at the saved step, not restarted from scratch"


@pytest.mark.processes  # three fit processes
def test_sigkill_mid_epoch_and_resume_is_bit_identical(tmp_path, mnist_root):
    """SIGKILLed after steps 5 and 24 of 51, resumed with `--ckpt_path last` (saved every 3 steps) from steps 3 and 21
    (the tensor loader restores its position): the final weights equal an uninterrupted run's."""
    data = ["--data.init_args.batch_size=32", "--data.init_args.augment=standard", "--data.init_args.loader=tensor"]
    run = [*data, "--trainer.max_epochs=3", "--trainer.limit_val_batches=2", HIDDEN]
    every = "--last_checkpoint.every_n_train_steps=3"
    assert torch.get_num_threads() == 1  # as in the processes (OMP_NUM_THREADS=1): the same order of float additions
    reference = fit("mnist.yaml", mnist_root, *run, every)  # its own checkpoint folder
    assert reference.trainer.global_step == 51
    train = mnist(mnist_root, *run, every, f"--last_checkpoint.dirpath={tmp_path / 'checkpoints'}")
    for i, kill in enumerate([5, 24, None]):
        resume = ["--ckpt_path=last"] if i else []
        done = launch(tmp_path, tmp_path / f"probe-{i}", *train, *resume, at=kill or -1)
        assert done.returncode == (-signal_module.SIGKILL if kill else 0), done.stderr[-3000:]
    assert [started_at(tmp_path / f"probe-{i}") for i in range(3)] == [0, 3, 21]
    got = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == 51
    expected = reference.model.state_dict()
    assert all(torch.equal(expected[k], got["state_dict"][k]) for k in expected), "weights differ after kill-and-resume"
