"""Every shipped config, stacked on its data set's config as the README uses it: its printed config parses back to the
same config, and a tiny real run of it on format-exact data shows the config's own effect. Configs that add
callbacks are stacked after another callback config: all their callbacks must be there."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from notebooks.wandb_runs import read_wandb_run
from project.cli import cli_main
from project.data.batches import TensorLoader
from project.loggers import WandbLogger
from tests.conftest import CONFIGS, QUIET, fit, read_metrics

STACKS = {  # every YAML under configs/ is in at least one stack (checked below); its effect is checked in CHECKS
    "mnist": [
        "mnist.yaml",
        "trainer/clip.yaml",
        "trainer/throughput.yaml",
        "trainer/device_stats.yaml",
        "logger/csv.yaml",
        "debug/limit_batches.yaml",
        "predict/jsonl.yaml",
    ],
    "early_stopping": ["mnist.yaml", "trainer/early_stopping.yaml"],
    "prune": [
        "fashion_mnist.yaml",
        "trainer/early_stopping.yaml",
        "compress/prune.yaml",
        "trainer/profile.yaml",
        "logger/wandb.yaml",
    ],
    "distill": ["fashion_mnist.yaml", "trainer/early_stopping.yaml", "compress/distill.yaml"],
    "cifar10": [
        "cifar10.yaml",
        "trainer/profile_advanced.yaml",
        "logger/tensorboard.yaml",
        "debug/overfit_batches.yaml",
    ],
    "cifar100": ["cifar100.yaml", "trainer/profile_pytorch.yaml", "logger/none.yaml"],
    "finetune": ["folder.yaml", "trainer/early_stopping.yaml", "finetune/resnet18.yaml"],
    "fast": ["experiment/fashion_mnist_fast.yaml"],
    "cifar_fast": ["experiment/cifar10_fast.yaml", "trainer/early_stopping.yaml"],
}
PRINT_ONLY = {"trainer/ddp.yaml": "needs CUDA GPUs", "trainer/ddp_cpu.yaml": "starts 2 processes: tests/test_ddp.py"}
EXTRAS = {"prune", "distill"}  # configs/compress/ uses extras/
DATA = {"mnist": "mnist_root", "fashion": "mnist_root", "cifar": "cifar_root", "folder": "image_root"}
CIFAR = ["--model.init_args.net.init_args.width=8", "--data.init_args.batch_size=16", "--data.init_args.val_split=0.2"]
WIDTH_4, HIDDEN_16 = "--model.init_args.net.init_args.width=4", "--model.init_args.net.init_args.hidden=[16]"
TEST_1 = ["--trainer.limit_test_batches=1"]
ONE_EPOCH = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *TEST_1]
SMALL = {  # small nets and batches, few of them; limit_batches.yaml and overfit_batches.yaml set their own
    "mnist": [
        HIDDEN_16,
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=8",
        "--trainer.limit_predict_batches=3",
    ],
    "early_stopping": [  # lr 0: val/loss stays put, so the run stops after patience (3) more epochs
        HIDDEN_16,
        "--model.init_args.optimizer.init_args.lr=0",
        "--trainer.max_epochs=10",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        *TEST_1,
    ],
    "prune": [WIDTH_4, *ONE_EPOCH, "--trainer.max_epochs=2"],
    "distill": [WIDTH_4, *ONE_EPOCH],
    "cifar10": [*CIFAR, "--trainer.max_epochs=10", *TEST_1],  # overfit_batches validates every 10 epochs
    "cifar100": [*CIFAR, *ONE_EPOCH],
    "finetune": [
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8",
        "--model.init_args.net.init_args.arch=mobilenet_v3_small",
        *ONE_EPOCH,
    ],
    "fast": ["--data.init_args.val_split=0.1", *ONE_EPOCH, "--trainer.limit_train_batches=3"],
    "cifar_fast": [*CIFAR, *ONE_EPOCH, "--trainer.limit_train_batches=6"],
}


class Probe(Callback):
    """What a run did: its first and last weights, each step's gradient norm before and after clipping, the labels of
    each training batch, the metrics at the end of fit."""

    def __init__(self) -> None:
        self.norms, self.batches, self.before, self.last, self.fit_metrics = [], [], {}, {}, {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.before = copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    @staticmethod
    def norm(module: torch.nn.Module) -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append([self.norm(pl_module), None])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.norms[-1][1] = self.norm(pl_module)
        self.batches.append((trainer.current_epoch, batch_idx, batch[1].tolist()))
        self.last = copy.deepcopy(pl_module.state_dict())


def check_mnist(cli, run: Path, probe: Probe) -> None:
    trainer, metrics = cli.trainer, read_metrics(run)
    # debug/limit_batches: 2 epochs of 10 training batches, 5 validation and 5 test batches (of 34, 7 and 13)
    assert trainer.global_step == 20 and trainer.num_val_batches == [5] and trainer.num_test_batches == [5]
    # trainer/clip: every step's gradient norm at most 1.0 after clipping, and clipping had work to do
    assert all(after <= 1.0 + 1e-4 for _, after in probe.norms) and max(b for b, _ in probe.norms) > 1.0
    # logger/csv: per-step training and per-epoch validation rows; throughput.yaml and device_stats.yaml: theirs
    assert len(metrics["train/loss_step"]) == 20 and len(metrics["val/acc"]) == 2 and len(metrics["test/acc"]) == 1
    assert metrics["train/samples"][-1] == 20 * 16
    assert len(metrics["DeviceStatsMonitor.on_train_batch_start/cpu_percent"]) == 20
    # predict/jsonl: predictions.jsonl beside predictions.csv, 5 classes per input
    trainer.predict(cli.model, datamodule=cli.datamodule)
    lines = [yaml.safe_load(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and all(len(x["top_k"]) == 5 for x in lines) and (run / "predictions.csv").is_file()


def check_early_stopping(cli, run: Path, probe: Probe) -> None:
    (stopper,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"]
    assert stopper.stopped_epoch == 3 and cli.trainer.global_step == 4  # epoch 0's val/loss, then 3 without gain


def check_prune(cli, run: Path, probe: Probe) -> None:
    # compress/prune: 30% of the remaining weights pruned after each of the 2 epochs, the zeros in the checkpoint
    weights = [v for k, v in torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"].items()]
    zeros = sum(int((w == 0).sum()) for w in weights if w.ndim > 1) / sum(w.numel() for w in weights if w.ndim > 1)
    assert zeros == pytest.approx(1 - 0.7**2, abs=0.01)
    # trainer/profile: SimpleProfiler's report; logger/wandb: one offline W&B run, with the training steps
    assert "run_training_epoch" in (run / "fit-profile.txt").read_text()
    history = read_wandb_run(run)["history"]
    assert [row["trainer/global_step"] for row in history if "train/loss_step" in row] == [0, 1, 2, 3]


def check_distill(cli, run: Path, probe: Probe) -> None:
    # compress/distill: the student learns from the teacher's checkpoint, frozen, kept out of the student's files
    teacher = torch.load(cli.model.teacher_ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, teacher[k]) for k, v in cli.model.teacher.state_dict().items() if k in teacher)
    assert probe.fit_metrics["train/soft_loss"] > 0
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in saved if k.startswith("teacher")] and cli.model.net.features[0][0].out_channels == 4


def check_cifar10(cli, run: Path, probe: Probe) -> None:
    # debug/overfit_batches: the same 4 training batches (unshuffled) in each of the 10 epochs, validated at the last
    epochs = [[labels for epoch, _, labels in probe.batches if epoch == e] for e in range(10)]
    assert len(epochs[0]) == 4 and all(batches == epochs[0] for batches in epochs)
    assert cli.trainer.num_val_batches == [4] and "val/acc" in probe.fit_metrics
    # model/resnet_cifar: a ResNet, label smoothing, one-cycle over the run's 40 steps
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert type(cli.model.net).__name__ == "ResNet" and cli.model.criterion.label_smoothing == 0.1
    assert scheduler.total_steps == cli.trainer.global_step == 40
    # trainer/profile_advanced: cProfile's report per hook; logger/tensorboard: event files (fit, then test)
    report = (run / "fit-profile.txt").read_text()
    assert "Profile stats for: [Strategy]SingleDeviceStrategy.training_step" in report and "function calls" in report
    assert len(list(run.glob("events.out.tfevents.*"))) == 2


def check_cifar100(cli, run: Path, probe: Probe) -> None:
    # trainer/profile_pytorch: torch.profiler's operator table; logger/none: no logger, nothing else in the folder
    assert "Self CPU" in (run / "fit-profile.txt").read_text() and not cli.trainer.loggers
    assert {p.name for p in run.iterdir() if "-profile" not in p.name} == {"config.yaml", "checkpoints"}
    assert "test/top5" in cli.trainer.callback_metrics  # cifar100: more than 10 classes


def check_finetune(cli, run: Path, probe: Probe) -> None:
    # finetune/resnet18: the backbone's conv weights frozen in epoch 0 (its batch norms train), the head trained
    before, after = probe.before, cli.model.state_dict()
    convs = [k for k in after if ".backbone.features." in k and after[k].ndim == 4]
    head = [k for k in after if k.startswith("net.head.")]
    assert convs and all(torch.equal(before[k], after[k]) for k in convs)
    assert head and not any(torch.equal(before[k], after[k]) for k in head)
    assert cli.model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's, in the model


def check_fast(cli, run: Path, probe: Probe) -> None:
    # experiment/fashion_mnist_fast: the in-memory loader, one-cycle per step over the run's 3 steps
    assert isinstance(cli.datamodule.train_dataloader(), TensorLoader)
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_steps == cli.trainer.global_step == 3


def check_cifar_fast(cli, run: Path, probe: Probe) -> None:
    # experiment/cifar10_fast: EMA of the weights, updated every 5 steps (after steps 1 and 6 of 6); the model ends
    # with the average, not with the last step's weights
    (ema,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging"]
    average, final = ema._average_model, cli.model.state_dict()  # Lightning's only handle of the average
    assert int(average.n_averaged) == 2 and cli.model.criterion.label_smoothing == 0.2
    assert all(torch.equal(v, final[k]) for k, v in average.module.state_dict().items())
    assert not torch.equal(final["net.head.2.weight"], probe.last["net.head.2.weight"])


CHECKS = {name: globals()[f"check_{name}"] for name in STACKS}


def test_every_shipped_config_is_covered():
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent.name != "sweep"}
    used = {c for stack in STACKS.values() for c in stack} | set(PRINT_ONLY) | {"model/resnet_cifar.yaml"}
    assert shipped == used  # model/resnet_cifar.yaml: inside the CIFAR configs; sweeps: tests/test_sweep.py


@pytest.fixture(scope="module")
def teacher(mnist_root, tmp_path_factory) -> Path:
    """A Fashion-MNIST checkpoint of the main job's net, for the distillation config."""
    cli = fit("fashion_mnist.yaml", mnist_root, WIDTH_4, "--trainer.fast_dev_run=1", run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def without_files(printed: str) -> dict:
    config = yaml.safe_load(printed)
    config.pop("config", None)  # the YAML files given, not values
    return config


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.extras] if n in EXTRAS else []) for n in STACKS])
def test_config_prints_round_trips_and_runs(name, request, tmp_path):
    data = request.getfixturevalue(DATA[next(k for k in DATA if STACKS[name][0].split("/")[-1].startswith(k))])
    data = data[0] if isinstance(data, tuple) else data
    configs = [f"--config={CONFIGS / c}" for c in STACKS[name]]
    args = [*configs, *QUIET, f"--data.init_args.data_dir={data}", "--data.init_args.num_workers=0", *SMALL[name]]
    if name == "distill":
        args.append(f"--model.init_args.teacher_ckpt={request.getfixturevalue('teacher')}")
    printed = cli_main(args, run=False)
    (tmp_path / "printed.yaml").write_text(printed.parser.dump(printed.config, skip_unset=False))
    text = (tmp_path / "printed.yaml").read_text()
    assert "Unable to serialize" not in text
    cli = cli_main(["--config=printed.yaml"], run=False)  # valid input again: the same config, and it trains
    assert without_files(cli.parser.dump(cli.config, skip_unset=False)) == without_files(text)
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    for config in STACKS[name]:
        for entry in yaml.safe_load((CONFIGS / config).read_text()).get("trainer", {}).get("callbacks+", []):
            assert kinds.count(entry["class_path"].rsplit(".", 1)[-1]) == 1, (config, entry["class_path"], kinds)
    probe = Probe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.close()
    run = Path(cli.trainer.log_dir)
    assert run.parent.parent == Path("runs") and run.name == "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "test/loss" in cli.trainer.callback_metrics
    CHECKS[name](cli, run, probe)


@pytest.mark.parametrize("config", list(PRINT_ONLY))
def test_print_only_configs_round_trip(config, capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--config={CONFIGS / config}", "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config=printed.yaml", "--print_config"])
    assert without_files(capsys.readouterr().out) == without_files(printed) and "DDPStrategy" in printed
