"""Stop at the first non-finite gradient, before the optimizer uses it (Lightning's ``detect_anomaly`` is too slow)."""

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from project.errors import UserError


class NonFiniteGuard(Callback):
    """A one-line error before an optimizer step with NaN/inf gradients: weights stay finite. ``16-mixed``: left to
    the gradient scaler, which skips such steps."""

    def __init__(self) -> None:
        self.loss: Tensor | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self.loss = loss.detach()  # kept for the message; checked with the gradients (the same on every rank)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or torch.nn.utils.get_total_norm(grads).isfinite():
            return
        saved = [Path(p) for c in trainer.checkpoint_callbacks for p in (c.best_model_path, c.last_model_path) if p]
        saved = sorted((p for p in saved if p.is_file()), key=lambda p: p.stat().st_mtime)
        kept = f"last good checkpoint: {saved[-1]}" if saved else "no checkpoint was written"
        raise UserError(
            f"training loss is {float(self.loss)} and the gradients are not finite at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); stopped before the weights were updated; {kept}. Likely causes: "
            f"learning rate too high (lower --model.optimizer.lr), bad data (NaN/Inf in a batch), or fp16 overflow "
            f"(use --trainer.precision bf16-mixed or 32-true)"
        )
