"""Random number generator states saved in checkpoints, so a resumed run draws the same numbers as an unbroken one."""

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGStateCheckpoint(Callback):
    """Saves the torch (CPU and CUDA), numpy and Python RNG states with every checkpoint and restores them when
    training resumes from it.

    The states are restored in ``on_train_start``, after the sanity check: evaluation loaders draw a seed from the
    global generator when they start, and the resumed run must continue from the state the checkpoint was taken in.
    This makes the shuffling order, dropout masks and augmentations after a resume from an end-of-epoch checkpoint
    the same as in an uninterrupted run (``tests/test_resume.py``). Everything is stored as tensors and plain
    data, so checkpoints still load with ``torch.load(..., weights_only=True)``.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
