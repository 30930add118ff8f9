"""DDP on CPU (gloo), 2 processes started by Lightning (`-c configs/trainer/ddp_cpu.yaml`): validation counts every
sample once on an odd-sized split, one run folder and W&B run, a dying worker ends the job with one line; predictions
keep each input once from a padding sampler. torchrun, SLURM and the test stage: tests/test_cluster.py."""

import csv
import os
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from notebooks.wandb_runs import read_wandb_run
from project.cli import cli_main
from project.data import MNISTDataModule
from tests.conftest import CONFIGS, CSV, N_TEST, N_VAL, QUIET, run_module

pytestmark = pytest.mark.processes  # each test starts two processes


def ddp(subcommand: str, data: Path, *extra: str) -> list[str]:
    configs = [f"--config={CONFIGS / 'mnist.yaml'}", f"--config={CONFIGS / 'trainer/ddp_cpu.yaml'}", *QUIET]
    data_args = [f"--data.init_args.data_dir={data}", f"--data.init_args.val_split={N_VAL}"]
    small = ["--data.init_args.batch_size=16", "--model.init_args.net.init_args.hidden=[16]"]
    return [subcommand, *configs, *data_args, *small, *extra]


class DieOnRank1(Callback):
    """Hard-exits DDP rank 1 before training step ``step``, as a crashed or OOM-killed process would."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            os._exit(3)


def test_two_processes_validate_every_sample_once_and_a_dying_worker_stops_the_job_in_one_line(odd_mnist, tmp_path):
    """Epoch 0 (3 steps) validates and saves; rank 1 dies at the first step of epoch 1."""
    die = "--trainer.callbacks+=tests.test_ddp.DieOnRank1"
    args = ddp("fit", odd_mnist, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", die)
    done = run_module("project", *args, cwd=tmp_path, timeout=200)
    assert done.returncode == 2 and "MEMBER: 2/2" in done.stderr, done.stderr[-3000:]
    assert "error: a DDP worker stopped answering (it died or hung)" in done.stderr, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "mnist").iterdir()
    assert run_dir.name == "version_0" and len(list(tmp_path.rglob("*.wandb"))) == 1, "rank 1 writes nothing"
    logged = read_wandb_run(run_dir)["summary"]
    (best,) = (run_dir / "checkpoints").glob("epoch=000*.ckpt")
    single = ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false"]  # the W&B run is the DDP's
    again = cli_main(["validate", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}", *single])
    for name in ("acc", "loss", "f1"):
        got = float(again.trainer.callback_metrics[f"val/{name}"])
        assert got == pytest.approx(logged[f"val/{name}"], rel=1e-5, abs=1e-6), name


class PaddedPredict(MNISTDataModule):
    """Predicts through torch's DistributedSampler, which pads the ranks with repeated samples."""

    def predict_dataloader(self) -> DataLoader:
        data = self.splits["test"]
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.eval_batch_size, sampler=sampler)


def test_predict_keeps_each_input_once_when_the_sampler_pads(odd_mnist, tmp_path):
    """An untrained model (no checkpoint) and CSV logs: which inputs the file holds depends on neither."""
    data = ["--data=tests.test_ddp.PaddedPredict", f"--data.init_args.data_dir={odd_mnist}"]
    done = run_module(
        "project", *ddp("predict", odd_mnist, CSV, *data, "--data.init_args.eval_batch_size=20"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "runs" / "padded_predict" / "version_0" / "predictions.csv") as f:
        ids = [int(r["id"]) for r in csv.DictReader(f)]
    assert sorted(ids) == list(range(N_TEST)), "each input exactly once (the sampler handed out 102)"
