"""Data modules on format-exact files: splits, both loaders, batch augmentation, your own image folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from project.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    vision,
)
from project.data.batches import BatchAugment, InMemory, TensorLoader
from project.errors import UserError
from tests.formats import draw, write_image_folder, write_mnist_family


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def modules(mnist_root, cifar_root, image_root, **kwargs) -> dict[str, object]:
    return {
        "mnist": MNISTDataModule(data_dir=mnist_root, **kwargs),
        "cifar10": CIFAR10DataModule(data_dir=cifar_root[0], **kwargs),
        "cifar100": CIFAR100DataModule(data_dir=cifar_root[0], val_split=0.25, **kwargs),
        "folder": ImageFolderDataModule(image_root, image_size=16, **kwargs),
    }


def test_every_data_module_serves_uint8_batches_the_same_on_both_loaders(mnist_root, cifar_root, image_root):
    """Evaluation splits: identical images and labels from the per-sample and the in-memory path, uint8, in a fixed
    seeded order that is not sorted by class (a limited validation still sees most classes)."""
    per_sample = modules(mnist_root, cifar_root, image_root, batch_size=32, loader="torchvision")
    in_memory = modules(mnist_root, cifar_root, image_root, batch_size=32, loader="tensor")
    for name, dm in per_sample.items():
        other = in_memory[name]
        for stage, split in (("fit", "val"), ("test", "test")):
            dm.setup(stage)
            other.setup(stage)
            x, y = collect(getattr(dm, f"{split}_dataloader")())
            x2, y2 = collect(getattr(other, f"{split}_dataloader")())
            assert x.dtype == torch.uint8 and x.shape[1:] == dm.image_shape, name
            assert torch.equal(x, x2) and torch.equal(y, y2), (name, split)
            first = y[:32].unique().numel()
            assert first >= min(dm.num_classes, 32) // 4 + 1 and not torch.equal(y, y.sort().values), (name, split)
        assert len(dm.splits["train"]) + len(dm.splits["val"]) in (600, 500, 400, 108), name


def test_split_is_stratified_seeded_disjoint_and_from_train_only(mnist_root):
    a, b, c = (FashionMNISTDataModule(data_dir=mnist_root, val_split=0.25, seed=s) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup("fit")
    train, val = a.splits["train"].indices, a.splits["val"].indices
    assert (
        len(val) == 150 and len(train) == 450 and set(train) | set(val) == set(range(600)) and not set(train) & set(val)
    )
    labels = torch.as_tensor(a.splits["train"].dataset.targets)
    assert torch.bincount(labels[val]).tolist() == [15] * 10  # every class in proportion
    assert val == b.splits["val"].indices and val != c.splits["val"].indices
    assert MNISTDataModule(data_dir=mnist_root, val_split=61).setup("fit") is None  # an exact odd count
    with pytest.raises(UserError, match="leaves no training data"):
        MNISTDataModule(data_dir=mnist_root, val_split=600).setup("fit")


def test_test_split_is_the_test_file(mnist_root):
    dm = MNISTDataModule(data_dir=mnist_root)
    dm.setup("test")
    raw = np.frombuffer((mnist_root / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    raw = torch.from_numpy(raw.reshape(-1, 1, 28, 28).copy())
    x, _ = collect(dm.test_dataloader())
    assert torch.equal(x, raw[dm.splits["test"].indices]) and sorted(dm.splits["test"].indices) == list(range(200))


def test_cifar_reads_python_pickles_and_checks_md5(cifar_root, tmp_path):
    root, files = cifar_root
    dm = CIFAR10DataModule(data_dir=root, batch_size=16, val_split=0.2)
    dm.prepare_data()
    dm.setup("test")
    assert set(dm.splits) == {"test"}, "a test run reads no training data"
    index = dm.splits["test"].indices[0]
    x, y = next(iter(dm.test_dataloader()))
    assert torch.equal(x[0], torch.from_numpy(files[10]["test"][0][index]).permute(2, 0, 1))
    assert y[0] == files[10]["test"][1][index]
    copy = tmp_path / "copy" / "cifar-10-batches-py"
    copy.mkdir(parents=True)
    for f in (root / "cifar-10-batches-py").iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes()[: -10 if f.name == "data_batch_1" else None])
    damaged = CIFAR10DataModule(data_dir=copy.parent)
    damaged.prepare_data()  # every file is there: nothing to fetch
    with pytest.raises(UserError, match="CIFAR10 not found or corrupt.*MD5 check; delete "):  # checked on reading
        damaged.setup("fit")


def test_fashion_mnist_unpacks_gz_from_a_folder_or_debian(tmp_path, monkeypatch):
    gz = tmp_path / "debian"
    write_mnist_family(gz, compress=True, n_train=100)
    dm = FashionMNISTDataModule(data_dir=tmp_path / "data", gz_dir=str(gz), val_split=10)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.splits["train"]) == 90
    assert sorted(p.name for p in (tmp_path / "data/FashionMNIST/raw").iterdir()) == sorted(vision.IDX_FILES)
    monkeypatch.setattr(FashionMNISTDataModule, "auto_gz_dirs", (str(gz),))
    FashionMNISTDataModule(data_dir=tmp_path / "other").prepare_data()
    assert len(list((tmp_path / "other/FashionMNIST/raw").iterdir())) == 4
    (gz / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz"):
        FashionMNISTDataModule(data_dir=tmp_path / "third", gz_dir=str(gz)).prepare_data()


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_missing_data_offline_is_one_clear_error_and_leaves_nothing(cls, tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError) as err:
        cls(data_dir=tmp_path / "data").prepare_data()
    assert "not found" in str(err.value) and str(tmp_path / "data") in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "data").iterdir()) == [], "a failed download leaves nothing behind"


def test_augmentations_take_effect_per_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    flipped = BatchAugment(flip=True)(x)
    original = x.float() / 255
    mirrored = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(flipped, original, strict=True)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(flipped, original, strict=True)])
    assert bool((mirrored ^ same).all()) and 0.4 < mirrored.float().mean() < 0.6
    # the crop equals slicing each reflect-padded image at the offsets drawn, in the order drawn
    # and with flip, the slice mirrored where the flip was drawn
    for flip in (False, True):
        torch.manual_seed(5)
        cropped = BatchAugment(crop_padding=3, flip=flip)(x[:32, :, :12, :10])
        torch.manual_seed(5)
        dy, dx = torch.randint(0, 7, (32,)), torch.randint(0, 7, (32,))
        mirror = torch.rand(32) < 0.5 if flip else torch.zeros(32, dtype=torch.bool)
        padded = torch.nn.functional.pad(original[:32, :, :12, :10], (3, 3, 3, 3), mode="reflect")
        expected = torch.stack([padded[i, :, dy[i] : dy[i] + 12, dx[i] : dx[i] + 10] for i in range(32)])
        expected = torch.where(mirror[:, None, None, None], expected.flip(-1), expected)
        torch.testing.assert_close(cropped, expected, rtol=0, atol=0)
        assert 0 < mirror.sum() < 32 or not flip
    assert len({(int(a), int(b)) for a, b in zip(dy, dx, strict=True)}) > 10
    digits = torch.zeros(256, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 10:18, 10:18] = 255
    moved = BatchAugment(degrees=10, translate=0.1, scale=(0.9, 1.1))(digits)
    mass = moved.sum(dim=(1, 2, 3)) / 64
    assert 0.75 < mass.min() and mass.max() < 1.3 and (moved != digits / 255).flatten(1).any(1).float().mean() > 0.95


def test_augmentation_runs_on_training_batches_only(mnist_root):
    dm = MNISTDataModule(data_dir=mnist_root, augment="standard", loader="tensor")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = type("T", (), {"training": False})()
    assert dm.on_after_batch_transfer(batch, 0)[0] is batch[0]  # validation/test: untouched uint8
    dm.trainer.training = True
    x = dm.on_after_batch_transfer(batch, 0)[0]
    assert x.dtype == torch.float32 and not torch.equal(x, batch[0] / 255)


def loader(n: int = 103, **kwargs) -> TensorLoader:
    data = InMemory(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n) % 4)
    return TensorLoader(data, **{"batch_size": 8, "seed": 7, **kwargs})


def test_tensor_loader_is_seeded_sharded_and_resumes_mid_epoch():
    a, b = loader(), loader()
    first = collect(a)[0].flatten()
    assert torch.equal(first, collect(b)[0].flatten()) and sorted(first.tolist()) == list(range(103))
    assert not torch.equal(first, collect(a)[0].flatten()) and not torch.equal(
        first, collect(loader(seed=8))[0].flatten()
    )
    shards = [collect(loader(rank=r, world_size=3))[0].flatten().tolist() for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(set(sum(shards, []))) == 102  # disjoint, equal lengths
    reference = loader()
    epochs = [[x for x, _ in reference] for _ in range(2)]
    interrupted = loader()
    list(interrupted)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    resumed = loader(seed=123)  # the seed comes back from the state
    resumed.load_state_dict(interrupted.state_dict())
    assert [x.tolist() for x, _ in resumed] == [x.tolist() for x in epochs[1][5:]]


def test_weighted_sampler_balances_classes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"red": 40, "stripes": 8})
    for kind in ("torchvision", "tensor"):
        dm = ImageFolderDataModule(
            root,
            image_size=8,
            val_split=0.25,
            test_split=0.0,
            sampler="weighted",
            batch_size=500,
            mean=[0.5] * 3,
            std=[0.5] * 3,
            loader=kind,
        )
        dm.setup("fit")
        train = dm.train_dataloader()
        labels = torch.cat([y for _ in range(30) for _, y in train])
        assert abs(labels.float().mean().item() - 0.5) < 0.05, kind  # 6/36 = 0.17 without the sampler


def test_folder_splits_are_stratified_and_seeded(image_root, tmp_path):
    dm = ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=3)
    assert dm.class_names == ["disk", "red", "stripes"] and dm.image_shape == (3, 64, 64)
    for name, per_class in (("train", 26), ("val", 10), ("test", 4)):
        labels = [label for _, label in dm.samples[name]]
        assert [labels.count(k) for k in range(3)] == [per_class] * 3, name
        assert all(Path(p).parent.name == dm.class_names[label] for p, label in dm.samples[name])
    assert ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=3).samples == dm.samples
    assert ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=4).samples["val"] != dm.samples["val"]
    write_image_folder(tmp_path / "split" / "train", {"a": 6, "b": 6})
    write_image_folder(tmp_path / "split" / "test", {"a": 2, "b": 3}, seed=1)
    write_image_folder(tmp_path / "unlabelled" / "any", {"x": 4}, seed=2)
    dm = ImageFolderDataModule(
        tmp_path / "split",
        channels=1,
        image_size=(16, 12),
        val_split=0.5,
        mean=[0.5],
        std=[0.25],
        predict_dir=str(tmp_path / "unlabelled"),
    )
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [6, 6, 5]
    dm.setup("predict")
    assert dm.splits["predict"][0][0].shape == (1, 16, 12) and dm.splits["predict"].targets == [-1] * 4


def test_folder_statistics_and_checks_are_computed_once_and_cached(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"red": 5, "stripes": 5})
    dm = ImageFolderDataModule(root, image_size=8, val_split=0.2, test_split=0.0)
    pixels = torch.stack([dm._dataset(dm.samples["train"])[i][0] for i in range(8)]).double() / 255
    np.testing.assert_allclose(dm.mean, pixels.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    np.testing.assert_allclose(dm.std, pixels.std(dim=(0, 2, 3), correction=0).numpy(), atol=1e-6)
    (cached,) = root.glob(".stats-*.json")
    assert json.loads(cached.read_text())["mean"] == list(dm.mean)
    cached.write_text(json.dumps({"unreadable": {}, "mean": [0.0] * 3, "std": [1.0] * 3}))
    assert ImageFolderDataModule(root, image_size=8, val_split=0.2, test_split=0.0).mean == (0.0, 0.0, 0.0)


def test_unreadable_images_are_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"red": 5, "stripes": 5})
    bad = root / "stripes" / "002.png"
    bad.write_bytes(bad.read_bytes()[:40])
    common = dict(val_split=0.2, test_split=0.0, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(UserError, match=r"cannot read image .*002\.png"):
        ImageFolderDataModule(root, **common)
    dm = ImageFolderDataModule(root, on_corrupt="skip", **common)
    assert len(dm.samples["train"]) + len(dm.samples["val"]) == 9
    jpeg = root / "red" / "cut.jpg"  # header intact, image data cut: passes the check, fails when read
    draw("red", np.random.default_rng(0), 64).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-400])
    dm = ImageFolderDataModule(root, on_corrupt="skip", **common)
    dm.setup("fit")
    split = next(dm.splits[s] for s in ("train", "val") if str(jpeg) in [p for p, _ in dm.samples[s]])
    with pytest.raises(UserError, match=r"cannot read image .*cut\.jpg"):
        [split[i] for i in range(len(split))]


def test_empty_root_or_class_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        ImageFolderDataModule(tmp_path / "empty")
    root = write_image_folder(tmp_path / "imgs", {"red": 5})
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="Found no valid file for the classes b"):
        ImageFolderDataModule(root)
    with pytest.raises(UserError, match="not found"):
        ImageFolderDataModule(tmp_path / "missing")
