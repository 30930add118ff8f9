"""Trainer capabilities switched on by stacking configs/trainer/*.yaml and configs/debug/*.yaml: each test checks
the effect (dtype inside the step, weights after a step, files written), not only that the run finished."""

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, RichModelSummary, RichProgressBar

from project.callbacks.rng import RNGStateCheckpoint
from project.cli import cli_main
from tests.conftest import CONFIGS, fast_args

MNIST = CONFIGS / "mnist.yaml"
TRAINER = CONFIGS / "trainer"
DEBUG = CONFIGS / "debug"


def mlp_args(root: Path, *extra: str) -> list[str]:
    """MNIST config with a small MLP without dropout: no batch-dependent layers, no randomness in the forward."""
    return [f"--config={MNIST}", *fast_args(root), "--model.init_args.net.init_args.hidden=[32]",
            "--model.init_args.net.init_args.dropout=0.0", "--data.init_args.batch_size=32",
            "--test_after_fit=false", *extra]  # fmt: skip


def fit(args: list[str], *callbacks: Callback):
    """Build the CLI without running it, add test callbacks to its trainer, then fit."""
    cli = cli_main(args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


class StepRecorder(Callback):
    """Records the dtype of the net's output inside each training step, and the training loss."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []
        self.losses: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.net.register_forward_hook(lambda m, i, out: self.dtypes.append(out.dtype) if m.training else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ---- UX and placement ------------------------------------------------------------------------------------------
def test_defaults_rich_progress_bar_model_summary_and_rng_state(mnist_root):
    cli = cli_main([f"--config={MNIST}", f"--data.init_args.data_dir={mnist_root}"], run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert RichProgressBar in kinds and RichModelSummary in kinds and RNGStateCheckpoint in kinds
    assert cli.trainer._accelerator_connector._accelerator_flag in ("cpu", "cuda", "mps")  # "auto" resolved


def test_cpu_config_places_on_one_cpu(mnist_root):
    cli = cli_main([f"--config={MNIST}", f"--config={TRAINER / 'cpu.yaml'}", *fast_args(mnist_root)], run=False)
    assert type(cli.trainer.accelerator).__name__ == "CPUAccelerator" and cli.trainer.num_devices == 1


# ---- precision -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "precision", "dtype"),
    [
        ("bf16", "bf16-mixed", torch.bfloat16),
        ("fp16", "bf16-mixed", torch.bfloat16),
        ("fp32", "32-true", torch.float32),
    ],
)
def test_precision_config_sets_the_forward_dtype_and_trains(mnist_root, config, precision, dtype):
    """16-mixed on a CPU becomes bf16-mixed (Lightning); the net's output inside the step has the config's dtype."""
    recorder = StepRecorder()
    args = mlp_args(mnist_root, f"--config={TRAINER / f'{config}.yaml'}", "--trainer.max_epochs=2",
                    "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=1",
                    "--trainer.accelerator=cpu")  # fmt: skip
    cli = fit(args, recorder)
    assert cli.trainer.precision == precision
    assert recorder.dtypes and set(recorder.dtypes) == {dtype}
    first, last = recorder.losses[:4], recorder.losses[-4:]
    assert all(torch.isfinite(torch.tensor(recorder.losses))) and sum(last) < 0.8 * sum(first)
    assert next(cli.model.parameters()).dtype == torch.float32  # mixed: master weights stay float32


# ---- gradient accumulation and clipping ------------------------------------------------------------------------
def weights_after_one_step(root: Path, *extra: str, record: list | None = None) -> dict[str, torch.Tensor]:
    class Initial(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            if record is not None:
                record.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    args = mlp_args(root, "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.5",
                    "--model.optimizer.weight_decay=0.0", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                    "--trainer.deterministic=true", *extra)  # fmt: skip
    cli = fit(args, Initial())
    assert cli.trainer.global_step == 1
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


def test_accumulating_4_batches_of_16_equals_one_batch_of_64(mnist_root):
    big = weights_after_one_step(mnist_root, "--data.init_args.batch_size=64")
    accumulated = weights_after_one_step(
        mnist_root, "--data.init_args.batch_size=16", f"--config={TRAINER / 'accumulate.yaml'}"
    )
    small = weights_after_one_step(mnist_root, "--data.init_args.batch_size=16")
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=0, atol=1e-6)
    assert any((small[k] - big[k]).abs().max() > 1e-4 for k in big), "without accumulation the step differs"


def test_gradient_clipping_bounds_the_step(mnist_root):
    """SGD moves the weights by lr * gradient: with the total norm clipped to c the step has norm exactly lr * c."""
    initial: list = []
    clipped = weights_after_one_step(mnist_root, f"--config={TRAINER / 'clip.yaml'}",
                                     "--trainer.gradient_clip_val=0.01", record=initial)  # fmt: skip
    free = weights_after_one_step(mnist_root)

    def step_norm(weights):
        return torch.cat([(weights[k] - initial[0][k]).flatten() for k in weights]).norm().item()

    assert step_norm(clipped) == pytest.approx(0.5 * 0.01, rel=1e-4)
    assert step_norm(free) > 10 * step_norm(clipped)


# ---- early stopping --------------------------------------------------------------------------------------------
def test_early_stopping_ends_the_run_and_says_why(mnist_root, caplog):
    """min_delta larger than any possible improvement of val/loss: stops after patience + 1 validations."""
    cli = cli_main(["fit", *mlp_args(mnist_root, f"--config={TRAINER / 'early_stopping.yaml'}",
                            "--trainer.max_epochs=20", "--trainer.callbacks.patience=2",
                            "--trainer.callbacks.min_delta=100", "--trainer.limit_train_batches=2")])  # fmt: skip
    stopper = next(c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping))
    assert stopper.patience == 2 and cli.trainer.current_epoch == 3 < 20 and cli.trainer.should_stop
    assert "did not improve" in stopper.stopping_reason_message
    assert "did not improve in the last 2 records" in caplog.text  # verbose: printed when it stops


# ---- profiling and monitors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["profile", "profile_advanced", "profile_pytorch"])
def test_profiler_report_in_the_run_folder_names_the_training_step(mnist_root, config):
    cli = cli_main(["fit", *mlp_args(mnist_root, f"--config={TRAINER / f'{config}.yaml'}", "--trainer.max_epochs=1",
                            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1")])  # fmt: skip
    report = Path(cli.trainer.log_dir) / "fit-profile.txt"
    step = "run_training_batch" if config == "profile_pytorch" else "training_step"  # its table cuts long names
    assert report.is_file() and step in report.read_text()


def test_monitor_configs_stack_and_log(mnist_root):
    monitors = [f"--config={TRAINER / f'{name}.yaml'}" for name in ("lr_monitor", "throughput", "device_stats")]
    cli = cli_main(["fit", *mlp_args(mnist_root, *monitors, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                            "--trainer.limit_val_batches=1")])  # fmt: skip
    columns = set(read_metrics(Path(cli.trainer.log_dir))[0])
    assert {"lr-AdamW/pg1", "lr-AdamW/pg1-momentum", "train/samples", "train/time"} <= columns
    assert "DeviceStatsMonitor.on_train_batch_end/cpu_percent" in columns


# ---- debug presets ---------------------------------------------------------------------------------------------
def test_debug_presets(mnist_root):
    def build(name: str, *extra: str):
        return cli_main(mlp_args(mnist_root, f"--config={DEBUG / f'{name}.yaml'}", *extra), run=False).trainer

    assert build("detect_anomaly")._detect_anomaly
    cli = cli_main(["fit", *mlp_args(mnist_root, f"--config={DEBUG / 'fast_dev_run.yaml'}")])
    assert cli.trainer.global_step == 1 and not Path("runs").exists()  # no logs, no checkpoints
    cli = cli_main(["fit", *mlp_args(mnist_root, f"--config={DEBUG / 'limit_batches.yaml'}")])
    assert cli.trainer.global_step == 20 and cli.trainer.current_epoch == 2
    cli = cli_main(
        ["fit", *mlp_args(mnist_root, f"--config={DEBUG / 'overfit_batches.yaml'}", "--trainer.max_epochs=10")]
    )
    assert cli.trainer.num_training_batches == 4 and cli.trainer.global_step == 40
    assert float(cli.trainer.callback_metrics["val/acc"]) > 0.9  # validated on the same 4 batches it learned
