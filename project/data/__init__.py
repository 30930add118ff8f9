from project.data.base import ImageDataModule
from project.data.folder import ImageFolderDataModule
from project.data.vision import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = ["ImageDataModule", "ImageFolderDataModule"]
__all__ += ["CIFAR10DataModule", "CIFAR100DataModule", "FashionMNISTDataModule", "MNISTDataModule"]
