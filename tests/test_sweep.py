"""Hyperparameter search (``python -m extras.sweep``, Optuna on the W&B sweep YAML) and Lightning's tuner callbacks
through the CLI.

The sweep's own process runs in the test process where it can (its trials are always ``python -m project fit``
processes); the kill -9 test and the SLURM array run it as a process of its own. Trials train the MLP of
``configs/mnist.yaml`` at 16 hidden units for 2 epochs on format-exact MNIST (540 training, 60 validation
images); studies, trial outcomes and metrics are read back from the study's journal file and the run folders.
A trial process costs about 11 s of CPU (9.5 of it imports). Measured on this 2-core machine with ``-n 0`` (load
average 0-4.6 from other suites): 3-5 min, 3.2-3.4 min of CPU with every process it started, for the file; CPU of
the four ``processes`` tests at load 3-4.5: grid 49 s, Hyperband 36, kill -9 44, SLURM array 56 (26-60 s wall each).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from PIL import Image

from extras.sweep import space
from extras.sweep.report import open_storage, pruner
from extras.sweep.search import Search, check, main, open_study
from notebooks.wandb_runs import read_wandb_run, records
from project.cli import cli_main
from tests import slurm
from tests.conftest import CONFIGS, CSV, QUIET, ROOT, error_line, read_metrics

MLP = [*QUIET, "--model.init_args.net.init_args.hidden=[16]", "--trainer.max_epochs=2"]
COMMAND = ["${env}", "${interpreter}", "-m", "project", "fit", "--config", "configs/mnist.yaml", "${args}"]
LR = "model.init_args.optimizer.init_args.lr"
CIFAR = ["--model.init_args.net.init_args.width=8", "--data.init_args.val_split=0.2", "--data.init_args.num_workers=0"]


class SlowFirstEpoch(Callback):
    """Test only: a pause after the first epoch (after its validation was reported), so a kill lands mid-trial."""

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            time.sleep(self.seconds)


@pytest.fixture
def here(tmp_path, mnist_root, monkeypatch):
    """The test's folder as a user's checkout: ``configs/`` there, the trials importing this repository."""
    (tmp_path / "configs").symlink_to(CONFIGS)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def write_sweep(folder: Path, name: str, parameters: dict, **keys) -> Path:
    spec = {"method": "grid", "metric": {"name": "val/acc", "goal": "maximize"}, "parameters": parameters}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**spec, "command": COMMAND, **keys}, sort_keys=False))
    return path


def sweep(*args: str) -> int:
    """``python -m extras.sweep ...`` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def study(name: str, root: Path = Path("runs")) -> optuna.Study:
    journal = root / "sweep" / name / "study.journal"
    return optuna.load_study(study_name=name, storage=open_storage(str(journal)))


def trials_of(loaded: optuna.Study, state: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in loaded.get_trials() if t.state.name == state]


# ---- the sweep YAML -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_load_and_their_extreme_trials_train(path, here, mnist_root, cifar_root):
    """Each shipped YAML reads for Optuna as W&B reads it; every key is in the fit's config and every value the
    search can give passes the CLI; a trial at the top of every range trains (1 epoch, a few batches)."""
    sweep = space.load(path)
    assert (sweep.metric, sweep.goal, sweep.method, sweep.notes) == ("val/acc", "maximize", "bayes", [])
    assert sweep.hyperband and sweep.head[:1] == ["--config"] and sweep.tail == []
    data = cifar_root[0] if "cifar" in path.stem else mnist_root
    small = CIFAR if data != mnist_root else ["--data.init_args.val_split=0.1"]  # the fast recipe holds 2000 out
    config = check(sweep, sweep.head, [])
    assert config["trainer"]["max_epochs"] >= 4
    top = {p.key: p.picks()[-1] for p in sweep.parameters}
    limits = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2"]
    args = [f"--{key}={space.cli_value(value)}" for key, value in top.items()]
    cli = cli_main(["fit", *sweep.head, f"--data.init_args.data_dir={data}", *QUIET, *small, *args, *limits, CSV])
    assert cli.datamodule.batch_size == top["data.init_args.batch_size"]
    (group,) = {g["max_lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert group == pytest.approx(top["model.init_args.scheduler.init_args.max_lr"])
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])  # tested after fit, as the YAML's config says


