"""The base data module every image classification data module shares."""

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from project.data.samplers import eval_sampler

Split = Literal["train", "val", "test"]


class ImageDataModule(LightningDataModule):
    """Train/val/test loaders for an image classification data set.

    The validation set is carved out of the training set with a seeded generator; the test set is never used
    for training or validation. Subclasses say where the data comes from (``make_dataset``, ``files_present``,
    ``download``) and give its constants (``class_names``, ``image_shape``, ``mean``, ``std``).

    Args:
        data_dir: folder holding the data set in torchvision's layout.
        batch_size: training batch size (evaluation uses ``eval_batch_size`` or the same).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory; default: only when a CUDA device is present.
        persistent_workers: keep workers alive between epochs (only with num_workers > 0).
        val_split: validation size taken from the training set, as a count (int) or a fraction (float).
        augment: train-time augmentation preset: ``none`` or ``standard`` (data set specific).
        seed: seed of the train/val split.
        predict_split: which split ``predict`` runs on.
        loader: ``torchvision``: per-sample transforms in a DataLoader; ``tensor``: the whole data set decoded once
            into memory (on the accelerator), batches normalized and augmented at once (``project/data/tensor.py``).
    """

    class_names: Sequence[str] = ()
    image_shape: tuple[int, int, int] = (1, 28, 28)
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        val_split: int | float = 0.1,
        augment: Literal["none", "standard"] = "none",
        seed: int = 42,
        predict_split: Split = "test",
        loader: Literal["torchvision", "tensor"] = "torchvision",
    ) -> None:
        super().__init__()
        if isinstance(val_split, float) and not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split as a fraction must be in [0, 1), got {val_split}")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.val_split = val_split
        self.augment = augment
        self.seed = seed
        self.predict_split = predict_split
        self.loader = loader
        self.datasets: dict[str, Dataset] = {}

    # ---- what a concrete data set provides -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def make_dataset(self, train: bool, transform: Any) -> Dataset:
        """The torchvision dataset for the train or test files, with ``transform`` applied per sample."""
        raise NotImplementedError

    def files_present(self) -> bool:
        raise NotImplementedError

    def missing_data_message(self) -> str:
        raise NotImplementedError

    def download(self, root: Path) -> None:
        """Download into ``root`` (a fresh temporary folder); the result is moved into ``data_dir`` on success."""
        raise NotImplementedError

    def standard_augmentations(self) -> list[Any]:
        return []

    # ---- transforms --------------------------------------------------------------------------------------
    def eval_transform(self) -> v2.Compose:
        return v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        )

    def train_transform(self) -> v2.Compose:
        augment = self.standard_augmentations() if self.augment == "standard" else []
        return v2.Compose([v2.ToImage(), *augment, *self.eval_transform().transforms[1:]])

    # ---- LightningDataModule hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.files_present():
            return
        with tempfile.TemporaryDirectory(dir=self._tmp_parent(), prefix=".download-") as tmp:
            try:
                self.download(Path(tmp))
            except Exception as err:  # offline, refused, corrupt: all end the same way for the user
                from project.errors import UserError

                raise UserError(f"{self.missing_data_message()} (download failed: {type(err).__name__})") from err
            for entry in Path(tmp).iterdir():
                target = self.data_dir / entry.name
                if not target.exists():
                    os.replace(entry, target)
                else:
                    shutil.copytree(entry, target, dirs_exist_ok=True)

    def _tmp_parent(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def num_samples(self, split: str) -> int:
        """Samples in a set-up split, whichever loader holds it (a Dataset, or the tensor path's (images, labels))."""
        data = self.datasets[split]
        return len(data[1]) if isinstance(data, tuple) else len(data)

    def split_indices(self, n: int) -> tuple[list[int], list[int]]:
        """Seeded, disjoint train/val indices out of ``n`` training samples."""
        n_val = int(round(n * self.val_split)) if isinstance(self.val_split, float) else int(self.val_split)
        if not 0 <= n_val < n:
            raise ValueError(f"val_split={self.val_split} leaves no training data out of {n} samples")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return sorted(order[n_val:]), sorted(order[:n_val])

    def setup(self, stage: str | None = None) -> None:
        if self.loader == "tensor":
            from project.data.tensor import setup_tensors

            return setup_tensors(self, stage)
        if stage in ("fit", "validate", None) and "train" not in self.datasets:
            train_full = self.make_dataset(train=True, transform=self.train_transform())
            val_full = self.make_dataset(train=True, transform=self.eval_transform())
            train_idx, val_idx = self.split_indices(len(train_full))
            self.datasets["train"] = Subset(train_full, train_idx)
            self.datasets["val"] = Subset(val_full, val_idx)
        if stage in ("test", "predict", None) and "test" not in self.datasets:
            self.datasets["test"] = self.make_dataset(train=False, transform=self.eval_transform())
        if stage == "predict" and self.predict_split != "test":
            self.setup("fit")

    def _loader(self, split: str, train: bool) -> DataLoader:
        if self.loader == "tensor":
            from project.data.tensor import tensor_loader

            return tensor_loader(self, split, train)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            sampler=None if train else eval_sampler(self.datasets[split], self.trainer),
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, train=False)
