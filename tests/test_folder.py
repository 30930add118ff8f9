"""ImageFolderDataModule: your own images with a YAML only, splits, statistics, bad input, imbalance."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from project.cli import cli_main
from project.data import ImageFolderDataModule
from project.errors import UserError

CLASSES = ("disk", "red", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """Three visually different kinds of picture, with random noise, position and scale."""
    image = rng.integers(0, 70, size=(size, size, 3), dtype=np.uint8)
    if kind == "red":
        image[..., 0] = rng.integers(150, 256, size=(size, size), dtype=np.uint8)
    elif kind == "stripes":
        period = int(rng.integers(3, 6))
        image[(np.arange(size) // period) % 2 == 0] += np.uint8(150)
    else:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // int(rng.integers(4, 6))) ** 2, 2] = 255
    return Image.fromarray(image)


def write_image_folder(root: Path, counts: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: PNG files as a user would have them (varying sizes; the module resizes)."""
    rng = np.random.default_rng(seed)
    for kind, n in counts.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw(kind, rng, size + int(rng.integers(0, 8))).save(root / kind / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), dict.fromkeys(CLASSES, 40))


MY_YAML = """
trainer:
  max_epochs: 6
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
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


def test_make_it_yours_one_yaml_trains_and_predicts(image_root, tmp_path):
    """A new data set with one YAML and no Python: fit, reach well above chance, then predict to a CSV."""
    config = tmp_path / "my_data.yaml"
    config.write_text(MY_YAML.format(root=image_root))
    cli = cli_main(["fit", f"--config={config}"])
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir.parent.name == "image_folder"
    assert float(cli.trainer.callback_metrics["val/acc"]) >= 0.8  # chance is 1/3
    best = cli.trainer.checkpoint_callback.best_model_path
    hparams = torch.load(best, weights_only=True)["hyper_parameters"]
    assert list(hparams["class_names"]) == list(CLASSES) and hparams["num_classes"] == 3

    predicted = cli_main(["predict", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    with open(Path(predicted.trainer.log_dir) / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    test_files = {path for path, _ in predicted.datamodule.split_samples["test"]}
    assert {r["id"] for r in rows} == test_files and len(rows) == len(test_files) == 12
    assert all(Path(r["id"]).parent.name == r["target"] for r in rows)
    assert sum(r["pred"] == r["target"] for r in rows) / len(rows) >= 0.75
    assert all(r["pred"] == r["top1_class"] and 1 / 3 <= float(r["prob"]) <= 1 for r in rows)

    # unlabelled images: any folder
    unlabelled = write_image_folder(tmp_path / "new", {"stripes": 4}, seed=7) / "stripes"
    again = cli_main(["predict", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}",
                      f"--data.init_args.predict_dir={unlabelled}"])  # fmt: skip
    with open(Path(again.trainer.log_dir) / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(str(p) for p in unlabelled.iterdir())
    assert all(r["target"] == "" for r in rows) and sum(r["pred"] == "stripes" for r in rows) >= 3


def test_stratified_seeded_split(image_root):
    dm = ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=3)
    assert dm.class_names == CLASSES and dm.num_classes == 3 and dm.image_shape == (3, 64, 64)
    splits = dm.split_samples
    for name, per_class in (("train", 26), ("val", 10), ("test", 4)):
        labels = [label for _, label in splits[name]]
        assert [labels.count(k) for k in range(3)] == [per_class] * 3, name
    files = [path for split in splits.values() for path, _ in split]
    assert len(files) == len(set(files)) == 120
    assert all(Path(path).parent.name == CLASSES[label] for split in splits.values() for path, label in split)
    again = ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=3).split_samples
    other = ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=4).split_samples
    assert again == splits and other["val"] != splits["val"]


def test_split_folders_and_predict_dir(tmp_path):
    write_image_folder(tmp_path / "train", {"a": 6, "b": 6})
    write_image_folder(tmp_path / "test", {"a": 2, "b": 3}, seed=1)
    write_image_folder(tmp_path / "unlabelled" / "any", {"x": 4}, seed=2)
    dm = ImageFolderDataModule(tmp_path, channels=1, image_size=(16, 12), val_split=0.5, mean=[0.5], std=[0.25],
                               predict_dir=str(tmp_path / "unlabelled"))  # fmt: skip
    assert dm.class_names == ("a", "b") and [len(dm.split_samples[s]) for s in ("train", "val", "test")] == [6, 6, 5]
    dm.setup("fit")
    x, y = dm.datasets["train"][0]
    assert x.shape == (1, 16, 12) and y in (0, 1)
    dm.setup("predict")
    assert len(dm.datasets["predict"]) == 4 and {label for _, label in dm.datasets["predict"].samples} == {-1}


def test_mean_std_computed_from_train_split_and_cached(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"red": 5, "stripes": 5})
    dm = ImageFolderDataModule(root, image_size=8, val_split=0.2, test_split=0.0)
    dm.setup("fit")
    images = dm._dataset(dm.split_samples["train"], transform=None)  # PIL images, resized, not normalized
    pixels = torch.stack([torch.from_numpy(np.asarray(image)) for image, _ in images]).double() / 255
    np.testing.assert_allclose(dm.mean, pixels.mean(dim=(0, 1, 2)).numpy(), atol=1e-6)
    np.testing.assert_allclose(dm.std, pixels.std(dim=(0, 1, 2), correction=0).numpy(), atol=1e-6)
    cached = list(root.glob(".stats-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["mean"] == list(dm.mean)
    x, _ = dm.datasets["val"][0]  # normalized with those statistics
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8)
    cached[0].write_text(json.dumps({"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}))
    again = ImageFolderDataModule(root, image_size=8, val_split=0.2, test_split=0.0)
    again.setup("fit")
    assert again.mean == (0.0, 0.0, 0.0), "the cached statistics are read back, not recomputed"


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    bad = root / "b" / "002.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    dm = ImageFolderDataModule(root, val_split=0.2, test_split=0.0, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(UserError, match=r"cannot read image .*002\.png"):
        dm.setup("fit")
    dm = ImageFolderDataModule(root, val_split=0.2, test_split=0.0, mean=[0.5] * 3, std=[0.5] * 3, on_corrupt="skip")
    dm.setup("fit")
    assert dm.skipped == [str(bad)]
    kept = dm.split_samples["train"] + dm.split_samples["val"]
    assert len(kept) == 9 and str(bad) not in {p for p, _ in kept}

    # a cut-off JPEG passes the cheap check at setup; reading it names the file
    jpeg = root / "a" / "cut.jpg"
    draw("red", np.random.default_rng(0), 64).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-400])  # header intact, image data cut
    dm = ImageFolderDataModule(root, val_split=0.2, test_split=0.0, mean=[0.5] * 3, std=[0.5] * 3, on_corrupt="skip")
    dm.setup("fit")
    dataset = next(dm.datasets[s] for s in ("train", "val") if str(jpeg) in {p for p, _ in dm.datasets[s].samples})
    index = [p for p, _ in dataset.samples].index(str(jpeg))
    with pytest.raises(UserError, match=r"cannot read image .*cut\.jpg"):
        dataset[index]


def test_empty_root_and_empty_class_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        ImageFolderDataModule(tmp_path / "empty")
    root = write_image_folder(tmp_path / "imgs", {"a": 5})
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"class folder .*b holds no images"):
        ImageFolderDataModule(root)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--data=project.data.ImageFolderDataModule", f"--data.data_dir={tmp_path / 'missing'}",
                  "--model.net=project.models.nets.SmallCNN"])  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: image folder")


def test_weighted_sampler_balances_classes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 40, "b": 8})
    dm = ImageFolderDataModule(root, image_size=8, val_split=0.25, test_split=0.0, sampler="weighted",
                               batch_size=500, mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip
    dm.setup("fit")
    assert dm.class_counts == [30, 6]
    loader = dm.train_dataloader()
    labels = torch.cat([y for _epoch in range(30) for _, y in loader])
    assert abs(labels.float().mean().item() - 0.5) < 0.05  # 6/36 = 0.17 without the sampler


TINY_NET = """
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, input_shape=(3, 32, 32), width: int = 4):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(input_shape[0], width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(width, num_classes))

    def forward(self, x):
        return self.layers(x)
