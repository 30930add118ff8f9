"""W&B runs read back from the files wandb writes offline: config, summary, history, media, artifacts, sweeps."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
import yaml
from wandb.proto import wandb_internal_pb2

from project.cli import cli_main
from project.loggers import has_credentials, resolve_mode
from tests.conftest import CONFIGS, ROOT

FAKE_KEY = "local-" + "f4ke" * 10  # planted: must appear in no file written
SMALL = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--model.init_args.net.init_args.width=4",
    "--data.init_args.batch_size=50",
]


@pytest.fixture(autouse=True)
def _wandb_dirs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb's own folders (artifact staging, cache, settings) in the test's folder, not in $HOME."""
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)


@pytest.fixture(autouse=True, scope="module")
def _stop_wandb_service():
    yield
    wandb.teardown()  # the wandb-core service process started by the in-process runs


def records(path: Path):
    """The protobuf records of a ``.wandb`` transaction log (a LevelDB-style log of 32 KiB blocks)."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _apply(target: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_run(run_dir: Path) -> dict[str, Any]:
    """Config, summary, history rows, artifacts and the folder of the single offline W&B run in ``run_dir``."""
    found: list[Path] = []
    for _ in range(100):  # wandb-core writes the run's files from its own process: allow it a moment
        found = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        if found:
            break
        time.sleep(0.2)
    assert len(found) == 1, f"expected one W&B run in {run_dir}, found {found}"
    run: dict[str, Any] = {"dir": found[0].parent, "config": {}, "summary": {}, "history": [], "artifacts": []}
    for record in records(found[0]):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                _apply(run["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _apply(run["summary"], item)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _apply(row, item)
            run["history"].append(row)
        elif kind == "artifact":
            artifact = record.artifact
            run["artifacts"].append({"type": artifact.type, "name": artifact.name, "aliases": set(artifact.aliases),
                                     "metadata": json.loads(artifact.metadata or "{}"),
                                     "files": {c.path for c in artifact.manifest.contents}})  # fmt: skip
        elif kind == "run":
            run["name"] = record.run.display_name
    return run


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", f"--config={CONFIGS / 'fashion_mnist.yaml'}", f"--data.init_args.data_dir={root}", *SMALL, *extra]


def files_containing(folder: Path, text: str) -> list[Path]:
    needle = text.encode()
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_fit_then_test_offline_run_read_back(mnist_root, tmp_path):
    """2 epochs + `test` from the checkpoint, logged offline; everything the issue asks for is read back from disk."""
    cli = cli_main(fit_args(mnist_root, "--trainer.max_epochs=2", "--test_after_fit=false", "--wandb_watch.log=all",
                            "--wandb_watch.log_freq=2", "--wandb_media.num_samples=8",
                            "--trainer.logger.init_args.log_model=true", "--trainer.logger.init_args.group=g1",
                            "--trainer.logger.init_args.tags=[smoke,cpu]"))  # fmt: skip
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir == Path("runs/fashion_mnist/version_0")
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.parent == run_dir / "checkpoints"
    run = read_run(run_dir)
    assert run["name"] == "fashion_mnist"

    # the full resolved config, nested, plus git state
    config = run["config"]
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.003
    assert config["model"]["init_args"]["net"]["init_args"]["width"] == 4
    assert config["data"]["class_path"] == "project.data.FashionMNISTDataModule"
    assert config["data"]["init_args"]["batch_size"] == 50
    assert config["trainer"]["max_epochs"] == 2 and config["seed_everything"] == 42
    assert config["trainer"]["logger"]["init_args"]["tags"] == ["smoke", "cpu"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert config["git"]["commit"] == head and isinstance(config["git"]["dirty"], bool)
    assert "net" not in config, "module hparams are inside the full config, not repeated at the top level"

    # metrics: the summary holds what the module computed; lr, gradients and parameters are in the history
    summary = run["summary"]
    assert summary["val/acc"] == pytest.approx(float(cli.trainer.callback_metrics["val/acc"]))
    assert summary["val/acc_best"] == pytest.approx(float(cli.trainer.checkpoint_callback.best_model_score))
    assert summary["epoch"] == 1
    keys = {k for row in run["history"] for k in row}
    assert {"train/loss", "train/acc", "val/loss", "val/f1", "lr-AdamW/pg1"} <= keys
    assert any(k.startswith("gradients/net.") for k in keys) and any(k.startswith("parameters/net.") for k in keys)
    tables = run["dir"] / "files" / "media" / "table" / "val"
    assert len(list(tables.glob("predictions_*.table.json"))) == 2, "media at the end of each validation"

    # media: confusion matrix with class names, predictions table with misclassified rows first
    class_names = cli.datamodule.class_names
    n_val = sum(len(batch[1]) for batch in cli.datamodule.val_dataloader())
    matrix = json.loads((run["dir"] / "files" / summary["val/confusion_matrix_table"]["path"]).read_text())
    assert {row[0] for row in matrix["data"]} <= set(class_names) and sum(r[2] for r in matrix["data"]) == n_val
    table = json.loads((run["dir"] / "files" / summary["val/predictions"]["path"]).read_text())
    assert table["columns"] == ["image", "true", "predicted", "confidence", "correct"] and len(table["data"]) == 8
    correct = [row[4] for row in table["data"]]
    assert correct == sorted(correct), "misclassified first"
    assert all((row[1] == row[2]) == row[4] and row[1] in class_names for row in table["data"])

    # artifacts: best and last checkpoints, each with the resolved config
    models = [a for a in run["artifacts"] if a["type"] == "model"]
    by_alias = {alias: a for a in models for alias in a["aliases"]}
    assert {"best", "last"} <= set(by_alias)
    assert by_alias["best"]["metadata"]["original_filename"] == best.name
    assert by_alias["last"]["metadata"]["original_filename"] == "last.ckpt"
    assert all(a["files"] == {"model.ckpt", "config.yaml"} for a in models)

    # `test` from the best checkpoint: a new run in its own folder with test metrics and test media
    tested = cli_main(["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    test_dir = Path(tested.trainer.log_dir)
    assert test_dir == Path("runs/fashion_mnist/version_1")
    test_run = read_run(test_dir)
    assert test_run["summary"]["test/acc"] == pytest.approx(float(tested.trainer.callback_metrics["test/acc"]))
    assert "test/confusion_matrix_table" in test_run["summary"] and "test/predictions" in test_run["summary"]
    assert test_run["config"]["model"]["init_args"]["net"]["init_args"]["width"] == 4

    # the planted API key is in no file written: configs, logs, W&B run files, checkpoints, staged artifacts
    assert files_containing(tmp_path, FAKE_KEY) == []
    assert wandb.run is None, "each command finishes its W&B run"


def test_every_watched_run_in_a_process_logs_gradients_under_the_same_names(mnist_root):
    """wandb numbers watched models per process: without idx=0 the second run logged "gradients/graph_1net..."."""
    args = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--test_after_fit=false", "--wandb_watch.log=gradients", "--wandb_watch.log_freq=1"]  # fmt: skip
    for version in range(2):
        cli = cli_main(fit_args(mnist_root, *args))
        keys = {k for row in read_run(Path(cli.trainer.log_dir))["history"] for k in row}
        gradients = {k for k in keys if k.startswith("gradients/")}
        assert "gradients/net.head.1.weight" in gradients, (version, sorted(gradients))
        assert all(k.startswith("gradients/net.") for k in gradients), (version, sorted(gradients))


def test_no_credentials_no_tty_goes_offline_and_says_how_to_sync(mnist_root, tmp_path):
    """`python -m project fit` with no key, no netrc, no WANDB_MODE and stdin closed: no prompt, no hang."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    args = fit_args(mnist_root, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                    "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "project", *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = read_run(tmp_path / "runs" / "fashion_mnist" / "version_0")
    offline_dir = run["dir"].resolve()  # absolute, so the sync line works from any folder
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "W&B run saved offline in" in line]
    assert len(lines) == 1 and lines[0].endswith(f"upload it with: wandb sync {offline_dir}"), lines
    assert "test/acc" in run["summary"], "test_after_fit logs into the same run"


