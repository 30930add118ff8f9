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
from tests.conftest import CONFIGS, CSV, QUIET, fails, fit, run_module

HIDDEN = "--model.init_args.net.init_args.hidden=[16]"
SHORT = ["--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2", HIDDEN]


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


def mnist(data_dir: Path, *extra: str) -> list[str]:
    """The options of ``fit`` on the MNIST config, quiet, with CSV logs, and ``extra``."""
    return [f"--config={CONFIGS / 'mnist.yaml'}", CSV, f"--data.init_args.data_dir={data_dir}", *QUIET, *extra]


def all_finite(path: Path) -> bool:
    return all(v.isfinite().all() for v in torch.load(path, weights_only=True)["state_dict"].values())


def only_good_checkpoints_kept(line: str, step: int | None) -> None:
    """None saved (``step`` None) and the message says so; or epoch 0's best and last.ckpt, finite, from ``step``,
    and the message names the last one."""
    saved = sorted(Path("runs/mnist/version_0/checkpoints").glob("*.ckpt"))
    if step is None:
        assert saved == [] and "no checkpoint was written" in line
        return
    assert len(saved) == 2 and f"last good checkpoint: {saved[-1]}" in line
    for path in saved:
        assert all_finite(path) and torch.load(path, weights_only=True)["global_step"] == step


@pytest.mark.parametrize(("nan_at", "kept"), [(4, None), (7, 4)])
def test_non_finite_gradients_never_reach_a_checkpoint(nan_at, kept, capsys, mnist_root):
    """NaN gradients with a finite loss, at the last step of epoch 0 (nothing saved yet) or in epoch 1 (epoch 0's
    checkpoints, at step 4, are the last good ones): the run stops before the update, every file on disk is finite,
    and the message names a checkpoint only if it exists."""
    net = [
        "--model.init_args.net.class_path=tests.test_faults.NaNAfter",
        f"--model.init_args.net.init_args.nan_at={nan_at}",
    ]
    line = fails(["fit", *mnist(mnist_root, *SHORT, "--trainer.max_epochs=3", *net)], capsys)
    assert f"gradients are not finite at step {nan_at - 1} (epoch {(nan_at - 1) // 4})" in line and "lr" in line
    only_good_checkpoints_kept(line, kept)


def test_fp16_gradient_scaler_is_left_to_skip_non_finite_steps():
    """Under ``16-mixed`` (a gradient scaler, as on a GPU) non-finite gradients are the scaler's to skip, not an
    error; under ``bf16-mixed`` (no scaler) the same gradients stop the run."""
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.tensor([1.0, float("nan")])
    optimizer = torch.optim.SGD([weight], lr=0.1)
    guard = NonFiniteGuard()
    guard.on_before_backward(None, None, torch.tensor(float("nan")))
    for precision, stops in [("16-mixed", False), ("bf16-mixed", True)]:
        trainer = SimpleNamespace(
            precision_plugin=MixedPrecision(precision, "cpu"), checkpoint_callbacks=[], global_step=3, current_epoch=0
        )
        message = "training loss is nan and the gradients are not finite at step 3 "
        with pytest.raises(UserError, match=message) if stops else nullcontext():
            guard.on_before_optimizer_step(trainer, None, optimizer)


def test_huge_learning_rate_is_caught(capsys, mnist_root):
    """SGD whose learning rate jumps to 1e29 after epoch 0 (StepLR): training diverges in epoch 1 and stops at the
    first non-finite gradients, leaving epoch 0's checkpoints as they were and naming the last one."""
    step_lr = ["--model.scheduler=torch.optim.lr_scheduler.StepLR", "--model.scheduler.step_size=1"]
    sgd = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.1", *step_lr, "--model.scheduler.gamma=1e30"]
    line = fails(["fit", *mnist(mnist_root, *SHORT, "--trainer.max_epochs=3", *sgd)], capsys)
    assert re.search(r"gradients are not finite at step [5-7] \(epoch 1\)", line), line
    only_good_checkpoints_kept(line, 4)


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
    """Tensors go where asked (a GPU run's checkpoint read on a CPU machine; "meta" here), fsspec URLs (s3://, gs://;
    memory:// here) through Lightning's remote write and read, and a file that cannot be read is named in one line
    saying why: missing, a pickle of something else, or damaged (a truncated download)."""
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
    """With ``mmap`` the file read (by the CLI) is handed to the next load of the same path, once; otherwise, and
    after that, every load reads the file as it is now."""
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
    """Sends its own process ``signal`` right after training step ``at`` (before the checkpoints of that step:
    Lightning runs ModelCheckpoint's hooks last), as a Ctrl-C or a crash would at a known step; records the step each
    start began from in ``<folder>/start-<pid>``."""

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
    """SIGINT, as Ctrl-C sends it, after step 3: the step ends, last.ckpt holds it, exit code 1 and the command that
    resumes; the resumed run goes on from there to the end (2 epochs of 17 steps)."""
    args = mnist(mnist_root, "--trainer.max_epochs=2", "--data.init_args.batch_size=32", HIDDEN)
    done = launch(tmp_path, tmp_path / "probe", *args, at=3, signal="SIGINT")
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "resume with:" in line]
    saved = Path("runs/mnist/version_0/checkpoints/last.ckpt")
    assert line == (
        f"interrupted at epoch 0, step 3; saved {saved}; resume with: python -m project fit -c "
        f"runs/mnist/version_0/config.yaml --ckpt_path {saved}"
    )
    assert torch.load(saved, weights_only=True)["global_step"] == 3 and all_finite(saved)
    resumed = cli_main(
        ["fit", "-c", "runs/mnist/version_0/config.yaml", f"--ckpt_path={saved}", "--trainer.callbacks=null"]
    )
    assert resumed.trainer.global_step == 34, "resumed at the saved step, not restarted from scratch"


@pytest.mark.processes  # three fit processes
def test_sigkill_mid_epoch_and_resume_is_bit_identical(tmp_path, mnist_root):
    """SIGKILLed mid-epoch twice (after steps 5 and 24 of 51) and resumed each time with `--ckpt_path last` from a
    shared checkpoint folder (last.ckpt refreshed every 3 steps; the tensor loader restores its position): each
    resume starts from the newest checkpoint before the kill (steps 3 and 21: the save of step 24 never happened),
    and the final weights equal those of an uninterrupted run."""
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
