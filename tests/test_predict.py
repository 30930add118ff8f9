"""`predict` writes one row per input for any data module and says where; your own images with one YAML."""

import csv
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from project.callbacks.prediction_writer import PredictionWriter, merge_rows
from project.cli import cli_main
from project.data.batches import InMemory
from project.errors import UserError
from tests.conftest import CONFIGS, QUIET, fit

JSONL = f"--config={CONFIGS / 'predict/jsonl.yaml'}"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_with_the_main_config(mnist_root, caplog):
    """The main job's own config (in-memory loader): CSV and JSON lines, ids are the test file's indices, the rows
    match the model's output, and the command says where the files went."""
    cli = fit("fashion_mnist.yaml", mnist_root, "--trainer.max_epochs=1", "--model.init_args.net.init_args.width=4")
    checkpoint = cli.config_init.fit.checkpoint.best_model_path
    setup = [f"--config={CONFIGS / 'fashion_mnist.yaml'}", JSONL, f"--data.init_args.data_dir={mnist_root}", *QUIET]
    predicted = cli_main(["predict", *setup, f"--ckpt_path={checkpoint}", "--data.init_args.eval_batch_size=64"])
    out = Path(predicted.trainer.log_dir)
    assert f"predictions of 200 inputs written to {out / 'predictions.csv'}, {out / 'predictions.jsonl'}" in caplog.text
    rows, lines = read_csv(out / "predictions.csv"), read_jsonl(out / "predictions.jsonl")
    order = predicted.datamodule.splits["test"].source.indices  # the in-memory copy of the seeded test order
    assert [int(r["id"]) for r in rows] == order == [r["id"] for r in lines] and sorted(order) == list(range(200))
    top5 = [f"top{j}_{w}" for j in range(1, 6) for w in ("class", "prob")]
    assert list(rows[0]) == ["index", "id", "target", "pred", "prob", *top5]
    images, labels = next(iter(predicted.datamodule.predict_dataloader()))
    probs = predicted.model.eval()(images[:3]).softmax(-1).detach()
    names = predicted.datamodule.class_names
    for line, p, label in zip(lines[:3], probs, labels[:3], strict=True):
        assert line["pred"] == names[int(p.argmax())] and abs(line["prob"] - float(p.max())) < 1e-5
        assert line["target"] == names[int(label)] and line["top_k"][0] == [line["pred"], line["prob"]]
    assert not list(out.glob(".predictions*")), "no partial files left"


MY_YAML = """
trainer: {{max_epochs: 6}}
model:
  class_path: project.models.ImageClassifier
  init_args:
    net: {{class_path: project.models.nets.SmallCNN, init_args: {{width: 8}}}}
    optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 0.01}}}}
data:
  class_path: project.data.ImageFolderDataModule
  init_args: {{data_dir: {root}, image_size: 24, batch_size: 16}}
"""


