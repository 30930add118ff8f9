"""Data modules on format-exact files: splits, both loaders, batch augmentation, your own image folders."""

import functools
import logging
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from torchvision import datasets

from project.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    folder,
    vision,
)
from project.data.base import ImageDataModule, stratified_split
from project.data.batches import BatchAugment, InMemory, TensorLoader, decode
from project.data.images import read_image
from project.errors import UserError
from tests.conftest import CONFIGS, CSV, QUIET, fails, fit
from tests.formats import (
    VIEWER_CASES,
    draw,
    write_alpha_icons,
    write_idx,
    write_image_folder,
    write_mnist_family,
    write_viewer_case,
)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def ready(dm, *stages: str):
    """``dm`` after ``prepare_data`` (the stage "prepare") and ``setup`` of each other stage, in order."""
    for stage in stages:
        dm.prepare_data() if stage == "prepare" else dm.setup(stage)
    return dm


def modules(mnist_root, cifar_root, image_root, **kwargs) -> dict[str, object]:
    return {
        "mnist": MNISTDataModule(data_dir=mnist_root, **kwargs),
        "cifar10": CIFAR10DataModule(data_dir=cifar_root[0], **kwargs),
        "cifar100": CIFAR100DataModule(data_dir=cifar_root[0], val_split=0.25, **kwargs),
        "folder": ImageFolderDataModule(image_root, image_size=16, **kwargs),
    }


def labelled_images(mnist_root, cifar_root, image_root) -> dict[str, dict[str, dict[bytes, int]]]:
    """For each module, per source file (train, test): every image's bytes (CHW) -> its label, read from the files."""

    def table(images, labels) -> dict[bytes, int]:
        return {x.tobytes(): int(y) for x, y in zip(images, labels, strict=True)}

    mnist = {split: datasets.MNIST(str(mnist_root), train=split == "train") for split in ("train", "test")}
    truth = {"mnist": {split: table(data.data.numpy(), data.targets) for split, data in mnist.items()}}
    for n in (10, 100):  # CIFAR's files hold HWC
        files = cifar_root[1][n]
        truth[f"cifar{n}"] = {s: table(files[s][0].transpose(0, 3, 1, 2), files[s][1]) for s in ("train", "test")}
    paths, names = list(image_root.glob("*/*")), sorted(p.name for p in image_root.iterdir() if p.is_dir())
    own = table([read_image(p, "RGB", (16, 16)).numpy() for p in paths], [names.index(p.parent.name) for p in paths])
    return {**truth, "folder": {"train": own, "test": own}}


def test_every_data_module_serves_uint8_batches_the_same_on_both_loaders(mnist_root, cifar_root, image_root):
    """Evaluation splits: the same uint8 images, each with its label from the files, on both loaders; sizes as asked;
    a seeded order not sorted by class (a limited validation still sees most classes)."""
    per_sample = modules(mnist_root, cifar_root, image_root, batch_size=32, loader="torchvision")
    in_memory = modules(mnist_root, cifar_root, image_root, batch_size=32, loader="tensor")
    truth = labelled_images(mnist_root, cifar_root, image_root)
    sizes = {"mnist": (540, 60, 200), "cifar10": (450, 50, 100), "cifar100": (300, 100, 100), "folder": (84, 24, 12)}
    for name, dm in per_sample.items():
        other = in_memory[name]
        for stage, split in (("fit", "val"), ("test", "test")):
            loaders = [getattr(ready(module, stage), f"{split}_dataloader")() for module in (dm, other)]
            assert [loader.batch_size for loader in loaders] == [32, 32], name
            (x, y), (x2, y2) = collect(loaders[0]), collect(loaders[1])
            held = other.splits[split]
            assert isinstance(held, InMemory) and held.source.indices == dm.splits[split].indices
            assert x.dtype == torch.uint8 and x.shape[1:] == dm.image_shape, name
            assert torch.equal(x, x2) and torch.equal(y, y2), (name, split)
            source = truth[name]["test" if split == "test" else "train"]
            assert [source.get(image.numpy().tobytes()) for image in x] == y.tolist(), (name, split)
            assert len({image.numpy().tobytes() for image in x}) == len(x) == sizes[name][1 if split == "val" else 2]
            first = y[:32].unique().numel()
            assert first >= min(dm.num_classes, 32) // 2 and not torch.equal(y, y.sort().values), (name, split)
        (train, labels), again = collect(dm.train_dataloader()), collect(dm.train_dataloader())[1]
        assert not torch.equal(labels, again), f"{name}: training batches are shuffled every epoch"
        train = [image.numpy().tobytes() for image in train]
        assert len(set(train)) == len(train) == sizes[name][0], name
        assert not set(train) & {image.numpy().tobytes() for image in collect(dm.val_dataloader())[0]}, name
        assert sorted(train) == sorted(image.numpy().tobytes() for image in collect(other.train_dataloader())[0])


