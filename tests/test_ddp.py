"""DDP on CPU (gloo) through the real command line: 2 processes on one machine, and 2 "nodes" x 1 process launched
with torchrun's environment variables on 127.0.0.1. Evaluation must count every sample exactly once, so the
validation and test metrics equal the single-process ones even when the split sizes are odd."""

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from project.cli import cli_main
from tests.conftest import CONFIGS, ROOT
from tests.formats import write_mnist_family

TIMEOUT_S = 150  # a hung process group fails the test instead of hanging CI
N_VAL, N_TEST = 61, 101  # odd: a padding sampler would count a sample twice


@pytest.fixture(scope="module")
def odd_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("odd-mnist")
    write_mnist_family(root / "MNIST" / "raw", n_train=200, n_test=N_TEST, seed=3)
    return root


def cli_args(data_dir: Path, *extra: str) -> list[str]:
    return ["fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--config={CONFIGS / 'trainer' / 'ddp_cpu.yaml'}",
            f"--config={CONFIGS / 'logger' / 'csv.yaml'}",
            f"--data.init_args.data_dir={data_dir}", f"--data.init_args.val_split={N_VAL}",
            "--data.init_args.batch_size=16", "--model.init_args.net.init_args.hidden=[16]",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--test_after_fit=true", *extra]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "LOCAL_", "WORLD_", "NODE_"))}
    base |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "project", *args], cwd=cwd, env=base, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_all(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outputs


def single_process_matches(run_dir: Path) -> None:
    """Validate and test the DDP run's checkpoint in one process: same numbers as the 2-process run logged."""
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    logged = {k: float(v) for row in rows for k, v in row.items() if v and k.startswith(("val/", "test/"))}
    ckpt = next((run_dir / "checkpoints").glob("epoch=*.ckpt"))
    single = ["--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto", f"--ckpt_path={ckpt}"]
    for stage in ("validate", "test"):
        cli = cli_main([stage, f"--config={run_dir / 'config.yaml'}", *single])
        stage_key = "val" if stage == "validate" else "test"
        for name in ("acc", "loss", "f1"):
            key = f"{stage_key}/{name}"
            assert float(cli.trainer.callback_metrics[key]) == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
        assert cli.datamodule.trainer.world_size == 1


def only_rank_zero_wrote(tmp_path: Path) -> Path:
    runs = sorted((tmp_path / "runs" / "mnist").iterdir())
    assert [r.name for r in runs] == ["version_0"], "one run, one folder: rank 1 writes no logs"
    run_dir = runs[0]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("epoch=*.ckpt"))) == 1
    return run_dir


def test_two_process_ddp_evaluates_every_sample_once(odd_mnist, tmp_path):
    (out,) = wait_all([launch(cli_args(odd_mnist), tmp_path)])
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    single_process_matches(only_rank_zero_wrote(tmp_path))


def test_two_nodes_one_process_each_via_torchrun_environment(odd_mnist, tmp_path):
    """What `torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --master_addr ... -m project fit ...` sets."""
    port = str(free_port())
    args = cli_args(odd_mnist, "--trainer.num_nodes=2", "--trainer.devices=1")
    processes = [
        launch(
            args,
            tmp_path,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            WORLD_SIZE="2",
            RANK=str(rank),
            GROUP_RANK=str(rank),
            NODE_RANK=str(rank),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = wait_all(processes)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    single_process_matches(only_rank_zero_wrote(tmp_path))


def test_a_dying_worker_takes_the_job_down_instead_of_hanging(odd_mnist, tmp_path):
    """Rank 1 hard-exits mid-training: the other rank fails fast with one clear line (bounded by TIMEOUT_S)."""
    args = cli_args(odd_mnist, "--trainer.limit_train_batches=10", "--trainer.callbacks+=tests.ddp_helpers.DieOnRank")
    process = launch(args, tmp_path, MASTER_PORT=str(free_port()))
    try:
        output = process.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0, output[-3000:]
    assert "error: a DDP worker stopped answering" in output, output[-3000:]
