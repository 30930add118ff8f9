"""Samplers for evaluation under DDP."""

from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler


def eval_sampler(dataset: Dataset, trainer: Any) -> Sampler | None:
    """Each sample exactly once across all processes, or None when not distributed.

    Lightning's default for validation and test is a ``DistributedSampler``, which pads the data set with repeated
    samples until it divides by the world size: metrics then count some samples twice. With this sampler the
    processes get shards that differ by at most one sample, and torchmetrics sums the states exactly.
    """
    if trainer is None or trainer.world_size <= 1:
        return None
    kwargs = trainer.strategy.distributed_sampler_kwargs or {}
    return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)