def test_split_is_stratified_seeded_disjoint_and_from_train_only(mnist_root):
    a, b, c = (ready(FashionMNISTDataModule(data_dir=mnist_root, val_split=0.25, seed=s), "fit") for s in (1, 1, 2))
    train, val = a.splits["train"].indices, a.splits["val"].indices
    assert len(val) == 150 and len(train) == 450
    assert set(train) | set(val) == set(range(600)) and not set(train) & set(val)
    labels = torch.as_tensor(a.splits["train"].dataset.targets)
    assert torch.bincount(labels[val]).tolist() == [15] * 10  # every class in proportion
    assert val == b.splits["val"].indices and val != c.splits["val"].indices
    odd = ready(MNISTDataModule(data_dir=mnist_root, val_split=61), "fit")  # exact: 6 of each class, one class 7
    val = odd.splits["val"].indices
    assert len(val) == 61 and len(odd.splits["train"]) == 539 and not set(val) & set(odd.splits["train"].indices)
    assert sorted(torch.bincount(torch.as_tensor(odd.splits["val"].dataset.targets)[val]).tolist()) == [6] * 9 + [7]
    with pytest.raises(UserError, match="--data.val_split=600 leaves no training data"):
        MNISTDataModule(data_dir=mnist_root, val_split=600).setup("fit")
    with pytest.raises(UserError, match="class 2 has 1 samples, too few to split off 1"):  # largest remainder: 0.6
        stratified_split([0, 0, 1, 1, 2], 3, seed=0, flag="--data.val_split")


def test_defaults_and_bounds_of_the_shared_arguments(mnist_root, tmp_path):
    shutil.copytree(mnist_root / "MNIST", tmp_path / "data" / "MNIST")  # data/ in the working folder: the default
    dm = ready(MNISTDataModule(batch_size=1, eval_batch_size=1), "predict")
    assert len(next(iter(dm.predict_dataloader()))[1]) == 1 and set(dm.splits) == {"test"}  # predict: the test split
    for wrong in (-1, 1.0):
        with pytest.raises(UserError, match=r"--data.val_split must be a count >= 0 or a fraction in \[0, 1\)"):
            MNISTDataModule(val_split=wrong)
    assert ready(MNISTDataModule(num_workers=2), "test").test_dataloader().num_workers == 2
    orders = []  # the in-memory loader's order follows the run's seed
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        orders.append(collect(ready(MNISTDataModule(loader="tensor"), "fit").train_dataloader())[1])
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])

    class TestOnly(MNISTDataModule):
        def make_datasets(self) -> dict:
            return {"test": super().make_datasets()["test"]}

    with pytest.raises(UserError, match="TestOnly has no train images in data"):
        TestOnly().setup("fit")
    images = tmp_path / "data/MNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # cut off
    with pytest.raises(UserError, match=r"could not read the data set in data \(RuntimeError: shape '\[600, 28, 28\]"):
        MNISTDataModule().setup("fit")


class DownloadsMNIST(MNISTDataModule):
    """Stands in for torchvision's download: writes the files where it writes them, ``root/MNIST/raw``."""

    def download(self, root: Path) -> None:
        assert root.parent == self.data_dir and root.name.startswith(".")  # renamed into place: one file system
        write_mnist_family(root / "MNIST" / "raw", n_train=100, n_test=20)


