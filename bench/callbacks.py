"""Bench-only callbacks, added to a real CLI command from the command line (``PYTHONPATH`` = the repository):

python -m project fit -c ... --trainer.callbacks+=bench.callbacks.StepTimer
python -m project fit -c ... --trainer.callbacks+=bench.callbacks.TestAccuracyLog
"""

import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

if str(Path(__file__).parent) not in sys.path:  # bench/ itself, as for its scripts: one ``common`` for all
    sys.path.append(str(Path(__file__).parent))
from common import append_log, cpu_seconds  # noqa: E402


class StepTimer(Callback):
    """Prints the wall and CPU seconds taken by the training steps after the first ``warmup`` (overhead.py reads
    the line; its plain loop prints the same)."""

    def __init__(self, warmup: int = 30) -> None:
        self.warmup = warmup
        self.start = self.cpu_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), cpu_seconds()

    def on_train_end(self, trainer, pl_module) -> None:
        wall, cpu = time.perf_counter() - self.start, cpu_seconds() - self.cpu_start
        steps = trainer.global_step - self.warmup
        print(f"steady_seconds={wall:.3f} steady_steps={steps} steady_cpu_seconds={cpu:.3f}", flush=True)


class TestAccuracyLog(Callback):
    """After every training epoch: accuracy of the model on the whole test set, appended with the seconds since
    launch to ``$BENCH_LOG`` (time_to_accuracy.py sets it and ``$BENCH_LAUNCH``). The reference loop does the same."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        dm.setup("test")
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        with torch.inference_mode():
            for batch in dm.test_dataloader():
                x, y = (t.to(pl_module.device) for t in batch[:2])
                logits = pl_module(x)
                correct += (logits.argmax(-1) == y).sum().item()
                total += len(y)
        pl_module.train(was_training)
        append_log(trainer.current_epoch + 1, correct / total)
