"""The LightningModule of image classification: preprocessing, loss, metrics, logging and optimizer wiring."""

import importlib.util
import inspect
import shutil
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from project.errors import UserError, require


def parameter_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Weight decay only on weights with ndim > 1 (convs, linears), not on biases and norm scales."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


class ImageClassifier(LightningModule):
    """Classifies raw images (uint8 in [0, 255] or float in [0, 1], N x C x H x W) with ``net`` after normalizing
    them with ``mean`` and ``std`` itself, so a checkpoint or export needs no outside preprocessing; cross-entropy.

    Args:
        net: the network; it maps a batch of normalized images to logits of shape (N, num_classes).
        num_classes, class_names, image_shape, mean, std: linked from the data module by the CLI.
        optimizer: any ``torch.optim`` class with its init args; no weight decay on parameters with ndim <= 1.
        scheduler: any ``torch.optim.lr_scheduler`` class with its init args, or None; an unset ``total_steps``
            (``OneCycleLR``) is filled with the run's number of optimizer steps.
        scheduler_interval: step the scheduler every ``epoch`` or every ``step`` (optimizer step).
        label_smoothing: cross-entropy label smoothing.
        class_weights: per-class weights of the cross-entropy (e.g. inverse class frequencies for imbalanced data).
        channels_last: run convolutions in NHWC memory layout (faster on CPUs and tensor-core GPUs).
        compile: ``torch.compile`` the net (``true``, or a dict of ``torch.compile`` arguments); off by default.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        class_names: Sequence[str] | None = None,
        image_shape: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        require(num_classes >= 2, f"num_classes must be at least 2, got {num_classes}")
        require(0 <= label_smoothing < 1, f"--model.label_smoothing must be in [0, 1), got {label_smoothing}")
        require(
            class_weights is None or len(class_weights) == num_classes,
            f"--model.class_weights needs {num_classes} values (one per class), got {len(class_weights or [])}",
        )
        # objects (a net built in Python, an optimizer function) stay out of the checkpoint, which then loads with
        # weights_only; under the CLI they arrive as config dicts and stay
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
            self.save_hyperparameters()
        for key in [k for k, v in self.hparams.items() if isinstance(v, nn.Module) or callable(v)]:
            self.hparams.pop(key)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.num_classes, self.channels_last = num_classes, channels_last
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.register_buffer("mean", torch.tensor(mean or [0.0]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0]).view(1, -1, 1, 1), persistent=False)
        self.optimizer, self.scheduler, self.scheduler_interval = optimizer, scheduler, scheduler_interval
        self.lr: float | None = None  # set by Lightning's LearningRateFinder: the lr, and a one-cycle max_lr
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.compile_options = ({} if compile is True else compile) if compile else None
        if image_shape:  # the model summary then shows input/output sizes and FLOPs
            self.example_input_array = torch.zeros(1, *image_shape, dtype=torch.uint8)
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        if num_classes > 10:
            metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", MetricCollection(metrics).clone(prefix=f"{stage}/"))
            setattr(self, f"{stage}_loss", MeanMetric())  # a mean over samples: exact under DDP too
        self.val_acc_best = MaxMetric()

    @property
    def backbone(self) -> nn.Module | None:  # what Lightning's BackboneFinetuning freezes and unfreezes
        return getattr(self.net, "backbone", None)

    def setup(self, stage: str) -> None:
        if self.compile_options is not None and not getattr(self, "compiled", False):
            cuda = torch.cuda.is_available()
            if self.compile_options.get("backend", "inductor") == "inductor":
                require(
                    importlib.util.find_spec("triton") if cuda else any(map(shutil.which, ("g++", "c++", "clang++"))),
                    f"torch.compile on {'CUDA needs the triton package' if cuda else 'CPU needs a C++ compiler'}; "
                    "install it, or set --model.compile false",
                )
            self.net.compile(**self.compile_options)  # in place: the state_dict keys stay as they are
            self.compiled = True

    def forward(self, images: Tensor) -> Tensor:
        x = images.to(self.mean.dtype)
        x = (x / 255 if images.dtype == torch.uint8 else x).sub(self.mean).div(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, y = self(batch[0]), batch[1]
        loss = self.criterion(logits.float(), y)
        self.train_metrics.update(logits.detach(), y)
        self.train_loss.update(loss.detach(), weight=y.numel())
        self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # logged per epoch, not per step (Lightning then moved each metric object every step, bench/overhead.yaml),
        # and only what the steps updated: none after an empty epoch, no train/loss under a subclass's own step
        logged = {**self.train_metrics, "train/loss": self.train_loss}
        self.log_dict({name: metric for name, metric in logged.items() if metric.update_called})

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # sanity-check batches must not count towards the best validation accuracy
        needed = self.trainer.estimated_stepping_batches
        for config in self.trainer.lr_scheduler_configs:
            planned = getattr(config.scheduler, "total_steps", None)
            if planned is not None and planned < needed:  # a resumed run asked to train longer than planned
                raise UserError(
                    f"the checkpoint's {type(config.scheduler).__name__} schedule ends after {planned} optimizer "
                    f"steps but this run needs {needed}; resume with the first run's --trainer.max_epochs (or "
                    f"max_steps), or train longer from the start"
                )

    def _evaluate(self, batch: Any, stage: str) -> dict[str, Tensor]:
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        logits, y = self(batch[0]), batch[1]
        metrics.update(logits, y)
        loss.update(self.criterion(logits.float(), y), weight=y.numel())
        self.log_dict({**metrics, f"{stage}/loss": loss}, prog_bar=stage == "val")  # synced by torchmetrics
        return {"preds": logits.argmax(dim=-1), "target": y, "logits": logits.detach()}  # for callbacks (media)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(self.val_metrics["acc"].compute())
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        probs = self(batch[0] if isinstance(batch, (list, tuple)) else batch).float().softmax(dim=-1)
        return {"preds": probs.argmax(dim=-1), "probs": probs}

    def parameter_groups(self) -> list[dict[str, Any]]:
        return parameter_groups(self)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameter_groups())
        if self.lr is not None:  # found by a LearningRateFinder
            for group in optimizer.param_groups:
                group["lr"] = self.lr
        if self.scheduler is None:
            return optimizer
        given = getattr(self.scheduler, "keywords", None)  # the CLI hands over a partial
        if given is None:
            params = inspect.signature(self.scheduler).parameters.values()
            given = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        fill = {"max_lr": self.lr} if "max_lr" in given and self.lr is not None else {}
        if "total_steps" in given and given["total_steps"] is None and given.get("epochs") is None:
            fill["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler(optimizer, **fill)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "monitor": "val/loss"},
        }
