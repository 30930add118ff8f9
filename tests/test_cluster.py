"""Real launches of ``python -m project fit`` on 2 processes: torchrun on one machine, then 2 torchrun "nodes" on
loopback resuming that run; a one-node SLURM cluster (tests/slurm.py) running srun, ``srun -n 2`` (refused) and
``sbatch scripts/slurm/train.sbatch`` preempted by SIGUSR1 twice, requeueing refused then allowed. Checked from the
exit codes, files and W&B offline runs; 101 test and 61 validation images: a sample counted twice would show."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from notebooks.wandb_runs import read_wandb_run
from project.callbacks.interrupt import GracefulInterrupt
from project.cli import cli_main
from tests import slurm
from tests.conftest import N_TEST, ROOT, unavailable
from tests.test_ddp import ddp

pytestmark = pytest.mark.processes  # pytest-xdist keeps a test file on one worker (--dist loadfile)
TIMEOUT_S = 300  # a hung launch fails instead of hanging CI; a launch takes 10 to 40 s
STEPS = 5  # per epoch and process: (200 - 61 validation images) / 2 processes, in batches of 16
METRICS = ("test/acc", "test/loss", "test/f1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


class Probe(Callback):
    """Records in each process what Lightning made of the launch (``start-<restart>-rank<R>.json``). At the steps in
    ``wait_at`` (first start only) rank 0 waits until it has SIGUSR1 while rank 1 goes on into the next collective:
    the signal finds one rank in Python code and the other blocked in gloo (what hangs Lightning's own handler)."""

    def __init__(self, folder: str, wait_at: list[int] | None = None) -> None:
        self.folder, self.wait_at, self.restart = (
            Path(folder),
            wait_at or [],
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        )

    def on_train_start(self, trainer, *args) -> None:
        env, ckpt = trainer.strategy.cluster_environment, trainer.ckpt_path
        info = {
            "environment": type(env).__name__,
            "auto_requeue": getattr(env, "auto_requeue", None),
            "node_rank": trainer.node_rank,
            "num_nodes": trainer.num_nodes,
            "world_size": trainer.world_size,
            "start_step": trainer.global_step,
            "ckpt_path": ckpt and str(Path(ckpt).resolve()),
            "procid": os.environ.get("SLURM_PROCID"),
            "job": os.environ.get("SLURM_JOB_ID"),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"start-{self.restart}-rank{trainer.global_rank}.json").write_text(json.dumps(info))

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == 0 and trainer.global_step in self.wait_at and self.restart == "0":
            (self.folder / f"waiting-{trainer.global_step}").touch()
            interrupt, deadline = (
                next(c for c in trainer.callbacks if isinstance(c, GracefulInterrupt)),
                time.time() + 120,
            )
            while not interrupt.requeue_requested and time.time() < deadline:
                time.sleep(0.05)


def probes(folder: Path, restart: int = 0) -> dict[int, dict]:
    return {int(p.stem[-1]): json.loads(p.read_text()) for p in folder.glob(f"start-{restart}-rank*.json")}


def fit(data: Path, probe: Path, *extra: str) -> list[str]:
    """``-m project fit`` on 2 CPU processes (gloo), 1 epoch, W&B offline, tested after fit, with the probe."""
    return [
        "-m",
        "project",
        *ddp(
            "fit",
            data,
            "--trainer.max_epochs=1",
            "--test_after_fit=true",
            "--trainer.callbacks+=tests.test_cluster.Probe",
            f"--trainer.callbacks.folder={probe}",
            *extra,
        ),
    ]


def environment(tmp: Path, cluster: slurm.Cluster | None = None) -> dict[str, str]:
    """No launcher or W&B variables of this process; the repository importable; W&B offline in ``tmp``; loopback.
    Under SLURM, a free MASTER_PORT: Lightning's default (15000 + the job id's last digits) may be taken."""
    env = {
        k: v for k, v in os.environ.items() if not re.match(r"MASTER_|RANK|LOCAL_|WORLD_|TORCHELASTIC|SLURM|WANDB", k)
    }
    env |= {
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp / "wandb"),
        **{f"WANDB_{name}_DIR": str(tmp / "wandb") for name in ("DATA", "CACHE", "CONFIG", "ARTIFACT")},
    }
    return env | ({"SLURM_CONF": str(cluster.conf), "MASTER_PORT": str(slurm.free_port())} if cluster else {})


