"""Every shipped config, alone or stacked on its data set's config as the README says to use it: its printed config
(what `--print_config` shows and a run's `config.yaml` holds) parses back to the same config, and a fast_dev_run of
it trains and tests on format-exact data with the config's effect in place. Configs that add callbacks are stacked
after another callback config: all their callbacks must be there."""

from pathlib import Path

import pytest
import yaml

from project.cli import cli_main
from tests.conftest import CONFIGS, QUIET

STACKS = {  # every YAML under configs/ is in at least one stack (checked below)
    "mnist": [
        "mnist.yaml",
        "trainer/clip.yaml",
        "trainer/early_stopping.yaml",
        "trainer/throughput.yaml",
        "trainer/device_stats.yaml",
        "logger/csv.yaml",
        "debug/limit_batches.yaml",
        "predict/jsonl.yaml",
    ],
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
DATA = {"mnist": "mnist_root", "fashion": "mnist_root", "cifar": "cifar_root", "folder": "image_root"}
SMALL = {
    "mnist": ["--model.init_args.net.init_args.hidden=[16]"],
    "prune": ["--model.init_args.net.init_args.width=4"],
    "distill": ["--model.init_args.net.init_args.width=4"],
    "cifar10": ["--model.init_args.net.init_args.width=8", "--data.init_args.val_split=0.2"],
    "cifar100": ["--model.init_args.net.init_args.width=8", "--data.init_args.val_split=0.2"],
    "cifar_fast": ["--model.init_args.net.init_args.width=8", "--data.init_args.val_split=0.2"],
    "finetune": ["--data.init_args.image_size=32", "--model.init_args.net.init_args.arch=mobilenet_v3_small"],
    "fast": ["--data.init_args.val_split=0.1"],
}


def test_every_shipped_config_is_covered():
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent.name != "sweep"}
    used = {c for stack in STACKS.values() for c in stack} | set(PRINT_ONLY) | {"model/resnet_cifar.yaml"}
    assert shipped == used  # model/resnet_cifar.yaml: inside the CIFAR configs; sweeps: tests/test_sweep.py


@pytest.fixture(scope="module")
def teacher(mnist_root, tmp_path_factory) -> Path:
    """A Fashion-MNIST checkpoint of the main job's net, for the distillation config."""
    cli = cli_main(
        [
            f"--config={CONFIGS / 'fashion_mnist.yaml'}",
            *QUIET,
            f"--data.init_args.data_dir={mnist_root}",
            "--model.init_args.net.init_args.width=4",
            "--trainer.fast_dev_run=1",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def without_files(printed: str) -> dict:
    config = yaml.safe_load(printed)
    config.pop("config", None)  # the YAML files given, not values
    return config


@pytest.mark.parametrize("name", list(STACKS))
def test_config_prints_round_trips_and_runs(name, request, tmp_path):
    data = request.getfixturevalue(DATA[next(k for k in DATA if STACKS[name][0].split("/")[-1].startswith(k))])
    data = data[0] if isinstance(data, tuple) else data
    args = [
        *(f"--config={CONFIGS / c}" for c in STACKS[name]),
        *QUIET,
        f"--data.init_args.data_dir={data}",
        "--data.init_args.num_workers=0",
        *SMALL.get(name, []),
        "--trainer.fast_dev_run=2",
    ]
    if name == "distill":
        args.append(f"--model.init_args.teacher_ckpt={request.getfixturevalue('teacher')}")
    printed = cli_main(args, run=False)
    (tmp_path / "printed.yaml").write_text(printed.parser.dump(printed.config, skip_none=False))
    assert "Unable to serialize" not in (tmp_path / "printed.yaml").read_text()
    cli = cli_main(["--config=printed.yaml"], run=False)  # valid input again: the same config, and it trains
    assert without_files(cli.parser.dump(cli.config, skip_none=False)) == without_files(
        (tmp_path / "printed.yaml").read_text()
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step > 0 and "test/loss" in cli.trainer.callback_metrics
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    for config in STACKS[name]:
        for entry in yaml.safe_load((CONFIGS / config).read_text()).get("trainer", {}).get("callbacks+", []):
            assert kinds.count(entry["class_path"].rsplit(".", 1)[-1]) == 1, (config, entry["class_path"], kinds)


@pytest.mark.parametrize("config", list(PRINT_ONLY))
def test_print_only_configs_round_trip(config, capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--config={CONFIGS / config}", "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config=printed.yaml", "--print_config"])
    assert without_files(capsys.readouterr().out) == without_files(printed) and "DDPStrategy" in printed
