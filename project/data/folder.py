"""Your own images: a folder with one sub-folder per class, configured by YAML alone."""

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from project.data.base import ImageDataModule
from project.errors import UserError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
Sample = tuple[str, int]


class ImageFiles(Dataset):
    """(image, label) pairs read with PIL, converted to ``mode`` ("L" or "RGB") and resized to ``size`` (H, W)."""

    def __init__(self, samples: Sequence[Sample], mode: str, size: tuple[int, int], transform: Any = None) -> None:
        self.samples = list(samples)
        self.mode = mode
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        except Exception as err:  # damage that the cheap check at setup does not see (e.g. a cut-off JPEG)
            raise UserError(f"cannot read image {path} ({type(err).__name__}: {err})") from err
        return (self.transform(image) if self.transform else image), label


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def unreadable(path: str) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it can (PIL's ``verify``: header and, for PNG,
    checksums, without decoding, so that it stays cheap for large folders)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f"{type(err).__name__}: {err}"
    return None


class ImageFolderDataModule(ImageDataModule):
    """Images in ``data_dir/<class name>/*.png|jpg|...``, or in ``data_dir/{train,val,test}/<class name>/``.

    Without split folders, validation and test sets are taken out of every class in proportion (a seeded,
    stratified split). With a ``train/`` folder, ``val/`` and ``test/`` are used when present; a missing ``val/``
    is carved out of ``train/`` the same way. Class names are the sub-folder names, sorted.

    Args:
        data_dir: the root folder.
        image_size: every image is resized to this (one int: square; or [height, width]).
        channels: 1 (grayscale) or 3 (RGB); images are converted on load.
        mean: per-channel normalization mean; None: computed from the training split and cached in
            ``data_dir/.stats-<hash>.json`` (the hash covers the file list, size and channels).
        std: per-channel normalization std; None: computed with the mean.
        val_split: fraction of each class used for validation (when there is no ``val/`` folder).
        test_split: fraction of each class used for testing (only without split folders).
        sampler: ``shuffle``, or ``weighted``: draw training samples with probability inversely proportional to
            their class frequency (for imbalanced data).
        on_corrupt: ``error``: stop naming the first unreadable image; ``skip``: leave unreadable images out and
            log how many.
        predict_dir: a folder of images without labels (searched recursively) for ``predict``; None: predict on
            ``predict_split``.
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        image_size: int | tuple[int, int] = 64,
        channels: Literal[1, 3] = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        val_split: float = 0.2,
        test_split: float = 0.1,
        sampler: Literal["shuffle", "weighted"] = "shuffle",
        on_corrupt: Literal["error", "skip"] = "error",
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, val_split=val_split, **kwargs)
        if not 0.0 <= test_split < 1.0 or val_split + test_split >= 1.0:
            raise UserError(f"val_split + test_split must stay below 1, got {val_split} + {test_split}")
        if (mean is None) != (std is None):
            raise UserError("give both data.mean and data.std, or neither (then they are computed from the data)")
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.channels = channels
        self.image_shape = (channels, *self.size)
        if mean is not None and std is not None:
            if len(mean) != channels or len(std) != channels:
                raise UserError(f"data.mean and data.std need {channels} values each (channels={channels})")
            self.mean, self.std = tuple(mean), tuple(std)
        else:
            self.mean = self.std = None
        self.test_split = test_split
        self.sampler = sampler
        self.on_corrupt = on_corrupt
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.split_samples = self._scan()
        self.skipped: list[str] = []

    # ---- scanning ----------------------------------------------------------------------------------------
    def _scan(self) -> dict[str, list[Sample]]:
        root = self.data_dir
        if not root.is_dir():
            raise UserError(
                f"image folder {root} not found; set data.data_dir to a folder with one sub-folder per class"
            )
        if (root / "train").is_dir():
            self.class_names = self._class_folders(root / "train")
            splits = {"train": self._samples(root / "train")}
            for name in ("val", "test"):
                if (root / name).is_dir():
                    splits[name] = self._samples(root / name, every_class=False)
            if "val" not in splits:
                splits["train"], splits["val"] = self._stratified(splits["train"], self.val_split)
            splits.setdefault("test", [])
            return splits
        self.class_names = self._class_folders(root)
        rest, test = self._stratified(self._samples(root), self.test_split)
        train, val = self._stratified(rest, self.val_split / (1.0 - self.test_split))
        return {"train": train, "val": val, "test": test}

    @staticmethod
    def _class_folders(folder: Path) -> tuple[str, ...]:
        names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not names:
            raise UserError(f"no class folders in {folder}: put each class's images in {folder}/<class name>/")
        return names

    def _samples(self, folder: Path, every_class: bool = True) -> list[Sample]:
        found = self._class_folders(folder)
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise UserError(f"{folder} has class folders not in train/: {', '.join(unknown)}")
        samples = []
        for label, name in enumerate(self.class_names):
            files = list_images(folder / name) if (folder / name).is_dir() else []
            if not files and every_class:
                raise UserError(f"class folder {folder / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
            samples += [(str(f), label) for f in files]
        return samples

    def _stratified(self, samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
        """Seeded split taking ``fraction`` of every class (at least one image when fraction > 0)."""
        generator = torch.Generator().manual_seed(self.seed)
        keep, taken = [], []
        for label in range(len(self.class_names)):
            members = [s for s in samples if s[1] == label]
            n_taken = max(1, round(len(members) * fraction)) if fraction > 0 else 0
            if n_taken >= len(members) and members:
                raise UserError(
                    f"class {self.class_names[label]!r} has {len(members)} images: too few to split off "
                    f"{fraction:.0%}; add images or lower data.val_split / data.test_split"
                )
            order = torch.randperm(len(members), generator=generator).tolist()
            taken += [members[i] for i in order[:n_taken]]
            keep += [members[i] for i in order[n_taken:]]
        return sorted(keep), sorted(taken)

    @property
    def class_counts(self) -> list[int]:
        counts = Counter(label for _, label in self.split_samples["train"])
        return [counts[i] for i in range(len(self.class_names))]

    def prepare_data(self) -> None:
        """Nothing to download: the folder was scanned when the module was built."""

    # ---- normalization -----------------------------------------------------------------------------------
    def _stats_path(self) -> Path:
        key = json.dumps([self.split_samples["train"], self.size, self.channels])
        return self.data_dir / f".stats-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def _compute_stats(self) -> None:
        path = self._stats_path()
        if path.is_file():
            stats = json.loads(path.read_text())
        else:
            dataset = self._dataset(
                self.split_samples["train"], v2.Compose([v2.ToImage(), v2.ToDtype(torch.float64, scale=True)])
            )
            total = torch.zeros(self.channels, dtype=torch.float64)
            squares = torch.zeros(self.channels, dtype=torch.float64)
            for x, _ in DataLoader(dataset, batch_size=256, num_workers=self.num_workers):
                total += x.sum(dim=(0, 2, 3))
                squares += (x**2).sum(dim=(0, 2, 3))
            n = len(dataset) * self.size[0] * self.size[1]
            mean = total / n
            stats = {"mean": mean.tolist(), "std": (squares / n - mean**2).clamp_min(1e-12).sqrt().tolist()}
            partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
            try:
                partial.write_text(json.dumps(stats))
                os.replace(partial, path)
            except OSError as err:
                log.warning("could not cache image statistics in %s (%s); they will be computed again", path, err)
        self.mean, self.std = tuple(stats["mean"]), tuple(stats["std"])

    # ---- datasets and loaders ----------------------------------------------------------------------------
    def _dataset(self, samples: Sequence[Sample], transform: Any) -> ImageFiles:
        return ImageFiles(samples, "L" if self.channels == 1 else "RGB", self.size, transform)

    def _check(self, samples: list[Sample]) -> list[Sample]:
        bad = [(path, why) for path, _ in samples if (why := unreadable(path)) is not None]
        if not bad:
            return samples
        if self.on_corrupt == "error":
            path, why = bad[0]
            raise UserError(
                f"cannot read image {path} ({why}); {len(bad)} unreadable file(s) in all: remove them or set "
                f"data.on_corrupt=skip"
            )
        self.skipped += [path for path, _ in bad]
        log.warning("skipped %d unreadable image(s), first: %s", len(bad), bad[0][0])
        bad_paths = {path for path, _ in bad}
        return [s for s in samples if s[0] not in bad_paths]

    def standard_augmentations(self) -> list[Any]:
        return [v2.RandomResizedCrop(self.size, scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip()]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: list(SPLITS)}.get(stage, [])
        if stage == "predict":
            needed = [] if self.predict_dir else [self.predict_split]
        if "train" in needed and not self.split_samples["train"]:
            raise UserError(f"no training images under {self.data_dir}")
        for split in needed:
            if not self.split_samples[split]:
                raise UserError(
                    f"no {split} images: add {self.data_dir}/{split}/<class name>/ folders or set data.{split}_split"
                )
        if self.mean is None:
            self._compute_stats()
        for split in needed:
            if split not in self.datasets:
                self.split_samples[split] = self._check(self.split_samples[split])
                transform = self.train_transform() if split == "train" else self.eval_transform()
                self.datasets[split] = self._dataset(self.split_samples[split], transform)
        if stage == "predict" and self.predict_dir and "predict" not in self.datasets:
            if not self.predict_dir.is_dir() or not (files := list_images(self.predict_dir)):
                raise UserError(f"no images found in data.predict_dir={self.predict_dir}")
            self.datasets["predict"] = self._dataset(self._check([(str(f), -1) for f in files]), self.eval_transform())

    def train_dataloader(self) -> DataLoader:
        if self.sampler != "weighted":
            return super().train_dataloader()
        counts = self.class_counts
        labels = torch.tensor([label for _, label in self.datasets["train"].samples])
        weights = 1.0 / torch.tensor(counts, dtype=torch.double)[labels]
        sampler = WeightedRandomSampler(weights, len(weights), generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False) if self.predict_dir else super().predict_dataloader()