def test_a_download_is_moved_into_place_whole_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    dm = ready(DownloadsMNIST(data_dir=tmp_path / "new" / "data", val_split=10), "prepare", "fit")  # parents made too
    assert len(dm.splits["train"]) == 90 and os.listdir(tmp_path / "new" / "data") == ["MNIST"]
    (tmp_path / "old" / "MNIST" / "raw").mkdir(parents=True)  # a folder there already: merged into
    (tmp_path / "old" / "MNIST" / "raw" / "notes.txt").write_text("kept")
    DownloadsMNIST(data_dir=tmp_path / "old").prepare_data()
    assert os.listdir(tmp_path / "old") == ["MNIST"]
    assert sorted(os.listdir(tmp_path / "old" / "MNIST" / "raw")) == sorted([*vision.IDX_FILES, "notes.txt"])
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    for cls in (MNISTDataModule, CIFAR10DataModule):
        data_dir = tmp_path / cls.__name__
        with pytest.raises(UserError) as err:
            cls(data_dir=data_dir).prepare_data()
        assert "not found" in str(err.value) and str(data_dir) in str(err.value) and "\n" not in str(err.value)
        assert f"(download failed: {type(err.value.__cause__).__name__})" in str(err.value)
        assert list(data_dir.iterdir()) == [], "a failed download leaves nothing behind"


class Pixels(torch.utils.data.TensorDataset):
    """``n`` random 1x4x4 uint8 images with int labels, also in ``.targets`` (classes 0 and 1 in turn)."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        super().__init__(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=generator))
        self.targets = [i % 2 for i in range(n)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tensors[0][i], self.targets[i]


class OwnData(ImageDataModule):
    """A user's data module whose ``make_datasets`` returns the data sets themselves, not functions reading them."""

    class_names, image_shape = ("even", "odd"), (1, 4, 4)

    def make_datasets(self) -> dict[str, torch.utils.data.Dataset]:
        return {"train": Pixels(20, seed=0), "test": Pixels(6, seed=1)}


@pytest.mark.parametrize("loader", ["torchvision", "tensor"])
def test_a_data_module_may_return_its_data_sets_themselves(loader):
    dm = ready(OwnData(val_split=4, batch_size=8, loader=loader), "fit", "test")
    loaders = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    (train_x, train_y), (val_x, _), (test_x, test_y) = map(collect, loaders)
    assert (len(train_x), len(val_x), len(test_x)) == (16, 4, 6) and train_x.dtype == torch.uint8
    given = Pixels(6, seed=1)
    assert sorted(map(bytes, test_x.numpy())) == sorted(bytes(given[i][0].numpy()) for i in range(6))
    assert sorted(test_y.tolist()) == [0, 0, 0, 1, 1, 1] and sorted(train_y.tolist()).count(0) == 8


def test_cifar_reads_python_pickles_and_checks_md5(cifar_root, tmp_path):
    root, files = cifar_root
    dm = ready(CIFAR10DataModule(data_dir=root, batch_size=16, val_split=0.2), "prepare", "test")
    assert set(dm.splits) == {"test"}, "a test run reads no training data"
    validating = ready(CIFAR10DataModule(data_dir=root, val_split=0.2), "validate")
    assert set(validating.splits) == {"train", "val"}, "validate reads no test data"
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


