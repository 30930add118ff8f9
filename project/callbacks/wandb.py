"""W&B callbacks (each idle without a ``WandbLogger``; rank 0 logs): histograms, a classifier's media, the run id."""

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class WandbRunId(Callback):
    """The W&B run id in every checkpoint (``wandb_run_id``): a fit resumed from it continues the run."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in wandb_loggers(trainer):
            if getattr(logger, "run_id", None):  # not .experiment: that would start a finished run again
                checkpoint["wandb_run_id"] = logger.run_id


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
        self.what, self.log_freq, self.log_graph = log, log_freq, log_graph  # `what`: Lightning sets `self.log`
        self.runs: list[Any] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.runs = []
        if self.what and trainer.is_global_zero:
            for logger in wandb_loggers(trainer):
                self.runs.append(logger.experiment)
                # idx=0: else a later run in this process logs "gradients/graph_1net..." (wandb counts per process)
                logger.experiment.watch(
                    pl_module, log=self.what, log_freq=self.log_freq, log_graph=self.log_graph, idx=0
                )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in wandb_loggers(trainer) if self.runs else ():
            if logger.experiment in self.runs:  # not a run started again after a SLURM requeue signal
                logger.experiment.unwatch(pl_module)


class WandbPredictionMedia(Callback):
    """After validation and test: a confusion matrix and a table of sample predictions, misclassified first, from
    what ``validation_step``/``test_step`` return (``{"preds", "target", "logits"}``; counts summed over DDP).

    Args:
        every_n_epochs: validation media every this many epochs (0: never); test media always.
        num_samples: rows in the predictions table.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 32) -> None:
        self.every_n_epochs, self.num_samples = every_n_epochs, num_samples
        self.confusion: MulticlassConfusionMatrix | None = None
        self.samples: dict[bool, list[tuple[Tensor, int, int, float]]] = {True: [], False: []}

    def active(self, trainer: Trainer) -> bool:
        classifier = hasattr(trainer.lightning_module, "class_names")  # other models have no classes to show
        if not wandb_loggers(trainer) or trainer.sanity_checking or not classifier:
            return False
        return trainer.testing or (self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active(trainer):
            return
        self.confusion = MulticlassConfusionMatrix(pl_module.num_classes).to(pl_module.device)
        self.samples = {True: [], False: []}

    def on_validation_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, *_: Any) -> None:
        if not self.active(trainer) or not isinstance(outputs, dict) or "preds" not in outputs:
            return
        preds, target = outputs["preds"], outputs["target"]
        self.confusion.update(preds, target)
        confidence = outputs["logits"].float().softmax(-1).amax(-1)
        for i in range(len(preds)):
            wrong = bool(preds[i] != target[i])
            if len(self.samples[wrong]) < self.num_samples:
                self.samples[wrong].append((batch[0][i].cpu(), int(target[i]), int(preds[i]), float(confidence[i])))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active(trainer):
            return
        import wandb

        counts = self.confusion.compute().flatten().cpu()  # every rank takes part in the sum; rank 0 logs
        if not trainer.is_global_zero:
            return
        n = pl_module.num_classes
        pairs = torch.repeat_interleave(torch.arange(n * n), counts)
        names = list(pl_module.class_names)
        table = wandb.Table(columns=["image", "true", "predicted", "confidence", "correct"])
        for image, true, pred, conf in (self.samples[True] + self.samples[False])[: self.num_samples]:
            table.add_data(wandb.Image(display(image)), names[true], names[pred], conf, true == pred)
        stage = "test" if trainer.testing else "val"
        media = {
            f"{stage}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=(pairs // n).tolist(), preds=(pairs % n).tolist(), class_names=names
            ),
            f"{stage}/predictions": table,
            "trainer/global_step": trainer.global_step,
        }
        for logger in wandb_loggers(trainer):
            logger.experiment.log(media)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


def display(image: Tensor) -> Any:
    """A uint8 or [0, 1] float (C, H, W) image as an HWC uint8 array for ``wandb.Image``."""
    image = image if image.dtype == torch.uint8 else (image.float().clamp(0, 1) * 255).to(torch.uint8)
    return image.permute(1, 2, 0).squeeze(-1).numpy()
