"""The notebooks run top to bottom on small fixture data (parameters through environment variables)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from project.cli import cli_main
from tests.conftest import CONFIGS, ROOT, fast_args


def run_notebook(name: str, cwd, monkeypatch: pytest.MonkeyPatch, **env: str) -> nbformat.NotebookNode:
    for key, value in {"PYTHONPATH": str(ROOT), **env}.items():
        monkeypatch.setenv(key, value)
    book = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return book


def text_of(book: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)


def test_quickstart_notebook(mnist_root, tmp_path, monkeypatch):
    book = run_notebook("quickstart.ipynb", tmp_path, monkeypatch, NB_DATA_DIR=str(mnist_root), NB_MAX_EPOCHS="1",
                        NB_RUNS_DIR=str(tmp_path / "runs"))  # fmt: skip
    assert "test accuracy:" in text_of(book)
    images = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # learning curves, confusion matrix, sample predictions
    assert (tmp_path / "runs" / "notebook" / "version_0" / "metrics.csv").is_file()


def test_compare_runs_notebook(mnist_root, tmp_path, monkeypatch):
    for lr in ("0.01", "0.001"):
        cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", *fast_args(mnist_root), "--trainer.max_epochs=2",
                  "--model.init_args.net.init_args.hidden=[16]", f"--model.optimizer.lr={lr}"])  # fmt: skip
    book = run_notebook("compare_runs.ipynb", tmp_path, monkeypatch, NB_RUNS=os.path.join("runs", "mnist", "version_*"))
    out = text_of(book)
    assert "2 runs: mnist/version_0, mnist/version_1" in out
    assert (
        "'model.init_args.optimizer.init_args.lr': 0.01" in out
        and "'model.init_args.optimizer.init_args.lr': 0.001" in out
    )