"""


def test_make_it_yours_a_new_net_in_one_file_and_one_yaml(image_root, tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(TINY_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny = "class_path: project.models.ImageClassifier\ninit_args:\n  net:\n    class_path: my_nets.TinyNet\n"
    (tmp_path / "tiny.yaml").write_text(tiny + "    init_args:\n      width: 6\n")
    config = tmp_path / "my_data.yaml"
    config.write_text(MY_YAML.format(root=image_root))
    cli = cli_main(["fit", f"--config={config}", f"--model={tmp_path / 'tiny.yaml'}", "--trainer.fast_dev_run=2"])
    assert type(cli.model.net).__name__ == "TinyNet" and cli.model.net.layers[0].out_channels == 6
    assert cli.model(torch.zeros(2, 3, 24, 24)).shape == (2, 3)  # num_classes and channels linked from the folder


def test_class_weighted_loss(tmp_path):
    from project.models import ImageClassifier
    from project.models.nets import MLP

    net = MLP(num_classes=2, input_shape=(1, 2, 2), hidden=[4])
    model = ImageClassifier(net, num_classes=2, class_weights=[1.0, 3.0])
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 1])
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(model.criterion(logits, y), expected)
    assert not torch.allclose(expected, torch.nn.functional.cross_entropy(logits, y))
    with pytest.raises(UserError, match="class_weights needs 2 values"):
        ImageClassifier(net, num_classes=2, class_weights=[1.0])