def test_fashion_mnist_unpacks_checked_gz_files_from_a_folder_debian_by_default(tmp_path):
    defaults = ArgumentParser()
    defaults.add_class_arguments(FashionMNISTDataModule, "fashion")
    defaults.add_class_arguments(MNISTDataModule, "mnist")
    assert defaults.get_defaults().fashion.gz_dir == "/usr/share/datasets/fashion-mnist"  # shown by --help
    assert defaults.get_defaults().mnist.gz_dir is None
    gz = tmp_path / "debian"
    write_mnist_family(gz, compress=True, n_train=100)
    dm = ready(FashionMNISTDataModule(data_dir=tmp_path / "data", gz_dir=str(gz), val_split=10), "prepare", "fit")
    assert len(dm.splits["train"]) == 90
    assert sorted(p.name for p in (tmp_path / "data/FashionMNIST/raw").iterdir()) == sorted(vision.IDX_FILES)
    (gz / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz"):
        FashionMNISTDataModule(data_dir=tmp_path / "third", gz_dir=str(gz)).prepare_data()
    # what is unpacked is checked before it is put in place: IDX header and size, as many labels as images
    write_idx(gz / "t10k-labels-idx1-ubyte", np.zeros(200, np.uint8), compress=True)
    images = gz / "train-images-idx3-ubyte"
    for broken, name in (
        (lambda: write_idx(gz / "train-labels-idx1-ubyte", np.zeros(99, np.uint8), compress=True), "train-labels"),
        (lambda: write_idx(images, np.zeros((100, 28, 27), np.uint8), compress=True), "train-images"),
        (lambda: images.with_suffix(".gz").write_bytes(images.with_suffix(".gz").read_bytes()[:-30]), "train-images"),
    ):
        write_mnist_family(gz, compress=True, n_train=100)
        broken()
        with pytest.raises(UserError, match=rf"{gz}/{name}-idx\d-ubyte.gz is not a whole FashionMNIST IDX file"):
            FashionMNISTDataModule(data_dir=tmp_path / name, gz_dir=str(gz)).prepare_data()
        raw = tmp_path / name / "FashionMNIST/raw"
        assert sorted(p.name for p in raw.iterdir()) == (["train-images-idx3-ubyte"] if "labels" in name else [])


def test_os_errors_while_preparing_data_name_the_path_and_the_flag(tmp_path, capsys, monkeypatch):
    """Unpacking into, or downloading into, a data_dir that cannot be created: one line, no traceback."""
    gz = tmp_path / "gz"
    write_mnist_family(gz, compress=True, n_train=100, n_test=20)
    fashion = [f"--config={CONFIGS / 'fashion_mnist.yaml'}", CSV, *QUIET]
    unpack = ["--data.init_args.data_dir=/proc/none/data", f"--data.init_args.gz_dir={gz}"]
    line = fails(["fit", *fashion, *unpack], capsys)
    assert line == "error: cannot write /proc/none: No such file or directory; set --data.data_dir to a writable folder"
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    (tmp_path / "blocker").write_text("a file, not a folder")
    cifar = [f"--config={CONFIGS / 'cifar10.yaml'}", CSV, *QUIET]
    blocked = tmp_path / "blocker" / "data"
    line = fails(["fit", *cifar, f"--data.init_args.data_dir={blocked}"], capsys)
    assert line == f"error: cannot write {blocked}: Not a directory; set --data.data_dir to a writable folder"


def test_augmentations_take_effect_per_image_on_training_batches_only(mnist_root):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    flipped = BatchAugment(flip=True)(x)
    original = x.float() / 255
    mirrored = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(flipped, original, strict=True)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(flipped, original, strict=True)])
    assert bool((mirrored ^ same).all()) and 0.4 < mirrored.float().mean() < 0.6
    # the crop: each reflect-padded image sliced at the offsets drawn, mirrored where a flip was drawn
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
    dm = ready(MNISTDataModule(data_dir=mnist_root, augment="standard", loader="tensor"), "fit")
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = type("T", (), {"training": False})()
    assert dm.on_after_batch_transfer(batch, 0)[0] is batch[0]  # validation/test: untouched uint8
    assert MNISTDataModule(augment="none").augment_batch(batch[0]) is batch[0]
    dm.trainer.training = True
    x, labels = dm.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.float32 and not torch.equal(x, batch[0] / 255) and labels is batch[1]


def test_under_ddp_each_rank_takes_its_share_and_evaluation_counts_each_sample_once(odd_mnist):
    """Two stand-in ranks: 101 test images as 51 + 50, none twice; the in-memory training loader takes the rank's
    half and continues the trainer's epoch count."""
    for kind in ("torchvision", "tensor"):
        tested, trained = [], []
        for rank in (0, 1):
            dm = ready(MNISTDataModule(data_dir=odd_mnist, batch_size=16, loader=kind, val_split=61), "fit", "test")
            loop = SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=3)))
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, fit_loop=loop)
            dm.trainer.distributed_sampler_kwargs = {"num_replicas": 2, "rank": rank}
            tested.append(collect(dm.test_dataloader())[0])
            if kind == "tensor":
                loader = dm.train_dataloader()
                trained.append(collect(loader)[0])
                assert loader.state_dict()["epoch"] == 3  # epochs 0-2 processed: this is epoch 3
        assert [len(x) for x in tested] == [51, 50], kind
        assert len({x.numpy().tobytes() for x in torch.cat(tested)}) == 101, kind
        if trained:
            halves = [{x.numpy().tobytes() for x in part} for part in trained]
            assert [len(h) for h in halves] == [69, 69] and not halves[0] & halves[1]


def loader(n: int = 103, **kwargs) -> TensorLoader:
    data = InMemory(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n) % 4)
    return TensorLoader(data, **{"batch_size": 8, "seed": 7, **kwargs})


