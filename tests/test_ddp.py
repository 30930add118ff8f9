"""DDP on CPU (gloo) through the real command line, 2 processes started by Lightning itself
(`-c configs/trainer/ddp_cpu.yaml`). Evaluation counts every sample once on odd-sized splits; one run folder and one
W&B run; predictions keep each input once even from a sampler that pads; a dying worker ends the job with one line.
Launches through torchrun and SLURM: tests/test_cluster.py."""

import csv
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
    return [
        subcommand,
        f"--config={CONFIGS / 'mnist.yaml'}",
        f"--config={CONFIGS / 'trainer/ddp_cpu.yaml'}",
        *QUIET,
        f"--data.init_args.data_dir={data}",
        f"--data.init_args.val_split={N_VAL}",
        "--data.init_args.batch_size=16",
        "--model.init_args.net.init_args.hidden=[16]",
        *extra,
    ]


def test_two_processes_evaluate_every_sample_once_and_write_one_run(odd_mnist, tmp_path):
    done = run_module(
        "project",
        *ddp("fit", odd_mnist, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--test_after_fit=true"),
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "MEMBER: 2/2" in done.stderr, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "mnist").iterdir()
    assert run_dir.name == "version_0" and len(list(tmp_path.rglob("*.wandb"))) == 1, "rank 1 writes nothing"
    logged = read_wandb_run(run_dir)["summary"]
    best = next((run_dir / "checkpoints").glob("epoch=*.ckpt"))
    for stage, key in (("validate", "val"), ("test", "test")):
        single = cli_main(
            [
                stage,
                f"--config={run_dir / 'config.yaml'}",
                "--trainer.devices=1",
                "--trainer.strategy=auto",
                f"--ckpt_path={best}",
                "--trainer.logger=false",  # the W&B run to compare with is the DDP fit's
            ]
        )
        for name in ("acc", "loss", "f1"):
            got = float(single.trainer.callback_metrics[f"{key}/{name}"])
            assert got == pytest.approx(logged[f"{key}/{name}"], rel=1e-5, abs=1e-6), (key, name)


class PaddedPredict(MNISTDataModule):
    """Predicts through torch's DistributedSampler, which pads the ranks with repeated samples."""

    def predict_dataloader(self) -> DataLoader:
        data = self.splits["test"]
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.eval_batch_size, sampler=sampler)


def test_predict_keeps_each_input_once_when_the_sampler_pads(odd_mnist, tmp_path):
    """An untrained model (no checkpoint) and CSV logs: which inputs the file holds depends on neither."""
    done = run_module(
        "project",
        *ddp(
            "predict",
            odd_mnist,
            CSV,
            "--data=tests.test_ddp.PaddedPredict",
            f"--data.init_args.data_dir={odd_mnist}",
            "--data.init_args.eval_batch_size=20",
        ),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "runs" / "padded_predict" / "version_0" / "predictions.csv") as f:
        ids = [int(r["id"]) for r in csv.DictReader(f)]
    assert sorted(ids) == list(range(N_TEST)), "each input exactly once (the sampler handed out 102)"


class DieOnRank(Callback):
    """Hard-exits one DDP worker at a given step, as a crashed or OOM-killed process would."""

    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            import os

            os._exit(3)


def test_a_dying_worker_takes_the_job_down_with_one_line(odd_mnist, tmp_path):
    done = run_module(
        "project",
        *ddp("fit", odd_mnist, "--trainer.limit_train_batches=10", "--trainer.callbacks+=tests.test_ddp.DieOnRank"),
        cwd=tmp_path,
        timeout=200,
    )
    assert done.returncode != 0 and "error: a DDP worker stopped answering" in done.stderr, done.stderr[-3000:]