def start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """``argv`` in ``cwd``, its output to a file (a pipe could fill while its reader waits on another process)."""
    cwd.mkdir(parents=True, exist_ok=True)
    out = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    process.out, process.marker = out, f"WANDB_DATA_DIR={env['WANDB_DATA_DIR']}"
    return process


def output(process: subprocess.Popen) -> str:
    process.out.seek(0)
    return process.out.read()


def finish(*processes: subprocess.Popen, code: int = 0) -> list[str]:
    """The output of each, once all exited with ``code``; at the timeout every process of the launch is killed."""
    try:
        for process in processes:
            process.wait(timeout=TIMEOUT_S)
    finally:  # then what is left (torchrun's workers, a job's tasks); not before: the launches may share a marker
        slurm.kill(sorted({pid for process in processes for pid in slurm.processes_with(process.marker)}))
    for process in processes:
        assert process.returncode == code, output(process)[-5000:]
    return [output(p) for p in processes]


def wait(process: subprocess.Popen, ready, what: str, every: float = 0.1):
    """``ready()``'s first true value, asked every ``every`` seconds while ``process`` runs."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (found := ready()):
        assert process.poll() is None and time.monotonic() < deadline, f"{what}: {process.poll()}\n{output(process)}"
        time.sleep(every)
    return found


def one_run(cwd: Path, root: str = "runs") -> Path:
    """Rank 0 alone wrote: one run folder under ``cwd/root``, one config.yaml and one W&B run; returns the folder."""
    (run,) = (cwd / root / "mnist").iterdir()
    assert run.name == "version_0" and list(cwd.rglob("config.yaml")) == [run / "config.yaml"]
    assert len(list(cwd.rglob("*.wandb"))) == 1, "one W&B run, started by rank 0 only"
    return run


def best_checkpoint(run: Path, epochs: int = 1) -> Path:
    """The best and the last checkpoint load as plain data and hold the whole training; returns the best."""
    (best,) = (run / "checkpoints").glob("epoch=*.ckpt")
    for path, epoch in ((best, int(best.name[6:9])), (run / "checkpoints" / "last.ckpt", epochs - 1)):
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["global_step"] == (epoch + 1) * STEPS and "net.layers.1.weight" in checkpoint["state_dict"]
    return best


def checked_metrics(run: dict) -> dict[str, float]:
    """The W&B run's test metrics, once its confusion matrix shows each test image counted once."""
    rows = json.loads((run["dir"] / "files" / run["summary"]["test/confusion_matrix_table"]["path"]).read_text())[
        "data"
    ]
    assert sum(n for *_, n in rows) == N_TEST
    assert run["summary"]["test/acc"] == pytest.approx(sum(n for a, p, n in rows if a == p) / N_TEST, abs=1e-6)
    return {key: run["summary"][key] for key in METRICS}


def parts(folder: Path) -> list[dict]:
    """The W&B offline runs under ``folder``, oldest first (a resumed run goes on in a new one)."""
    return [read_wandb_run(f) for f in sorted(folder.rglob("*.wandb"), key=lambda f: f.stat().st_mtime_ns)]


def train_steps(run: dict) -> list[int]:
    return [row["trainer/global_step"] for row in run["history"] if "train/loss_step" in row]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if why := slurm.missing():
        unavailable(why)
    cluster = slurm.Cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def torchrun(odd_mnist, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """``torchrun --standalone --nproc_per_node 2 -m project fit ...``, and the metrics of a 1-process ``python -m
    project test`` (in this process) of its best checkpoint."""
    tmp = tmp_path_factory.mktemp("torchrun")
    finish(
        start([*TORCHRUN, "--standalone", "--nproc_per_node=2", *fit(odd_mnist, tmp / "probe")], tmp, environment(tmp))
    )
    best = best_checkpoint(one_run(tmp))
    single = cli_main(
        [
            "test",
            f"--config={best.parents[1] / 'config.yaml'}",
            f"--ckpt_path={best}",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path_factory.mktemp('single')}",
        ]
    )
    return tmp, {key: float(single.trainer.callback_metrics[key]) for key in METRICS}


