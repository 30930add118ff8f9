"""Callbacks the DDP subprocess tests load by class path."""

import os

from lightning.pytorch.callbacks import Callback


class DieOnRank(Callback):
    """Hard-exits one DDP worker at a given step, as a crashed or OOM-killed process would."""

    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(3)
