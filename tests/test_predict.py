"""The prediction writer: files written by `predict` for any data module, each input exactly once."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from project.callbacks.prediction_writer import PredictionWriter, merge_rows
from project.cli import cli_main
from tests.conftest import CONFIGS, ROOT, fast_args


def test_predict_writes_csv_and_jsonl_with_indices(mnist_root):
    """A data module without file paths: rows are identified by index; JSON lines carry the top-k list."""
    fit = cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", *fast_args(mnist_root), "--trainer.max_epochs=1",
                    "--model.init_args.net.init_args.hidden=[16]", "--test_after_fit=false"])  # fmt: skip
    best = fit.trainer.checkpoint_callback.best_model_path
    cli = cli_main(["predict", f"--config={Path(fit.trainer.log_dir) / 'config.yaml'}",
                    f"--config={CONFIGS / 'predict' / 'jsonl.yaml'}", f"--ckpt_path={best}",
                    "--data.init_args.eval_batch_size=64"])  # fmt: skip
    out = Path(cli.trainer.log_dir)
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == 200  # the fixture's test set
    assert [int(r["id"]) for r in rows] == list(range(200)) == [r["id"] for r in lines]
    assert list(rows[0]) == ["index", "id", "target", "pred", "prob"] + [
        f"top{j}_{w}" for j in range(1, 6) for w in ("class", "prob")
    ]
    # the file matches the model's own output
    x = torch.stack([cli.datamodule.datasets["test"][i][0] for i in range(3)])
    cli.model.eval()
    probs = cli.model(x).softmax(-1)
    for i in range(3):
        assert lines[i]["pred"] == str(int(probs[i].argmax())) and abs(lines[i]["prob"] - float(probs[i].max())) < 1e-5
        assert lines[i]["target"] == str(int(cli.datamodule.datasets["test"][i][1]))
        assert len(lines[i]["top_k"]) == 5 and lines[i]["top_k"][0] == [lines[i]["pred"], lines[i]["prob"]]
    assert not list(out.glob(".predictions*"))  # no partial files left


def test_merge_keeps_each_sample_once_under_distributed_padding(tmp_path):
    """DistributedSampler pads the ranks with repeated samples; the merged file has each index once, in order."""
    n = 7
    per_rank = []
    for rank in range(3):
        indices = list(DistributedSampler(range(n), num_replicas=3, rank=rank, shuffle=False))
        per_rank.append([{"index": i, "id": f"img{i}.png", "rank": rank} for i in indices])
    assert sum(len(rows) for rows in per_rank) == 9  # two padded repeats
    merged = merge_rows(per_rank)
    assert [r["index"] for r in merged] == list(range(n))
    writer = PredictionWriter(formats=["csv"], top_k=1)
    rows = [{**r, "target": "", "pred": "a", "prob": 0.9, "top_k": [["a", 0.9]]} for r in merged]
    (path,) = writer.write(rows, tmp_path)
    with open(path) as f:
        assert [r["id"] for r in csv.DictReader(f)] == [f"img{i}.png" for i in range(n)]


@pytest.mark.slow  # three processes start (about 20 s on 2 cores)
def test_ddp_predict_writes_each_sample_once(mnist_root, tmp_path):
    """3 CPU processes (gloo) on 200 samples: the sampler pads one repeat; the file still has each sample once."""
    fit = cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", *fast_args(mnist_root), "--trainer.max_epochs=1",
                    "--model.init_args.net.init_args.hidden=[16]", "--test_after_fit=false"])  # fmt: skip
    command = [sys.executable, "-m", "project", "predict", f"--config={Path(fit.trainer.log_dir) / 'config.yaml'}",
               f"--ckpt_path={fit.trainer.checkpoint_callback.last_model_path}", "--trainer.strategy=ddp",
               "--trainer.devices=3", "--trainer.accelerator=cpu", "--data.init_args.eval_batch_size=64"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    with open(tmp_path / "runs" / "mnist" / "version_1" / "predictions.csv") as f:
        assert [int(r["id"]) for r in csv.DictReader(f)] == list(range(200))
