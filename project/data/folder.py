"""Your own images: a folder with one sub-folder per class, configured by YAML alone."""

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from project.data.base import ImageDataModule, stratified_split
from project.data.batches import BatchAugment
from project.data.images import read_image, rgb
from project.errors import UserError, require
from project.files import atomic_write

log = logging.getLogger(__name__)
Sample = tuple[str, int]
CHECKS = ".image-checks.json"  # one per image folder: unreadable files and statistics, valid while no file changes
EXTENSIONS = (*IMG_EXTENSIONS, ".gif")


class ImageFiles(Dataset):
    """(uint8 CHW image, label) of each file by :func:`read_image`; ``checking``: ``(image, label, why)``, ``why``
    saying why a file cannot be decoded (label -1)."""

    def __init__(self, samples: Sequence[Sample], mode: str, size: tuple, background: str, checking: bool = False):
        self.samples, self.targets = list(samples), [label for _, label in samples]
        self.mode, self.size, self.background, self.checking = mode, size, background, checking

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        path, label = self.samples[index]
        try:
            image = read_image(path, self.mode, self.size, self.background)  # type: ignore[arg-type]
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            why = f"cannot read image {path} ({type(err).__name__}: {err})"
            if not self.checking:
                raise UserError(why) from err
            return torch.zeros(len(self.mode), *self.size, dtype=torch.uint8), -1, why
        return (image, label, "") if self.checking else (image, label)