def test_your_own_images_with_one_yaml_train_and_predict(image_root, tmp_path):
    """A new data set with one YAML and no Python: fit well above chance, predict the test split (ids are the file
    paths, targets the folder names), then the same images unlabelled (no target, the same predictions)."""
    (tmp_path / "mine.yaml").write_text(MY_YAML.format(root=image_root))
    cli = cli_main(["fit", "--config=mine.yaml", *QUIET, f"--config={CONFIGS / 'logger/csv.yaml'}"])
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir.parent.name == "image_folder" and float(cli.trainer.callback_metrics["val/acc"]) >= 0.8  # chance 1/3
    best = cli.config_init.fit.checkpoint.best_model_path
    assert torch.load(best, weights_only=True)["hyper_parameters"]["class_names"] == ["disk", "red", "stripes"]
    config = f"--config={run_dir / 'config.yaml'}"
    predicted = cli_main(["predict", config, f"--ckpt_path={best}"])
    rows = read_csv(Path(predicted.trainer.log_dir) / "predictions.csv")
    assert sorted(r["id"] for r in rows) == sorted(p for p, _ in predicted.datamodule.samples["test"])
    assert len(rows) == 12
    assert all(Path(r["id"]).parent.name == r["target"] for r in rows)
    assert sum(r["pred"] == r["target"] for r in rows) >= 9 and all(r["pred"] == r["top1_class"] for r in rows)
    unlabelled = tmp_path / "new" / "any"  # the test images again, without labels, in a folder tree of their own
    unlabelled.mkdir(parents=True)
    for i, r in enumerate(rows):
        shutil.copy(r["id"], unlabelled / f"{i:02d}.png")
    again = cli_main(["predict", config, JSONL, f"--ckpt_path={best}", f"--data.init_args.predict_dir={unlabelled}"])
    out = Path(again.trainer.log_dir)
    lines = read_jsonl(out / "predictions.jsonl")
    assert sorted(x["id"] for x in lines) == sorted(str(p) for p in unlabelled.iterdir())
    assert all(x["target"] is None for x in lines) and {r["target"] for r in read_csv(out / "predictions.csv")} == {""}
    assert [x["pred"] for x in sorted(lines, key=lambda x: x["id"])] == [r["pred"] for r in rows]


def test_rows_merged_from_padded_ranks_keep_each_input_once(tmp_path):
    per_rank = [[{"index": i} for i in indices] for indices in ([0, 3, 6], [1, 4, 0], [2, 5, 1])]  # 2 padded repeats
    predicted = {"target": None, "pred": "a", "prob": 0.9, "top_k": [["a", 0.9]]}
    rows = [{**r, "id": f"img{r['index']}.png", **predicted} for r in merge_rows(per_rank)]
    (path,) = PredictionWriter(formats=["csv"], top_k=1).write(rows, tmp_path)
    assert [r["id"] for r in read_csv(path)] == [f"img{i}.png" for i in range(7)]


def one_batch(writer: PredictionWriter, trainer, model, outputs, batch) -> None:
    writer.on_predict_epoch_start(trainer, model)
    writer.write_on_batch_end(trainer, model, outputs, None, batch, 0, 0)
    writer.on_predict_epoch_end(trainer, model)


