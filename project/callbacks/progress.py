"""Lightning's Rich progress bar, counting epochs as people do: ``Epoch 1/2`` ... ``Epoch 2/2`` (Lightning shows
the 0-based index against ``max_epochs - 1``: ``Epoch 0/1``, ``Epoch 1/1``)."""

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar


class EpochProgressBar(RichProgressBar):
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
            self.progress.update(self.train_progress_bar_id, description=f"Epoch {trainer.current_epoch + 1}{total}")
