"""Ctrl-C (SIGINT) during fit: finish the current step, save a checkpoint, say how to resume, exit non-zero."""

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class GracefulInterrupt(Callback):
    """The first Ctrl-C asks the run to stop at the next batch boundary; a second one stops it at once.

    At the boundary the full training state is saved as ``last.ckpt`` next to the run's other checkpoints (written
    atomically by the CLI's checkpoint IO) and Lightning's own shutdown follows (``trainer.interrupted``, exit 1).
    """

    def __init__(self) -> None:
        self.requested = False
        self.saved: Path | None = None
        self._previous: Any = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.requested, self.saved = False, None
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: no more waiting
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)", file=sys.stderr)

    def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any) -> None:
        if self.requested:
            self._save(trainer)
            raise KeyboardInterrupt

    def on_validation_batch_end(self, trainer: "pl.Trainer", *args: Any) -> None:
        if self.requested and not trainer.sanity_checking:
            raise KeyboardInterrupt

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        if self.saved is None and not trainer.sanity_checking and trainer.global_step > 0:
            self._save(trainer)
        if self.saved is not None and trainer.is_global_zero:
            print(
                f"interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; saved {self.saved}; "
                f"resume with: python -m project fit -c {resume_config(trainer)} --ckpt_path {self.saved}",
                file=sys.stderr,
            )

    def _save(self, trainer: "pl.Trainer") -> None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir)
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path


def resume_config(trainer: "pl.Trainer") -> str:
    config = Path(trainer.log_dir or ".") / "config.yaml"
    return str(config) if config.is_file() else "<your config>"