def test_torchrun_two_processes(torchrun):
    tmp, single = torchrun
    ranks = probes(tmp / "probe")
    assert {rank: (r["environment"], r["world_size"]) for rank, r in ranks.items()} == {
        0: ("TorchElasticEnvironment", 2),
        1: ("TorchElasticEnvironment", 2),
    }
    assert checked_metrics(read_wandb_run(one_run(tmp))) == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_two_torchrun_nodes_on_loopback_resume_the_run(torchrun, tmp_path):
    """2 "nodes" x 1 process (static rendezvous on 127.0.0.1) resume a copy of the torchrun run from its last.ckpt
    for a second epoch: a new run folder, the same W&B run id, steps going on."""
    shutil.copytree(torchrun[0] / "runs", tmp_path / "runs", symlinks=True)
    first, port = tmp_path / "runs" / "mnist" / "version_0", slurm.free_port()
    nodes = [
        start(
            [
                *TORCHRUN,
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "project",
                "fit",
                f"--config={first / 'config.yaml'}",
                f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                "--trainer.max_epochs=2",
                "--trainer.devices=1",
                "--trainer.num_nodes=2",
                f"--trainer.callbacks.folder={tmp_path / 'probe'}",
            ],
            tmp_path,
            environment(tmp_path),
        )
        for rank in (0, 1)
    ]
    finish(*nodes)
    ranks = probes(tmp_path / "probe")
    assert {(r["node_rank"], r["num_nodes"], r["world_size"], r["environment"]) for r in ranks.values()} == {
        (0, 2, 2, "TorchElasticEnvironment"),
        (1, 2, 2, "TorchElasticEnvironment"),
    }
    assert {(r["start_step"], r["ckpt_path"]) for r in ranks.values()} == {
        (STEPS, str(first / "checkpoints" / "last.ckpt"))
    }
    second = tmp_path / "runs" / "mnist" / "version_1"
    assert sorted(second.parent.iterdir()) == [first, second] and len(list(second.rglob("config.yaml"))) == 1
    best_checkpoint(second, epochs=2)
    before, after = parts(tmp_path / "runs")
    assert before["dir"].is_relative_to(first) and before["id"] == after["id"], (before["dir"], after["dir"])
    assert train_steps(before) + train_steps(after) == list(range(2 * STEPS)) and checked_metrics(after)


