"""Stop training at the first non-finite loss, before it reaches the weights or a checkpoint."""

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from project.errors import UserError


class NonFiniteLoss(UserError):
    pass


class NonFiniteLossGuard(Callback):
    """Raises :class:`NonFiniteLoss` when the training loss is NaN or infinite, before ``backward``.

    The optimizer never steps on it, so the weights in memory and every checkpoint on disk stay finite; the run
    ends with one line naming the step, the value and the usual causes, and the last good checkpoint is kept.
    """

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        value = float(loss.detach())
        if math.isfinite(value):
            return
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        kept = f"; last good checkpoint: {last}" if last else "; no checkpoint was written"
        raise NonFiniteLoss(
            f"training loss is {value} at step {trainer.global_step} (epoch {trainer.current_epoch}), training "
            f"stopped before the weights were updated{kept}. Likely causes: learning rate too high (lower "
            f"--model.init_args.optimizer.init_args.lr), bad data (NaN/Inf in a batch), or fp16 overflow (use "
            f"--trainer.precision bf16-mixed or 32-true)"
        )


class EmptyEpochCheck(Callback):
    """A training set smaller than one batch with ``drop_last`` trains on nothing: say so instead."""

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning skips the whole fit loop (no on_train_start) when an epoch has no batches.
        if trainer.num_training_batches != 0 or trainer.limit_train_batches == 0 or trainer.global_step > 0:
            return
        loader: Any = trainer.train_dataloader
        size = len(getattr(loader, "dataset", ())) if loader is not None else 0
        batch_size = getattr(loader, "batch_size", None)
        raise UserError(
            f"the training set has {size} samples, fewer than one batch of {batch_size} with drop_last, so an epoch "
            f"has no batches; lower --data.init_args.batch_size to at most {size} or use more data"
        )
