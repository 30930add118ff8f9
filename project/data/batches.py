"""Whole batches at once: the batch augmentation (run on the device) and ``loader: tensor``'s data set and loader."""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


@dataclass(frozen=True)
class BatchAugment:
    """Random augmentations of a uint8 batch (N, C, H, W), one draw per image from torch's global generator (seeded
    and checkpointed by Lightning), returned as float in [0, 1]: a random affine (``degrees``, ``translate``, ``scale``
    as torchvision's ``RandomAffine``, zero fill), a crop of a ``crop_padding`` reflect-padded image, a 50% ``flip``.
    """

    crop_padding: int = 0
    flip: bool = False
    degrees: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)

    def __call__(self, images: Tensor) -> Tensor:
        x, n = images, images.shape[0]
        if self.degrees or self.translate or self.scale != (1.0, 1.0):
            x, d, t = as_float(x), self.degrees, self.translate
            ranges = ((-d, d), self.scale, (-t, t), (-t, t))
            angle, zoom, sx, sy = ((torch.rand(n) * (high - low) + low).to(x.device) for low, high in ranges)
            shift = torch.stack([sx * 2, sy * 2], dim=1)[..., None]
            # affine_grid maps output to input coordinates in [-1, 1]: the inverse of the forward transform
            cos, sin = torch.cos(angle * (math.pi / 180)) / zoom, torch.sin(angle * (math.pi / 180)) / zoom
            turn = torch.stack([cos, sin, -sin, cos], dim=1).view(n, 2, 2)
            grid = F.affine_grid(torch.cat([turn, -(turn @ shift)], dim=2), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.crop_padding or self.flip:
            # crop and flip as one gather (on uint8 when no affine ran): each output pixel's source row and column,
            # reflected at the border as F.pad(mode="reflect") does, columns reversed for flipped images
            _, c, h, w = x.shape
            p = self.crop_padding
            rows, cols = torch.arange(h).expand(n, h), torch.arange(w).expand(n, w)
            if p:
                dy, dx = (torch.randint(0, 2 * p + 1, (n,)) for _ in range(2))
                rows, cols = reflect(rows + dy[:, None] - p, h), reflect(cols + dx[:, None] - p, w)
            if self.flip:
                cols = torch.where(torch.rand(n)[:, None] < 0.5, cols.flip(-1), cols)
            index = (rows.to(x.device)[:, :, None] * w + cols.to(x.device)[:, None, :]).view(n, 1, h * w)
            x = x.reshape(n, c, h * w).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
        return as_float(x)


def reflect(position: Tensor, size: int) -> Tensor:
    return (size - 1) - ((size - 1) - position.abs()).abs()


def as_float(images: Tensor) -> Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


class InMemory(Dataset):
    """Decoded images (uint8 N, C, H, W) and labels; ``__getitems__`` serves a whole batch with one index op."""

    def __init__(self, images: Tensor, labels: Tensor, source: Dataset | None = None) -> None:
        self.images, self.labels, self.source = images, labels, source

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, device=self.images.device)
        return self.images.index_select(0, index), self.labels.index_select(0, index)


def whole_batch(batch: Any) -> Any:  # collate_fn for InMemory: __getitems__ already made the batch
    return batch


def decode(dataset: Dataset, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """All (uint8 image, label) pairs of ``dataset`` as two tensors, read once with ``num_workers`` workers."""
    source = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(getattr(source, "data", None), (Tensor, np.ndarray)):  # torchvision's MNIST and CIFAR: in memory
        images = torch.as_tensor(source.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(source.targets, dtype=torch.long)
        if isinstance(dataset, Subset):  # index_select: 2x faster than [index]
            index = torch.as_tensor(dataset.indices, dtype=torch.long)
            images, labels = images.index_select(0, index), labels.index_select(0, index)
        return images.contiguous(), labels
    batches = list(DataLoader(dataset, batch_size=512, num_workers=num_workers))
    return torch.cat([x for x, _ in batches]).contiguous(), torch.cat([torch.as_tensor(y) for _, y in batches]).long()


class TensorLoader:
    """Training batches of an :class:`InMemory`: each epoch a permutation seeded by ``(seed, epoch)`` (with ``weights``,
    draws with replacement), every ``world_size``-th sample to a rank; its ``state_dict`` resumes mid-epoch exactly."""

    def __init__(
        self,
        data: InMemory,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = -1,
        weights: Tensor | None = None,
    ) -> None:
        self.data, self.batch_size, self.seed, self.weights = data, batch_size, seed, weights
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position, self._resume = epoch, 0, False  # position: the epoch's batches handed out

    def __len__(self) -> int:
        return math.ceil(len(self.data) // self.world_size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not (self._resume and self.position < len(self)):
            self.epoch, self.position = self.epoch + 1, 0
        self._resume, n = False, len(self.data)
        seeded = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        if self.weights is None:
            order = torch.randperm(n, generator=seeded)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=seeded)
        order = order[self.rank :: self.world_size][: n // self.world_size].tolist()
        for batch_idx in range(self.position, len(self)):
            self.position = batch_idx + 1
            yield self.data.__getitems__(order[batch_idx * self.batch_size : (batch_idx + 1) * self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._resume = True
