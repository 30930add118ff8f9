"""A new task as a user adds one: the README's LightningModule (a denoising autoencoder, no classes) in a file of
theirs, through the CLI in-process (tests/test_readme.py runs the same commands as processes)."""

import hashlib
import re
import sys

import torch
from lightning import LightningModule

from project.cli import cli_main
from tests.conftest import CONFIGS, CSV, QUIET, ROOT, fails, read_metrics

LIMITS = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]


def fit_args(config: str, data_dir, *extra: str) -> list[str]:
    return ["fit", f"--config={CONFIGS / config}", f"--data.init_args.data_dir={data_dir}", *QUIET, *extra]


def readme_file(name: str) -> str:
    return re.search(rf"```python\n# {re.escape(name)}\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def test_a_users_own_lightning_module_fits_tests_and_resumes(tmp_path, mnist_root, monkeypatch, caplog):
    """Fit, test from the saved config, resume; the data's facts reach only the arguments the module takes; what
    needs classes says so."""
    (tmp_path / "my_task.py").write_text(readme_file("my_task.py"))
    monkeypatch.syspath_prepend(str(tmp_path))  # where the user put it, as PYTHONPATH would
    monkeypatch.delitem(sys.modules, "my_task", raising=False)
    data = f"--data.init_args.data_dir={mnist_root}"

    def project(*args: str):
        return cli_main([*args, *QUIET, *LIMITS, data])

    model = ["--model=my_task.Denoiser", "--checkpoint.monitor=val/loss", "--checkpoint.mode=min"]
    project("fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", CSV, *model, "--trainer.max_epochs=2")
    run = tmp_path / "runs/fashion_mnist/version_0"
    best, last = sorted((run / "checkpoints").iterdir())
    assert re.fullmatch(r"epoch=00[01]-val_loss=0\.\d{4}\.ckpt", best.name) and last.name == "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    # the data's image shape reached the one argument of that name; nothing the module does not take
    assert checkpoint["hyper_parameters"] == {
        "_class_path": "my_task.Denoiser",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "image_shape": [1, 28, 28],
        "width": 32,
        "noise": 0.3,
    }
    assert checkpoint["global_step"] == 6 and "net.0.weight" in checkpoint["state_dict"]
    header = (run / "config.yaml").read_text().splitlines()[1]  # the user's untracked file is recorded with the run
    digest = hashlib.sha256((tmp_path / "my_task.py").read_bytes()).hexdigest()[:16]
    imported = header.split("untracked files imported: ", 1)[1].split(", ")  # in-process: other tests' files too
    assert f"{(tmp_path / 'my_task.py').resolve()} (sha256 {digest})" in imported
    metrics = read_metrics(run)
    assert metrics["val/loss"][1] < metrics["val/loss"][0] and len(metrics["test/loss"]) == 1  # test_after_fit
    tested = project("test", f"--config={run / 'config.yaml'}", "--ckpt_path=last")
    assert tested.trainer.callback_metrics["test/loss"] > 0
    assert len(read_metrics(tmp_path / "runs/fashion_mnist/version_1")["test/loss"]) == 1
    project("fit", f"--config={run / 'config.yaml'}", "--ckpt_path=last", "--trainer.max_epochs=3")
    resumed = torch.load(tmp_path / "runs/fashion_mnist/version_2/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 9 and resumed["epoch"] == 2, "resumed at step 6, not from scratch"
    with caplog.at_level("INFO"):
        project("predict", f"--config={run / 'config.yaml'}", "--ckpt_path=last")
    assert "prediction files need a classifier" in caplog.text
    assert not list(tmp_path.rglob("predictions.*"))


class Regressor(LightningModule):
    """A model that takes none of the data's facts and has no test_step."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)


def test_test_after_fit_without_a_test_step_is_refused_before_training(mnist_root, capsys, tmp_path):
    line = fails(fit_args("fashion_mnist.yaml", mnist_root, "--model=tests.test_own_task.Regressor"), capsys)
    assert line == "error: --test_after_fit true but Regressor has no test_step; add one, or set --test_after_fit false"
    assert not (tmp_path / "runs").exists()


def test_a_command_that_fails_before_training_leaves_no_run_folder(mnist_root, capsys, tmp_path):
    """The data is set up after the run folder (config.yaml, W&B run) exists: a failure there removes it."""
    # more than the 600 training images, found at setup
    line = fails(fit_args("mnist.yaml", mnist_root, "--data.init_args.val_split=700"), capsys)
    assert "leaves no training data" in line
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]  # W&B had started its run there
