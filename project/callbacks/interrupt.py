"""Ctrl-C and SLURM's requeue signal take effect between two training steps, never in the middle of one (Lightning's
SLURM handler saves inside the signal handler, where a rank blocked in an all-reduce hangs the job: issue #21406)."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info


def slurm_job_id() -> str | None:
    """The id SLURM requeues: ``<array job>_<task>`` in an array job."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def hpc_checkpoints(folder: Path) -> dict[int, Path]:
    """``{N: folder/hpc_ckpt_<N>.ckpt}``; Lightning resumes a requeued SLURM job from the highest N."""
    return {int(m[1]): p for p in folder.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)", p.stem))}


class GracefulInterrupt(Callback):
    """The first Ctrl-C stops at the next step, saving ``checkpoints/last.ckpt`` and printing how to resume; a second
    stops at once. SIGUSR1 under SLURM saves ``<default_root_dir>/hpc_ckpt_<N>.ckpt`` at the next step on every rank
    and requeues the job, which resumes from it (training goes on if SLURM refuses)."""

    def __init__(self) -> None:
        self.requested, self.requeue_requested, self.slurm, self.saved, self.previous = False, False, False, None, {}
        self.hpc_checkpoint: Path | None = None  # saved on SIGUSR1; requeued once Lightning logged that step

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.requested, self.requeue_requested, self.saved, self.hpc_checkpoint = False, False, None, None
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self.on_sigint)
            self.slurm = SLURMEnvironment.detect()
            if self.slurm:
                self.previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self.on_sigusr1)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)", file=sys.stderr)

    def on_sigusr1(self, signum: int, frame: Any) -> None:
        self.requeue_requested = True

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.requested:
            self.save(trainer)
            raise KeyboardInterrupt
        requeue = self.requeue_requested
        if self.slurm and trainer.world_size > 1:  # the same step on every rank
            requeue = trainer.strategy.reduce_boolean_decision(requeue, all=False)
        if requeue:
            self.requeue_requested = False
            folder = Path(trainer.default_root_dir)
            self.hpc_checkpoint = folder / f"hpc_ckpt_{max(hpc_checkpoints(folder), default=0) + 1}.ckpt"
            trainer.save_checkpoint(self.hpc_checkpoint)

    def requeue(self, trainer: Trainer, *args: Any) -> None:
        """Lightning's SLURM handler, between two steps once the hpc checkpoint is saved and the step logged: flush the
        loggers (``scontrol requeue`` kills the job), requeue from rank 0, end this job or go on if SLURM refused."""
        if self.hpc_checkpoint is None:
            return
        path, self.hpc_checkpoint = self.hpc_checkpoint, None
        for logger in trainer.loggers:
            logger.finalize("finished")
        requeued, job = False, slurm_job_id()
        if trainer.is_global_zero:
            try:
                done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=60)
                requeued, why = done.returncode == 0, done.stderr.strip()
            except (OSError, subprocess.SubprocessError) as err:
                why = str(err)
            outcome = (
                f"requeued job {job}, which resumes from it"
                if requeued
                else f"`scontrol requeue {job}` failed ({why}): training goes on"
            )
            rank_zero_info(f"SLURM requeue signal at step {trainer.global_step}: saved {path}; {outcome}")
        if trainer.strategy.broadcast(requeued):
            raise SystemExit(0)  # SLURM starts the job again

    on_train_batch_start = on_validation_start = on_train_epoch_end = on_train_end = requeue

    def on_validation_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.requested and not trainer.sanity_checking:
            raise KeyboardInterrupt

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        if self.saved is None and not trainer.sanity_checking and trainer.global_step > 0:
            self.save(trainer)
        if self.saved is not None and trainer.is_global_zero:
            config = Path(trainer.log_dir or ".") / "config.yaml"
            print(
                f"interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; saved {self.saved}; "
                f"resume with: python -m project fit -c {config if config.is_file() else '<your config>'} "
                f"--ckpt_path {self.saved}",
                file=sys.stderr,
            )

    def save(self, trainer: Trainer) -> None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        self.saved = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(self.saved)
