"""Speed options of the classifier: ``torch.compile`` with a clear message where it cannot work, and a
warmup-cosine learning-rate schedule stepped per batch."""

import math
import shutil
import sys
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from project.errors import UserError


def compile_problem(options: dict[str, Any]) -> str | None:
    """Why ``torch.compile`` with ``options`` cannot work here, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on Python {sys.version.split()[0]} with torch {torch.__version__}"
    if options.get("backend", "inductor") != "inductor":
        return None
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile on CUDA needs the triton package (pip install triton)"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        return "torch.compile on CPU needs a C++ compiler (apt-get install g++)"
    return None


def compile_net(net: nn.Module, options: dict[str, Any]) -> None:
    """Compile ``net`` in place (its state_dict keys stay as they are), or stop with one line saying why not."""
    problem = compile_problem(options)
    if problem:
        raise UserError(f"{problem}; or set model.init_args.compile: false")
    net.compile(**options)


class WarmupCosineLR(LambdaLR):
    """Linear warmup from 0 to the optimizer's lr over ``warmup`` steps, then cosine decay to ``final_fraction``.

    Step it per batch (``scheduler_interval: step``). ``total_steps`` left unset is filled by the classifier with
    the run's real number of optimizer steps. ``warmup`` below 1 is a fraction of ``total_steps``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup: float = 0.05,
        final_fraction: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None:
            raise ValueError("WarmupCosineLR needs total_steps (filled automatically under the classifier)")
        self.total_steps = total_steps
        self.warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)
        self.final_fraction = final_fraction
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
