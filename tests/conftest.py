import os
from pathlib import Path

import pytest
from torchvision import datasets

from tests.formats import write_cifar, write_mnist_family

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")

# Quiet, offline, never prompt.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder, so ``runs/`` and ``data/`` never leak between tests."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir with format-exact MNIST and Fashion-MNIST raw IDX files (600 train, 200 test)."""
    root = tmp_path_factory.mktemp("mnist-data")
    write_mnist_family(root / "MNIST" / "raw", seed=0)
    write_mnist_family(root / "FashionMNIST" / "raw", seed=10)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory):
    """A data_dir with format-exact CIFAR-10 and CIFAR-100 pickles; torchvision's MD5 lists point at them."""
    root = tmp_path_factory.mktemp("cifar-data")
    files = {10: write_cifar(root, 10, seed=0), 100: write_cifar(root, 100, n_train=400, seed=5)}
    with pytest.MonkeyPatch.context() as mp:
        for cls, n in ((datasets.CIFAR10, 10), (datasets.CIFAR100, 100)):
            for attr in ("train_list", "test_list", "meta"):
                mp.setattr(cls, attr, files[n][attr])
        yield root, files


def fast_args(data_dir: Path, *extra: str) -> list[str]:
    """Common CLI arguments for quick in-test runs: tiny nets, no progress bar, CSV logs in the cwd."""
    return [
        f"--config={CONFIGS / 'logger' / 'csv.yaml'}",  # W&B is the default logger; tests/test_wandb.py covers it
        f"--data.init_args.data_dir={data_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]
