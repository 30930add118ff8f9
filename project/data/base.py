"""The data module every image data set shares: splits, loaders and batch augmentation."""

import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler

from project.data.batches import BatchAugment, InMemory, TensorLoader, decode, whole_batch
from project.errors import UserError, require

log = logging.getLogger(__name__)


def targets(dataset: Dataset) -> list[int]:
    """The labels (``.targets``) of a torchvision-style data set, through any ``Subset``."""
    if isinstance(dataset, Subset):
        labels = targets(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    return [int(t) for t in dataset.targets]


def stratified_split(labels: Sequence[Any], size: float, seed: int, flag: str) -> tuple[list[int], list[int]]:
    """Seeded ``(rest, taken)`` index lists in a random order; ``taken`` has ``size`` samples (a count or a fraction),
    each class in proportion (largest remainders get the odd ones)."""
    n = len(labels)
    want = round(n * size) if isinstance(size, float) else int(size)
    require(0 <= want < n, f"{flag}={size} leaves no training data out of {n} samples; lower {flag}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    members: dict[Any, list[int]] = {}
    for i in order:
        members.setdefault(labels[i], []).append(i)
    quota = {c: want * len(m) / n for c, m in members.items()}
    take = {c: int(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: take[c] - quota[c])[: want - sum(take.values())]:
        take[c] += 1
    for c, m in members.items():
        require(take[c] < len(m), f"class {c} has {len(m)} samples, too few to split off {take[c]}; add samples")
    if none := [str(c) for c in sorted(members) if want and not take[c]]:
        log.warning("%s takes no sample of class %s (too few): none in that split; add samples", flag, ", ".join(none))
    chosen = {i for c, m in members.items() for i in m[: take[c]]}
    return [i for i in order if i not in chosen], [i for i in order if i in chosen]


class ImageDataModule(LightningDataModule):
    """Batches of ``(uint8 images (N, C, H, W), int64 labels)``, augmented on the device, normalized in the model.

    Args:
        data_dir: the folder holding the data set.
        batch_size: training batch size.
        eval_batch_size: batch size of validation, test and predict; default: batch_size.
        num_workers: DataLoader worker processes of the per-sample path (and of decoding for ``loader: tensor``).
        pin_memory: pin host memory; default: only when a CUDA device is present.
        persistent_workers: keep workers alive between epochs (only with num_workers > 0).
        val_split: validation size taken from the training set: a count (int) or a fraction (float).
        augment: ``none``, or ``standard``: the data set's batch augmentation of training images.
        seed: seed of the splits and of the evaluation order.
        predict_split: the split ``predict`` runs on.
        loader: ``torchvision``: per-sample decoding in workers; ``tensor``: each split decoded once onto the device.
        sampler: ``shuffle``, or ``weighted``: draw training samples with probability 1 / their class's frequency.
    """

    class_names: Sequence[str] = ()
    image_shape: tuple[int, int, int] = (1, 28, 28)
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    standard_augment = BatchAugment()

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
        predict_split: Literal["train", "val", "test"] = "test",
        loader: Literal["torchvision", "tensor"] = "torchvision",
        sampler: Literal["shuffle", "weighted"] = "shuffle",
    ) -> None:
        super().__init__()
        require(batch_size >= 1, f"--data.batch_size must be at least 1, got {batch_size}")
        require(eval_batch_size is None or eval_batch_size >= 1, "--data.eval_batch_size must be at least 1 or null")
        require(num_workers >= 0, f"--data.num_workers must be 0 or more, got {num_workers}")
        require(
            val_split >= 0 and (isinstance(val_split, int) or val_split < 1),
            f"--data.val_split must be a count >= 0 or a fraction in [0, 1), got {val_split}",
        )
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.val_split, self.augment, self.seed = val_split, augment, seed
        self.predict_split, self.loader, self.sampler = predict_split, loader, sampler
        self.splits: dict[str, Dataset] = {}  # the splits the stages so far needed

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def make_datasets(self) -> dict[str, Dataset | Callable[[], Dataset]]:
        """Splits (a missing ``val`` is carved from train): data sets of (uint8 CHW, label) with ``.targets``, or
        functions reading one."""
        raise NotImplementedError

    def files_present(self) -> bool:
        return True

    def download(self, root: Path) -> None:  # into a temporary folder, moved into data_dir on success
        raise NotImplementedError

    def missing_data_message(self) -> str:
        return f"no data in {self.data_dir}"

    def prepare_data(self) -> None:
        try:
            if self.files_present():
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.data_dir, prefix=".download-") as tmp:
                try:
                    self.download(Path(tmp))
                except Exception as err:  # offline, refused, corrupt: all end the same way for the user
                    raise UserError(f"{self.missing_data_message()} (download failed: {type(err).__name__})") from err
                for entry in Path(tmp).iterdir():  # renamed into place, or merged into a folder already there
                    target = self.data_dir / entry.name
                    if target.exists():
                        shutil.copytree(entry, target, dirs_exist_ok=True)
                    else:
                        os.replace(entry, target)
        except OSError as err:  # unpacking or moving into place: nothing half-written stays
            path = err.filename or self.data_dir
            raise UserError(f"cannot write {path}: {err.strerror}; set --data.data_dir to a writable folder") from err

    @cached_property
    def sources(self) -> dict[str, Dataset | Callable[[], Dataset]]:
        return self.read(self.make_datasets)

    def has_split(self, name: str) -> bool:  # without decoding anything
        return name in self.sources or (name == "val" and "train" in self.sources)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": [self.predict_name]}
        for name in wanted.get(stage, ["train", "val", "test"]):
            if name not in self.splits:
                self.make_split(name)
            if self.loader == "tensor" and not isinstance(self.splits[name], InMemory):
                device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
                images, labels = decode(self.splits[name], self.num_workers)
                self.splits[name] = InMemory(images.to(device), labels.to(device), source=self.splits[name])

    def make_split(self, name: str) -> None:
        if name in ("train", "val") and "val" not in self.sources:
            require("train" in self.sources, f"{type(self).__name__} has no train images in {self.data_dir}")
            train = self.read(self.sources["train"])
            rest, val = stratified_split(targets(train), self.val_split, self.seed, "--data.val_split")
            self.splits["train"], self.splits["val"] = Subset(train, rest), Subset(train, val)
            return
        require(name in self.sources, f"{type(self).__name__} has no {name} images in {self.data_dir}")
        data = self.read(self.sources[name])
        if name in ("val", "test"):  # a fixed seeded order: limit_*_batches then sees every class
            data = Subset(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed)).tolist())
        self.splits[name] = data

    def read(self, make: Any) -> Any:
        """``make()``, a torchvision reader's error turned into one line."""
        if not callable(make):
            return make
        try:
            return make()
        except (AssertionError, EOFError, OSError, pickle.UnpicklingError, RuntimeError) as err:  # torchvision raises
            raise UserError(
                f"could not read the data set in {self.data_dir} ({type(err).__name__}: {str(err)[:200]}); a file "
                f"is probably truncated or corrupt: delete it and copy it again, or set --data.data_dir"
            ) from err

    def train_weights(self) -> Tensor | None:
        """Per-sample weights of the training split for ``sampler: weighted`` (1 / class frequency), else None."""
        if self.sampler != "weighted":
            return None
        data = self.splits["train"]
        labels = torch.as_tensor(data.labels.cpu() if isinstance(data, InMemory) else targets(data))
        return 1.0 / torch.bincount(labels).double()[labels]

    def train_dataloader(self) -> Any:
        data, weights, trainer = self.splits["train"], self.train_weights(), self.trainer
        if isinstance(data, InMemory):  # continues the trainer's epoch count (a resumed run's first is not epoch 0)
            epoch = trainer.fit_loop.epoch_progress.current.processed - 1 if trainer else -1
            rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
            return TensorLoader(data, self.batch_size, torch.initial_seed(), rank, world_size, epoch, weights)
        sampler = WeightedRandomSampler(weights, len(weights)) if weights is not None else None
        return self._dataloader(data, self.batch_size, shuffle=sampler is None, sampler=sampler)

    def _eval_dataloader(self, name: str) -> DataLoader:
        data, sampler = self.splits[name], None
        if self.trainer is not None and self.trainer.world_size > 1:
            # each sample exactly once over all processes (Lightning's default sampler pads with repeats)
            sampler = UnrepeatedDistributedSampler(data, shuffle=False, **self.trainer.distributed_sampler_kwargs)
        return self._dataloader(data, self.eval_batch_size, shuffle=False, sampler=sampler)

    def _dataloader(self, data: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        if isinstance(data, InMemory):
            return DataLoader(data, batch_size=batch_size, collate_fn=whole_batch, **kwargs)
        kwargs |= dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        return DataLoader(data, batch_size=batch_size, persistent_workers=self.persistent_workers, **kwargs)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    @property
    def predict_name(self) -> str:  # predict: unlabelled images of its own (ImageFolder's predict_dir)
        return "predict" if self.has_split("predict") else self.predict_split

    def predict_dataloader(self) -> DataLoader:
        return self._eval_dataloader(self.predict_name)

    def augment_batch(self, images: Tensor) -> Tensor:  # uint8 in, float in [0, 1] out
        return self.standard_augment(images) if self.augment == "standard" else images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # (images, labels) of a training step, not the model summary's example input (a bare tensor)
        if self.trainer and self.trainer.training and self.augment != "none" and isinstance(batch, list | tuple):
            return (self.augment_batch(batch[0]), *batch[1:])
        return batch
