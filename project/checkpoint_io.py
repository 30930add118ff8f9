"""Checkpoint files that are safe to write and safe to read.

- Written to a temporary name in the same folder, flushed to disk, then renamed: a kill or a full disk never
  leaves a truncated file under the real name, and the previous file of that name stays until the new one is whole.
- Always read with ``weights_only=True``: a checkpoint is data, loading one never runs code from it (whatever
  ``--weights_only`` or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say).
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project.errors import UserError, describe_checkpoint_error


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return None

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError as err:
            raise UserError(f"checkpoint not found: {path}") from err
        except Exception as err:
            raise UserError(describe_checkpoint_error(path, err)) from err


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` as every checkpoint in this project is read: plain data only, one-line error otherwise."""
    return SafeCheckpointIO().load_checkpoint(path, map_location="cpu")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
