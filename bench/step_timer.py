"""A callback for the overhead benchmark: prints the seconds taken by the training steps after a warm-up."""

import time

from lightning.pytorch import Callback


class StepTimer(Callback):
    def __init__(self, warmup: int = 30) -> None:
        self.warmup = warmup
        self.start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        steps = trainer.global_step - self.warmup
        print(f"steady_seconds={time.perf_counter() - self.start:.3f} steady_steps={steps}", flush=True)
