"""Weights & Biases for the CLI: offline without credentials, one folder per run, the full config in the run.

``WandbLogger`` is Lightning's logger with three changes:

- **mode**: ``mode`` if given, else ``WANDB_MODE``, else ``online`` when an API key exists (``WANDB_API_KEY`` or a
  netrc entry) and ``offline`` when not. It never prompts; an online start that fails falls back to offline.
- **folders**: each run gets ``<save_dir>/<name>/version_<N>/`` like the CSV logger; W&B's files, the resolved
  ``config.yaml`` and ``checkpoints/`` all live in it.
- **artifacts** (``log_model``): checkpoints are logged with aliases ``best``/``last``/``latest`` and the run's
  ``config.yaml`` next to ``model.ckpt``.
"""

import json
import netrc
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.cli import SaveConfigCallback as _SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.utilities import _scan_checkpoints
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

Mode = Literal["online", "offline", "disabled"]
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def has_credentials() -> bool:
    """An API key in ``WANDB_API_KEY`` or in the netrc file for the W&B host (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return bool(path.is_file() and netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None = None) -> tuple[Mode, str]:
    """The W&B mode to run in and why: the argument, else ``WANDB_MODE``, else online only with credentials."""
    aliases = {"dryrun": "offline", "run": "online"}
    if mode:
        return aliases.get(mode, mode), "--trainer.logger.init_args.mode"
    if os.environ.get("WANDB_MODE"):
        return aliases.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"]), "WANDB_MODE"
    if has_credentials():
        return "online", "credentials found"
    return "offline", "no W&B credentials found"


def git_state(repo: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The commit of the code that runs and whether it has uncommitted changes (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def next_run_dir(parent: Path, create: bool) -> Path:
    """``parent/version_<N>`` with N one more than the highest there; created atomically when ``create``."""
    names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    numbers = [int(m[1]) for name in names if (m := re.fullmatch(r"version_(\d+)", name))]
    n = max(numbers, default=-1) + 1
    if create:
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (parent / f"version_{n}").mkdir()
                break
            except FileExistsError:
                n += 1
    return parent / f"version_{n}"


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger``, zero-setup: see the module docstring.

    Args:
        name: the run's name in W&B and its folder under ``save_dir`` (the CLI fills in the data set's name).
        save_dir: where run folders go: ``<save_dir>/<name>/version_<N>/``.
        project, entity, group, tags, notes, job_type: as in ``wandb.init``.
        mode: ``online``, ``offline`` or ``disabled``; unset: ``WANDB_MODE``, else online only with credentials.
        log_model: log checkpoints as model artifacts: ``True`` at the end of training, ``"all"`` as saved.
        checkpoint_name: the model artifact's name (default ``model-<run id>``).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        project: str = "image-classification",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        mode: Mode | None = None,
        log_model: bool | Literal["all"] = False,
        checkpoint_name: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            log_model=log_model,
            checkpoint_name=checkpoint_name,
            entity=entity,
            group=group,
            tags=tags,
            notes=notes,
            job_type=job_type,
        )
        self._root = Path(save_dir) / (name or "")
        self._run_dir: Path | None = None
        self._mode = mode
        self._config_logged = False
        self._mode_reason = ""

    @property
    def save_dir(self) -> str:
        """The run's own folder (``Trainer.log_dir``): config.yaml, checkpoints/ and wandb/ go here."""
        if self._run_dir is None:
            # Only rank 0 creates it; Lightning broadcasts rank 0's paths to the other processes.
            self._run_dir = next_run_dir(self._root, create=rank_zero_only.rank == 0)
        return str(self._run_dir)

    @property
    def name(self) -> str:
        # ModelCheckpoint writes to save_dir/name/version/checkpoints: keep that equal to <run folder>/checkpoints.
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            mode, self._mode_reason = resolve_mode(self._mode)
            # absolute: wandb resolves a relative dir against the cwd of its first run in this process
            self._wandb_init.update(dir=os.path.abspath(self.save_dir), mode=mode)
            self._wandb_init.pop("anonymous", None)  # deprecated in wandb; Lightning always passes it
            import wandb

            if wandb.run is not None:  # left open by another logger in this process: never log into it
                wandb.run.finish()
            try:
                return _WandbLogger.experiment.fget(self)
            except Exception as err:  # network or server trouble: keep the run, offline
                if mode != "online":
                    raise
                rank_zero_warn(f"W&B could not start online ({err}); logging offline instead")
                self._mode, self._wandb_init["mode"] = "offline", "offline"
                return _WandbLogger.experiment.fget(self)
        return self._experiment

    @rank_zero_only
    def log_config(self, config: dict[str, Any]) -> None:
        """Put the full resolved CLI config (nested) and the git state into the run's config."""
        self.experiment.config.update({**config, "git": git_state()}, allow_val_change=True)
        self._config_logged = True

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if not self._config_logged:  # under the CLI the model's hyperparameters are already in the full config
            super().log_hyperparams(params)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "success":
            self.close(exit_code=1)

    @rank_zero_only
    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (the CLI calls this when its subcommand is done) and say where an offline run is."""
        run, self._experiment = self._experiment, None
        if run is None:
            return
        offline = getattr(getattr(run, "settings", None), "mode", None) in ("offline", "dryrun")
        run_path = Path(run.dir).parent if offline else None
        run.finish(exit_code=exit_code)
        if offline:
            rank_zero_info(
                f"W&B run saved offline in {run_path} ({self._mode_reason}); upload it with: wandb sync {run_path}"
            )

    def _scan_and_log_checkpoints(self, checkpoint_callback: Any) -> None:
        import wandb

        config = Path(self.save_dir) / "config.yaml"
        last = getattr(checkpoint_callback, "last_model_path", "")
        best = getattr(checkpoint_callback, "best_model_path", "")
        for timestamp, path, score, _ in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            aliases = ["latest"] + ["best"] * (path == best) + ["last"] * (path == last)
            metadata = {
                "score": score.item() if hasattr(score, "item") else score,
                "original_filename": Path(path).name,
                "monitor": getattr(checkpoint_callback, "monitor", None),
                "mode": getattr(checkpoint_callback, "mode", None),
            }
            artifact = wandb.Artifact(
                name=self._checkpoint_name or f"model-{self.experiment.id}", type="model", metadata=metadata
            )
            artifact.add_file(path, name="model.ckpt", policy=self.add_file_policy)
            if config.is_file():
                artifact.add_file(str(config), name="config.yaml")
            self.experiment.log_artifact(artifact, aliases=aliases)
            self._logged_model_time[path] = timestamp


class SaveConfigCallback(_SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder, as Lightning's does, and hands the full config to the loggers."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        config = json.loads(json.dumps(self.config.clone().as_dict(), default=str))
        config.pop("config", None)  # the paths of the YAML files given, not values
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_config(config)


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` that stays silent when the run has no logger (``logger: false``)."""

    def on_train_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def close_loggers(trainer: Any) -> None:
    """Finish W&B runs when a CLI subcommand ends, so the next run in the same process starts fresh."""
    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, WandbLogger):
            logger.close()
        elif isinstance(logger, LightningWandbLogger) and getattr(logger, "_experiment", None) is not None:
            # Lightning's own logger never finishes its run: the next run in this process would write into it.
            logger._experiment.finish()
