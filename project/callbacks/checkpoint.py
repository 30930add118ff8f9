"""Checkpoints: ``last.ckpt`` refreshed after every validation and every ``every_n_train_steps``; ``--ckpt_path last``
resolved to a given run."""

import os
from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from project.errors import UserError


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that ``save_last`` refreshes ``last.ckpt`` after *every* validation.

    In Lightning 2.6 a monitored ModelCheckpoint writes ``last.ckpt`` only when it has also saved a top-k checkpoint
    in the same step, so after the best epoch ``last.ckpt`` silently stops moving and a resume restarts from the best
    epoch instead of the last one.
    """

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # Lightning defers every_n_train_steps saves while the monitored (validation) metric is absent, i.e. always
        # mid-epoch; refresh last.ckpt anyway (the epoch's last batch is left to the epoch-end refresh)
        n = self._every_n_train_steps
        if n >= 1 and trainer.global_step % n == 0 and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            saved_step = self._last_global_step_saved
            self._refresh_last(trainer)
            self._last_global_step_saved = saved_step  # a top-k save at this step (mid-epoch validation) still runs

    def _refresh_last(self, trainer: "pl.Trainer") -> None:
        # _should_skip_saving_checkpoint is also true when a checkpoint (and so last.ckpt) was saved at this step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def last_checkpoint_of_run(config_files: Iterable[os.PathLike | str], checkpoint_dir: str | None = None) -> str:
    """The ``last.ckpt`` of the run whose saved ``config.yaml`` is among ``config_files`` (the last one given wins).

    A new process writes into a new ``version_N`` folder, so Lightning's own ``ckpt_path="last"`` lookup (in the
    new run's checkpoint folder) finds nothing; the run to resume is named by its config instead:
    ``python -m project fit -c runs/mnist/version_0/config.yaml --ckpt_path last``.
    """
    config_files = [Path(os.fspath(f)) for f in config_files]
    candidates = [Path(checkpoint_dir) / "last.ckpt"] if checkpoint_dir else []
    candidates += [f.parent / "checkpoints" / "last.ckpt" for f in reversed(config_files)]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    given = ", ".join(str(f) for f in config_files) or "none"
    raise UserError(
        f"--ckpt_path last: no checkpoints/last.ckpt next to the given configs ({given}); "
        "pass the run's own config, e.g. -c runs/mnist/version_0/config.yaml, or a checkpoint file path"
    )