def test_srun_two_tasks_take_their_ranks_from_slurm(odd_mnist, torchrun, slurm_cluster, tmp_path):
    stale = tmp_path / "runs" / "hpc_ckpt_1.ckpt"  # where every SLURM job resumed from before a folder per job
    stale.parent.mkdir()
    shutil.copy(torchrun[0] / "runs" / "mnist" / "version_0" / "checkpoints" / "last.ckpt", stale)
    argv = [
        "srun",
        "-N1",
        "--ntasks-per-node=2",
        "--kill-on-bad-exit=1",
        sys.executable,
        *fit(odd_mnist, tmp_path / "probe"),
    ]
    finish(start(argv, tmp_path, environment(tmp_path, slurm_cluster)))
    ranks = probes(tmp_path / "probe")
    assert {
        rank: (r["environment"], r["auto_requeue"], r["procid"], r["world_size"], r["start_step"])
        for rank, r in ranks.items()
    } == {0: ("SLURMEnvironment", False, "0", 2, 0), 1: ("SLURMEnvironment", False, "1", 2, 0)}
    run = one_run(tmp_path, f"runs/slurm-{ranks[0]['job']}")
    ours, theirs = (
        torch.load(best_checkpoint(r), weights_only=True)["state_dict"] for r in (run, one_run(torchrun[0]))
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (
        "srun's 2 tasks train exactly as torchrun's 2 processes"
    )
    assert checked_metrics(read_wandb_run(run)) == pytest.approx(torchrun[1], rel=1e-5, abs=1e-6)


def test_srun_ntasks_is_refused_in_one_line_per_task(odd_mnist, slurm_cluster, tmp_path):
    argv = ["srun", "-n", "2", "--label", sys.executable, "-m", "project", *ddp("fit", odd_mnist)]
    (out,) = finish(start(argv, tmp_path, environment(tmp_path, slurm_cluster)), code=2)
    errors = sorted(re.findall(r"^(\d): (error: .*)$", out, re.M))
    assert [task for task, _ in errors] == ["0", "1"], out
    assert all(e.endswith("HINT: Use `--ntasks-per-node=2` instead.") for _, e in errors) and "Traceback" not in out, (
        out
    )
    assert not (tmp_path / "runs").exists()


def test_sbatch_job_requeued_on_sigusr1_resumes_as_one_run(odd_mnist, slurm_cluster, tmp_path):
    """``sbatch --wait scripts/slurm/train.sbatch`` (2 epochs of 5 steps) gets SIGUSR1 at step 2 while the job may not
    be requeued (as with ``--no-requeue``): a checkpoint, training goes on; and at step 4 while it may: a checkpoint,
    the job is requeued, starts again and resumes from it by itself, one W&B run across the pieces."""
    probe = tmp_path / "probe"
    argv = [
        "sbatch",
        "--wait",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        str(ROOT / "scripts" / "slurm" / "train.sbatch"),
        *fit(odd_mnist, probe, "--trainer.callbacks.wait_at=[2,4]", "--trainer.max_epochs=2")[3:],
    ]
    sbatch, cluster = start(argv, tmp_path, environment(tmp_path, slurm_cluster)), slurm_cluster
    for step, requeue in ((2, 0), (4, 1)):
        wait(sbatch, lambda step=step: (probe / f"waiting-{step}").exists(), f"training never reached step {step}")
        job = probes(probe)[0]["job"]
        cluster.run("scontrol", "update", f"JobId={job}", f"Requeue={requeue}")
        cluster.run("scancel", "--signal=USR1", job)  # what `#SBATCH --signal=USR1@180` sends
    # SLURM holds a requeued job back for about 2 minutes (its EligibleTime): start it at once
    wait(sbatch, lambda: (s := cluster.job(job))["Restarts"] == "1" and s["JobState"] == "PENDING", "requeue")
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = wait(  # every 0.5 s, not 0.1 (each scontrol costs CPU): a finished job stays visible for MinJobAge (4 s)
        sbatch,
        lambda: (s := cluster.job(job))["JobState"] not in ("PENDING", "RUNNING", "COMPLETING") and s,
        "end",
        every=0.5,
    )
    (out,) = finish(sbatch)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "1", "0:0"), out + log
    root = tmp_path / "runs" / f"slurm-{job}"  # the job's default_root_dir
    hpc = [root / "hpc_ckpt_1.ckpt", root / "hpc_ckpt_2.ckpt"]
    assert [torch.load(p, weights_only=True)["global_step"] for p in hpc] == [2, 4]
    lines = [re.sub(r"\(.+\)", "(...)", line) for line in re.findall("SLURM requeue signal at .*", log)]
    assert lines == [
        f"SLURM requeue signal at step 2: saved runs/slurm-{job}/hpc_ckpt_1.ckpt; `scontrol requeue {job}` "
        "failed (...): training goes on",
        f"SLURM requeue signal at step 4: saved runs/slurm-{job}/hpc_ckpt_2"
        f".ckpt; requeued job {job}, which resumes from it",
    ], log
    starts = [
        {
            rank: (r["environment"], r["auto_requeue"], r["procid"], r["start_step"], r["ckpt_path"])
            for rank, r in probes(probe, restart).items()
        }
        for restart in (0, 1)
    ]
    assert starts == [
        {rank: ("SLURMEnvironment", False, str(rank), step, ckpt) for rank in (0, 1)}
        for step, ckpt in ((0, None), (4, str(hpc[1].resolve())))
    ]  # by itself, from the newest hpc_ckpt
    folders = sorted((root / "mnist").iterdir())  # one per start of the job, written by rank 0
    assert [f.name for f in folders] == ["version_0", "version_1"] and len(list(root.rglob("config.yaml"))) == 2
    best_checkpoint(folders[1], epochs=2)
    pieces = parts(root)  # before the refused requeue, after it, after the restart
    steps = [train_steps(p) for p in pieces]
    assert len({p["id"] for p in pieces}) == 1 and sum(steps, []) == list(range(2 * STEPS)), steps
    checked_metrics(pieces[-1])
