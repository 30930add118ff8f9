"""Ctrl-C during fit: finish the current step, save ``last.ckpt``, say how to resume, exit non-zero.

Lightning alone stops wherever the signal lands and saves nothing; its ``OnExceptionCheckpoint`` saves mid-step
(possibly half an optimizer update) and deletes the file again at teardown.
"""

import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class GracefulInterrupt(Callback):
    """The first Ctrl-C stops the run at the next batch boundary, a second one at once; at the boundary the full
    training state is saved as ``last.ckpt`` in the run's ``checkpoints/`` and Lightning's own shutdown follows."""

    def __init__(self) -> None:
        self.requested, self.saved, self.previous = False, None, None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.requested, self.saved = False, None
            self.previous = signal.signal(signal.SIGINT, self.on_sigint)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)", file=sys.stderr)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.requested:
            self.save(trainer)
            raise KeyboardInterrupt

    def on_validation_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.requested and not trainer.sanity_checking:
            raise KeyboardInterrupt

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        if self.saved is None and not trainer.sanity_checking and trainer.global_step > 0:
            self.save(trainer)
        if self.saved is not None and trainer.is_global_zero:
            config = Path(trainer.log_dir or ".") / "config.yaml"
            print(
                f"interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; saved {self.saved}; "
                f"resume with: python -m project fit -c {config if config.is_file() else '<your config>'} "
                f"--ckpt_path {self.saved}",
                file=sys.stderr,
            )

    def save(self, trainer: Trainer) -> None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        self.saved = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(self.saved)
