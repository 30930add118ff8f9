"""Writes what ``predict`` returns to CSV and/or JSON-lines files, one row per input, each input exactly once."""

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset, Subset

Row = dict[str, Any]


def input_id(dataset: Dataset, index: int) -> str | int:
    """The file path of sample ``index`` when the data set keeps one (through any Subsets), else the index."""
    while isinstance(dataset, Subset):
        index, dataset = int(dataset.indices[index]), dataset.dataset
    samples = getattr(dataset, "samples", None)  # ImageFiles and torchvision's ImageFolder
    if samples is not None:
        return str(samples[index][0])
    return index


def merge_rows(per_rank: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per index, in index order: distributed samplers pad ranks with repeated samples."""
    merged: dict[int, Row] = {}
    for rows in per_rank:
        for row in rows:
            merged.setdefault(row["index"], row)
    return [merged[i] for i in sorted(merged)]


def write_atomically(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(partial, "w", newline="") as f:
        write(f)
    os.replace(partial, path)


class PredictionWriter(BasePredictionWriter):
    """Saves ``predictions.csv`` / ``predictions.jsonl`` with input id, target (when known), predicted class name,
    its probability and the top-k classes.

    Args:
        formats: any of ``csv`` and ``jsonl``; empty: write nothing.
        top_k: how many of the most likely classes to list per input.
        output_dir: where to write; None: the run's log folder (``trainer.log_dir``).
    """

    def __init__(
        self,
        formats: Sequence[Literal["csv", "jsonl"]] = ("csv",),
        top_k: int = 3,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.formats = list(formats)
        self.top_k = top_k
        self.output_dir = output_dir
        self.rows: list[Row] = []
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not self.formats:
            return
        probs = prediction["probs"] if isinstance(prediction, dict) else prediction.float().softmax(dim=-1)
        probs = probs.detach().float().cpu()
        dataloaders = trainer.predict_dataloaders
        loader = dataloaders[dataloader_idx] if isinstance(dataloaders, Sequence) else dataloaders
        if batch_indices is None:  # a sampler Lightning cannot track: number the rows in arrival order
            start = batch_idx * probs.shape[0]
            batch_indices = range(start, start + probs.shape[0])
        targets = batch[1].tolist() if isinstance(batch, (list, tuple)) and len(batch) > 1 else [None] * len(probs)
        names = getattr(pl_module, "class_names", None) or [str(i) for i in range(probs.shape[1])]
        top_p, top_i = probs.topk(min(self.top_k, probs.shape[1]), dim=-1)
        for index, target, p, i in zip(batch_indices, targets, top_p.tolist(), top_i.tolist(), strict=True):
            self.rows.append(
                {
                    "index": int(index),
                    "id": input_id(loader.dataset, int(index)),
                    "target": names[target] if target is not None and target >= 0 else "",
                    "pred": names[i[0]],
                    "prob": round(p[0], 6),
                    "top_k": [[names[c], round(q, 6)] for c, q in zip(i, p, strict=True)],
                }
            )

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.formats:
            return
        per_rank = [self.rows]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank = [None] * trainer.world_size
            torch.distributed.all_gather_object(per_rank, self.rows)
        self.rows = []
        folder = Path(self.output_dir or trainer.log_dir or ".")  # log_dir is a collective call: on every rank
        if trainer.is_global_zero:
            self.written = self.write(merge_rows(per_rank), folder)

    def write(self, rows: list[Row], folder: Path) -> list[Path]:
        written = []
        if "csv" in self.formats:
            k = max((len(r["top_k"]) for r in rows), default=0)
            header = ["index", "id", "target", "pred", "prob"]
            header += [f"top{j}_{what}" for j in range(1, k + 1) for what in ("class", "prob")]

            def write_csv(f: Any) -> None:
                writer = csv.writer(f)
                writer.writerow(header)
                for r in rows:
                    writer.writerow([r[c] for c in header[:5]] + [v for pair in r["top_k"] for v in pair])

            write_atomically(folder / "predictions.csv", write_csv)
            written.append(folder / "predictions.csv")
        if "jsonl" in self.formats:
            write_atomically(folder / "predictions.jsonl", lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))
            written.append(folder / "predictions.jsonl")
        return written
