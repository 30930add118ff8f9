"""Real Fashion-MNIST from Debian's dataset-fashion-mnist package (CI installs it, so this never skips there)."""

import socket

import pytest

from tests.conftest import FASHION_MNIST_DEBIAN, fit, unavailable

pytestmark = pytest.mark.slow


def test_fashion_mnist_half_an_epoch_reaches_85_percent(tmp_path, monkeypatch):
    if not (FASHION_MNIST_DEBIAN / "train-images-idx3-ubyte.gz").is_file():
        unavailable(f"apt-get install dataset-fashion-mnist to run the real-data test ({FASHION_MNIST_DEBIAN})")

    def refuse(*args, **kwargs):  # the data must come from the Debian files: a download attempt fails the test
        raise OSError("no network in the real-data test: the data must come from the Debian files")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    half = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=200"]  # 25,600 images, one-cycle planned for it
    cli = fit("fashion_mnist.yaml", tmp_path / "data", *half, "--test_after_fit=true")
    sizes = {split: len(cli.trainer.datamodule.splits[split]) for split in ("train", "val", "test")}
    assert sizes["test"] == 10_000 and sizes["train"] + sizes["val"] == 60_000, sizes
    accuracy = float(cli.trainer.callback_metrics["test/acc"])
    assert accuracy >= 0.85, f"test accuracy {accuracy:.4f}"
