"""The in-memory tensor path: a data set decoded once into a uint8 tensor, batches normalized and augmented at once.

Selected with ``data.init_args.loader: tensor``. Each batch is a pair ``(images float32 NCHW, labels int64)`` on the
trainer's device. Shuffling and augmentation draw from generators seeded by ``(seed, epoch, batch)``, so the order
and the augmentations depend on nothing but the seed, and a loader restored from its ``state_dict`` continues
mid-epoch with exactly the batches an uninterrupted run would have seen (Lightning saves and restores the state of
any train loader that has ``state_dict``/``load_state_dict``).
"""

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset


def decode(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """All images of a torchvision data set as one uint8 (N, C, H, W) tensor, and its labels as int64 (N,)."""
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is None or targets is None:
        raise TypeError(f"{type(dataset).__name__} has no .data/.targets arrays; use loader: torchvision for it")
    images = torch.as_tensor(data)
    if images.ndim == 3:  # MNIST family: N, H, W
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # CIFAR: N, H, W, C
        images = images.permute(0, 3, 1, 2)
    images = images.to(torch.uint8).contiguous()
    labels = torch.as_tensor(targets, dtype=torch.long)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return images, labels


class BatchAugment:
    """Random augmentations applied to a whole float batch in [0, 1], with one generator per batch.

    Args:
        crop_padding: random crop of the original size from the image padded by this many pixels (reflect); 0: off.
        flip: random horizontal flip with probability 0.5.
        degrees, translate, scale: a random affine per image (rotation in degrees, shift as a fraction of the size,
            zoom range), zero fill, as torchvision's ``RandomAffine``; ``degrees=0`` and no translate/scale: off.
    """

    def __init__(
        self,
        crop_padding: int = 0,
        flip: bool = False,
        degrees: float = 0.0,
        translate: tuple[float, float] | None = None,
        scale: tuple[float, float] | None = None,
    ) -> None:
        self.crop_padding = crop_padding
        self.flip = flip
        self.degrees = degrees
        self.translate = translate
        self.scale = scale

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.degrees or self.translate or self.scale)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n = x.shape[0]

        def uniform(low: float, high: float) -> Tensor:
            return (torch.rand(n, generator=generator) * (high - low) + low).to(x.device)

        if self.degrees or self.translate or self.scale:
            angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
            zoom = uniform(*self.scale) if self.scale else torch.ones(n, device=x.device)
            tx, ty = self.translate or (0.0, 0.0)
            # affine_grid maps output to input coordinates in [-1, 1]: invert the forward transform
            shift_x, shift_y = uniform(-tx, tx) * 2, uniform(-ty, ty) * 2
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            theta = torch.stack(
                [
                    torch.stack([cos, sin, -(cos * shift_x + sin * shift_y)], dim=1),
                    torch.stack([-sin, cos, -(-sin * shift_x + cos * shift_y)], dim=1),
                ],
                dim=1,
            )
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.crop_padding:
            p = self.crop_padding
            h, w = x.shape[-2:]
            padded = F.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            # one gather over each flattened padded image (3x faster than 4-d advanced indexing on CPU)
            c, width_padded = x.shape[1], w + 2 * p
            window = torch.arange(h, device=x.device)[:, None] * width_padded + torch.arange(w, device=x.device)
            index = window.view(1, 1, h * w) + (dy * width_padded + dx).view(n, 1, 1)
            x = padded.reshape(n, c, -1).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


