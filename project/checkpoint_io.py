"""Checkpoints written atomically (fsynced, then renamed) and never with NaN/inf weights, and always read
``weights_only`` whatever ``--weights_only`` or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say."""

import os
import pickle
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project.errors import UserError, require
from project.files import atomic_write


def non_finite(state_dict: dict[str, Any]) -> list[str]:
    return [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


class SafeCheckpointIO(TorchCheckpointIO):
    def __init__(self, mmap: bool = False) -> None:
        self.mmap = mmap  # tensors read when used; the file read is kept for the next load of the same path
        self.loaded: tuple[str, dict[str, Any]] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if bad := non_finite(checkpoint.get("state_dict", {})):
            raise UserError(f"refused to write {path}: weights {', '.join(bad[:3])} are not finite (NaN/inf)")
        if "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None) -> dict:
        if self.loaded is not None and self.loaded[0] == str(path):  # read once already (by the CLI): hand it over
            checkpoint, self.loaded = self.loaded[1], None
            return checkpoint
        require(os.path.isfile(path) or "://" in str(path), f"checkpoint not found: {path}")
        try:
            if self.mmap:
                checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            else:
                checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported global" in str(err):  # a pickled class or function: what malicious files carry
                raise UserError(
                    f"refused to load {path}: it contains Python objects, not just weights, and loading it could run "
                    f"code; only load checkpoints you trust, re-saved as plain data"
                ) from err
            raise UserError(
                f"{path} is not a readable checkpoint (damaged or not a checkpoint); pass a .ckpt from fit"
            ) from err
        except Exception as err:  # torch's readers raise many types on files that are not checkpoints
            raise UserError(
                f"{path} is not a readable checkpoint ({type(err).__name__}); pass a .ckpt from fit"
            ) from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise UserError(f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by fit")
        self.loaded = (str(path), checkpoint) if self.mmap else None
        return checkpoint


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint as plain data on the CPU; a one-line error for a missing, damaged or hostile file."""
    return SafeCheckpointIO(mmap).load_checkpoint(path)
