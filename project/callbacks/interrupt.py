"""Ctrl-C and SLURM's requeue signal take effect between two training steps, never in the middle of one.

Lightning alone stops wherever Ctrl-C lands and saves nothing (its ``OnExceptionCheckpoint`` saves mid-step and
deletes the file at teardown). On SIGUSR1 its SLURM handler saves and requeues inside the signal handler: a rank
blocked in a gradient all-reduce never joins the save's barrier, and the job hangs (Lightning issue #21406).
"""

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


class GracefulInterrupt(Callback):
    """The first Ctrl-C stops the run at the next step boundary, saving the full training state as ``last.ckpt`` in
    the run's ``checkpoints/`` and printing how to resume; a second one stops it at once. Under SLURM, SIGUSR1
    (``#SBATCH --signal=USR1@180``, or a preemption) saves ``<default_root_dir>/hpc_ckpt_<N>.ckpt`` at the next step
    boundary, on every rank at once, and requeues the job, which resumes from it; if SLURM refuses the requeue,
    training goes on. (The CLI turns Lightning's own SIGUSR1 handling off: ``SLURMEnvironment(auto_requeue=False)``.)
    """

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
            numbers = [
                int(m[1]) for p in folder.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)", p.stem))
            ]
            self.hpc_checkpoint = folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"
            trainer.save_checkpoint(self.hpc_checkpoint)

    def requeue(self, trainer: Trainer, *args: Any) -> None:
        """What Lightning's SLURM handler does, between two steps: after the hpc checkpoint Lightning resumes a
        requeued job from is saved and the step's metrics are logged, flush the loggers (``scontrol requeue`` kills
        the job) and requeue the job from rank 0; end this job, or go on if SLURM refused."""
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