def test_tensor_loader_is_seeded_sharded_and_resumes_mid_epoch():
    a, b = loader(), loader()
    first = collect(a)[0].flatten()
    assert torch.equal(first, collect(b)[0].flatten()) and sorted(first.tolist()) == list(range(103))
    assert not torch.equal(first, collect(a)[0].flatten())  # the next epoch
    assert not torch.equal(first, collect(loader(seed=8))[0].flatten())
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
    at_the_end = loader()  # saved after an epoch's last batch: the next iteration is a whole new epoch
    at_the_end.load_state_dict({"seed": 7, "epoch": 0, "position": len(at_the_end)})
    assert [x.tolist() for x, _ in at_the_end] == [x.tolist() for x in epochs[1]]
    cut = loader()  # an epoch cut short (limit_train_batches): the next iteration starts a new one
    next(iter(cut))
    assert [x.tolist() for x, _ in cut] == [x.tolist() for x in epochs[1]]
    weights = torch.rand(103).double()
    weighted = [collect(loader(weights=weights))[0].flatten() for _ in range(2)]
    assert torch.equal(*weighted)  # weighted draws seeded too (resumable)
    assert len(loader(n=17, world_size=2)) == 1 == len(list(loader(n=17, world_size=2)))  # 8 each, no empty batch


