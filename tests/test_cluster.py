"""Real launches of ``python -m project fit`` on 2 processes: 2 torchrun "nodes" on loopback; on a one-node SLURM
cluster (tests/slurm.py) ``srun -n 2`` (refused) beside ``sbatch scripts/slurm/train.sbatch`` (its srun's tasks take
their ranks from SLURM) preempted by SIGUSR1 twice, requeueing refused then allowed. Checked from the exit codes, files
and W&B offline runs; 101 test and 61 validation images: a sample counted twice would show."""

import json
import os
import re
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


class Probe(Callback):
    """Records in each process what Lightning made of the launch (``start-<restart>-rank<R>.json``). At the steps in
    ``wait_at`` (first start only) rank 0 waits until it has SIGUSR1 while rank 1 goes on into the next collective:
    the signal finds one rank in Python code and the other blocked in gloo (what hangs Lightning's own handler)."""

    def __init__(self, folder: str, wait_at: list[int] | None = None) -> None:
        self.folder, self.wait_at = Path(folder), wait_at or []
        self.restart = os.environ.get("SLURM_RESTART_COUNT", "0")

    def on_train_start(self, trainer, *args) -> None:
        env, ckpt = trainer.strategy.cluster_environment, trainer.ckpt_path
        info = {"environment": type(env).__name__, "auto_requeue": getattr(env, "auto_requeue", None)}
        info |= {"node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes, "world_size": trainer.world_size}
        info |= {"start_step": trainer.global_step, "ckpt_path": ckpt and str(Path(ckpt).resolve())}
        info |= {"procid": os.environ.get("SLURM_PROCID"), "job": os.environ.get("SLURM_JOB_ID")}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"start-{self.restart}-rank{trainer.global_rank}.json").write_text(json.dumps(info))

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == 0 and trainer.global_step in self.wait_at and self.restart == "0":
            (self.folder / f"waiting-{trainer.global_step}").touch()
            interrupt = next(c for c in trainer.callbacks if isinstance(c, GracefulInterrupt))
            deadline = time.time() + 120
            while not interrupt.requeue_requested and time.time() < deadline:
                time.sleep(0.05)


def probes(folder: Path, restart: int = 0) -> dict[int, dict]:
    return {int(p.stem[-1]): json.loads(p.read_text()) for p in folder.glob(f"start-{restart}-rank*.json")}


def fit(data: Path, probe: Path, *extra: str) -> list[str]:
    """``-m project fit`` on 2 CPU processes (gloo), 1 epoch, W&B offline, tested after fit, with the probe."""
    probe_args = ["--trainer.callbacks+=tests.test_cluster.Probe", f"--trainer.callbacks.folder={probe}"]
    return ["-m", "project", *ddp("fit", data, "--trainer.max_epochs=1", "--test_after_fit=true", *probe_args, *extra)]


