"""The notebooks run top to bottom in a Jupyter kernel on small fixture data, their parameters set through environment
variables. The kernel starts in notebooks/, as ``jupyter lab notebooks/`` starts it, and nothing may be written into
the repository: data and runs go where the parameters say.

nbformat (so nbclient) and wandb are imported where used, not at collection: with jupyterlab installed, importing
jsonschema builds rfc3987-syntax's Lark parsers, about 2.5 s of CPU in every pytest worker that imports it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from jupyter_client import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync

from project.cli import cli_main
from tests.conftest import CONFIGS, QUIET, ROOT, read_metrics

if TYPE_CHECKING:
    from nbformat import NotebookNode

pytestmark = pytest.mark.xdist_group("notebooks")  # one worker, one kernel
NOTEBOOKS = ROOT / "notebooks"
# what the notebooks import, imported by the kernel as soon as it starts (while the test trains in this process)
WARM_UP = "import lightning, matplotlib.pyplot, torch, yaml, project.cli, project.tools.runs"
CACHES = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"}
TINY = "--trainer.limit_train_batches=2 --trainer.num_sanity_val_steps=0 --trainer.log_every_n_steps=1"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    """One Jupyter kernel for this module, started in notebooks/ (one start-up instead of four); each notebook runs
    in it after its namespace is cleared. Its sockets are files in a temporary folder: TCP ports picked by kernels
    that two pytest workers start at once can collide."""
    km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path_factory.mktemp("kernel") / "ipc"))
    # one thread: these tiny trainings gain nothing from more, and this process trains while the kernel starts
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_sync(km.start_kernel)(cwd=str(NOTEBOOKS), env=env, extra_arguments=["--HistoryManager.hist_file=:memory:"])
    client = BlockingKernelClient()
    client.load_connection_info(km.get_connection_info())
    client.start_channels()
    client.wait_for_ready(timeout=60)
    client.execute(WARM_UP)  # not waited for: the first notebook's cells queue behind it
    yield km, client
    client.stop_channels()
    run_sync(km.shutdown_kernel)(now=True)


@pytest.fixture(scope="module", autouse=True)
def _stop_wandb_service():
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # the wandb-core service process started by the in-process runs


def ignored(paths: list[str]) -> set[str]:
    """Those of ``paths`` that git ignores (all of them outside a git checkout)."""
    done = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(paths), capture_output=True,
                          text=True)  # fmt: skip
    return set(done.stdout.splitlines()) if done.returncode in (0, 1) else set(paths)


def repo_files() -> dict[str, tuple[int, int]]:
    """Every file of the checkout (ignored ones too; caches and virtual environments left out): size, mtime."""
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in CACHES and not d.endswith(".egg-info")
                   and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg"))]  # fmt: skip
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            files[os.path.relpath(os.path.join(folder, name), ROOT)] = (stat.st_size, stat.st_mtime_ns)
    return files


def run_notebook(kernel, name: str, **env: str) -> NotebookNode:
    """Execute ``notebooks/<name>`` with ``env`` (NB_* parameters) set in the kernel. It must write nothing into the
    repository: no file new or changed in notebooks/, nor an ignored one anywhere (data/, runs/, wandb/...); source
    files that people edit meanwhile in a shared checkout are not its doing."""
    import nbformat
    from nbclient import NotebookClient

    km, client = kernel
    setup = f"""_ip = get_ipython()
for _name in [n for n in _ip.user_ns if not n.startswith("_") and n not in _ip.user_ns_hidden]:
    del _ip.user_ns[_name]  # what %reset -f does, without its slow history and garbage collection
import os as _os
_os.chdir({str(NOTEBOOKS)!r})
for _key in [k for k in _os.environ if k.startswith("NB_") or k == "XDG_CACHE_HOME"]:
    del _os.environ[_key]