class Arrays(torch.utils.data.Dataset):
    """A torchvision-style data set held as one array (``data``, ``targets``) that must not be read per sample."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.targets = data, list(range(len(data)))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        raise AssertionError("an in-memory array is copied whole, not read sample by sample")


def test_decoding_copies_arrays_whole_in_split_order_and_reads_other_data_sets_by_sample():
    hwc = np.arange(3 * 4 * 5 * 3, dtype=np.uint8).reshape(3, 4, 5, 3)  # CIFAR's layout; MNIST's has no channels
    images, labels = decode(torch.utils.data.Subset(Arrays(hwc), [2, 0]))
    assert torch.equal(images, torch.as_tensor(hwc[[2, 0]]).permute(0, 3, 1, 2)) and labels.tolist() == [2, 0]
    images, labels = decode(Arrays(hwc[..., 0]))
    assert torch.equal(images, torch.as_tensor(hwc[..., 0]).unsqueeze(1)) and labels.tolist() == [0, 1, 2]
    files = torch.utils.data.TensorDataset(images.flip(0), labels.flip(0))  # as ImageFiles: read per sample
    assert all(torch.equal(a, b) for a, b in zip(decode(files), files.tensors, strict=True))
    data = InMemory(images, labels)
    assert torch.equal(data[2][0], images[2]) and data[2][1] == 2 and len(data) == 3


def blob(n: int, size: int = 33) -> torch.Tensor:
    """``n`` copies of a soft spot 6 px above and 4 px right of the centre, uint8 (n, 1, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    spot = torch.exp(-((yy - (size - 1) / 2 + 6) ** 2 + (xx - (size - 1) / 2 - 4) ** 2) / 4.5)
    return (spot * 255).round().to(torch.uint8).expand(n, 1, size, size).contiguous()


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(x, y) of each image's centre of mass, from the image centre, in pixels."""
    h, w = images.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    mass = images[:, 0].sum((1, 2))
    x, y = ((images[:, 0] * grid).sum((1, 2)) / mass for grid in (xx, yy))
    return torch.stack([x - (w - 1) / 2, y - (h - 1) / 2], 1)


AFFINE = {"degrees": 10, "translate": 0.1, "scale": (0.8, 1.2)}


@pytest.mark.parametrize("settings", [*({k: v} for k, v in AFFINE.items()), AFFINE])  # each alone, then all
def test_affine_augmentation_turns_zooms_and_shifts_each_image_by_what_it_drew(settings):
    """Each spot moves (within 0.1 px) where the angle, zoom and shift, drawn in order over the ranges, put it."""
    n, size = 256, 33
    torch.manual_seed(1)
    moved = centre_of_mass(BatchAugment(**settings)(blob(n)))
    torch.manual_seed(1)
    degrees, translate = settings.get("degrees", 0), settings.get("translate", 0)
    ranges = [(-degrees, degrees), settings.get("scale", (1, 1)), (-translate, translate), (-translate, translate)]
    angle, zoom, shift_x, shift_y = (torch.rand(n) * (high - low) + low for low, high in ranges)
    x, y = centre_of_mass(blob(1).float())[0]
    turn = angle * math.pi / 180
    expected_x = zoom * (torch.cos(turn) * x - torch.sin(turn) * y) + shift_x * size
    expected_y = zoom * (torch.sin(turn) * x + torch.cos(turn) * y) + shift_y * size
    torch.testing.assert_close(moved, torch.stack([expected_x, expected_y], 1), rtol=0, atol=0.1)
    for drawn, (low, high) in zip((angle, zoom, shift_x), ranges, strict=False):
        assert low == high or drawn.min() < low + 0.1 * (high - low) and drawn.max() > high - 0.1 * (high - low)
    assert torch.equal(BatchAugment()(blob(4)), blob(4) / 255)  # the default: no augmentation


def test_weighted_sampler_balances_classes(tmp_path, mnist_root):
    root = write_image_folder(tmp_path / "imgs", {"red": 40, "stripes": 8})
    for kind in ("torchvision", "tensor"):
        given = {"mean": [0.5] * 3, "std": [0.5] * 3, "batch_size": 500, "loader": kind}
        dm = ImageFolderDataModule(root, image_size=8, val_split=0.25, test_split=0.0, sampler="weighted", **given)
        train = ready(dm, "fit").train_dataloader()
        labels = torch.cat([y for _ in range(30) for _, y in train])
        assert abs(labels.float().mean().item() - 0.5) < 0.05, kind  # 6/36 = 0.17 without the sampler
    mnist = ready(MNISTDataModule(data_dir=mnist_root, sampler="weighted"), "fit")  # train: a Subset of the file
    labels = torch.as_tensor(mnist.splits["train"].dataset.targets)[mnist.splits["train"].indices]
    assert torch.equal(mnist.train_weights() * torch.bincount(labels)[labels], torch.ones(540, dtype=torch.float64))


def per_class(samples: list[tuple[str, int]]) -> list[int]:
    labels = [label for _, label in samples]
    return [labels.count(k) for k in range(max(labels) + 1)]


def test_folder_splits_are_stratified_and_seeded_and_name_a_class_too_small(image_root, tmp_path, caplog):
    dm = ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=3)
    assert dm.class_names == ["disk", "red", "stripes"] and dm.image_shape == (3, 64, 64)
    for name, n in (("train", 26), ("val", 10), ("test", 4)):
        assert per_class(dm.samples[name]) == [n] * 3, name
        assert all(Path(p).parent.name == dm.class_names[label] for p, label in dm.samples[name])
    assert ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=3).samples == dm.samples
    assert ImageFolderDataModule(image_root, val_split=0.25, test_split=0.1, seed=4).samples["val"] != dm.samples["val"]
    write_image_folder(tmp_path / "split" / "train", {"a": 6, "b": 6})
    write_image_folder(tmp_path / "split" / "test", {"a": 2, "b": 3}, seed=1)
    write_image_folder(tmp_path / "unlabelled" / "any", {"x": 4}, seed=2)
    given = {"mean": [0.5], "std": [0.25], "predict_dir": str(tmp_path / "unlabelled")}
    dm = ImageFolderDataModule(tmp_path / "split", channels=1, image_size=(16, 12), val_split=0.5, **given)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [6, 6, 5]
    dm.setup("predict")
    assert dm.splits["predict"][0][0].shape == (1, 16, 12) and dm.splits["predict"].targets == [-1] * 4
    root = write_image_folder(tmp_path / "imgs", {"red": 10, "stripes": 10, "solo": 1, "alone": 1})
    with caplog.at_level(logging.WARNING):
        samples = ImageFolderDataModule(root, image_size=8).samples
    assert caplog.messages == [
        f"--data.{name}_split takes no sample of class alone, solo (too few): none in that split; add samples"
        for name in ("test", "val")
    ]
    assert per_class(samples["train"])[2] == 1  # "solo" (class 2) trains