@pytest.mark.parametrize(
    "change, said",
    [
        ({"parameters": {LR.replace("lr", "lrr"): {"values": [0.1, 0.2]}}}, f"parameter {LR}r is not a key"),
        ({"parameters": {"data.init_args.batch_size": {"values": [16, "all"]}}}, "batch_size=all is refused"),
        ({"parameters": {LR: {"distribution": "normal", "mu": 0.01, "sigma": 0.001}}}, "'mu' cannot be followed"),
        ({"paramters": {}}, "unknown key 'paramters' (did you mean parameters?)"),
        ({"method": "hyperopt"}, "method must be grid, random or bayes"),
    ],
    ids=["key", "value", "distribution", "typo", "method"],
)
def test_a_bad_sweep_is_one_line_and_nothing_runs(change, said, here, mnist_root, capsys):
    path = write_sweep(here, "bad", {LR: {"values": [0.01, 0.02]}}, controller={"type": "local"})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **change}))
    assert sweep(path, "--trials=2", f"--data.init_args.data_dir={mnist_root}", *MLP) == 2
    line = error_line(capsys.readouterr().err)
    assert said in line and line.startswith(f"error: {path}"), line
    assert not (here / "runs").exists()


def test_a_key_only_wandb_follows_is_one_note_line(here, capsys):
    path = write_sweep(here, "noted", {LR: {"values": [0.01, 0.02], "probabilities": [0.9, 0.1]}})
    path.write_text(path.read_text() + "controller:\n  type: local\n")
    notes = space.load(path).notes
    assert notes == [
        f"{path}: 'controller' is used by W&B only; ignored here",
        f"{path}: parameter {LR}: 'probabilities' is used by W&B only; Optuna tries each value equally often",
    ]


def test_sweep_processes_sharing_a_journal_count_and_start_trials_one_at_a_time(here, monkeypatch):
    """Counting the trials and starting one is a single step across sweep processes: while one holds it another
    waits, so together they never start a trial too many nor a grid point twice. (Trials are asked, not run.)"""
    sweep = space.load(write_sweep(here, "shared", {LR: {"values": [0.1, 0.2]}}))
    spec, summary = str(here / "shared.journal"), {"metric": "val/acc", "pruner": None, "search": "", "fit": []}
    first, second = (Search(sweep, *open_study(sweep, "shared", spec, summary, None), spec, here, 2) for _ in range(2))
    asked = []
    monkeypatch.setattr(Search, "start", lambda self: asked.append(self.study.ask(self.distributions).params[LR]))
    with first.counting_alone():
        waiting = threading.Thread(target=second.run)
        waiting.start()
        waiting.join(1.0)
        assert asked == [] and waiting.is_alive(), "the second process counted while the first was starting a trial"
    waiting.join()
    first.run()
    assert sorted(asked) == [0.1, 0.2]


def test_hyperband_checks_trials_as_wandb_does(here):
    """W&B's early termination checks a run after min_iter x eta^k iterations: Optuna's Hyperband with one bracket
    with those rungs; a trial not in the top 1/eta there stops (the first ones: unless the best so far)."""
    path = write_sweep(here, "hb", {LR: {"values": [0.01, 0.02]}}, early_terminate={"type": "hyperband", "min_iter": 2})
    settings = space.load(path).pruner_settings(validations=8)
    assert settings == {"min_resource": 2, "max_resource": 2, "reduction_factor": 3}
    assert space.load(path).pruner_settings(validations=2) is None, "trials that end at the first check"
    loaded = optuna.create_study(direction="maximize", pruner=pruner(settings))
    curves = [[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92], [0.4, 0.7, 0.7, 0.7, 0.7, 0.8, 0.8], [0.3, 0.5, 0.9]]
    stopped = []
    for curve in curves:  # checked after validations 2 and 6
        trial = loaded.ask()
        for step, value in enumerate(curve, 1):
            trial.report(value, step)
            if trial.should_prune():
                loaded.tell(trial, state=optuna.trial.TrialState.PRUNED)
                stopped.append(step)
                break
        else:
            loaded.tell(trial, curve[-1])
            stopped.append(None)
    assert stopped == [None, 6, 2]


