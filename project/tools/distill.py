"""Knowledge distillation: a (small) student net learns from a trained teacher's soft targets and the labels."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from project.errors import UserError
from project.models.classifier import ImageClassifier


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al., 2015)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationClassifier(ImageClassifier):
    """An ``ImageClassifier`` whose training loss is ``alpha * soft + (1 - alpha) * hard``: soft is the distillation
    loss against a frozen teacher, hard the usual cross-entropy with the labels. Validation and test are unchanged.

    The teacher is the net of a checkpoint written by ``python -m project fit`` (read with ``weights_only``); it is
    not part of the student's checkpoint, which loads and exports like any other.

    Args:
        net: the student.
        teacher_ckpt: the teacher's checkpoint.
        temperature: softening temperature of both distributions.
        alpha: weight of the soft loss (1: learn from the teacher only).
        **kwargs: see :class:`ImageClassifier`.
    """

    def __init__(
        self, net: nn.Module, teacher_ckpt: str, temperature: float = 4.0, alpha: float = 0.7, **kwargs: Any
    ) -> None:
        super().__init__(net, **kwargs)
        from project.export import load_net

        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise UserError(f"distillation needs 0 <= alpha <= 1 and temperature > 0, got {alpha}, {temperature}")
        teacher, hparams = load_net(teacher_ckpt)
        if hparams.get("num_classes", self.num_classes) != self.num_classes:
            raise UserError(f"teacher {teacher_ckpt} has {hparams['num_classes']} classes, the data {self.num_classes}")
        teacher.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: stays out of the student's state_dict
        self.temperature = temperature
        self.alpha = alpha

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        soft = distillation_loss(logits, teacher_logits, self.temperature)
        hard = self.criterion(logits.float(), y)
        loss = self.alpha * soft + (1.0 - self.alpha) * hard
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log_dict({"train/soft_loss": soft, "train/hard_loss": hard}, on_step=False, on_epoch=True)
        return loss
