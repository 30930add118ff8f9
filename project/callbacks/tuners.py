"""What Lightning's tuner callbacks lack: ``LearningRateFinder`` and ``BatchSizeFinder`` run after the optimizer and
its schedule were built (a one-cycle schedule overwrites the found lr, and was planned for the old batch size): here
both are built again, and ``tuners.json`` and ``lr_find.png`` (with matplotlib) go into the run folder."""

import json
import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.utilities import rank_zero_only

from project.files import atomic_write

log = logging.getLogger("lightning.pytorch.tuner")


class TunerResults(Callback):
    """Runs after the tuner callbacks (the CLI adds it with them): the optimizer built again, their results saved."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.setup_optimizers(trainer)  # before a resumed run's optimizer state is restored into it
        self.save(trainer)

    @rank_zero_only
    def save(self, trainer: Trainer) -> None:
        folder, found, said = Path(trainer.log_dir or "."), {}, []
        for callback in trainer.callbacks:
            if isinstance(callback, LearningRateFinder) and callback.optimal_lr is not None:
                finder = callback.optimal_lr
                found["learning_rate"] = {"suggestion": finder.suggestion(), **finder.results}
                plot = self.plot(finder, folder / "lr_find.png")
                said.append(f"lr {found['learning_rate']['suggestion']}" + (f" (plot: {plot})" if plot else ""))
            elif isinstance(callback, BatchSizeFinder) and callback.optimal_batch_size is not None:
                found["batch_size"] = callback.optimal_batch_size
                said.append(f"batch size {callback.optimal_batch_size}")
        if found:
            with atomic_write(folder / "tuners.json", "w") as f:
                json.dump(found, f, indent=1)
            log.info(f"tuners found {', '.join(said)}; saved in {folder / 'tuners.json'}")

    @staticmethod
    def plot(finder: Any, path: Path) -> Path | None:
        """Lightning's loss-vs-lr plot with the suggestion marked, or None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        figure = finder.plot(suggest=True)
        with atomic_write(path) as f:
            figure.savefig(f, format="png", dpi=100)
        plt.close(figure)
        return path
