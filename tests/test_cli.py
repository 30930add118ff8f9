"""End-to-end runs through ``cli_main``, in-process, on format-exact data."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from project.cli import cli_main
from project.models import ImageClassifier
from tests.conftest import CONFIGS, fast_args

DATASETS = {
    "mnist": "mnist_root",
    "fashion_mnist": "mnist_root",
    "cifar10": "cifar_root",
    "cifar100": "cifar_root",
}
SMALL_NETS = {
    "mnist": ["--model.init_args.net.init_args.hidden=[32]"],
    "fashion_mnist": ["--model.init_args.net.init_args.width=8"],
    "cifar10": [
        "--model.init_args.net.init_args.width=8",
        "--model.init_args.net.init_args.blocks=[1,1]",
        "--data.init_args.val_split=0.2",
        "--data.init_args.num_workers=0",
    ],
    "cifar100": [
        "--model.init_args.net.init_args.width=8",
        "--model.init_args.net.init_args.blocks=[1,1]",
        "--data.init_args.val_split=0.2",
        "--data.init_args.num_workers=0",
    ],
}


def data_root(name: str, request: pytest.FixtureRequest) -> Path:
    value = request.getfixturevalue(DATASETS[name])
    return value[0] if isinstance(value, tuple) else value


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return [float(r[key]) for r in rows if r.get(key)][-1]


@pytest.mark.parametrize("name", list(DATASETS))
def test_fast_dev_run_every_dataset(name, request):
    root = data_root(name, request)
    cli = cli_main(["fit", f"--config={CONFIGS / f'{name}.yaml'}", *fast_args(root), *SMALL_NETS[name],
                    "--trainer.fast_dev_run=2", "--test_after_fit=true"])  # fmt: skip
    assert cli.trainer.state.finished and cli.trainer.state.fn == "test"
    assert cli.model.num_classes == cli.datamodule.num_classes
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1


@pytest.mark.parametrize("name", list(DATASETS))
def test_one_epoch_then_test_from_checkpoint(name, request):
    """A tiny real epoch writes a checkpoint, the resolved config and metrics; `validate` and `test` from the
    checkpoint, in new processes' worth of state, give back the numbers the fit run logged."""
    root = data_root(name, request)
    cli = cli_main(["fit", f"--config={CONFIGS / f'{name}.yaml'}", *fast_args(root), *SMALL_NETS[name],
                    "--trainer.max_epochs=1", "--data.init_args.batch_size=32", "--test_after_fit=true"])  # fmt: skip
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir.parent.name == name and run_dir.name == "version_0"
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.parent == run_dir / "checkpoints"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["init_args"]["data_dir"] == str(root) and saved["trainer"]["max_epochs"] == 1

    rows = read_metrics(run_dir)
    val_acc = last_value(rows, "val/acc")
    assert last_value(rows, "val/acc_best") == pytest.approx(val_acc)
    assert last_value(rows, "train/acc") >= 0 and last_value(rows, "train/loss") > 0
    if name == "cifar100":
        assert "val/top5" in rows[0]

    # validate with the checkpoint reproduces the numbers logged during fit
    again = cli_main(["validate", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    assert float(again.trainer.callback_metrics["val/acc"]) == pytest.approx(val_acc, abs=1e-6)
    assert float(again.trainer.callback_metrics["val/loss"]) == pytest.approx(last_value(rows, "val/loss"), rel=1e-5)
    assert Path(again.trainer.log_dir).name == "version_1", "a new run never writes into an earlier run's folder"

    # test from the checkpoint gives the numbers the fit run's own test (test_after_fit) logged
    tested = cli_main(["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    test_acc = float(tested.trainer.callback_metrics["test/acc"])
    assert test_acc == pytest.approx(last_value(rows, "test/acc"), abs=1e-6)
    assert last_value(read_metrics(Path(tested.trainer.log_dir)), "test/acc") == pytest.approx(test_acc)


def test_learns_above_chance(mnist_root):
    cli = cli_main(["fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", *fast_args(mnist_root),
                    "--model.init_args.net.init_args.width=8", "--trainer.max_epochs=3",
                    "--data.init_args.batch_size=32", "--test_after_fit=false"])  # fmt: skip
    best = cli.trainer.checkpoint_callback.best_model_path
    tested = cli_main(["test", f"--config={Path(cli.trainer.log_dir) / 'config.yaml'}", f"--ckpt_path={best}"])
    assert float(tested.trainer.callback_metrics["test/acc"]) > 0.5  # chance is 0.1


def test_print_config_round_trips(mnist_root, capsys, tmp_path):
    args = ["fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", *fast_args(mnist_root), "--model.optimizer.lr=0.02"]
    with pytest.raises(SystemExit):
        cli_main([*args, "--print_config"])
    first = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(first)
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={tmp_path / 'printed.yaml'}", "--print_config"])
    second = capsys.readouterr().out
    assert first == second
    assert yaml.safe_load(first)["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.02


def test_num_classes_and_shape_are_linked_into_the_net(cifar_root):
    root, _ = cifar_root
    cli = cli_main([f"--config={CONFIGS / 'cifar100.yaml'}", *fast_args(root)], run=False)
    assert cli.model.num_classes == 100 and len(cli.model.class_names) == 100
    assert cli.model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    net = cli.model.hparams["net"]["init_args"]
    assert net["num_classes"] == 100 and tuple(net["input_shape"]) == (3, 32, 32)


def test_optimizer_and_scheduler_overrides_take_effect(mnist_root):
    cli = cli_main([
        "fit", f"--config={CONFIGS / 'mnist.yaml'}", *fast_args(mnist_root), "--trainer.fast_dev_run=1",
        "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.05", "--model.optimizer.momentum=0.9",
        "--model.optimizer.weight_decay=0.01",
        "--model.scheduler=torch.optim.lr_scheduler.StepLR", "--model.scheduler.step_size=7",
        "--model.scheduler_interval=step",
    ])  # fmt: skip
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    config = cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR) and config.scheduler.step_size == 7
    assert config.interval == "step"


def test_one_cycle_total_steps_filled_from_the_trainer(mnist_root):
    cli = cli_main(["fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", *fast_args(mnist_root),
                    "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                    "--model.init_args.net.init_args.width=4"])  # fmt: skip
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and scheduler.total_steps == 6


def test_checkpoint_loads_with_weights_only(mnist_root):
    cli = cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", *fast_args(mnist_root), "--trainer.fast_dev_run=1",
                    "--trainer.enable_checkpointing=true"])  # fmt: skip
    path = Path("model.ckpt")
    cli.trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # no pickled modules or classes inside
    model = ImageClassifier.load_from_checkpoint(path, weights_only=True)
    x = torch.randn(3, 1, 28, 28)
    cli.model.eval()
    model.eval()
    torch.testing.assert_close(model(x), cli.model(x))


def test_missing_data_exits_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--data.init_args.data_dir={tmp_path / 'nothing'}"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: MNIST not found") and "train-images-idx3-ubyte" in err[-1]
