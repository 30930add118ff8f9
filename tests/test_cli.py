"""The command line end to end, in-process, on format-exact data: runs, links, overrides, checkpoints, folders."""

from pathlib import Path

import pytest
import torch
import yaml

from project.cli import cli_main
from project.models import ImageClassifier
from tests.conftest import CONFIGS, CSV, QUIET, fails, fit, read_metrics

ONE_EPOCH = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=1"]
WIDTH_4 = "--model.init_args.net.init_args.width=4"


@pytest.mark.parametrize(("config", "root"), [("fashion_mnist.yaml", "mnist_root"), ("cifar10.yaml", "cifar_root")])
def test_fit_then_validate_and_test_from_the_checkpoint_give_the_logged_numbers(config, root, request):
    """2 epochs write checkpoints, config and metrics; `validate` and `test` of the best checkpoint through the run's
    config.yaml reproduce the logged numbers."""
    data = request.getfixturevalue(root)
    data = data[0] if isinstance(data, tuple) else data
    small = ["--model.init_args.net.init_args.width=8", "--data.init_args.batch_size=32"]
    small += ["--data.init_args.num_workers=0", "--data.init_args.val_split=0.2"]
    cli = fit(config, data, *small, "--trainer.max_epochs=2", "--test_after_fit=true")
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir == Path("runs") / config.removesuffix(".yaml") / "version_0"
    best = Path(cli.config_init.fit.checkpoint.best_model_path)
    assert best.parent == run_dir / "checkpoints" and best.name.startswith("epoch=")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == cli.trainer.global_step
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    metrics = read_metrics(run_dir)
    assert max(metrics["val/acc"]) == metrics["val/acc_best"][-1] and metrics["train/loss"][-1] > 0
    if config == "fashion_mnist.yaml":  # the main job's recipe learns the fixture (chance is 0.1)
        assert metrics["test/acc"][-1] > 0.5
    again = cli_main(["validate", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    best_epoch = metrics["val/acc"].index(max(metrics["val/acc"]))
    assert float(again.trainer.callback_metrics["val/acc"]) == pytest.approx(metrics["val/acc"][best_epoch], abs=1e-6)
    assert float(again.trainer.callback_metrics["val/loss"]) == pytest.approx(metrics["val/loss"][best_epoch], rel=1e-5)
    assert Path(again.trainer.log_dir).name == "version_1", "a new run never writes into an earlier run's folder"
    tested = cli_main(["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    assert float(tested.trainer.callback_metrics["test/acc"]) == pytest.approx(metrics["test/acc"][-1], abs=1e-6)


def test_data_is_linked_into_the_model_and_the_net(cifar_root):
    cli = fit("cifar100.yaml", cifar_root[0], "--model.init_args.net.init_args.width=4", run=False)
    model = cli.model
    assert model.num_classes == len(model.class_names) == 100 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert model.hparams["net"]["init_args"]["num_classes"] == 100
    assert tuple(model.hparams["image_shape"]) == (3, 32, 32)
    assert model.mean.flatten().tolist() == pytest.approx(cli.datamodule.mean)


NET = """
from math import prod
from torch import nn


class Net(nn.Sequential):
    def __init__(self, num_classes: int, input_shape):
        super().__init__(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))
"""


def test_a_net_taking_only_the_linked_arguments(mnist_root, tmp_path, monkeypatch):
    """A new net is one file, whatever its signature: chosen on the command line or in a net YAML without init_args."""
    (tmp_path / "linked.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "net.yaml").write_text("class_path: project.models.ImageClassifier\ninit_args:\n  net: linked.Net\n")
    for choice in ("--model.net=linked.Net", f"--model={tmp_path / 'net.yaml'}"):
        cli = fit("mnist.yaml", mnist_root, choice, "--trainer.fast_dev_run=1")
        assert type(cli.model.net).__name__ == "Net" and cli.model.hparams["net"]["init_args"]["num_classes"] == 10


def test_optimizer_and_scheduler_overrides_take_effect(mnist_root):
    sgd = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.05", "--model.optimizer.momentum=0.9"]
    sgd += ["--model.optimizer.weight_decay=0.01"]
    step_lr = ["--model.scheduler=torch.optim.lr_scheduler.StepLR", "--model.scheduler.step_size=7"]
    cli = fit("mnist.yaml", mnist_root, "--trainer.fast_dev_run=1", *sgd, *step_lr, "--model.scheduler_interval=step")
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]  # none on biases and norms
    config = cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR) and config.scheduler.step_size == 7
    assert config.interval == "step"


def test_one_cycle_and_lr_logs_follow_the_run_checkpoints_are_plain_data_and_a_longer_resume_stops(mnist_root, capsys):
    """OneCycle gets the run's length, lr is logged once per step (momentum too, when asked); the checkpoint holds
    plain data and its model takes raw images; resuming for more epochs than the schedule has stops in one line."""
    momentum = "--lr_monitor.log_momentum=true"
    cli = fit("fashion_mnist.yaml", mnist_root, *ONE_EPOCH, "--trainer.limit_train_batches=3", WIDTH_4, momentum)
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_steps == 3
    metrics = read_metrics(Path(cli.trainer.log_dir))
    assert len(metrics["lr-AdamW/pg1"]) == 3 and "lr-AdamW/pg1-momentum" in metrics
    path = cli.config_init.fit.checkpoint.best_model_path
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]  # no pickled modules or classes inside
    assert tuple(hparams["mean"]) == (0.2860,) and hparams["class_names"][0] == "T-shirt/top"
    model = ImageClassifier.load_from_checkpoint(path, weights_only=True).eval()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(model(images), cli.model.eval()(images))
    torch.testing.assert_close(model(images), model(images.float() / 255))  # uint8 or float in [0, 1]
    config = Path(cli.trainer.log_dir) / "config.yaml"
    line = fails(["fit", f"--config={config}", "--ckpt_path=last", "--trainer.max_epochs=3"], capsys)
    assert "OneCycleLR schedule ends after 3 optimizer steps but this run needs 9" in line
    assert "--trainer.max_epochs" in line


def test_default_root_dir_decides_where_runs_go_and_a_smoke_run_leaves_nothing(mnist_root, tmp_path):
    elsewhere = "--trainer.default_root_dir=elsewhere/runs"
    cli = fit("mnist.yaml", mnist_root, elsewhere, *ONE_EPOCH, "--trainer.limit_train_batches=2")
    assert Path(cli.trainer.log_dir) == Path("elsewhere/runs/mnist/version_0")
    files = {p.name for p in Path(cli.trainer.log_dir).iterdir()}
    assert files == {"config.yaml", "checkpoints", "metrics.csv", "hparams.yaml"}
    before = sorted(tmp_path.rglob("*"))
    smoke = [f"--config={CONFIGS / 'mnist.yaml'}", f"--data.init_args.data_dir={mnist_root}", *QUIET]
    for _ in range(2):
        cli_main(["fit", *smoke, "--trainer.fast_dev_run=true", "--test_after_fit=true"])
    assert sorted(tmp_path.rglob("*")) == before, "fast_dev_run writes no checkpoints, logs or configs"


CALLBACK_OPTIONS = {  # each with a setting whose effect shows
    "ModelCheckpoint": ["--trainer.callbacks.filename=stock-{step}"],
    "LearningRateMonitor": ["--trainer.callbacks.log_momentum=true"],  # the CLI's own logs no momentum
    "EarlyStopping": [
        "--trainer.callbacks.monitor=val/loss",
        "--trainer.callbacks.patience=1",
        "--model.optimizer.lr=0",
    ],
    "EMAWeightAveraging": ["--trainer.callbacks.decay=0.5"],
}


@pytest.mark.parametrize("name", list(CALLBACK_OPTIONS))
def test_lightning_callback_short_names_work(name, mnist_root):
    """The LightningCLI docs' form, each callback doing its job beside the CLI's (EarlyStopping: val/loss stays put)."""
    short = ["--trainer.max_epochs=3", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    short += ["--test_after_fit=false"]  # a test of the best checkpoint would load its weights back
    cli = fit("mnist.yaml", mnist_root, f"--trainer.callbacks+={name}", *CALLBACK_OPTIONS[name], *short)
    run_dir = Path(cli.trainer.log_dir)
    assert cli.trainer.state.finished and cli.trainer.global_step == (4 if name == "EarlyStopping" else 6)
    if name == "ModelCheckpoint":
        names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert names[1:] == ["last.ckpt", "stock-step=6.ckpt"] and names[0].startswith("epoch="), names
    elif name == "LearningRateMonitor":
        assert set(read_metrics(run_dir)["lr-AdamW/pg1-momentum"]) == {0.9}  # AdamW's beta1
    elif name == "EarlyStopping":
        (stopper,) = [c for c in cli.trainer.callbacks if type(c).__name__ == name]
        assert stopper.stopped_epoch == 1 and len(read_metrics(run_dir)["val/loss"]) == 2
    else:
        plain = fit("mnist.yaml", mnist_root, *short).model.state_dict()
        averaged = cli.model.state_dict()
        assert plain.keys() == averaged.keys() and not all(torch.equal(plain[k], averaged[k]) for k in plain)


def test_no_logger_trains_and_checkpoints(mnist_root):
    configs = [f"--config={CONFIGS / 'mnist.yaml'}", f"--config={CONFIGS / 'logger/none.yaml'}", *QUIET]
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--test_after_fit=true"]
    cli = cli_main(["fit", *configs, f"--data.init_args.data_dir={mnist_root}", *short])
    assert not cli.trainer.loggers and cli.trainer.state.finished and "test/acc" in cli.trainer.callback_metrics
    run = Path("runs/mnist/version_0")
    best, last = sorted((run / "checkpoints").iterdir())
    assert best.name.startswith("epoch=000-val_acc=") and last.name == "last.ckpt"
    config = run / "config.yaml"
    tested = cli_main(["test", f"--config={config}", "--ckpt_path=last", *QUIET])  # its own folder again
    assert sorted(p.name for p in Path("runs/mnist").iterdir()) == ["version_0", "version_1"]
    assert (Path(tested.trainer.log_dir) / "config.yaml").is_file() and "test/acc" in tested.trainer.callback_metrics


def test_train_loss_is_logged_every_epoch_however_few_the_steps_and_epochs_count_from_one(mnist_root, capsys):
    """3 steps an epoch, fewer than log_every_n_steps: the epoch's mean train/loss is logged anyway; the progress bar
    ends at Epoch 2/2, not at Lightning's 0-based Epoch 1/1."""
    data = [f"--config={CONFIGS / 'mnist.yaml'}", CSV, f"--data.init_args.data_dir={mnist_root}"]
    short = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]
    cli = cli_main(["fit", *data, *short, "--trainer.log_every_n_steps=50", "--trainer.enable_model_summary=false"])
    metrics = read_metrics(Path(cli.trainer.log_dir))
    assert len(metrics["train/loss"]) == 2 and all(v > 0 for v in metrics["train/loss"]) and "train/acc" in metrics
    console = capsys.readouterr()
    shown = console.out + console.err
    assert "Epoch 2/2" in shown and "Epoch 1/1" not in shown  # without a terminal, Rich draws the last state


def computes_in(plugin) -> torch.dtype:
    with plugin.forward_context():
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(["avx512_bf16", "amx_bf16"], torch.bfloat16), (["avx512_bf16"], torch.float32), ([], torch.float32)],
)
def test_cpu_recipes_take_bf16_where_the_cpu_has_it_and_an_explicit_precision_wins(
    flags, expected, mnist_root, monkeypatch, caplog, tmp_path
):
    """The fast recipe computes in bf16 on a CPU with AMX (/proc/cpuinfo's `flags`) only, not with AVX512-BF16 alone,
    says so at start, and yields to --trainer.precision. The main job stays fp32 everywhere."""
    from project import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {' '.join(flags)}\n")
    assert precision.native_bf16_flags(cpuinfo) == flags
    monkeypatch.setattr(precision, "native_bf16_flags", lambda: flags)
    plugin = fit("experiment/fashion_mnist_fast.yaml", mnist_root, run=False).trainer.precision_plugin
    with caplog.at_level("INFO"):
        plugin.convert_module(torch.nn.Linear(2, 2))
    said = f"Precision: {'bf16-mixed' if expected == torch.bfloat16 else '32-true'} (this CPU has {', '.join(flags)}"
    assert computes_in(plugin) == expected and (said if flags else "Precision: 32-true (no ") in caplog.text
    assert computes_in(fit("fashion_mnist.yaml", mnist_root, run=False).trainer.precision_plugin) == torch.float32
    explicit = fit("experiment/fashion_mnist_fast.yaml", mnist_root, "--trainer.precision=32-true", run=False)
    assert computes_in(explicit.trainer.precision_plugin) == torch.float32