# ---- searches -------------------------------------------------------------------------------------------------


@pytest.mark.processes  # 3 trial processes
def test_grid_with_two_workers_runs_every_point_once_and_best_yaml_reruns(here, mnist_root, capsys):
    """lr 1e6 diverges: that trial fails with the fit's error line and the search goes on."""
    lrs = [0.001, 0.03, 1e6]  # two complete: the importances plot needs two
    path = write_sweep(here, "grid", {LR: {"values": lrs}, "data.init_args.batch_size": {"value": 32}})
    assert sweep(path, "--workers", "2", f"--data.init_args.data_dir={mnist_root}", *MLP, CSV) == 0
    out = capsys.readouterr().out
    loaded = study("grid")
    done, (failed,) = trials_of(loaded, "COMPLETE"), trials_of(loaded, "FAIL")
    assert sorted(t.number for t in loaded.trials) == [0, 1, 2]
    assert sorted(t.params[LR] for t in loaded.trials) == lrs and failed.params[LR] == 1e6, "every grid point once"
    assert failed.user_attrs["error"].startswith("training loss is nan and the gradients are not finite at step")
    first, second = sorted(loaded.trials, key=lambda t: t.datetime_start)[:2]
    assert second.datetime_start < first.datetime_complete, "two trials at once"
    for t in done:  # the value each trial reported is what its run folder logged
        run = Path(t.user_attrs["run_dir"])
        assert run.parent.parent == Path("runs/sweep/grid") / f"trial_{t.number}"
        assert read_metrics(run)["val/acc"] == pytest.approx(list(t.intermediate_values.values()))
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["batch_size"] == 32
    with open("runs/sweep/grid/trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["trial", "state", "val/acc", "epochs", "seconds"] and len(rows) == 3
    assert {(int(r["trial"]), r["state"], r["val/acc"], r["epochs"], r["error"]) for r in rows} == {
        *((t.number, "complete", str(t.value), "2", "") for t in done),
        (failed.number, "failed", "", "0", failed.user_attrs["error"]),
    }
    for plot in ("history", "importances", "intermediate"):
        assert Image.open(f"runs/sweep/grid/{plot}.png").size == (800, 500)
    assert "┃ trial ┃ state" in out and f"best: trial {loaded.best_trial.number}" in out
    best = yaml.safe_load(Path("runs/sweep/grid/best.yaml").read_text())
    assert best["test_after_fit"] is True and best["trainer"]["callbacks"] is None  # the sweep's reporter gone
    rerun = cli_main(["fit", "-c", "runs/sweep/grid/best.yaml"])
    assert Path(rerun.trainer.log_dir) == Path("runs/mnist/version_0")  # not into the sweep's folder
    logged = read_metrics(rerun.trainer.log_dir)
    assert logged["val/acc"] == list(loaded.best_trial.intermediate_values.values()), "the best trial, trained again"
    assert "test/acc" in logged


@pytest.mark.processes  # 2 trial processes
def test_bayes_with_hyperband_prunes_the_bad_region(here, mnist_root):
    """lr from 1e-6 (learns nothing in 2 epochs) to 0.1, seed 10: 0.0072, then 1.3e-6; Hyperband with one bracket:
    after the first validation only the best so far goes on. W&B (the default logger) groups the trials by study."""
    path = write_sweep(
        here,
        "bayes",
        {LR: {"distribution": "log_uniform_values", "min": 1e-6, "max": 0.1}},
        method="bayes",
        early_terminate={"type": "hyperband", "min_iter": 1},
    )
    assert sweep(path, "--trials=2", "--seed=10", f"--data.init_args.data_dir={mnist_root}", *MLP) == 0
    loaded = study("bayes")
    good, bad = loaded.trials
    assert bad.params[LR] < 1e-5 < good.params[LR], "the seed's draws"
    assert [(t.state.name, len(t.intermediate_values)) for t in (good, bad)] == [("COMPLETE", 2), ("PRUNED", 1)]
    run = read_wandb_run(Path(good.user_attrs["run_dir"]))
    assert run["summary"]["val/acc"] == pytest.approx(good.value, abs=1e-7), "the metric its own run folder logged"
    logged = read_wandb_run(Path(bad.user_attrs["run_dir"]))
    assert [row["val/acc"] for row in logged["history"] if "val/acc" in row] == pytest.approx([bad.value])
    files = Path("runs/sweep/bayes").rglob("*.wandb")
    assert {r.run.run_group for f in files for r in records(f) if r.HasField("run")} == {"bayes"}


@pytest.mark.processes  # the sweep as a process, killed mid-trial, then its trial again
def test_kill_9_mid_trial_then_the_same_command_continues(here, mnist_root):
    path = write_sweep(here, "resume", {LR: {"distribution": "log_uniform_values", "min": 0.001, "max": 0.03}})
    path.write_text(path.read_text().replace("method: grid", "method: random"))
    args = [path, "--trials=1", f"--data.init_args.data_dir={mnist_root}", *MLP, CSV]
    args += ["--trainer.callbacks+=tests.test_sweep.SlowFirstEpoch"]
    marker = f"SWEEP_TEST={here}"  # in the environment of the sweep and its trials
    env = {**os.environ, "SWEEP_TEST": str(here)}
    with open(here / "killed.log", "w") as log:
        killed = subprocess.Popen(
            [sys.executable, "-m", "extras.sweep", *map(str, args)], env=env, stdout=log, stderr=log
        )
    journal = here / "runs/sweep/resume/study.journal"
    try:
        deadline = time.monotonic() + 300
        while not (journal.exists() and (trials := study("resume").trials) and trials[0].intermediate_values):
            assert killed.poll() is None and time.monotonic() < deadline, (here / "killed.log").read_text()
            time.sleep(0.5)
        killed.send_signal(signal.SIGKILL)  # inside the trial's pause after its first epoch
        killed.wait()
        deadline = time.monotonic() + 10
        while slurm.processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert slurm.processes_with(marker) == [], "the trial dies with its sweep"
    finally:
        killed.kill()
        slurm.kill(slurm.processes_with(marker))
    assert study("resume").trials[0].state.name == "RUNNING"
    assert sweep(*args) == 0
    loaded = study("resume")
    assert [t.number for t in loaded.trials] == [0, 1]
    interrupted, again = loaded.trials
    assert interrupted.state.name == "FAIL" and "sweep:interrupted" in interrupted.system_attrs
    assert again.state.name == "COMPLETE" and again.user_attrs["retry_of"] == 0 and again.params == interrupted.params


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if why := slurm.missing():
        pytest.skip(why)
    cluster = slurm.Cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.mark.processes  # a SLURM cluster, 2 sweep processes, 2 trials
def test_slurm_array_tasks_share_one_study(here, mnist_root, slurm_cluster):
    path = write_sweep(here, "array", {LR: {"values": [0.001, 0.03]}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "WANDB"))}
    env |= {"SLURM_CONF": str(slurm_cluster.conf), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    argv = ["sbatch", "--wait", "--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    argv += [str(ROOT / "scripts/slurm/sweep.sbatch"), str(path), f"--data.init_args.data_dir={mnist_root}", *MLP, CSV]
    done = subprocess.run(argv, cwd=here, env=env, capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text() for p in here.glob("slurm-*.out")}
    assert done.returncode == 0 and len(logs) == 2, done.stderr + "\n".join(logs.values())
    assert all("study array in runs/sweep/array/study.journal: 2 trials" in log for log in logs.values()), logs
    loaded = study("array", here / "runs")
    assert sorted(t.number for t in trials_of(loaded, "COMPLETE")) == [0, 1] and len(loaded.trials) == 2
    assert sum(log.count(" started") for log in logs.values()) == 2, logs


# ---- Lightning's tuners ---------------------------------------------------------------------------------------


def tuners(init_batch_size: int) -> list[str]:
    """BatchSizeFinder from ``init_batch_size``: twice that (one doubling); then LearningRateFinder over 15 steps,
    never stopping early (its suggestion needs 13 points)."""
    return [
        "--trainer.callbacks+=BatchSizeFinder",
        f"--trainer.callbacks.init_val={init_batch_size}",
        "--trainer.callbacks.max_trials=2",
        "--trainer.callbacks.steps_per_trial=1",
        "--trainer.callbacks+=LearningRateFinder",
        "--trainer.callbacks.num_training_steps=15",
        "--trainer.callbacks.early_stop_threshold=null",
    ]


SHIPPED = {  # config: data, the finder's first batch size (an epoch must hold 15 steps at twice it), more arguments
    "fashion_mnist.yaml": ("mnist", 8, []),  # the main job: in-memory loader, one-cycle per step
    "mnist.yaml": ("mnist", 8, []),
    "cifar10.yaml": ("cifar", 8, CIFAR),
    "cifar100.yaml": ("cifar", 8, CIFAR),
    "folder.yaml": ("folder", 2, ["--data.init_args.image_size=16"]),
    "experiment/fashion_mnist_fast.yaml": ("mnist", 8, ["--data.init_args.val_split=0.1"]),
    "experiment/cifar10_fast.yaml": ("cifar", 8, CIFAR),
}


@pytest.mark.parametrize("config", SHIPPED, ids=lambda c: Path(c).stem)
def test_lightning_tuners_through_the_cli(config, mnist_root, cifar_root, image_root):
    """``--trainer.callbacks+=BatchSizeFinder`` and ``LearningRateFinder`` on each shipped config: training goes on
    with the batch size and the lr they found (a one-cycle schedule planned for that batch size, peaking at that
    lr), and their results are in the run folder."""
    kind, batch_size, extra = SHIPPED[config]
    data = {"mnist": mnist_root, "cifar": cifar_root[0], "folder": image_root}[kind]
    args = [f"--config={CONFIGS / config}", CSV, f"--data.init_args.data_dir={data}", *QUIET, *extra]
    # the configs' batches of 128 to 512 would leave a one-cycle of a few steps on these few images, which the
    # finder's own steps overrun: plan it for the batch size the finder starts from
    args += [f"--data.init_args.batch_size={batch_size}"]
    limits = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=1", "--test_after_fit=false"]
    cli = cli_main(["fit", *args, *tuners(batch_size), *limits])
    run = Path(cli.trainer.log_dir)
    found = json.loads((run / "tuners.json").read_text())
    lr, curve = found["learning_rate"]["suggestion"], found["learning_rate"]["loss"]
    assert found["batch_size"] == cli.datamodule.batch_size == 2 * batch_size and len(curve) == 15 and lr
    assert Image.open(run / "lr_find.png").format == "PNG"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    (group, *_) = checkpoint["optimizer_states"][0]["param_groups"]
    schedules = checkpoint["lr_schedulers"]
    if schedules:  # one-cycle: the found lr is its peak, its steps those of one epoch at the found batch size
        assert group["max_lr"] == pytest.approx(lr) and schedules[0]["total_steps"] == checkpoint["global_step"]
    else:
        assert group["lr"] == pytest.approx(lr)
    assert checkpoint["global_step"] == len(cli.datamodule.train_dataloader())
