import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from project.data import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, MNISTDataModule, vision
from project.errors import UserError
from tests.formats import write_mnist_family


@pytest.mark.parametrize("cls, folder", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")])
def test_mnist_family_reads_raw_idx(cls, folder, mnist_root):
    dm = cls(data_dir=mnist_root, batch_size=32, val_split=100)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"]), len(dm.datasets["test"])) == (500, 100, 200)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.num_classes == 10 and len(dm.class_names) == 10 and dm.image_shape == (1, 28, 28)


def test_test_set_is_the_test_file_untouched(mnist_root):
    """Test samples are exactly the t10k file, in order; normalization is the only change."""
    dm = MNISTDataModule(data_dir=mnist_root)
    dm.setup("test")
    raw = np.frombuffer((mnist_root / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    raw = torch.from_numpy(raw.reshape(-1, 28, 28).copy()).float() / 255
    x, _ = next(iter(dm.test_dataloader()))
    restored = x[:, 0] * dm.std[0] + dm.mean[0]
    torch.testing.assert_close(restored, raw[: len(x)], atol=1e-5, rtol=0)


def test_split_disjoint_deterministic_and_from_train_only(mnist_root):
    a = FashionMNISTDataModule(data_dir=mnist_root, val_split=0.25, seed=1)
    b = FashionMNISTDataModule(data_dir=mnist_root, val_split=0.25, seed=1)
    c = FashionMNISTDataModule(data_dir=mnist_root, val_split=0.25, seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    train_idx, val_idx = a.datasets["train"].indices, a.datasets["val"].indices
    assert len(val_idx) == 150 and len(train_idx) == 450
    assert not set(train_idx) & set(val_idx) and set(train_idx) | set(val_idx) == set(range(600))
    assert val_idx == b.datasets["val"].indices
    assert val_idx != c.datasets["val"].indices
    assert a.datasets["val"].dataset.train and a.datasets["train"].dataset.train  # both out of the training file


def test_val_split_leaving_no_training_data_is_refused(mnist_root):
    with pytest.raises(ValueError, match="leaves no training data"):
        MNISTDataModule(data_dir=mnist_root, val_split=600).setup("fit")


def test_standard_augmentation_only_on_train(mnist_root):
    dm = MNISTDataModule(data_dir=mnist_root, augment="standard", val_split=50)
    dm.setup("fit")
    train_ds, val_ds = dm.datasets["train"], dm.datasets["val"]
    torch.manual_seed(0)
    first, second = train_ds[0][0], train_ds[0][0]
    assert not torch.equal(first, second), "train samples should be randomly augmented"
    assert torch.equal(val_ds[0][0], val_ds[0][0]), "validation samples must be deterministic"


def test_fashion_mnist_unpacks_gz_folder(tmp_path):
    gz = tmp_path / "debian"
    write_mnist_family(gz, compress=True)
    dm = FashionMNISTDataModule(data_dir=tmp_path / "data", gz_dir=str(gz))
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.datasets["test"]) == 200
    raw = sorted(p.name for p in (tmp_path / "data/FashionMNIST/raw").iterdir())
    assert raw == sorted(vision.IDX_FILES), "no partial or extra files"


def test_fashion_mnist_finds_debian_folder_by_itself(tmp_path, monkeypatch):
    gz = tmp_path / "usr-share"
    write_mnist_family(gz, compress=True, n_train=100)
    monkeypatch.setattr(FashionMNISTDataModule, "auto_gz_dirs", (str(gz),))
    dm = FashionMNISTDataModule(data_dir=tmp_path / "data", val_split=10)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 90


def test_gz_dir_missing_files_names_them(tmp_path):
    gz = tmp_path / "partial"
    write_mnist_family(gz, compress=True)
    (gz / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz"):
        FashionMNISTDataModule(data_dir=tmp_path / "data", gz_dir=str(gz)).prepare_data()


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_missing_data_offline_is_one_clear_error_and_leaves_nothing(cls, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as err:
        cls(data_dir=data_dir).prepare_data()
    message = str(err.value)
    assert "not found" in message and str(data_dir) in message and "\n" not in message
    assert list(data_dir.iterdir()) == [], "a failed download must leave nothing behind"


@pytest.mark.parametrize("cls, n", [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_cifar_reads_python_pickles(cls, n, cifar_root):
    root, files = cifar_root
    dm = cls(data_dir=root, batch_size=16, val_split=0.2)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    n_train = len(files[n]["train"][1])
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == n_train
    assert len(dm.datasets["test"]) == len(files[n]["test"][1])
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 3, 32, 32) and dm.num_classes == n == len(dm.class_names)
    # First test image, de-normalized, equals the pickled pixels.
    mean, std = torch.tensor(dm.mean)[:, None, None], torch.tensor(dm.std)[:, None, None]
    expected = torch.from_numpy(files[n]["test"][0][0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x[0] * std + mean, expected, atol=1e-5, rtol=0)
    assert y[0].item() == files[n]["test"][1][0]


def test_cifar_with_a_corrupt_file_is_not_present(cifar_root, tmp_path):
    root, _ = cifar_root
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    batch = copy / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:-10])
    assert CIFAR10DataModule(data_dir=root).files_present()
    assert not CIFAR10DataModule(data_dir=copy).files_present()


def test_predict_uses_test_split_by_default(mnist_root):
    dm = MNISTDataModule(data_dir=mnist_root)
    dm.setup("predict")
    assert len(dm.predict_dataloader().dataset) == 200
    dm = MNISTDataModule(data_dir=mnist_root, predict_split="val", val_split=30)
    dm.setup("predict")
    assert len(dm.predict_dataloader().dataset) == 30


def test_data_dir_as_path_is_used(mnist_root):
    assert Path(MNISTDataModule(data_dir=str(mnist_root)).data_dir) == mnist_root