_os.environ.update({env!r})
"""
    reply = client.execute_interactive(setup, timeout=120, output_hook=lambda msg: None)
    assert reply["content"]["status"] == "ok", reply["content"]
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    before = repo_files()
    runner = NotebookClient(book, km=km, timeout=120)
    try:
        runner.execute()
    finally:
        if runner.kc is not None:
            runner.kc.stop_channels()
    after = repo_files()
    touched = sorted(p for p in after if before.get(p) != after[p])
    written = [p for p in touched if p.startswith("notebooks" + os.sep)] + sorted(ignored(touched))
    assert not written, f"{name} wrote into the repository: {written}"
    return book


def text_of(book: NotebookNode) -> str:
    """Everything the code cells printed (stdout and plain-text results)."""
    return "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)


def images_of(book: NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in book.cells if c.cell_type == "code" for o in c.outputs)


def test_compare_runs_reads_wandb_offline_runs(kernel, mnist_root, tmp_path):
    """Two runs with the default W&B logger, offline: the notebook reads them back from disk."""
    from project.tools.runs import read_wandb_run

    for lr in ("0.01", "0.001"):
        cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--data.init_args.data_dir={mnist_root}", *QUIET,
                  *TINY.split(), "--trainer.max_epochs=2", "--test_after_fit=false", "--wandb_watch.log=null",
                  "--wandb_media.every_n_epochs=0", "--model.init_args.net.init_args.hidden=[16]",
                  f"--model.init_args.optimizer.init_args.lr={lr}"])  # fmt: skip
    folders = [tmp_path / "runs" / "mnist" / f"version_{i}" for i in (0, 1)]
    runs = [read_wandb_run(folder) for folder in folders]  # waits for W&B to finish writing
    book = run_notebook(kernel, "compare_runs.ipynb", NB_RUNS=str(tmp_path / "runs" / "*" / "version_*"))
    out = text_of(book)
    assert "2 runs: mnist/version_0, mnist/version_1" in out
    for folder, run in zip(folders, runs, strict=True):
        rows = len([r for r in run["history"] if "trainer/global_step" in r])
        assert f"{folder.parent.name}/{folder.name}: W&B {run['id']}, {rows} history rows" in out
    assert "config keys that differ: ['model.init_args.optimizer.init_args.lr']" in out
    assert "\n  model.init_args.optimizer.init_args.lr: 0.01 (mnist/version_0), 0.001 (mnist/version_1)\n" in out
    table = final_metrics(out)
    for folder, run in zip(folders, runs, strict=True):
        row = table[f"{folder.parent.name}/{folder.name}"]
        assert row["epochs"] == 2 and row["test/acc"] is None
        for key in ("val/acc", "val/acc_best", "val/loss"):
            assert row[key] == pytest.approx(run["summary"][key], abs=6e-5)
    assert images_of(book) == 1  # the learning curves


def final_metrics(out: str) -> dict[str, dict[str, float | None]]:
    """The notebook's final-metrics table: {run: {metric: value or None}}."""
    lines = out[out.index("\nrun ") + 1 :].splitlines()
    header = lines[0].split()[1:]
    table = {}
    for line in lines[1:]:
        if not line.strip():
            break
        name, *values = line.split()
        table[name] = {k: None if v == "-" else float(v) for k, v in zip(header, values, strict=True)}
    return table


def quickstart_result(book: NotebookNode, run_dir: Path) -> float:
    """The test accuracy the notebook printed, which must be the one the run's test logged; three plots."""
    out = text_of(book)
    assert f"run folder: {run_dir}\n" in out
    accuracy = float(re.search(r"test accuracy: ([0-9.]+) \(\d+ images\)", out)[1])
    assert accuracy == pytest.approx(read_metrics(run_dir)["test/acc"][-1], abs=6e-5)
    assert images_of(book) == 3  # learning curves, confusion matrix, sample predictions
    return accuracy


def test_quickstart_on_mnist_and_image_folder_then_compare_csv_runs(kernel, mnist_root, image_root, tmp_path):
    """MNIST (1 channel) from the default data folder, your own RGB images, then compare_runs on both CSV runs."""
    cache = tmp_path / "cache"  # the default data_dir: $XDG_CACHE_HOME/lightning-template/data, outside the repository
    (cache / "lightning-template" / "data").mkdir(parents=True)
    (cache / "lightning-template" / "data" / "MNIST").symlink_to(mnist_root / "MNIST")
    runs = tmp_path / "runs"
    book = run_notebook(kernel, "quickstart.ipynb", NB_DATA_MODULE="project.data.MNISTDataModule",
                        XDG_CACHE_HOME=str(cache), NB_DATA_ARGS=json.dumps({"batch_size": 32, "loader": "tensor"}),
                        NB_MAX_EPOCHS="1", NB_RUNS_DIR=str(runs), NB_CLI_ARGS=TINY)  # fmt: skip
    assert f"--data.init_args.data_dir={cache / 'lightning-template' / 'data'} " in text_of(book)
    assert "(200 images)" in text_of(book)
    mnist_accuracy = quickstart_result(book, runs / "mnist" / "version_0")

    book = run_notebook(kernel, "quickstart.ipynb", NB_DATA_MODULE="project.data.ImageFolderDataModule",
                        NB_DATA_DIR=str(image_root), NB_DATA_ARGS=json.dumps({"image_size": 16, "channels": 3}),
                        NB_MAX_EPOCHS="2", NB_RUNS_DIR=str(runs), NB_CLI_ARGS=TINY)  # fmt: skip
    assert "(12 images)" in text_of(book)  # test_split 0.1 of 3 x 40
    folder_accuracy = quickstart_result(book, runs / "image_folder" / "version_0")

    book = run_notebook(kernel, "compare_runs.ipynb", NB_RUNS=str(runs / "*" / "version_*"))
    out = text_of(book)
    assert "2 runs: image_folder/version_0, mnist/version_0" in out
    assert "image_folder/version_0: CSV," in out and "mnist/version_0: CSV," in out
    differing = json.loads(re.search(r"config keys that differ: (\[.*\])", out)[1].replace("'", '"'))
    assert {"data.class_path", "data.init_args.image_size", "trainer.max_epochs"} <= set(differing)
    assert ("\n  data.class_path: 'project.data.ImageFolderDataModule' (image_folder/version_0), "
            "'project.data.MNISTDataModule' (mnist/version_0)\n") in out  # fmt: skip
    table = final_metrics(out)
    assert table["mnist/version_0"]["test/acc"] == pytest.approx(mnist_accuracy, abs=6e-5)
    assert table["image_folder/version_0"]["test/acc"] == pytest.approx(folder_accuracy, abs=6e-5)
    assert table["mnist/version_0"]["epochs"] == 1 and table["image_folder/version_0"]["epochs"] == 2
    assert images_of(book) == 1


def test_notebooks_are_committed_without_outputs():
    """Last: nbformat is imported by then (see above)."""
    import nbformat

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: clear its outputs"
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == {"quickstart.ipynb", "compare_runs.ipynb"}