class ImageFolderDataModule(ImageDataModule):
    """Images in ``data_dir/<class name>/*.png|jpg|...``, or in ``data_dir/{train,val,test}/<class name>/``.

    Classes are the sorted sub-folder names; a missing ``test/`` or ``val/`` is a seeded, stratified part of ``train/``
    (or of all images). Unreadable images and statistics are found once and kept in ``data_dir/.image-checks.json``.

    Args:
        data_dir: the root folder.
        image_size: every image is resized to this (one int: square; or [height, width]).
        channels: 1 (grayscale) or 3 (RGB); images are converted on load.
        background: the colour transparent pixels are composited onto (a name or ``#rrggbb``).
        mean, std: per-channel normalization (linked into the model); None: computed from the training split.
        val_split: fraction of the images used for validation, when there is no ``val/`` folder.
        test_split: fraction of the images used for testing, when there is no ``test/`` folder.
        on_corrupt: ``error``: stop naming the first image that cannot be decoded; ``skip``: leave those out.
        predict_dir: a folder of unlabelled images (searched recursively) for ``predict``.
        **kwargs: see :class:`ImageDataModule`.
    """

    standard_augment = BatchAugment(translate=0.1, scale=(1.0, 1.2), flip=True)

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        image_size: int | tuple[int, int] = 64,
        channels: Literal[1, 3] = 3,
        background: str = "white",
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
        try:
            rgb(background)
        except ValueError:
            raise UserError(f"--data.background: unknown colour {background!r}; give a name or #rrggbb") from None
        self.channels, self.image_shape, self.background = channels, (channels, *self.size), background
        self.test_split, self.on_corrupt, self.given = test_split, on_corrupt, (mean, std)
        self.predict_files: list[str] = []
        if predict_dir:
            folder = Path(predict_dir)
            require(folder.is_dir(), f"--data.predict_dir {folder} not found; give a folder of images")
            self.predict_files = [str(p) for p in sorted(folder.rglob("*")) if str(p).lower().endswith(EXTENSIONS)]
            require(self.predict_files, f"no images found in --data.predict_dir {folder} (searched recursively)")

    class_names = property(lambda self: self.found[0])
    samples = property(lambda self: self.found[1])  # the files of each split that has any, checked or not
    mean = property(lambda self: tuple(self.given[0] or self.checked["mean"]))
    std = property(lambda self: tuple(self.given[1] or self.checked["std"]))

    @cached_property
    def found(self) -> tuple[list[str], dict[str, list[Sample]]]:
        root = self.data_dir
        require(root.is_dir(), f"image folder {root} not found; set --data.data_dir to a folder of class folders")
        base = root / "train" if (root / "train").is_dir() else root
        try:
            names, class_to_idx = find_classes(base)
        except FileNotFoundError:
            raise UserError(f"no class folders in {base}: put each class's images in {base}/<class name>/") from None
        splits = {"train": self._list(base, class_to_idx)}
        for name in ("val", "test") if base != root else ():
            if (root / name).is_dir():
                unknown = sorted(set(find_classes(root / name)[0]) - set(names))
                require(not unknown, f"{root / name} has class folders not in train/: {', '.join(unknown)}")
                splits[name] = self._list(root / name, class_to_idx, allow_empty=True)
        carved = 0.0 if "test" in splits else self.test_split  # val_split stays a fraction of all the images
        for name, fraction in (("test", self.test_split), ("val", self.val_split / (1 - carved))):
            if name not in splits:
                train, flag = splits["train"], f"--data.{name}_split"
                rest, part = stratified_split([names[label] for _, label in train], fraction, self.seed, flag)
                splits["train"], splits[name] = [train[i] for i in rest], [train[i] for i in part]
        return names, {name: samples for name, samples in splits.items() if samples}

    @staticmethod
    def _list(folder: Path, class_to_idx: dict[str, int], allow_empty: bool = False) -> list[Sample]:
        try:
            return make_dataset(folder, class_to_idx, extensions=EXTENSIONS, allow_empty=allow_empty)
        except FileNotFoundError as err:  # "Found no valid file for the classes b. Supported extensions are: ..."
            raise UserError(f"{folder}: {err}") from None

    @cached_property
    def checked(self) -> dict[str, Any]:
        """Unreadable images and the training images' mean and std (unless given), kept in ``CHECKS`` until a file
        or setting changes."""
        split_of = {path: name for name, samples in self.samples.items() for path, _ in samples}
        stamps = [[p, (s := os.stat(p)).st_size, s.st_mtime_ns] if os.path.exists(p) else [p] for p in sorted(split_of)]
        files = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()  # a broken link: its name alone
        setting = [*self.size, self.channels, self.background, self.seed, self.val_split, self.test_split]
        cache = self.data_dir / CHECKS
        try:
            saved = json.loads(cache.read_text())
        except (OSError, ValueError):  # none yet, or damaged: computed again
            saved = {}
        need_stats = self.given[0] is None and saved.get("setting") != setting
        if saved.get("files") != files or need_stats:  # one file per folder, holding what is current
            samples = [(path, int(name == "train")) for path, name in split_of.items()]
            saved = {"files": files, "setting": setting if need_stats else None, **self._decode(samples, need_stats)}
            try:
                with atomic_write(cache, "w") as f:
                    json.dump(saved, f)
            except OSError as err:  # a read-only image folder still trains
                log.warning("could not keep the image checks in %s (%s); every run repeats them", cache, err.strerror)
        self._refuse_or_skip(saved["unreadable"], split_of)
        return saved

    def _decode(self, samples: list[Sample], stats: bool) -> dict[str, Any]:
        """{path: why} of undecodable files; with ``stats`` the mean and std of the readable ones labelled 1."""
        loader = DataLoader(self._files(samples, checking=True), batch_size=256, num_workers=self.num_workers)
        bad, total, squares, count = {}, 0.0, 0.0, 0
        for start, (x, label, why) in zip(range(0, len(samples), 256), loader, strict=True):
            bad |= {samples[start + i][0]: w for i, w in enumerate(why) if w}
            x = x[label == 1].double().div_(255).transpose(0, 1).flatten(1)
            total, squares, count = total + x.sum(1), squares + x.square().sum(1), count + x.shape[1]
        if not stats:
            return {"unreadable": bad}
        require(count > 0, f"no readable training images in {self.data_dir}")
        mean = total / count
        std = (squares / count - mean**2).clamp_min(0).sqrt()
        return {"unreadable": bad, "mean": mean.tolist(), "std": std.tolist()}

    def _refuse_or_skip(self, bad: dict[str, str], split_of: dict[str, str]) -> None:
        if bad:
            first = min(bad)
            require(
                self.on_corrupt == "skip",
                f"{bad[first]} in the {split_of[first]} split; {len(bad)} image(s) cannot be read: remove them or set "
                f"--data.on_corrupt skip",
            )
            log.warning("skipped %d unreadable image(s), first: %s (%s split)", len(bad), first, split_of[first])

    def _files(self, samples: Sequence[Sample], checking: bool = False) -> ImageFiles:
        return ImageFiles(samples, "L" if self.channels == 1 else "RGB", self.size, self.background, checking)

    def _usable(self, name: str) -> ImageFiles:
        return self._files([s for s in self.samples[name] if s[0] not in self.checked["unreadable"]])

    def make_datasets(self) -> dict[str, Callable[[], Dataset]]:
        return {name: partial(self._usable, name) for name in self.samples}

    def has_split(self, name: str) -> bool:
        return bool(self.predict_files) if name == "predict" else super().has_split(name)

    def make_split(self, name: str) -> None:
        if name != "predict":  # unlabelled images: never the training folder
            return super().make_split(name)
        samples = [(path, -1) for path in self.predict_files]
        bad = self._decode(samples, stats=False)["unreadable"]
        self._refuse_or_skip(bad, dict.fromkeys(bad, "predict"))
        self.splits[name] = self._files([s for s in samples if s[0] not in bad])
