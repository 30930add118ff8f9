"""Shared scaffolding: format-exact data sets, running the CLI in-process or as a process, reading results back."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import datasets

from project.cli import cli_main
from tests.formats import write_cifar, write_image_folder, write_mnist_family

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]
CSV = f"--config={CONFIGS / 'logger' / 'csv.yaml'}"  # W&B is the default logger; tests/test_wandb.py covers it
os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")  # quiet, offline, never prompt
# One thread per test process (pytest-xdist runs one process per core): tiny ops on two threads only wait on each other.
torch.set_num_threads(1)


def unavailable(why: str) -> None:
    """Skip a test whose prerequisite this machine lacks; fail it under CI (``CI`` set), which installs them all."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI installs it, so it must be there)")
    pytest.skip(why)


EXTRAS_TESTS = ["test_tools.py", "test_sweep.py", "test_serve.py"]  # the extras' own test modules
collect_ignore = [] if (ROOT / "extras").is_dir() else EXTRAS_TESTS  # a fork may delete extras/ (README)


# The longest test files first (pytest-xdist hands out whole files, --dist loadfile): the two workers then finish
# together instead of one waiting for the other's last long file. Measured with --durations on 2 cores.
LONGEST_FIRST = ["test_readme.py", "test_sweep.py", "test_cluster.py", "test_faults.py", "test_tools.py", "test_ddp.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
    if not (ROOT / "extras").is_dir():
        for item in items:
            if item.get_closest_marker("extras"):
                item.add_marker(pytest.mark.skip(reason="uses extras/, which this checkout does not have"))


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder, so ``runs/`` and ``data/`` never leak between tests; wandb's own folders
    (staging, cache, settings) are kept there too."""
    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir with format-exact MNIST and Fashion-MNIST raw IDX files (600 train, 200 test)."""
    root = tmp_path_factory.mktemp("mnist-data")
    write_mnist_family(root / "MNIST" / "raw", seed=0)
    write_mnist_family(root / "FashionMNIST" / "raw", seed=10)
    return root


N_VAL, N_TEST = 61, 101  # odd: a padding sampler would count a sample twice


@pytest.fixture(scope="session")
def odd_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST with 200 training (61 of them validation) and 101 test images, for the multi-process tests."""
    root = tmp_path_factory.mktemp("odd-mnist")
    write_mnist_family(root / "MNIST" / "raw", n_train=200, n_test=N_TEST, seed=3)
    return root


@pytest.fixture(scope="session")
def cifar_files(tmp_path_factory: pytest.TempPathFactory):
    """A data_dir with format-exact CIFAR-10 and CIFAR-100 pickles, and their MD5 lists."""
    root = tmp_path_factory.mktemp("cifar-data")
    return root, {10: write_cifar(root, 10, seed=0), 100: write_cifar(root, 100, n_train=400, seed=5)}


@pytest.fixture
def cifar_root(cifar_files, monkeypatch: pytest.MonkeyPatch):
    """``cifar_files`` with torchvision's MD5 lists pointing at them during this test only."""
    for cls, n in ((datasets.CIFAR10, 10), (datasets.CIFAR100, 100)):
        for attr in ("train_list", "test_list", "meta"):
            monkeypatch.setattr(cls, attr, cifar_files[1][n][attr])
    return cifar_files


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Your own images: 3 classes x 40 PNG files of varying sizes, one folder per class."""
    return write_image_folder(tmp_path_factory.mktemp("images"), dict.fromkeys(("disk", "red", "stripes"), 40))


def fit(config: str, data_dir: Path, *extra: str, subcommand: str = "fit", run: bool = True):
    """``python -m project <subcommand> -c configs/<config> ...`` in-process: quiet, CSV logs in the cwd."""
    args = [subcommand] if run else []
    return cli_main(
        [*args, f"--config={CONFIGS / config}", CSV, f"--data.init_args.data_dir={data_dir}", *QUIET, *extra], run=run
    )


def run_module(
    *args: str, cwd: Path | None = None, timeout: float = 300, **env: str | None
) -> subprocess.CompletedProcess:
    """``python -m <args>`` as a separate process (stdin closed), with the repository on the path; ``env`` values
    of None unset a variable."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def error_line(err: str) -> str:
    """The single ``error:`` line of a failed command's stderr; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def fails(args: list[str], capsys: pytest.CaptureFixture, main=cli_main) -> str:
    """Run ``main(args)`` in-process (the CLI, or a tool's ``main``): it must exit with code 2, print nothing to
    stdout and one ``error:`` line to stderr; that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == "", out
    return error_line(err)


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    """Each column of a CSV logger's ``metrics.csv``: the values logged, in order."""
    with open(Path(run_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, f"no metrics in {run_dir}"
    return {key: [float(r[key]) for r in rows if r[key] != ""] for key in rows[0]}
