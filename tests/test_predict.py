"""`predict` writes one row per input for any data module and says where; your own images with one YAML."""

import csv
import json
import shutil
from pathlib import Path

import torch

from project.callbacks.prediction_writer import PredictionWriter, merge_rows
from project.cli import cli_main
from tests.conftest import CONFIGS, QUIET, fit


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_with_the_main_config(mnist_root, caplog):
    """The main job's own config (in-memory loader): CSV and JSON lines, ids are the test file's indices, the rows
    match the model's output, and the command says where the files went."""
    cli = fit("fashion_mnist.yaml", mnist_root, "--trainer.max_epochs=1", "--model.init_args.net.init_args.width=4")
    checkpoint = cli.config_init.fit.checkpoint.best_model_path
    predicted = cli_main(
        [
            "predict",
            f"--config={CONFIGS / 'fashion_mnist.yaml'}",
            f"--config={CONFIGS / 'predict/jsonl.yaml'}",
            f"--data.init_args.data_dir={mnist_root}",
            *QUIET,
            f"--ckpt_path={checkpoint}",
            "--data.init_args.eval_batch_size=64",
        ]
    )
    out = Path(predicted.trainer.log_dir)
    assert f"predictions of 200 inputs written to {out / 'predictions.csv'}, {out / 'predictions.jsonl'}" in caplog.text
    rows, lines = (
        read_csv(out / "predictions.csv"),
        [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()],
    )
    order = predicted.datamodule.splits["test"].source.indices  # the in-memory copy of the seeded test order
    assert [int(r["id"]) for r in rows] == order == [r["id"] for r in lines] and sorted(order) == list(range(200))
    assert list(rows[0]) == ["index", "id", "target", "pred", "prob"] + [
        f"top{j}_{w}" for j in range(1, 6) for w in ("class", "prob")
    ]
    images, labels = next(iter(predicted.datamodule.predict_dataloader()))
    probs = predicted.model.eval()(images[:3]).softmax(-1).detach()
    names = predicted.datamodule.class_names
    for i in range(3):
        assert (
            lines[i]["pred"] == names[int(probs[i].argmax())] and abs(lines[i]["prob"] - float(probs[i].max())) < 1e-5
        )
        assert lines[i]["target"] == names[int(labels[i])] and lines[i]["top_k"][0] == [
            lines[i]["pred"],
            lines[i]["prob"],
        ]
    assert not list(out.glob(".predictions*")), "no partial files left"


MY_YAML = """
trainer:
  max_epochs: 6
model:
  class_path: project.models.ImageClassifier
  init_args:
    net:
      class_path: project.models.nets.SmallCNN
      init_args:
        width: 8
    optimizer:
      class_path: torch.optim.AdamW
      init_args:
        lr: 0.01
data:
  class_path: project.data.ImageFolderDataModule
  init_args:
    data_dir: {root}
    image_size: 24
    batch_size: 16
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
    predicted = cli_main(["predict", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    rows = read_csv(Path(predicted.trainer.log_dir) / "predictions.csv")
    assert (
        sorted(r["id"] for r in rows) == sorted(p for p, _ in predicted.datamodule.samples["test"]) and len(rows) == 12
    )
    assert all(Path(r["id"]).parent.name == r["target"] for r in rows)
    assert sum(r["pred"] == r["target"] for r in rows) >= 9 and all(r["pred"] == r["top1_class"] for r in rows)
    unlabelled = tmp_path / "new" / "any"  # the test images again, without labels, in a folder tree of their own
    unlabelled.mkdir(parents=True)
    for i, r in enumerate(rows):
        shutil.copy(r["id"], unlabelled / f"{i:02d}.png")
    again = cli_main(
        [
            "predict",
            f"--config={run_dir / 'config.yaml'}",
            f"--config={CONFIGS / 'predict/jsonl.yaml'}",
            f"--ckpt_path={best}",
            f"--data.init_args.predict_dir={unlabelled}",
        ]
    )
    out = Path(again.trainer.log_dir)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(str(p) for p in unlabelled.iterdir())
    assert all(x["target"] is None for x in lines) and {r["target"] for r in read_csv(out / "predictions.csv")} == {""}
    assert [x["pred"] for x in sorted(lines, key=lambda x: x["id"])] == [r["pred"] for r in rows]


def test_rows_merged_from_padded_ranks_keep_each_input_once(tmp_path):
    per_rank = [[{"index": i} for i in indices] for indices in ([0, 3, 6], [1, 4, 0], [2, 5, 1])]  # 2 padded repeats
    rows = [
        {**r, "id": f"img{r['index']}.png", "target": None, "pred": "a", "prob": 0.9, "top_k": [["a", 0.9]]}
        for r in merge_rows(per_rank)
    ]
    (path,) = PredictionWriter(formats=["csv"], top_k=1).write(rows, tmp_path)
    assert [r["id"] for r in read_csv(path)] == [f"img{i}.png" for i in range(7)]
