"""Knowledge distillation: a (small) student net learns from a trained teacher's soft targets and the labels.

    python -m project fit -c configs/fashion_mnist.yaml --model.init_args.label_smoothing 0 \\
        --trainer.default_root_dir runs/teacher
    python -m project fit -c configs/fashion_mnist.yaml -c configs/compress/distill.yaml \\
        --model.init_args.teacher_ckpt runs/teacher/fashion_mnist/version_0/checkpoints/last.ckpt
"""

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from project.errors import require
from project.models.classifier import ImageClassifier


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al., 2015)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationClassifier(ImageClassifier):
    """An ``ImageClassifier`` trained on ``alpha * soft + (1 - alpha) * hard``: soft is the distillation loss against
    a frozen teacher, hard the usual cross-entropy with the labels. Validation, test and predict are unchanged.

    The teacher is the whole classifier of a ``python -m project fit`` checkpoint (loaded weights-only by Lightning,
    ``extras.load_trained``), so it normalizes the raw batches with its own mean and std, whatever the student's
    are. It is frozen, in eval mode, moved to the student's device, and not a submodule: the student's checkpoint
    holds the student alone and loads and exports like any other (without the teacher file).

    Args:
        net: the student.
        teacher_ckpt: the teacher's checkpoint, trained on the same classes.
        temperature: softening temperature of both distributions. The default 1 (the teacher's own probabilities):
            on Fashion-MNIST, 2 and 4 made small students worse than 1 (``bench/distill.py``).
        alpha: weight of the soft loss (1: learn from the teacher only, never from the labels). A teacher trained
            with label smoothing gives flatter, less informative targets: train it with ``label_smoothing 0``.
        **kwargs: see :class:`ImageClassifier`.
    """

    def __init__(
        self,
        net: nn.Module,
        teacher_ckpt: str | None = None,
        temperature: float = 1.0,
        alpha: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        require(
            0.0 <= alpha <= 1.0 and temperature > 0,
            f"distillation needs 0 <= --model.init_args.alpha <= 1 and --model.init_args.temperature > 0, "
            f"got {alpha} and {temperature}",
        )
        self.teacher_ckpt, self.temperature, self.alpha = teacher_ckpt, temperature, alpha
        teacher = None
        # A missing file is reported when training starts: validate/test/predict and loading the student's own
        # checkpoint do not need the teacher, which may be gone by then.
        if teacher_ckpt is not None and os.path.exists(teacher_ckpt):
            teacher = self.load_teacher(teacher_ckpt)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: stays out of the student's state_dict

    def load_teacher(self, path: str) -> ImageClassifier:
        from extras import load_trained

        teacher = load_trained(path, "distillation (--model.init_args.teacher_ckpt)")
        require(
            teacher.num_classes == self.num_classes,
            f"the teacher {path} has {teacher.num_classes} classes, the data {self.num_classes}; "
            f"distill from a teacher trained on the same data",
        )
        require(
            teacher.class_names == self.class_names,
            f"the teacher {path} has other classes ({', '.join(teacher.class_names[:3])}, ...) than the data "
            f"({', '.join(self.class_names[:3])}, ...); distill from a teacher trained on the same data",
        )
        return teacher

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None:
            require(
                self.teacher_ckpt is not None,
                "distillation needs a teacher: set --model.init_args.teacher_ckpt to a checkpoint of "
                "`python -m project fit` on the same data",
            )
            require(
                os.path.exists(self.teacher_ckpt),
                f"teacher checkpoint not found: {self.teacher_ckpt} (--model.init_args.teacher_ckpt)",
            )
            object.__setattr__(self, "teacher", self.load_teacher(self.teacher_ckpt))

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.teacher.mean.device != x.device:  # moved by hand, e.g. a model put on a device after fit started
            self.teacher.to(x.device)
        with torch.no_grad():
            teacher_logits = self.teacher.eval()(x)
        soft = distillation_loss(logits, teacher_logits, self.temperature)
        hard = self.criterion(logits.float(), y)
        loss = self.alpha * soft + (1.0 - self.alpha) * hard
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict({"train/soft_loss": soft, "train/hard_loss": hard}, on_step=False, on_epoch=True)
        return loss
