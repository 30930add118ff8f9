"""Your own images: a folder with one sub-folder per class, configured by YAML alone."""

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from project.data.base import ImageDataModule, stratified_split
from project.data.batches import BatchAugment, decode
from project.errors import UserError, require

log = logging.getLogger(__name__)
Sample = tuple[str, int]


class ImageFiles(Dataset):
    """(uint8 CHW image, label) pairs read with PIL, converted to ``mode`` ("L" or "RGB") and resized to ``size``
    (height, width) with bilinear filtering: the same rule an exported model's metadata states."""

    def __init__(self, samples: Sequence[Sample], mode: str, size: tuple[int, int]) -> None:
        self.samples, self.targets = list(samples), [label for _, label in samples]
        self.mode, self.size = mode, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize(self.size[::-1], Image.Resampling.BILINEAR)
        except Exception as err:  # damage that the header check does not see (e.g. a cut-off JPEG)
            raise UserError(f"cannot read image {path} ({type(err).__name__}: {err})") from err
        return pil_to_tensor(image), label


def unreadable(path: str) -> str | None:
    """Why ``path`` is not a usable image (PIL's ``verify``: header and, for PNG, checksums), or None."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f"{type(err).__name__}: {err}"
    return None


class ImageFolderDataModule(ImageDataModule):
    """Images in ``data_dir/<class name>/*.png|jpg|...``, or in ``data_dir/{train,val,test}/<class name>/``.

    Class names are the sub-folder names, sorted (torchvision's ``find_classes``/``make_dataset``). Without split
    folders, the test and validation sets are seeded, stratified parts of all images; with a ``train/`` folder,
    ``val/`` and ``test/`` are used when present and a missing ``val/`` is carved out of ``train/``. Every image
    is checked once (PIL ``verify``) and the result cached with the normalization statistics in
    ``data_dir/.stats-<hash>.json`` (the hash covers the file list, sizes, times, image size and channels).

    Args:
        data_dir: the root folder.
        image_size: every image is resized to this (one int: square; or [height, width]).
        channels: 1 (grayscale) or 3 (RGB); images are converted on load.
        mean, std: per-channel normalization (linked into the model); None: computed from the training split.
        val_split: fraction of the images used for validation (of ``train/`` with split folders).
        test_split: fraction of the images used for testing (only without split folders).
        on_corrupt: ``error``: stop naming the first unreadable image; ``skip``: leave unreadable images out.
        predict_dir: a folder of unlabelled images (searched recursively) for ``predict``.
        **kwargs: see :class:`ImageDataModule`.
    """

    standard_augment = BatchAugment(translate=0.1, scale=(1.0, 1.2), flip=True)

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        image_size: int | tuple[int, int] = 64,
        channels: Literal[1, 3] = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        val_split: float = 0.2,
        test_split: float = 0.1,
        on_corrupt: Literal["error", "skip"] = "error",
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, val_split=val_split, **kwargs)
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        require(len(self.size) == 2 and min(self.size) >= 1, f"--data.image_size must be positive, got {image_size}")
        require(
            isinstance(val_split, float) and 0 <= test_split < 1 and val_split + test_split < 1,
            f"--data.val_split and --data.test_split must be fractions summing below 1, got {val_split}, {test_split}",
        )
        require((mean is None) == (std is None), "give both --data.mean and --data.std, or neither")
        require(mean is None or len(mean) == len(std) == channels, f"--data.mean and --data.std need {channels} values")
        self.channels, self.image_shape = channels, (channels, *self.size)
        self.test_split, self.on_corrupt = test_split, on_corrupt
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.samples = self._scan()
        checked = self._inspect(need_stats=mean is None)
        self.samples = {name: self._usable(samples, checked["unreadable"]) for name, samples in self.samples.items()}
        self.mean, self.std = tuple(mean or checked["mean"]), tuple(std or checked["std"])

    def _scan(self) -> dict[str, list[Sample]]:
        root = self.data_dir
        require(
            root.is_dir(), f"image folder {root} not found; set --data.data_dir to a folder with a folder per class"
        )
        base = root / "train" if (root / "train").is_dir() else root
        try:
            self.class_names, class_to_idx = find_classes(base)
        except FileNotFoundError:
            raise UserError(f"no class folders in {base}: put each class's images in {base}/<class name>/") from None
        splits = {"train": self._list(base, class_to_idx)}
        for name in ("val", "test") if base != root else ():
            if (root / name).is_dir():
                unknown = sorted(set(find_classes(root / name)[0]) - set(self.class_names))
                require(not unknown, f"{root / name} has class folders not in train/: {', '.join(unknown)}")
                splits[name] = self._list(root / name, class_to_idx, allow_empty=True)
        if base == root:  # no split folders: stratified test and validation parts of all images
            everything = splits.pop("train")
            labels = [label for _, label in everything]
            rest, test = stratified_split(labels, self.test_split, self.seed, "--data.test_split")
            fraction = self.val_split / (1 - self.test_split)
            train, val = stratified_split([labels[i] for i in rest], fraction, self.seed, "--data.val_split")
            splits = {"train": [everything[rest[i]] for i in train], "val": [everything[rest[i]] for i in val]}
            splits |= {"test": [everything[i] for i in test]} if test else {}
        return splits

    @staticmethod
    def _list(folder: Path, class_to_idx: dict[str, int], allow_empty: bool = False) -> list[Sample]:
        try:
            return make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
        except FileNotFoundError as err:  # "Found no valid file for the classes b. Supported extensions are: ..."
            raise UserError(f"{folder}: {err}") from None

    def _inspect(self, need_stats: bool) -> dict[str, Any]:
        """Unreadable files of every split, and the training split's mean and std: read from the cache, or computed
        once and cached (written atomically)."""
        files = sorted(path for samples in self.samples.values() for path, _ in samples)
        stamp = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
        key = hashlib.sha256(json.dumps([stamp, self.size, self.channels]).encode()).hexdigest()[:16]
        cache = self.data_dir / f".stats-{key}.json"
        checked = json.loads(cache.read_text()) if cache.is_file() else {}
        if "unreadable" not in checked:
            checked["unreadable"] = {p: why for p in files if (why := unreadable(p)) is not None}
        if need_stats and "mean" not in checked:
            train = self._dataset(self._usable(self.samples["train"], checked["unreadable"], quiet=True))
            x = decode(train, self.num_workers)[0].double().div_(255).transpose(0, 1).flatten(1)
            checked |= {"mean": x.mean(1).tolist(), "std": x.std(1, correction=0).tolist()}
        partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
        try:
            partial.write_text(json.dumps(checked))
            os.replace(partial, cache)
        except OSError as err:
            log.warning("could not cache image checks in %s (%s); they will be repeated next time", cache, err)
        return checked

    def _usable(self, samples: list[Sample], bad: dict[str, str], quiet: bool = False) -> list[Sample]:
        found = [path for path, _ in samples if path in bad]
        if found and self.on_corrupt == "error":
            raise UserError(
                f"cannot read image {found[0]} ({bad[found[0]]}); {len(found)} unreadable file(s) in this split: "
                f"remove them or set --data.on_corrupt skip"
            )
        if found and not quiet:
            log.warning("skipped %d unreadable image(s), first: %s", len(found), found[0])
        return [s for s in samples if s[0] not in bad]

    def _dataset(self, samples: Sequence[Sample]) -> ImageFiles:
        return ImageFiles(samples, "L" if self.channels == 1 else "RGB", self.size)

    def make_datasets(self) -> dict[str, Dataset]:
        splits = {name: self._dataset(samples) for name, samples in self.samples.items()}
        if self.predict_dir:
            files = sorted(
                str(p) for p in self.predict_dir.rglob("*") if has_file_allowed_extension(str(p), IMG_EXTENSIONS)
            )
            require(bool(files), f"no images found in --data.predict_dir {self.predict_dir}")
            bad = {p: why for p in files if (why := unreadable(p)) is not None}
            splits["predict"] = self._dataset(self._usable([(p, -1) for p in files], bad))
        return splits
