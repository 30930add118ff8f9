"""Hyperparameter search (``python -m extras.sweep``: Optuna on the W&B sweep YAML) and Lightning's tuner callbacks
through the CLI. Trials (always ``python -m project fit`` processes) train a 16-unit MLP for 2 epochs on format-exact
MNIST; studies, outcomes and metrics are read back from the study's journal file and the run folders. A trial process
costs about 11 s of CPU (9.5 of it imports): the tests start as few as show each behaviour."""

import csv
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import torch
import yaml
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


def trials_of(trials: list[optuna.trial.FrozenTrial], state: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state.name == state]


# ---- the sweep YAML -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_load_and_their_extreme_trials_train(path, here, mnist_root, cifar_root):
    """Each shipped YAML reads for Optuna as W&B reads it; every key is in the fit's config and every value the
    search can give passes the CLI; a trial at the top of every range trains (a batch)."""
    sweep = space.load(path)
    assert (sweep.metric, sweep.goal, sweep.method, sweep.notes) == ("val/acc", "maximize", "bayes", [])
    assert sweep.hyperband and sweep.head[:1] == ["--config"] and sweep.tail == []
    data = cifar_root[0] if "cifar" in path.stem else mnist_root
    small = CIFAR if data != mnist_root else ["--data.init_args.val_split=0.1"]  # the fast recipe holds 2000 out
    config = check(sweep, sweep.head, [])
    assert config["trainer"]["max_epochs"] >= 4
    top = {p.key: p.picks()[-1] for p in sweep.parameters}
    limits = ["--trainer.max_epochs=1", *(f"--trainer.limit_{s}_batches=1" for s in ("train", "val", "test"))]
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
    """Counting the trials and starting one is one step across sweep processes: while one holds it another waits
    (blocked on its lock, as /proc/locks shows), so together they never start a trial too many nor a grid point
    twice. (Trials are asked, not run.)"""
    sweep = space.load(write_sweep(here, "shared", {LR: {"values": [0.1, 0.2]}}))
    spec, summary = str(here / "shared.journal"), {"metric": "val/acc", "pruner": None, "search": "", "fit": []}
    first, second = (Search(sweep, *open_study(sweep, "shared", spec, summary, None), spec, here, 2) for _ in range(2))
    asked = []
    monkeypatch.setattr(Search, "start", lambda self: asked.append(self.study.ask(self.distributions).params[LR]))
    with first.counting_alone():
        waiting = threading.Thread(target=second.run)
        waiting.start()
        inode = f":{os.stat(f'{spec}.start-lock').st_ino} "  # in /proc/locks, a "->" line is a request waiting
        locks = Path("/proc/locks")
        slurm.wait_until(
            lambda: any("->" in x and inode in x for x in locks.read_text().splitlines()), waiting.is_alive, seconds=10
        )
        assert asked == [], "the second process counted while the first was starting a trial"
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


def sweep_marked(args: list[str], marker: str) -> None:
    """The sweep in a process forked from this one (no imports to wait for); its trials carry ``marker``."""
    os.environ["SWEEP_TEST"] = marker
    main(args)


