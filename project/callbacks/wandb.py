"""W&B callbacks: gradient/parameter histograms (``wandb.watch``) and validation/test media.

Both do nothing unless the trainer has a ``WandbLogger``, and log from global rank 0 only.
"""

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class WandbWatch(Callback):
    """``wandb.watch`` the module during fit.

    Args:
        log: ``gradients``, ``parameters``, ``all``, or None for off.
        log_freq: log histograms every this many optimizer steps.
        log_graph: also log the model's graph.
    """

    def __init__(
        self,
        log: Literal["gradients", "parameters", "all"] | None = "gradients",
        log_freq: int = 100,
        log_graph: bool = False,
    ) -> None:
        self.what = log  # not `self.log`: Lightning sets that attribute on callbacks
        self.log_freq = log_freq
        self.log_graph = log_graph

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.what and trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                # idx=0: wandb numbers watched models per process, so a later run in the same process would log
                # under "gradients/graph_1net..." instead of "gradients/net...".
                logger.experiment.watch(
                    pl_module, log=self.what, log_freq=self.log_freq, log_graph=self.log_graph, idx=0
                )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.what and trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                logger.experiment.unwatch(pl_module)


class WandbPredictionMedia(Callback):
    """At the end of validation (every ``every_n_epochs``) and of test: a confusion matrix with class names and a
    table of sample predictions (image, true, predicted, confidence), misclassified first.

    Reads what ``validation_step``/``test_step`` return: ``{"preds", "target", "logits"}``.

    Args:
        every_n_epochs: validation media every this many epochs (0: never); test media always.
        num_samples: rows in the predictions table.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 32) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self._reset()

    def _reset(self) -> None:
        self._preds: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._samples: dict[bool, list[tuple[Tensor, int, int, float]]] = {True: [], False: []}

    def _active(self, trainer: Trainer, stage: str) -> bool:
        if not wandb_loggers(trainer) or trainer.sanity_checking:
            return False
        if stage == "val":
            return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return True

    def _collect(self, outputs: Any, batch: Any) -> None:
        if not isinstance(outputs, dict) or "preds" not in outputs:
            return
        preds, target = outputs["preds"].detach(), outputs["target"].detach()
        self._preds.append(preds)
        self._targets.append(target)
        confidence = outputs["logits"].detach().float().softmax(-1).amax(-1) if "logits" in outputs else None
        for i in range(len(preds)):
            wrong = bool(preds[i] != target[i])
            if len(self._samples[wrong]) < self.num_samples:
                conf = float(confidence[i]) if confidence is not None else float("nan")
                self._samples[wrong].append((batch[0][i].detach().cpu(), int(target[i]), int(preds[i]), conf))

    def _log(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        import wandb

        if not self._preds and trainer.world_size == 1:
            return
        # A fixed-size confusion count, summed over ranks: ranks may hold different numbers of samples
        # (evaluation is unrepeated), which a plain all_gather cannot take. Every rank takes part; rank 0 logs.
        num_classes = int(pl_module.num_classes)
        counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=pl_module.device)
        if self._preds:
            pairs = torch.cat(self._targets).long() * num_classes + torch.cat(self._preds).long()
            counts += torch.bincount(pairs.to(counts.device), minlength=num_classes * num_classes)
        counts = trainer.strategy.reduce(counts, reduce_op="sum").cpu()
        if not trainer.is_global_zero:
            return
        pairs = torch.repeat_interleave(torch.arange(num_classes * num_classes), counts)
        targets, preds = pairs // num_classes, pairs % num_classes
        names = list(getattr(pl_module, "class_names", [])) or [str(i) for i in range(int(targets.max()) + 1)]
        table = wandb.Table(columns=["image", "true", "predicted", "confidence", "correct"])
        rows = (self._samples[True] + self._samples[False])[: self.num_samples]  # misclassified first
        for image, true, pred, conf in rows:
            table.add_data(wandb.Image(_to_unit_range(image)), names[true], names[pred], conf, true == pred)
        media = {
            f"{stage}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=targets.tolist(), preds=preds.tolist(), class_names=names
            ),
            f"{stage}/predictions": table,
            "trainer/global_step": trainer.global_step,
        }
        for logger in wandb_loggers(trainer):
            logger.experiment.log(media)

    @staticmethod
    def _stage(trainer: Trainer) -> str:
        return "test" if trainer.testing else "val"

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active(trainer, self._stage(trainer)):
            self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stage = self._stage(trainer)
        if self._active(trainer, stage):
            self._log(trainer, pl_module, stage)
        self._reset()

    # test collects and logs the same way; the stage comes from the trainer
    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


def _to_unit_range(image: Tensor) -> Tensor:
    """A normalized image scaled to [0, 1] for display (no knowledge of the data set's mean and std needed)."""
    image = image.float()
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)