def test_a_missing_test_folder_is_carved_from_train_and_known_before_training(tmp_path):
    """Without test/, test_split of train/ (stratified) is the test split; has_split knows it without decoding."""
    write_image_folder(tmp_path / "split" / "train", {"red": 10, "stripes": 10})
    write_image_folder(tmp_path / "split" / "val", {"red": 2, "stripes": 2}, seed=1)
    dm = ImageFolderDataModule(tmp_path / "split", image_size=8, test_split=0.2)
    assert dm.has_split("test") and dm.has_split("val") and not dm.has_split("predict")
    assert not (tmp_path / "split" / folder.CHECKS).exists()  # nothing decoded yet
    for name, n in (("train", 8), ("val", 2), ("test", 2)):
        assert per_class(dm.samples[name]) == [n] * 2, name
    assert not set(dm.samples["test"]) & set(dm.samples["train"])
    dm.setup("test")
    assert len(dm.splits["test"]) == 4
    untested = ImageFolderDataModule(tmp_path / "split", test_split=0.0)
    assert not untested.has_split("test")
    with pytest.raises(UserError, match=f"ImageFolderDataModule has no test images in {tmp_path / 'split'}"):
        untested.setup("test")
    assert ImageFolderDataModule(tmp_path / "split" / "train", val_split=0.0, test_split=0.0).has_split("val")


def test_folder_statistics_and_checks_are_computed_once_and_cached(tmp_path, monkeypatch, caplog):
    root = tmp_path / "imgs"
    write_alpha_icons(root / "train", n=5)  # the statistics see the images composited onto white
    module = functools.partial(ImageFolderDataModule, root, image_size=8, val_split=0.2, test_split=0.0)
    dm = module()
    pixels = torch.stack([read_image(p, "RGB", (8, 8)) for p, _ in dm.samples["train"]]).double() / 255
    np.testing.assert_allclose(dm.mean, pixels.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    np.testing.assert_allclose(dm.std, pixels.std(dim=(0, 2, 3), correction=0).numpy(), atol=1e-6)
    cache = root / folder.CHECKS
    decoded = []
    monkeypatch.setattr(folder, "read_image", lambda path, *args: decoded.append(path) or read_image(path, *args))
    other = module()  # another process or command
    assert other.mean == dm.mean and decoded == []
    ready(other, "fit")
    assert decoded == []  # a test or predict of the run does not verify the images again
    assert len(module(image_size=6).mean) == 3  # another size
    assert sorted(decoded) == sorted(str(p) for p in root.glob("train/*/*.png"))  # each image once
    assert [p.name for p in root.iterdir() if p.is_file()] == [folder.CHECKS]  # one file per folder
    write_alpha_icons(root / "train", n=6, seed=1)  # the files changed: checked again, the stale results replaced
    grown = module()
    assert grown.mean != dm.mean
    cache.write_text('{"files": "trunc')  # a damaged file is computed again
    assert module().mean == grown.mean
    cache.unlink()
    cache.mkdir()  # cannot be written: one warning line, the data still serves
    with caplog.at_level(logging.WARNING):
        assert module().mean == grown.mean
    assert caplog.messages == [f"could not keep the image checks in {cache} (Is a directory); every run repeats them"]


def test_unreadable_images_are_named_with_their_split_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"red": 5, "stripes": 5})
    common = dict(val_split=0.2, test_split=0.0, mean=[0.5] * 3, std=[0.5] * 3)
    jpeg = root / "red" / "cut.jpg"  # header intact, image data cut: passes PIL's verify, fails to decode
    draw("red", np.random.default_rng(0), 64).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-400])
    dm = ImageFolderDataModule(root, **common)
    split = next(s for s in ("train", "val") if str(jpeg) in [p for p, _ in dm.samples[s]])
    truncated = rf"cannot read image .*cut\.jpg \(OSError: image file is truncated.*in the {split} split"
    with pytest.raises(UserError, match=truncated):
        dm.setup("fit")
    bad = root / "stripes" / "002.png"
    bad.write_bytes(bad.read_bytes()[:40])
    os.symlink(tmp_path / "nowhere.png", root / "stripes" / "gone.png")  # a broken link
    with pytest.raises(UserError, match=r"3 image\(s\) cannot be read: remove them or set --data.on_corrupt skip"):
        ImageFolderDataModule(root, **common).setup("fit")
    dm = ready(ImageFolderDataModule(root, on_corrupt="skip", **common), "fit")
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 9
    for name in ("train", "val"):
        assert [dm.splits[name][i][0].shape for i in range(len(dm.splits[name]))]  # every image left decodes


def test_a_bad_image_size_is_one_short_line(image_root, tmp_path, capsys):
    (tmp_path / "size.yaml").write_text("data:\n  init_args:\n    image_size: abc\n")
    folder_args = ["fit", f"--config={CONFIGS / 'folder.yaml'}", CSV, f"--data.init_args.data_dir={image_root}"]
    for wrong in (f"--config={tmp_path / 'size.yaml'}", "--data.image_size=abc"):
        assert fails([*folder_args, wrong], capsys) == "error: data.image_size: Expected a <class 'int'>, got abc"