@pytest.mark.processes  # the sweep and its 2 trials killed as they start, then 3 trial processes
def test_a_grid_killed_mid_trial_continues_every_point_once_two_at_once_and_best_yaml_reruns(here, mnist_root, capsys):
    """kill -9 of the sweep kills its trials; the same command marks them interrupted and runs their parameters
    again, two trials at once. lr 1e6 diverges: that trial fails with the fit's error line and the search goes on."""
    lrs = [0.001, 0.03, 1e6]  # two complete: the importances plot needs two
    path = write_sweep(here, "grid", {LR: {"values": lrs}, "data.init_args.batch_size": {"value": 32}})
    args = [str(path), "--workers=2", f"--data.init_args.data_dir={mnist_root}", *MLP, CSV]
    marker = f"SWEEP_TEST={here}"
    killed = multiprocessing.get_context("fork").Process(target=sweep_marked, args=(args, str(here)))
    killed.start()
    try:
        slurm.wait_until(lambda: len(slurm.processes_with(marker)) == 2, killed.is_alive)  # both trials started
        killed.kill()
        killed.join()
        slurm.wait_until(lambda: not slurm.processes_with(marker), seconds=10)  # the trials die with their sweep
    finally:
        killed.kill()
        slurm.kill(slurm.processes_with(marker))
    assert [t.state.name for t in study("grid").trials] == ["RUNNING", "RUNNING"]
    assert sweep(*args) == 0
    out = capsys.readouterr().out
    loaded = study("grid")
    interrupted, rest = loaded.trials[:2], loaded.trials[2:]
    assert all(t.state.name == "FAIL" and "sweep:interrupted" in t.system_attrs for t in interrupted)
    assert f"trial 0 was interrupted (its sweep process {killed.pid} is gone)" in out
    assert [t.user_attrs.get("retry_of") for t in loaded.trials] == [None, None, 0, 1, None]
    assert [t.params for t in rest[:2]] == [t.params for t in interrupted] and "trial 2 started (again: trial 0)" in out
    done, (failed,) = trials_of(rest, "COMPLETE"), trials_of(rest, "FAIL")
    assert sorted(t.params[LR] for t in rest) == lrs and failed.params[LR] == 1e6, "every grid point once"
    assert failed.user_attrs["error"].startswith("training loss is nan and the gradients are not finite at step")
    first, second = sorted(rest, key=lambda t: t.datetime_start)[:2]
    assert second.datetime_start < first.datetime_complete, "two trials at once"
    for t in done:  # the value each trial reported is what its run folder logged
        run = Path(t.user_attrs["run_dir"])
        assert run.parent.parent == Path("runs/sweep/grid") / f"trial_{t.number}"
        assert read_metrics(run)["val/acc"] == pytest.approx(list(t.intermediate_values.values()))
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["batch_size"] == 32
    with open("runs/sweep/grid/trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["trial", "state", "val/acc", "epochs", "seconds"] and len(rows) == 5
    assert {(int(r["trial"]), r["state"], r["val/acc"], r["epochs"], r["error"]) for r in rows} == {
        *((t.number, "interrupted", "", "0", "") for t in interrupted),
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
    spec = {LR: {"distribution": "log_uniform_values", "min": 1e-6, "max": 0.1}}
    path = write_sweep(here, "bayes", spec, method="bayes", early_terminate={"type": "hyperband", "min_iter": 1})
    assert sweep(path, "--trials=2", "--seed=10", f"--data.init_args.data_dir={mnist_root}", *MLP) == 0
    good, bad = study("bayes").trials
    assert bad.params[LR] < 1e-5 < good.params[LR], "the seed's draws"
    assert [(t.state.name, len(t.intermediate_values)) for t in (good, bad)] == [("COMPLETE", 2), ("PRUNED", 1)]
    run = read_wandb_run(Path(good.user_attrs["run_dir"]))
    assert run["summary"]["val/acc"] == pytest.approx(good.value, abs=1e-7), "the metric its own run folder logged"
    logged = read_wandb_run(Path(bad.user_attrs["run_dir"]))
    assert [row["val/acc"] for row in logged["history"] if "val/acc" in row] == pytest.approx([bad.value])
    files = Path("runs/sweep/bayes").rglob("*.wandb")
    assert {r.run.run_group for f in files for r in records(f) if r.HasField("run")} == {"bayes"}


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if why := slurm.missing():
        pytest.skip(why)
    cluster = slurm.Cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.mark.processes  # a SLURM cluster, 2 sweep processes, 1 trial
def test_slurm_array_tasks_share_one_study(here, mnist_root, slurm_cluster):
    """Two array tasks, one trial (--trials 1): both open the same journal, and only one of them starts a trial."""
    path = write_sweep(here, "array", {LR: {"values": [0.001, 0.03]}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "WANDB"))}
    env |= {"SLURM_CONF": str(slurm_cluster.conf), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    argv = ["sbatch", "--wait", "--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    argv += [str(ROOT / "scripts/slurm/sweep.sbatch"), str(path), "--trials=1", *MLP, CSV]
    argv += [f"--data.init_args.data_dir={mnist_root}"]
    done = subprocess.run(argv, cwd=here, env=env, capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text() for p in here.glob("slurm-*.out")}
    assert done.returncode == 0 and len(logs) == 2, done.stderr + "\n".join(logs.values())
    assert all("study array in runs/sweep/array/study.journal: 1 trials" in log for log in logs.values()), logs
    assert [t.state.name for t in study("array", here / "runs").trials] == ["COMPLETE"]
    assert sum(log.count(" started") for log in logs.values()) == 1, logs


# ---- Lightning's tuners ---------------------------------------------------------------------------------------


def tuners(init_batch_size: int) -> list[str]:
    """BatchSizeFinder from ``init_batch_size``: twice that (one doubling); then LearningRateFinder over 15 steps,
    never stopping early (its suggestion needs 13 points)."""
    batch = ["--trainer.callbacks+=BatchSizeFinder", f"--trainer.callbacks.init_val={init_batch_size}"]
    batch += ["--trainer.callbacks.max_trials=2", "--trainer.callbacks.steps_per_trial=1"]
    lr = ["--trainer.callbacks+=LearningRateFinder", "--trainer.callbacks.num_training_steps=15"]
    return [*batch, *lr, "--trainer.callbacks.early_stop_threshold=null"]


# config: data, the finder's first batch size (an epoch must hold 15 steps at twice it), more arguments. What the
# tuners touch is the loader's batch size and the optimizer's lr (a one-cycle's peak, or the plain lr): these four
# cover each kind. Left out, covered by one kept: cifar10.yaml and cifar100.yaml (a CIFAR DataLoader, SGD under
# one-cycle: as mnist.yaml's DataLoader and cifar10_fast.yaml's SGD one-cycle), fashion_mnist_fast.yaml (the loader
# and one-cycle of fashion_mnist.yaml; its bf16 plugin touches neither).
SHIPPED = {
    "fashion_mnist.yaml": ("mnist", 8, []),  # the main job: in-memory loader, AdamW, one-cycle per step
    "mnist.yaml": ("mnist", 8, []),  # a DataLoader, AdamW without a scheduler
    "folder.yaml": ("folder", 2, ["--data.init_args.image_size=16"]),  # your image files, no scheduler
    "experiment/cifar10_fast.yaml": ("cifar", 8, CIFAR),  # CIFAR in memory, SGD one-cycle, an EMA callback
}


@pytest.mark.parametrize("config", SHIPPED, ids=lambda c: Path(c).stem)
def test_lightning_tuners_through_the_cli(config, mnist_root, cifar_root, image_root):
    """``--trainer.callbacks+=BatchSizeFinder`` and ``LearningRateFinder`` on shipped configs: training goes on
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
