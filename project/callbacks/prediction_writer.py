"""``predict`` output as CSV and/or JSON-lines files: one row per input, each input exactly once, even under DDP."""

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset, Subset

from project.errors import require
from project.files import atomic_write

Row = dict[str, Any]


def input_id(dataset: Dataset, index: int) -> str | int:
    """The file path of sample ``index`` (through Subsets and in-memory copies), else its index in the data set."""
    while isinstance(dataset, Subset) or getattr(dataset, "source", None) is not None:
        if isinstance(dataset, Subset):
            index, dataset = int(dataset.indices[index]), dataset.dataset
        else:
            dataset = dataset.source
    samples = getattr(dataset, "samples", None)  # ImageFiles and torchvision's ImageFolder
    return str(samples[index][0]) if samples is not None else index


def merge_rows(per_rank: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per index, in index order: distributed samplers pad ranks with repeated samples."""
    merged: dict[int, Row] = {}
    for rows in per_rank:
        for row in rows:
            merged.setdefault(row["index"], row)
    return [merged[i] for i in sorted(merged)]


class PredictionWriter(BasePredictionWriter):
    """Saves ``predictions.csv`` / ``.jsonl``: input id, target (when known), predicted class, its probability, top-k.

    Args:
        formats: any of ``csv`` and ``jsonl``; empty: write nothing.
        top_k: how many of the most likely classes to list per input.
        output_dir: where to write; None: the run's folder (``trainer.log_dir``).
    """

    def __init__(
        self, formats: Sequence[Literal["csv", "jsonl"]] = ("csv",), top_k: int = 3, output_dir: str | None = None
    ) -> None:
        super().__init__(write_interval="batch")
        require(top_k >= 1, f"--prediction_writer.top_k must be at least 1, got {top_k}")
        self.formats, self.top_k, self.output_dir = list(formats), top_k, output_dir
        self.rows: list[Row] = []
        self.classifier = True
        self.written: list[Path] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []
        self.classifier = hasattr(pl_module, "class_names")
        if not self.classifier and self.formats:
            rank_zero_info(
                f"prediction files need a classifier (a model with class_names); {type(pl_module).__name__} is not "
                f"one, so none are written: use trainer.predict's return value, or a BasePredictionWriter of yours"
            )

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
        if not self.classifier:
            return
        probs = prediction["probs"] if isinstance(prediction, dict) else prediction.float().softmax(dim=-1)
        probs = probs.detach().float().cpu()
        if not batch_indices:  # a loader whose sampler Lightning cannot track (Lightning passes [] or None)
            require(trainer.world_size == 1, "predict under DDP needs a DataLoader with a sampler Lightning can track")
            batch_indices = range(len(self.rows), len(self.rows) + len(probs))
        loaders = trainer.predict_dataloaders
        dataset = (loaders[dataloader_idx] if isinstance(loaders, Sequence) else loaders).dataset
        targets = batch[1].tolist() if isinstance(batch, (list, tuple)) and len(batch) > 1 else [-1] * len(probs)
        names = list(pl_module.class_names)
        top_p, top_i = probs.topk(min(self.top_k, probs.shape[1]), dim=-1)
        for index, target, p, i in zip(batch_indices, targets, top_p.tolist(), top_i.tolist(), strict=True):
            self.rows.append(
                {
                    "index": int(index),
                    "id": input_id(dataset, int(index)),
                    "target": names[target] if target >= 0 else None,
                    "pred": names[i[0]],
                    "prob": round(p[0], 6),
                    "top_k": [[names[c], round(q, 6)] for c, q in zip(i, p, strict=True)],
                }
            )

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        per_rank: list[Any] = [self.rows]
        if trainer.world_size > 1:
            per_rank = [None] * trainer.world_size
            torch.distributed.all_gather_object(per_rank, self.rows)
        self.rows = []
        folder = Path(self.output_dir or trainer.log_dir or ".")  # log_dir is a collective call: on every rank
        if trainer.is_global_zero and self.formats and self.classifier:
            rows = merge_rows(per_rank)
            self.written = self.write(rows, folder)
            rank_zero_info(f"predictions of {len(rows)} inputs written to {', '.join(map(str, self.written))}")

    def write(self, rows: list[Row], folder: Path) -> list[Path]:
        written = []
        if "csv" in self.formats:
            k = max((len(r["top_k"]) for r in rows), default=0)
            header = ["index", "id", "target", "pred", "prob"]
            header += [f"top{j}_{what}" for j in range(1, k + 1) for what in ("class", "prob")]
            with atomic_write(folder / "predictions.csv", "w", newline="") as f:
                out = csv.writer(f)
                out.writerow(header)
                out.writerows(
                    [
                        r["index"],
                        r["id"],
                        r["target"] or "",
                        r["pred"],
                        r["prob"],
                        *(v for pair in r["top_k"] for v in pair),
                    ]
                    for r in rows
                )
            written.append(folder / "predictions.csv")
        if "jsonl" in self.formats:
            with atomic_write(folder / "predictions.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            written.append(folder / "predictions.jsonl")
        return written