def test_folders_without_images_are_clear_errors_and_predicting_needs_no_training_folder(tmp_path):
    """predict_dir alone: the training folder may be gone (or hold a broken image) and is never listed or read."""
    new = write_image_folder(tmp_path / "new", {"a": 3}, seed=4)
    (new / "a" / "notes.txt").write_text("not an image")
    training = write_image_folder(tmp_path / "train", {"red": 4, "stripes": 4})
    (training / "red" / "000.png").write_bytes(b"broken")
    for data_dir in (tmp_path / "gone", training):
        dm = ready(ImageFolderDataModule(data_dir, image_size=8, predict_dir=str(new)), "prepare", "predict")
        x, y = collect(dm.predict_dataloader())
        assert x.shape == (3, 3, 8, 8) and y.tolist() == [-1] * 3
    assert not (tmp_path / "gone").exists() and not (training / folder.CHECKS).exists()
    with pytest.raises(UserError, match=f"--data.predict_dir {tmp_path / 'nope'} not found"):
        ImageFolderDataModule(tmp_path / "gone", predict_dir=str(tmp_path / "nope"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=f"no images found in --data.predict_dir {tmp_path / 'empty'}"):
        ImageFolderDataModule(tmp_path / "gone", predict_dir=str(tmp_path / "empty"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        ImageFolderDataModule(tmp_path / "bare").has_split("train")
    root = write_image_folder(tmp_path / "imgs", {"red": 5})
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="Found no valid file for the classes b"):
        ImageFolderDataModule(root).has_split("train")
    with pytest.raises(UserError, match="image folder .*missing not found"):
        ImageFolderDataModule(tmp_path / "missing").setup("fit")
    with pytest.raises(UserError, match="--data.background: unknown colour 'nocolour'; give a name or #rrggbb"):
        ImageFolderDataModule(root, background="nocolour")


@pytest.mark.parametrize("case", VIEWER_CASES)
def test_images_are_read_as_a_viewer_shows_them(case, tmp_path):
    """Alpha over the background, EXIF orientation, 16-bit/float scaled, CMYK, an animation's first frame."""
    folder = tmp_path / "images" / case  # a class folder holding the one file, and predict_dir

    def seen(**kwargs) -> np.ndarray:
        dm = ImageFolderDataModule(folder.parent, mean=[0.5] * channels, std=[0.5] * channels, **kwargs)
        return collect(ready(dm, "predict").predict_dataloader())[0][0].permute(1, 2, 0).numpy()

    channels, expected = write_viewer_case(case, folder)
    size = expected.shape[:2]
    np.testing.assert_array_equal(seen(image_size=size, channels=channels, predict_dir=str(folder)), expected)
    if case == "rgba":
        red = seen(image_size=size, background="#ff0000", predict_dir=str(folder))
        assert red[:, :3].max() == 0 and (red[:, 3:] == [255, 0, 0]).all()


def test_a_class_drawn_only_in_the_alpha_channel_is_learnable(tmp_path):
    """Black RGB, the shape only in alpha: composited onto white two pictures (blank without alpha: accuracy 50%)."""
    root = write_alpha_icons(tmp_path / "icons", n=24)
    data = "image_size=12 augment=none val_split=0.25 test_split=0.25 batch_size=8 mean=[0.5,0.5,0.5] std=[0.5,0.5,0.5]"
    args = [f"--data.init_args.{a}" for a in data.split()]  # mean, std given: the statistics test covers computed ones
    cli = fit("folder.yaml", root, *args, "--model.init_args.net.init_args.width=8", "--trainer.max_epochs=6")
    assert float(cli.trainer.callback_metrics["test/acc"]) >= 0.9


def test_torchvision_md5_lists_are_patched_only_inside_cifar_tests():
    """The cifar_root fixture patches them for its own tests only (this file's CIFAR tests ran before this one)."""
    assert datasets.CIFAR10.train_list[0] == ["data_batch_1", "c99cafc152244af753f735de768cd75f"]
    assert datasets.CIFAR100.meta["md5"] == "7973b15100ade9c7d40fb424638fde48"
