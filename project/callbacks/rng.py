"""Random number generator states saved in checkpoints, so a resumed run draws the same numbers as an unbroken one."""

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGState(Callback):
    """Saves the torch (CPU and CUDA), numpy and Python RNG states with every checkpoint and restores them when
    training resumes from it.

    The states are restored as soon as the checkpoint is loaded, before the fit loop creates the training iterator
    (its sampler and worker seeds come from the global generator); Lightning runs the sanity check inside
    ``isolate_rng``, so it does not disturb them.
    This makes the shuffling order, dropout masks and augmentations after a resume from an end-of-epoch checkpoint
    the same as in an uninterrupted run (``tests/test_resume.py``). Everything is stored as tensors and plain
    data, so checkpoints still load with ``torch.load(..., weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
