"""One LightningModule for image classification: loss, metrics, logging and optimizer wiring.

The architecture lives in ``net`` (any ``nn.Module``); nothing here knows which data set it is trained on.
"""

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from project.errors import UserError


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


class ImageClassifier(LightningModule):
    """Classifies images with ``net``, trained with cross-entropy.

    Args:
        net: the network; it maps a batch of images to logits of shape (N, num_classes).
        num_classes: linked from the data module by the CLI.
        class_names: linked from the data module; used by predictions and loggers.
        optimizer: any ``torch.optim`` class with its init args (in YAML: class_path + init_args).
            Weight decay is never applied to biases and normalization weights (any parameter with ndim <= 1).
        scheduler: any ``torch.optim.lr_scheduler`` class with its init args, or None.
        scheduler_interval: step the scheduler every ``epoch`` or every ``step`` (optimizer step).
        label_smoothing: cross-entropy label smoothing.
        class_weights: per-class weights of the cross-entropy (e.g. inverse class frequencies for imbalanced data).
        channels_last: run convolutions in NHWC memory layout (faster on CPUs and tensor-core GPUs).
        compile: ``torch.compile`` the net (``true``, or a dict of ``torch.compile`` arguments); off by default.
        tta_flip: at validation and test, average the logits of the images and of their horizontal mirror images.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        class_names: Sequence[str] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        class_weights: Sequence[float] | None = None,
        compile: bool | dict[str, Any] = False,
        tta_flip: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Objects (a net built in Python, an optimizer class) can't be saved as plain data: keep them out of the
        # checkpoint, which then loads with weights_only. Under the CLI these arrive as config dicts and stay.
        for key in [k for k, v in self.hparams.items() if isinstance(v, nn.Module) or callable(v)]:
            self.hparams.pop(key)
        self.channels_last = channels_last
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        if class_weights is not None and len(class_weights) != num_classes:
            raise UserError(f"class_weights needs {num_classes} values (one per class), got {len(class_weights)}")
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.tta_flip = tta_flip
        self.compile_options = ({} if compile is True else compile) if compile else None

        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes > 10:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        collection = MetricCollection(metrics)
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        # Mean loss over samples (not over per-process batch means), so it is exact under DDP too.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    @property
    def backbone(self) -> nn.Module | None:
        """The net's ``backbone`` when it has one: what Lightning's ``BackboneFinetuning`` freezes and unfreezes."""
        return getattr(self.net, "backbone", None)

    def setup(self, stage: str) -> None:
        if self.compile_options is not None and self.net._compiled_call_impl is None:
            from project.models.speed import compile_net

            compile_net(self.net, self.compile_options)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _shared_step(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch[0], batch[1]
        logits = (self(x) + self(x.flip(-1))) / 2 if self.tta_flip and not self.training else self(x)
        return self.criterion(logits.float(), y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, y = self._shared_step(batch)
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def on_train_start(self) -> None:
        # Sanity-check batches must not count towards the best validation accuracy.
        self.val_acc_best.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        loss, logits, y = self._shared_step(batch)
        self.val_metrics.update(logits, y)
        self.val_loss.update(loss, weight=y.numel())
        return {"preds": logits.argmax(dim=-1), "target": y, "logits": logits.detach()}  # for callbacks (media)

    def on_validation_epoch_end(self) -> None:
        values = {**self.val_metrics.compute(), "val/loss": self.val_loss.compute()}  # synced by torchmetrics
        self.val_metrics.reset()
        self.val_loss.reset()
        self.log_dict(values, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        loss, logits, y = self._shared_step(batch)
        self.test_metrics.update(logits, y)
        self.test_loss.update(loss, weight=y.numel())
        return {"preds": logits.argmax(dim=-1), "target": y, "logits": logits.detach()}

    def on_test_epoch_end(self) -> None:
        self.log_dict({**self.test_metrics.compute(), "test/loss": self.test_loss.compute()})
        self.test_metrics.reset()
        self.test_loss.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(x).float().softmax(dim=-1)
        return {"preds": probs.argmax(dim=-1), "probs": probs}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay only on weights with ndim > 1 (convs, linears), not on biases and norm scales."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _schedule_length(self) -> dict[str, int]:
        """Fill a one-cycle style ``total_steps`` left unset with the run's real number of optimizer steps."""
        given = getattr(self.scheduler, "keywords", None)
        if given is None:  # a plain class or function, not a partial from the CLI
            params = inspect.signature(self.scheduler).parameters
            given = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        if "total_steps" in given and given["total_steps"] is None and given.get("epochs") is None:
            return {"total_steps": int(self.trainer.estimated_stepping_batches)}
        return {}

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameter_groups())
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer, **self._schedule_length())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "monitor": "val/loss"},
        }