def test_writer_rows_are_the_model_outputs_named_per_input_file(tmp_path, caplog, monkeypatch):
    """The writer itself, with a stand-in trainer: logits or probabilities in, per input its file (through a Subset
    and an in-memory copy), target (none for -1), predicted class, its probability and the top-k, rounded to 6
    places; a loader whose sampler Lightning cannot track numbers the inputs in order (one process only)."""
    files = SimpleNamespace(samples=[(f"img{i}.png", i % 3) for i in range(5)])  # ImageFiles: each sample's file
    order = Subset(files, [3, 1, 4, 0, 2])
    dataset = InMemory(torch.zeros(5, 1, 1, 1, dtype=torch.uint8), torch.tensor([0, 2, 1, -1, 0]), source=order)
    loader = DataLoader(dataset)
    trainer = SimpleNamespace(world_size=1, predict_dataloaders=[loader], is_global_zero=True, log_dir=str(tmp_path))
    model = SimpleNamespace(class_names=["a", "b", "c", "d"])
    probs = torch.tensor(
        [
            [0.1234567, 0.0, 0.8765433, 0.0],
            [0.25, 0.5, 0.125, 0.125],
            [0.0, 0.0, 0.3333333, 0.6666667],
            [0.9999994, 0.0000006, 0.0, 0.0],
            [0.4, 0.1, 0.2, 0.3],
        ]
    )
    writer = PredictionWriter(formats=["csv", "jsonl"], top_k=2)
    caplog.set_level(logging.INFO)
    writer.on_predict_epoch_start(trainer, model)
    writer.write_on_batch_end(trainer, model, probs[:3].log(), None, (None, torch.tensor([0, 2, 1])), 0, 0)
    writer.write_on_batch_end(trainer, model, {"probs": probs[3:]}, [], (None, torch.tensor([-1, 0])), 1, 0)
    writer.on_predict_epoch_end(trainer, model)
    assert "need a classifier" not in caplog.text and "predictions of 5 inputs written to" in caplog.text
    expected = [
        (0, "img3.png", "a", [["c", 0.876543], ["a", 0.123457]]),
        (1, "img1.png", "c", [["b", 0.5], ["a", 0.25]]),
        (2, "img4.png", "b", [["d", 0.666667], ["c", 0.333333]]),
        (3, "img0.png", None, [["a", 0.999999], ["b", 1e-06]]),
        (4, "img2.png", "a", [["a", 0.4], ["d", 0.3]]),
    ]
    assert writer.written == [tmp_path / "predictions.csv", tmp_path / "predictions.jsonl"]
    assert read_jsonl(tmp_path / "predictions.jsonl") == [
        {"index": i, "id": f, "target": t, "pred": k[0][0], "prob": k[0][1], "top_k": k} for i, f, t, k in expected
    ]
    header = ["index", "id", "target", "pred", "prob", "top1_class", "top1_prob", "top2_class", "top2_prob"]
    body = [[str(i), f, t or "", k[0][0], str(k[0][1]), *(str(v) for p in k for v in p)] for i, f, t, k in expected]
    with open(tmp_path / "predictions.csv", newline="") as text:
        assert list(csv.reader(text)) == [header, *body]
    default = PredictionWriter()  # CSV only, the top 3
    (tmp_path / "default").mkdir()
    trainer.log_dir = str(tmp_path / "default")
    one_batch(default, trainer, model, {"probs": probs}, torch.zeros(5, 3))  # images, no labels
    assert default.written == [tmp_path / "default" / "predictions.csv"]
    rows = read_csv(default.written[0])
    assert [r["target"] for r in rows] == [""] * 5 and "top4_class" not in rows[-1]
    assert [rows[-1][f"top{j}_class"] for j in (1, 2, 3)] == ["a", "d", "c"]  # 0.4, 0.1, 0.2, 0.3

    # two DDP ranks (the gather stood in for): rank 1 sent inputs 5 and 6, and input 0 again (a padding repeat)
    def gather(out: list, rows: list) -> None:
        out[:] = [rows, [{**r, "index": i, "id": f"other{i}"} for r, i in zip(rows, (5, 6, 0), strict=False)]]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    trainer.world_size = 2
    default.write_on_batch_end(trainer, model, {"probs": probs}, [0, 1, 2, 3, 4], torch.zeros(5, 3), 0, 0)
    default.on_predict_epoch_end(trainer, model)
    ids = [f"img{i}.png" for i in (3, 1, 4, 0, 2)]
    assert [r["id"] for r in read_csv(default.written[0])] == [*ids, "other5", "other6"]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # no logger (no log_dir) and no output_dir: the current folder
    trainer.world_size, trainer.log_dir = 1, None
    one_batch(default, trainer, model, {"probs": probs}, torch.zeros(5, 3))
    assert [p.name for p in (tmp_path / "cwd").iterdir()] == ["predictions.csv"]
    trainer.world_size = 2  # DDP: without the sampler's indices the rows of the ranks cannot be merged
    with pytest.raises(UserError, match="predict under DDP needs a DataLoader with a sampler Lightning can track"):
        writer.write_on_batch_end(trainer, model, probs, None, (None, torch.zeros(5, dtype=torch.long)), 0, 0)
    not_a_classifier = SimpleNamespace()  # no class_names: nothing written, and it says so
    (tmp_path / "other").mkdir()
    trainer.world_size, trainer.log_dir = 1, str(tmp_path / "other")
    one_batch(writer, trainer, not_a_classifier, probs, (None, torch.zeros(5, dtype=torch.long)))
    assert "SimpleNamespace is not one, so none are written" in caplog.text and not list((tmp_path / "other").iterdir())
