"""The notebooks run top to bottom in one Jupyter kernel started in notebooks/ (as `jupyter lab notebooks/` starts
it), on small fixture data, their parameters set through NB_* environment variables; nothing is written into the
repository. nbformat is imported where used: with jupyterlab installed, importing it costs 2.5 s of CPU."""

import json
import os
import re

import pytest
from jupyter_client import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync

from notebooks.wandb_runs import read_wandb_run
from project.cli import cli_main
from tests.conftest import CONFIGS, QUIET, ROOT, read_metrics

NOTEBOOKS = ROOT / "notebooks"
TINY = "--trainer.limit_train_batches=2 --trainer.num_sanity_val_steps=0 --trainer.log_every_n_steps=1"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel for the module (sockets are files: TCP ports two pytest workers pick at once can collide)."""
    km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path_factory.mktemp("kernel") / "ipc"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_sync(km.start_kernel)(cwd=str(NOTEBOOKS), env=env, extra_arguments=["--HistoryManager.hist_file=:memory:"])
    client = BlockingKernelClient()
    client.load_connection_info(km.get_connection_info())
    client.start_channels()
    client.wait_for_ready(timeout=60)
    yield km, client
    client.stop_channels()
    run_sync(km.shutdown_kernel)(now=True)


def repository_files() -> dict[str, int]:
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}]
        files |= {os.path.join(folder, name): os.stat(os.path.join(folder, name)).st_mtime_ns for name in names}
    return files


def run_notebook(kernel, name: str, **env: str) -> tuple[str, int]:
    """Execute ``notebooks/<name>`` with ``env``; what it printed and how many images it drew. It must write into
    neither notebooks/ nor data/ or runs/ of the repository."""
    import nbformat
    from nbclient import NotebookClient

    km, client = kernel
    reset = f"%reset -f\nimport os\nos.chdir({str(NOTEBOOKS)!r})\nos.environ.update({env!r})"
    assert client.execute_interactive(reset, timeout=120, output_hook=lambda msg: None)["content"]["status"] == "ok"
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    before = repository_files()
    runner = NotebookClient(book, km=km, timeout=120)
    try:
        runner.execute()
    finally:
        runner.kc.stop_channels()
    written = [
        p for p, t in repository_files().items() if before.get(p) != t and re.search(r"/(notebooks|data|runs)/", p)
    ]
    assert not written, f"{name} wrote into the repository: {written}"
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    return "".join(o.get("text", "") for o in outputs), sum("image/png" in o.get("data", {}) for o in outputs)


def final_metrics(out: str) -> dict[str, dict[str, float | None]]:
    """The notebook's final-metrics table: {run: {metric: value or None}}."""
    lines = out[out.index("\nrun ") + 1 :].split("\n\n")[0].splitlines()
    header = lines[0].split()[1:]
    return {
        n: {k: None if v == "-" else float(v) for k, v in zip(header, vs, strict=True)}
        for n, *vs in (line.split() for line in lines[1:])
    }


def test_compare_runs_reads_wandb_offline_runs(kernel, mnist_root, tmp_path):
    """Two runs with the default logger (W&B, offline), read back from disk: differing key, curves, final metrics."""
    args = ["fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--data.init_args.data_dir={mnist_root}", *QUIET]
    args += [*TINY.split(), "--trainer.max_epochs=2", "--wandb_watch.log=null", "--wandb_media.every_n_epochs=0"]
    args += ["--model.init_args.net.init_args.hidden=[16]"]
    for lr in ("0.01", "0.001"):
        cli_main([*args, f"--model.init_args.optimizer.init_args.lr={lr}"])
    runs = [read_wandb_run(tmp_path / "runs" / "mnist" / f"version_{i}") for i in (0, 1)]
    out, images = run_notebook(kernel, "compare_runs.ipynb", NB_RUNS=str(tmp_path / "runs" / "*" / "version_*"))
    assert "2 runs: mnist/version_0, mnist/version_1" in out and f"mnist/version_1: W&B {runs[1]['id']}" in out
    assert "\n  model.init_args.optimizer.init_args.lr: 0.01 (mnist/version_0), 0.001 (mnist/version_1)\n" in out
    table = final_metrics(out)
    for i, run in enumerate(runs):
        assert table[f"mnist/version_{i}"]["epochs"] == 2
        assert table[f"mnist/version_{i}"]["val/acc"] == pytest.approx(run["summary"]["val/acc"], abs=6e-5)
    assert images == 1  # the learning curves


def test_quickstart_on_mnist_and_your_images_then_compare_csv_runs(kernel, mnist_root, image_root, tmp_path):
    """MNIST (1 channel) from the default data folder, outside the repository; your RGB images; then compare_runs."""
    cache = tmp_path / "cache"  # the default data_dir: $XDG_CACHE_HOME/lightning-template/data
    (cache / "lightning-template" / "data").mkdir(parents=True)
    (cache / "lightning-template" / "data" / "MNIST").symlink_to(mnist_root / "MNIST")
    runs, accuracy = tmp_path / "runs", {}
    for name, module, epochs, data_args, env in (
        ("mnist", "MNISTDataModule", "1", {"loader": "tensor"}, {"XDG_CACHE_HOME": str(cache)}),
        ("image_folder", "ImageFolderDataModule", "2", {"image_size": 16}, {"NB_DATA_DIR": str(image_root)}),
    ):
        env.update(NB_DATA_MODULE=f"project.data.{module}", NB_MAX_EPOCHS=epochs, NB_DATA_ARGS=json.dumps(data_args))
        out, images = run_notebook(kernel, "quickstart.ipynb", NB_RUNS_DIR=str(runs), NB_CLI_ARGS=TINY, **env)
        accuracy[name] = float(re.search(r"test accuracy: ([0-9.]+) \((\d+) images\)", out)[1])
        assert accuracy[name] == pytest.approx(read_metrics(runs / name / "version_0")["test/acc"][-1], abs=6e-5)
        assert images == 3 and ("(200 images)" if name == "mnist" else "(12 images)") in out
    out, images = run_notebook(kernel, "compare_runs.ipynb", NB_RUNS=str(runs / "*" / "version_*"))
    assert "2 runs: image_folder/version_0, mnist/version_0" in out and "mnist/version_0: CSV," in out
    assert (
        "\n  data.class_path: 'project.data.ImageFolderDataModule' (image_folder/version_0), "
        "'project.data.MNISTDataModule' (mnist/version_0)\n"
    ) in out
    table = final_metrics(out)
    assert {n: table[f"{n}/version_0"]["test/acc"] for n in accuracy} == pytest.approx(accuracy, abs=6e-5)


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in (NOTEBOOKS / "quickstart.ipynb", NOTEBOOKS / "compare_runs.ipynb"):
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: clear its outputs"