def environment(tmp: Path, cluster: slurm.Cluster | None = None) -> dict[str, str]:
    """No launcher or W&B variables of this process; the repository importable; W&B offline in ``tmp``; loopback.
    Under SLURM, a free MASTER_PORT: Lightning's default (15000 + the job id's last digits) may be taken."""
    launcher = re.compile(r"MASTER_|RANK|LOCAL_|WORLD_|TORCHELASTIC|SLURM|WANDB")
    env = {k: v for k, v in os.environ.items() if not launcher.match(k)}
    env |= {"PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "OMP_NUM_THREADS": "1"}
    env |= {"GLOO_SOCKET_IFNAME": "lo", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env |= {f"WANDB_{name}DIR": str(tmp / "wandb") for name in ("", "DATA_", "CACHE_", "CONFIG_", "ARTIFACT_")}
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
    return slurm.wait_until(
        ready, lambda: process.poll() is None, lambda: f"{what}: {process.poll()}\n{output(process)}", TIMEOUT_S, every
    )


def best_checkpoint(run: Path) -> Path:
    """The best and the last checkpoint load as plain data and hold the whole (1-epoch) training; returns the best."""
    (best,) = (run / "checkpoints").glob("epoch=000*.ckpt")
    for path in (best, run / "checkpoints" / "last.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["global_step"] == STEPS and "net.layers.1.weight" in checkpoint["state_dict"]
    return best


def checked_metrics(run: dict) -> dict[str, float]:
    """The W&B run's test metrics, once its confusion matrix shows each test image counted once."""
    table = run["dir"] / "files" / run["summary"]["test/confusion_matrix_table"]["path"]
    rows = json.loads(table.read_text())["data"]
    assert sum(n for *_, n in rows) == N_TEST
    assert run["summary"]["test/acc"] == pytest.approx(sum(n for a, p, n in rows if a == p) / N_TEST, abs=1e-6)
    return {key: run["summary"][key] for key in METRICS}


def test_two_torchrun_nodes_on_loopback_count_every_test_sample_once(odd_mnist, tmp_path):
    """2 "nodes" x 1 process (static rendezvous on 127.0.0.1): ranks from torchrun, rank 0 alone writes, and the test
    metrics equal those of a 1-process ``test`` (in this process) of the best checkpoint."""
    port, env = slurm.free_port(), environment(tmp_path)
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    node += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    argv = fit(odd_mnist, tmp_path / "probe", "--trainer.devices=1", "--trainer.num_nodes=2")
    finish(*[start([*node, f"--node_rank={rank}", *argv], tmp_path, env) for rank in (0, 1)])
    ranks = probes(tmp_path / "probe").values()
    assert {(r["node_rank"], r["num_nodes"], r["world_size"], r["environment"]) for r in ranks} == {
        (rank, 2, 2, "TorchElasticEnvironment") for rank in (0, 1)
    }
    (run,) = (tmp_path / "runs" / "mnist").iterdir()
    assert run.name == "version_0" and list(tmp_path.rglob("config.yaml")) == [run / "config.yaml"]
    assert len(list(tmp_path.rglob("*.wandb"))) == 1, "one W&B run, started by rank 0 only"
    best = best_checkpoint(run)
    single = ["--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto", "--trainer.logger=false"]
    single += [f"--trainer.default_root_dir={tmp_path / 'single'}"]
    tested = cli_main(["test", f"--config={run / 'config.yaml'}", f"--ckpt_path={best}", *single])
    expected = {key: float(tested.trainer.callback_metrics[key]) for key in METRICS}
    assert checked_metrics(read_wandb_run(run)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    if why := slurm.missing():
        unavailable(why)
    cluster = slurm.Cluster(tmp_path_factory.mktemp("slurm"), cpus=4)  # the sbatch job's 2 tasks and srun's 2
    yield cluster
    cluster.stop()


def test_srun_ntasks_refused_and_sbatch_job_requeued_on_sigusr1_resumes_as_one_run(odd_mnist, slurm_cluster, tmp_path):
    """``srun -n 2`` fails in one line per task. ``sbatch --wait scripts/slurm/train.sbatch`` (1 epoch of 5 steps):
    its tasks take ranks and world size from SLURM and ignore a stale ``runs/hpc_ckpt_1.ckpt`` (where every job
    resumed from before a folder per job); SIGUSR1 at step 2 while the job may not be requeued (as with
    ``--no-requeue``): a checkpoint, training goes on; at step 4 while it may: a checkpoint, the job is requeued,
    starts again and resumes from it by itself, one W&B run across the pieces."""
    probe, cluster = tmp_path / "probe", slurm_cluster
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "hpc_ckpt_1.ckpt").write_bytes(b"a stale checkpoint: any start that reads it fails")
    options = ["--wait", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    job_args = fit(odd_mnist, probe, "--trainer.callbacks.wait_at=[2,4]")[3:]
    argv = ["sbatch", *options, str(ROOT / "scripts/slurm/train.sbatch"), *job_args]
    sbatch = start(argv, tmp_path, environment(tmp_path, cluster))
    refused = tmp_path / "refused"  # started beside the job: its own folder, W&B folder and marker
    srun = ["srun", "-n", "2", "--label", sys.executable, "-m", "project", *ddp("fit", odd_mnist)]
    (out,) = finish(start(srun, refused, environment(refused, cluster)), code=2)
    errors = sorted(re.findall(r"^(\d): (error: .*)$", out, re.M))
    assert [task for task, _ in errors] == ["0", "1"] and "Traceback" not in out, out
    assert all(e.endswith("HINT: Use `--ntasks-per-node=2` instead.") for _, e in errors), out
    assert not (refused / "runs").exists()
    for step, requeue in ((2, 0), (4, 1)):
        wait(sbatch, lambda step=step: (probe / f"waiting-{step}").exists(), f"training never reached step {step}")
        job = probes(probe)[0]["job"]
        cluster.run("scontrol", "update", f"JobId={job}", f"Requeue={requeue}")
        cluster.run("scancel", "--signal=USR1", job)  # what `#SBATCH --signal=USR1@180` sends
    # SLURM holds a requeued job back for about 2 minutes (its EligibleTime): start it at once
    wait(sbatch, lambda: (s := cluster.job(job))["Restarts"] == "1" and s["JobState"] == "PENDING", "requeue")
    # slurmd refuses a start stamped in the second it killed the job ("Job 1 already killed"): start in the next one
    time.sleep(1.05 - time.time() % 1)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    # every 0.5 s, not 0.1 (each scontrol costs CPU): a finished job stays visible for MinJobAge (4 s)
    running = ("PENDING", "RUNNING", "COMPLETING")
    state = wait(sbatch, lambda: (s := cluster.job(job))["JobState"] not in running and s, "end", every=0.5)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    ended = (state["JobState"], state["Restarts"], state["ExitCode"])
    assert ended == ("COMPLETED", "1", "0:0"), f"{ended}\n{log}\n{cluster.logs()}"
    finish(sbatch)
    root = tmp_path / "runs" / f"slurm-{job}"  # the job's default_root_dir
    hpc = [root / "hpc_ckpt_1.ckpt", root / "hpc_ckpt_2.ckpt"]
    assert [torch.load(p, weights_only=True)["global_step"] for p in hpc] == [2, 4]
    lines = [re.sub(r"\(.+\)", "(...)", line) for line in re.findall("SLURM requeue signal at .*", log)]
    assert lines == [
        f"SLURM requeue signal at step 2: saved runs/slurm-{job}/hpc_ckpt_1.ckpt; `scontrol requeue {job}` "
        "failed (...): training goes on",
        f"SLURM requeue signal at step 4: saved runs/slurm-{job}/hpc_ckpt_2.ckpt; requeued job {job}, which resumes "
        "from it",
    ], log
    keys = ("environment", "auto_requeue", "procid", "world_size", "start_step", "ckpt_path")
    starts = [{rank: tuple(r[k] for k in keys) for rank, r in probes(probe, restart).items()} for restart in (0, 1)]
    assert starts == [
        {rank: ("SLURMEnvironment", False, str(rank), 2, step, ckpt) for rank in (0, 1)}
        for step, ckpt in ((0, None), (4, str(hpc[1].resolve())))
    ]  # by itself, from the newest hpc_ckpt of its own folder
    folders = sorted((root / "mnist").iterdir())  # one per start of the job, written by rank 0
    assert [f.name for f in folders] == ["version_0", "version_1"] and len(list(root.rglob("config.yaml"))) == 2
    assert len(list(tmp_path.rglob("config.yaml"))) == 2, "rank 1 writes no run folder"
    best_checkpoint(folders[1])
    # the W&B pieces, oldest first: before the refused requeue, after it, after the restart
    pieces = [read_wandb_run(f) for f in sorted(root.rglob("*.wandb"), key=lambda f: f.stat().st_mtime_ns)]
    steps = [[row["trainer/global_step"] for row in p["history"] if "train/loss_step" in row] for p in pieces]
    assert len({p["id"] for p in pieces}) == 1 and sum(steps, []) == list(range(STEPS)), steps
    checked_metrics(pieces[-1])
