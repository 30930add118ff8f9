"""Real Fashion-MNIST from Debian's dataset-fashion-mnist package (CI installs it, so this never skips there)."""

import os
import socket

import pytest

from project.cli import cli_main
from tests.conftest import CONFIGS, FASHION_MNIST_DEBIAN

pytestmark = pytest.mark.slow


@pytest.fixture
def debian_fashion_mnist() -> None:
    if not (FASHION_MNIST_DEBIAN / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must install dataset-fashion-mnist ({FASHION_MNIST_DEBIAN} is missing)")
        pytest.skip("apt-get install dataset-fashion-mnist to run the real-data test")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacking from the Debian files must work on its own: a download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise OSError("no network in the real-data test: the data must come from the Debian files")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_fashion_mnist_half_an_epoch_reaches_85_percent(debian_fashion_mnist, no_network, tmp_path):
    cli = cli_main(
        [
            "fit",
            f"--config={CONFIGS / 'fashion_mnist.yaml'}",
            f"--config={CONFIGS / 'logger' / 'csv.yaml'}",
            f"--data.init_args.data_dir={tmp_path / 'data'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=200",  # 25,600 images: half an epoch, one-cycle planned for it
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=true",
        ]
    )
    metrics = cli.trainer.callback_metrics
    sizes = {split: len(cli.trainer.datamodule.splits[split]) for split in ("train", "val", "test")}
    assert sizes["test"] == 10_000 and sizes["train"] + sizes["val"] == 60_000, sizes
    assert float(metrics["test/acc"]) >= 0.85, f"test accuracy {float(metrics['test/acc']):.4f}"