def test_mode_follows_env_then_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    assert not has_credentials() and resolve_mode()[0] == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert has_credentials() and resolve_mode()[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode()[0] == "offline"
    assert resolve_mode("disabled")[0] == "disabled", "the logger's own mode argument wins"


def test_disabled_mode_trains_and_writes_no_wandb_files(mnist_root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_main(fit_args(mnist_root, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                            "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"))  # fmt: skip
    run_dir = Path(cli.trainer.log_dir)
    assert cli.trainer.state.finished and 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list(run_dir.glob("wandb/*run-*"))


def sweep_files() -> list[Path]:
    return sorted((CONFIGS / "sweep").glob("*.yaml"))


def sweep_args(sweep: dict[str, Any], pick: int) -> list[str]:
    """What ``wandb agent`` puts in for ``${args}``: ``--key=value``, here with the lowest or highest value."""
    args = []
    for key, spec in sweep["parameters"].items():
        value = spec["values"][-pick] if "values" in spec else spec["max" if pick else "min"]
        args.append(f"--{key}={value}")
    return args


def sweep_command(sweep: dict[str, Any]) -> list[str]:
    """The CLI arguments of the sweep's command (after ``-m project``), without the agent's placeholders."""
    command = [c for c in sweep["command"] if not c.startswith("${")]
    assert command[:2] == ["-m", "project"] and sweep["command"][1] == "${interpreter}", command
    return command[2:]


@pytest.mark.parametrize("path", sweep_files(), ids=lambda p: p.stem)
def test_sweep_parameters_are_cli_keys(path, capsys):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "bayes" and sweep["metric"] == {"name": "val/acc", "goal": "maximize"}
    assert "early_terminate" in sweep and "${args}" in sweep["command"]
    command = [c.replace("configs/", f"{CONFIGS}/") for c in sweep_command(sweep)]
    assert command[0] == "fit"
    for pick in (0, 1):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*command, *sweep_args(sweep, pick), "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        for key, spec in sweep["parameters"].items():
            value = printed
            for part in key.split("."):
                value = value[part]
            expected = spec["values"][-pick] if "values" in spec else spec["max" if pick else "min"]
            assert value == pytest.approx(expected), key


def test_sweep_style_invocation_runs(mnist_root):
    sweep = yaml.safe_load((CONFIGS / "sweep" / "fashion_mnist.yaml").read_text())
    command = [c.replace("configs/", f"{CONFIGS}/") for c in sweep_command(sweep)]
    cli = cli_main([*command, f"--data.init_args.data_dir={mnist_root}", *SMALL[:4], *sweep_args(sweep, 1),
                    "--trainer.fast_dev_run=2"])  # fmt: skip
    assert cli.trainer.state.finished
    assert cli.model.criterion.label_smoothing == sweep["parameters"]["model.init_args.label_smoothing"]["values"][-1]
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])
