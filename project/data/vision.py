"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 on torchvision's dataset classes and on-disk formats."""

import gzip
import shutil
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
from torchvision.transforms import v2

from project.data.base import ImageDataModule
from project.data.batches import BatchAugment
from project.errors import UserError, require
from project.files import atomic_write

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class _TorchvisionDataModule(ImageDataModule):
    dataset_class: Any = datasets.MNIST

    def make_datasets(self) -> dict[str, Callable[[], Dataset]]:
        return {"train": partial(self.open, train=True), "test": partial(self.open, train=False)}

    def open(self, train: bool) -> Dataset:
        return self.dataset_class(str(self.data_dir), train=train, transform=v2.PILToTensor())

    def download(self, root: Path) -> None:
        self.dataset_class(str(root), train=True, download=True)


class _MNISTFamily(_TorchvisionDataModule):
    """28x28 grayscale images read from the raw IDX files under ``data_dir/<Name>/raw``.

    Args:
        gz_dir: a folder of the four ``*-idx?-ubyte.gz`` files, checked and unpacked if needed; ignored if missing.
        **kwargs: see :class:`ImageDataModule`.
    """

    image_shape = (1, 28, 28)
    standard_augment = BatchAugment(degrees=10, translate=0.1, scale=(0.9, 1.1))

    def __init__(self, *args: Any, gz_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gz_dir = gz_dir

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.dataset_class.__name__ / "raw"

    def files_present(self) -> bool:
        if all((self.raw_dir / name).is_file() for name in IDX_FILES):
            return True
        if not (self.gz_dir and (folder := Path(self.gz_dir)).is_dir()):
            return False
        missing = [f"{n}.gz" for n in IDX_FILES if not (folder / f"{n}.gz").is_file()]
        require(not missing, f"--data.gz_dir {self.gz_dir} lacks {', '.join(missing)}")
        count = 0  # images in the file before: as many labels
        for name in IDX_FILES:
            with atomic_write(self.raw_dir / name) as raw:  # in place only once checked
                try:
                    with gzip.open(folder / f"{name}.gz") as packed:
                        shutil.copyfileobj(packed, raw)
                    raw.flush()
                    data = read_sn3_pascalvincent_tensor(raw.name)  # torchvision's IDX reader: header, type, size
                    count = len(data) if "images" in name else count
                    ok = data.dtype == torch.uint8 and data.shape == ((count, 28, 28) if "images" in name else (count,))
                except (AssertionError, EOFError, RuntimeError, gzip.BadGzipFile, zlib.error):
                    ok = False
                require(
                    ok,
                    f"{folder / name}.gz is not a whole {self.dataset_class.__name__} IDX file, or its images and "
                    f"labels differ in number; replace it, or set --data.gz_dir to a folder with good copies",
                )
        return True

    def missing_data_message(self) -> str:
        where = f" or as .gz in --data.gz_dir {self.gz_dir}" if self.gz_dir else ""
        return (
            f"{self.dataset_class.__name__} not found: expected {', '.join(IDX_FILES)} in {self.raw_dir}{where}; "
            f"copy them there (plain or as .gz via --data.gz_dir DIR) or run once with internet access"
        )


class MNISTDataModule(_MNISTFamily):
    dataset_class = datasets.MNIST
    class_names = tuple(str(i) for i in range(10))
    mean, std = (0.1307,), (0.3081,)


class FashionMNISTDataModule(_MNISTFamily):
    """Fashion-MNIST; by default unpacked from Debian's ``dataset-fashion-mnist`` package folder when installed."""

    dataset_class = datasets.FashionMNIST
    class_names = tuple(datasets.FashionMNIST.classes)
    mean, std = (0.2860,), (0.3530,)

    def __init__(self, *args: Any, gz_dir: str | None = "/usr/share/datasets/fashion-mnist", **kwargs: Any) -> None:
        super().__init__(*args, gz_dir=gz_dir, **kwargs)


class _CIFAR(_TorchvisionDataModule):
    """32x32 RGB images from the python pickles under ``data_dir/cifar-10-batches-py`` or ``cifar-100-python``."""

    image_shape = (3, 32, 32)
    standard_augment = BatchAugment(crop_padding=4, flip=True)

    def files_present(self) -> bool:
        cls = self.dataset_class
        return all((self.data_dir / cls.base_folder / name).is_file() for name, _ in cls.train_list + cls.test_list)

    def open(self, train: bool) -> Dataset:
        try:  # torchvision checks every file's MD5 when it opens a split
            return super().open(train)
        except RuntimeError as err:  # the files are there (files_present), so a download would not replace them
            cls, folder = self.dataset_class, self.data_dir / self.dataset_class.base_folder
            raise UserError(
                f"{cls.__name__} not found or corrupt: a file in {folder} fails torchvision's MD5 check; delete "
                f"{folder}, then unpack {cls.filename} into {self.data_dir} or run once online"
            ) from err

    def missing_data_message(self) -> str:
        cls = self.dataset_class
        files = ", ".join(name for name, _ in cls.train_list + cls.test_list)
        return (
            f"{cls.__name__} not found or corrupt: expected {files} (python version, with matching MD5s) in "
            f"{self.data_dir / cls.base_folder}; unpack {cls.filename} into {self.data_dir} or run once online"
        )

    def download(self, root: Path) -> None:
        super().download(root)
        (root / self.dataset_class.filename).unlink(missing_ok=True)


class CIFAR10DataModule(_CIFAR):
    dataset_class = datasets.CIFAR10
    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFAR):
    dataset_class = datasets.CIFAR100
    class_names = tuple(
        """
        apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
        castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
        elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
        man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
        pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
        skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
        tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
    """.split()
    )
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
