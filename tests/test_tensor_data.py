"""The tensor data path: same samples as torchvision's, sane augmentation, determinism, DDP shards, resume."""

from pathlib import Path

import pytest
import torch

from project.cli import cli_main
from project.data import CIFAR10DataModule, FashionMNISTDataModule
from project.data.tensor import BatchAugment, TensorLoader
from tests.conftest import fast_args


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("kind", ["mnist", "cifar"])
def test_same_samples_as_torchvision(kind: str, split: str, mnist_root: Path, cifar_root) -> None:
    make = {
        "mnist": lambda loader: FashionMNISTDataModule(data_dir=mnist_root, loader=loader, batch_size=64),
        "cifar": lambda loader: CIFAR10DataModule(data_dir=cifar_root[0], loader=loader, batch_size=64),
    }[kind]
    got = {}
    for loader in ("tensor", "torchvision"):
        dm = make(loader)
        dm.setup("fit" if split == "val" else "test")
        got[loader] = collect(getattr(dm, f"{split}_dataloader")())
    assert got["tensor"][0].shape == got["torchvision"][0].shape
    torch.testing.assert_close(got["tensor"][0], got["torchvision"][0], atol=1e-5, rtol=0)
    assert torch.equal(got["tensor"][1], got["torchvision"][1])


def test_augmentation_statistics() -> None:
    torch.manual_seed(0)
    x = torch.rand(512, 3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    flipped = BatchAugment(flip=True)(x, gen)
    is_flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x, strict=True)])
    is_same = torch.tensor([torch.equal(a, b) for a, b in zip(flipped, x, strict=True)])
    assert bool((is_flipped ^ is_same).all())  # each image either mirrored or untouched
    assert 0.4 < is_flipped.float().mean() < 0.6

    cropped = BatchAugment(crop_padding=4)(x, torch.Generator().manual_seed(2))
    assert cropped.shape == x.shape
    # every crop is the original shifted by at most 4 pixels: the 24x24 centre of the crop appears in the image
    shifts = []
    for a, b in zip(cropped[:64], x[:64], strict=True):
        centre = a[:, 4:28, 4:28]
        found = [
            (dy, dx) for dy in range(9) for dx in range(9) if torch.equal(centre, b[:, dy : dy + 24, dx : dx + 24])
        ]
        assert found, "crop is not a shifted window of the image"
        shifts.append(found[0])
    assert len(set(shifts)) > 10  # shifts vary

    digits = torch.zeros(256, 1, 28, 28)
    digits[:, :, 10:18, 10:18] = 1.0
    moved = BatchAugment(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))(digits, torch.Generator().manual_seed(3))
    mass = moved.sum(dim=(1, 2, 3)) / digits.sum(dim=(1, 2, 3))
    assert 0.75 < mass.min() and mass.max() < 1.3  # zoom 0.9..1.1 changes area by 0.81..1.21
    assert (moved - digits).abs().sum(dim=(1, 2, 3)).gt(0).float().mean() > 0.95  # nearly all images changed
    assert moved.min() >= 0 and moved.max() <= 1


def make_loader(n: int = 103, **kwargs) -> TensorLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.arange(n)
    defaults = dict(batch_size=8, mean=(0.0,), std=(1.0,), shuffle=True, seed=7)
    return TensorLoader(images, labels, **{**defaults, **kwargs})


def epoch_labels(loader: TensorLoader) -> list[torch.Tensor]:
    return [y for _, y in loader]


def test_determinism_and_reshuffling() -> None:
    aug = BatchAugment(crop_padding=1, flip=True)
    a, b = make_loader(augment=aug), make_loader(augment=aug)
    first_a, first_b = collect(a), collect(b)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    second_a = collect(a)
    assert not torch.equal(first_a[1], second_a[1])  # a new order every epoch
    assert sorted(first_a[1].tolist()) == sorted(second_a[1].tolist()) == list(range(103))
    assert not torch.equal(first_a[1], collect(make_loader(seed=8))[1])  # the seed matters


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards(world_size: int) -> None:
    train = [collect(make_loader(rank=r, world_size=world_size))[1] for r in range(world_size)]
    assert len({len(t) for t in train}) == 1  # same number of samples (and batches) on every rank
    seen = torch.cat(train).tolist()
    assert len(seen) == len(set(seen)) == 103 // world_size * world_size  # disjoint

    evaluation = [collect(make_loader(rank=r, world_size=world_size, shuffle=False))[1] for r in range(world_size)]
    assert sorted(torch.cat(evaluation).tolist()) == list(range(103))  # every sample exactly once


def test_resume_mid_epoch_continues_the_same_order() -> None:
    aug = BatchAugment(flip=True, crop_padding=1)
    reference = make_loader(augment=aug)
    epochs = [list(reference) for _ in range(2)]
    interrupted = make_loader(augment=aug)
    list(interrupted)
    it = iter(interrupted)
    for _ in range(5):
        next(it)
    state = interrupted.state_dict()
    resumed = make_loader(augment=aug, seed=123)  # the seed comes back from the state
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(epochs[1]) - 5
    for (x, y), (x_ref, y_ref) in zip(rest, epochs[1][5:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert torch.equal(collect(resumed)[1], collect(reference)[1])  # and the epochs after it match too


def test_fit_resumes_mid_epoch_through_lightning(mnist_root: Path, tmp_path: Path) -> None:
    """Lightning saves the loader's state in a mid-epoch checkpoint and restores it: the resumed run sees the
    batches the uninterrupted run saw (recorded by the order of training labels)."""
    from lightning.pytorch.callbacks import Callback

    class Record(Callback):
        def __init__(self) -> None:
            self.labels: list[list[int]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.labels.append(batch[1].tolist())

    def run(*extra: str, ckpt_path: Path | None = None) -> tuple[list[list[int]], Path]:
        record = Record()
        cli = cli_main(
            fast_args(
                mnist_root,
                "--config",
                str(Path(__file__).parents[1] / "configs" / "fashion_mnist.yaml"),
                "--data.init_args.loader=tensor",
                "--data.init_args.batch_size=100",
                "--data.init_args.augment=standard",
                "--model.init_args.net.init_args.width=4",
                "--test_after_fit=false",
                "--trainer.limit_val_batches=1",
                "--model.init_args.scheduler=null",
                *extra,
            ),
            run=False,
        )
        cli.trainer.callbacks.append(record)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return record.labels, Path(cli.trainer.log_dir)

    full, _ = run("--trainer.max_epochs=2")
    steps_per_epoch = len(full) // 2
    stop = steps_per_epoch + 2
    _, log_dir = run(
        "--trainer.max_epochs=2", f"--trainer.max_steps={stop}", f"--checkpoint.every_n_train_steps={stop}"
    )
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["position"] == 2 and state["epoch"] == 1
    resumed, _ = run("--trainer.max_epochs=2", ckpt_path=ckpt)
    assert resumed == full[steps_per_epoch + 2 :]


def test_crop_equals_per_image_slices_of_the_padded_image():
    """The batched gather crop gives exactly what slicing each reflect-padded image at its drawn offset gives."""
    x = torch.rand(32, 3, 12, 10)
    cropped = BatchAugment(crop_padding=3)(x, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)  # the same draws, in the same order: rows, then columns
    dy, dx = torch.randint(0, 7, (32,), generator=draws), torch.randint(0, 7, (32,), generator=draws)
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect")
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 12, dx[i] : dx[i] + 10] for i in range(32)])
    torch.testing.assert_close(cropped, expected, rtol=0, atol=0)