class TensorLoader:
    """Batches from in-memory uint8 images: shard, shuffle, normalize and augment whole batches at once.

    Training (``shuffle=True``): every epoch a new permutation of all samples, seeded by ``(seed, epoch)``; under
    DDP rank ``r`` of ``w`` takes every ``w``-th sample of it, cut to the same length on every rank. Evaluation
    (``shuffle=False``): rank ``r`` takes every ``w``-th sample in order, nothing repeated or padded, so the ranks
    together see every sample exactly once.

    Args:
        images: uint8 (N, C, H, W); moved to ``device`` once.
        labels: int64 (N,).
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        mean, std: per-channel normalization of images scaled to [0, 1].
        shuffle: reshuffle every epoch (training).
        augment: batch augmentation, or None.
        seed: seed of the order and the augmentations.
        rank, world_size: this process's DDP shard.
        device: where the images live and batches are made.
        drop_last: drop a last incomplete batch.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: BatchAugment | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = -1  # the epoch being (or last) iterated; the next __iter__ starts epoch + 1
        self.position = 0  # batches of `epoch` handed out so far
        self._resume = False

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.labels)
        if self.shuffle:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for ``epoch``, in order."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self._seed_for(epoch)))
        return order[self.rank :: self.world_size][: self.num_samples]

    def _seed_for(self, epoch: int, batch: int = -1) -> int:
        return hash((self.seed, epoch, batch)) & 0x7FFF_FFFF_FFFF_FFFF

    def batch(self, index: Tensor, epoch: int, batch_idx: int) -> tuple[Tensor, Tensor]:
        index = index.to(self.images.device)
        x = self.images[index].float().div_(255)
        if self.augment is not None:
            generator = torch.Generator().manual_seed(self._seed_for(epoch, batch_idx))
            x = self.augment(x, generator)
        return (x - self.mean) / self.std, self.labels[index]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not (self._resume and self.position < len(self)):
            self.epoch, self.position = self.epoch + 1, 0
        self._resume = False
        epoch, start = self.epoch, self.position
        order = self.indices(epoch)
        for batch_idx in range(start, len(self)):
            index = order[batch_idx * self.batch_size : (batch_idx + 1) * self.batch_size]
            self.position = batch_idx + 1
            yield self.batch(index, epoch, batch_idx)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._resume = True


def augmentation(kind: str, image_shape: Sequence[int]) -> BatchAugment:
    """The batch version of a data module's ``standard`` preset: MNIST-family affine, or CIFAR crop + flip."""
    if kind == "none":
        return BatchAugment()
    if image_shape[0] == 1:
        return BatchAugment(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    return BatchAugment(crop_padding=4, flip=True)


def setup_tensors(dm: Any, stage: str | None) -> None:
    """``ImageDataModule.setup`` for ``loader: tensor``: decoded uint8 tensors per split, the same split indices."""
    if stage in ("fit", "validate", None) and "train" not in dm.datasets:
        images, labels = decode(dm.make_dataset(train=True, transform=None))
        train_idx, val_idx = (torch.as_tensor(i, dtype=torch.long) for i in dm.split_indices(len(labels)))
        dm.datasets["train"] = (images[train_idx], labels[train_idx])
        dm.datasets["val"] = (images[val_idx], labels[val_idx])
    if stage in ("test", "predict", None) and "test" not in dm.datasets:
        dm.datasets["test"] = decode(dm.make_dataset(train=False, transform=None))
    if stage == "predict" and dm.predict_split != "test":
        setup_tensors(dm, "fit")


def tensor_loader(dm: Any, split: str, train: bool) -> TensorLoader:
    """A :class:`TensorLoader` for ``split`` of data module ``dm`` on its trainer's device and DDP rank."""
    trainer = dm.trainer
    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    images, labels = dm.datasets[split]
    loader = TensorLoader(
        images,
        labels,
        batch_size=dm.batch_size if train else dm.eval_batch_size,
        mean=dm.mean,
        std=dm.std,
        shuffle=train,
        augment=augmentation(dm.augment, dm.image_shape) if train else None,
        seed=torch.initial_seed() if train else 0,
        rank=rank,
        world_size=world_size,
        device=device,
    )
    if train and trainer is not None:
        # continue the trainer's epoch count: Lightning restores no loader state from an end-of-epoch checkpoint
        loader.epoch = trainer.fit_loop.epoch_progress.current.processed - 1
    return loader
