"""The logger configs stack with --config: CSV, TensorBoard, none; W&B callbacks stay silent without W&B."""

from pathlib import Path

import pytest

from project.cli import cli_main
from tests.conftest import CONFIGS

QUICK = [
    "--trainer.enable_progress_bar=false",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1",
    "--model.init_args.net.init_args.width=4",
]


def fit(root: Path, logger: str):
    return cli_main(["fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", f"--config={CONFIGS / 'logger' / logger}",
                     f"--data.init_args.data_dir={root}", *QUICK])  # fmt: skip


def test_csv_logger_writes_metrics_and_learning_rate(mnist_root):
    cli = fit(mnist_root, "csv.yaml")
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir == Path("runs/fashion_mnist/version_0")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc", "test/acc", "lr-AdamW/pg1"} <= set(header)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not Path("runs/fashion_mnist/version_0/wandb").exists() and not Path("wandb").exists()


def test_tensorboard_logger_writes_events(mnist_root):
    cli = fit(mnist_root, "tensorboard.yaml")
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir == Path("runs/fashion_mnist/version_0")
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_no_logger_still_trains_and_checkpoints(mnist_root):
    cli = fit(mnist_root, "none.yaml")
    assert not cli.trainer.loggers and cli.trainer.state.finished
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1
    assert Path(cli.trainer.checkpoint_callback.best_model_path).is_file()


@pytest.mark.parametrize("name", ["csv", "tensorboard", "none", "wandb"])
def test_logger_config_switches_class(name, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--config={CONFIGS / 'logger' / f'{name}.yaml'}",
                  "--print_config"])  # fmt: skip
    printed = capsys.readouterr().out
    expected = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger", "none": "logger: false", "wandb": "WandbLogger"}
    assert expected[name] in printed
