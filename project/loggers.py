"""Weights & Biases for the CLI: never waits on a network it cannot reach, one folder per run, the full config in
the run, and a resumed fit continues the same run.

``WandbLogger`` is Lightning's logger with four changes:

- **mode**: ``mode`` if given, else ``WANDB_MODE``, else ``online`` when an API key exists (``WANDB_API_KEY`` or a
  netrc entry) and ``offline`` when not. Before going online the server must answer within ``timeout`` seconds,
  else the run is written offline (``wandb sync`` uploads it later) and the last line says why.
- **folders**: each run gets ``<save_dir>/<name>/version_<N>/`` like the CSV logger; W&B's files, the resolved
  ``config.yaml`` and ``checkpoints/`` all live in it.
- **resume**: checkpoints carry the run id (``SaveConfigCallback``); a fit resumed from one (``--ckpt_path``, or a
  SLURM requeue) logs into the same W&B run, its steps continuing (the CLI calls ``resume`` before the run starts).
- **artifacts** (``log_model``): checkpoints with aliases ``best``/``last``/``latest`` and the run's ``config.yaml``.
"""

import json
import netrc
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.cli import SaveConfigCallback as LightningSaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from project.errors import UserError

Mode = Literal["online", "offline", "disabled"]
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def has_credentials() -> bool:
    """An API key in ``WANDB_API_KEY`` or in the netrc file for the W&B host (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return bool(path.is_file() and netrc.netrc(path).authenticators(urlparse(base_url()).hostname))
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None = None) -> tuple[Mode, str]:
    """The W&B mode to run in and why: the argument, else ``WANDB_MODE``, else online only with credentials."""
    aliases = {"dryrun": "offline", "run": "online"}
    if mode:
        return aliases.get(mode, mode), f"--trainer.logger.init_args.mode {mode}"
    if os.environ.get("WANDB_MODE"):
        return aliases.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"]), f"WANDB_MODE={os.environ['WANDB_MODE']}"
    return ("online", "credentials found") if has_credentials() else ("offline", "no W&B credentials found")


def unreachable(url: str, timeout: float) -> str | None:
    """Why the server at ``url`` gives no HTTP answer within ``timeout`` seconds, or None when it answers."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status
    except (OSError, ValueError) as err:
        return f"{getattr(err, 'reason', None) or err}"
    return None


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
    n = max((int(m[1]) for name in names if (m := re.fullmatch(r"version_(\d+)", name))), default=-1) + 1
    while create:
        parent.mkdir(parents=True, exist_ok=True)
        try:
            (parent / f"version_{n}").mkdir()
            break
        except FileExistsError:
            n += 1
    return parent / f"version_{n}"


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with zero setup: see the module docstring.

    Args:
        name: the run's name in W&B and its folder under ``save_dir`` (the CLI fills in the data set's name).
        save_dir: where run folders go (the CLI links it to ``trainer.default_root_dir``).
        project, entity, group, tags, notes, job_type: as in ``wandb.init``.
        mode: ``online``, ``offline`` or ``disabled``; unset: ``WANDB_MODE``, else online only with credentials.
        timeout: seconds the W&B server has to answer before the run goes offline instead.
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
        timeout: float = 5.0,
        log_model: bool | Literal["all"] = False,
        checkpoint_name: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            entity=entity,
            group=group,
            tags=tags,
            notes=notes,
            job_type=job_type,
        )
        self.root, self.run_dir = Path(save_dir) / (name or ""), None
        given = mode or os.environ.get("WANDB_MODE")
        if given not in (None, "", "online", "offline", "disabled", "dryrun", "run"):
            raise UserError(f"W&B mode {given!r} (WANDB_MODE or the logger's mode) must be online, offline or disabled")
        self.mode, self.timeout, self.why = mode, timeout, ""
        self.run_config: dict[str, Any] | None = None
        self.run_id: str | None = None  # kept when the run is finished: a later start in this fit resumes it
        self.log_model_as, self.artifact_name, self.checkpoints, self.logged = log_model, checkpoint_name, [], {}

    @property
    def save_dir(self) -> str:
        """The run's own folder (``Trainer.log_dir``): config.yaml, checkpoints/ and wandb/ go here."""
        if self.run_dir is None:  # only rank 0 creates it; Lightning broadcasts rank 0's paths to the others
            self.run_dir = next_run_dir(self.root, create=rank_zero_only.rank == 0)
        return str(self.run_dir)

    @property
    def name(self) -> str:
        return ""  # ModelCheckpoint writes to save_dir/name/version/checkpoints: keep it <run folder>/checkpoints

    @property
    def version(self) -> str:
        return ""

    def resume(self, run_id: str) -> None:
        """Log into the existing run ``run_id`` (a fit resumed from a checkpoint of it, or going on after its run
        was finished at a SLURM requeue signal that could not requeue)."""
        if self._experiment is None:
            self._wandb_init.update(id=run_id, resume="allow")  # private: the kwargs Lightning passes to wandb.init

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:  # private: Lightning's handle of the open run (None until it starts)
            import wandb

            planned, self.why = resolve_mode(self.mode)
            mode = planned
            if mode == "online" and (problem := unreachable(base_url(), self.timeout)):
                mode, self.why = "offline", f"{base_url()} did not answer: {problem}"
            # absolute: wandb resolves a relative dir against the cwd of its first run in this process
            self._wandb_init.update(dir=os.path.abspath(self.save_dir), mode=mode)
            self._wandb_init.pop("anonymous", None)  # deprecated in wandb; Lightning always passes it
            if wandb.run is not None:  # left open by another logger in this process: never log into it
                wandb.run.finish()
            try:
                run = super().experiment
            except Exception as err:  # the server answered, then failed: keep the run, offline
                if mode != "online":
                    raise
                mode, self.why = "offline", f"W&B could not start online: {err}"
                self._wandb_init["mode"] = "offline"
                run = super().experiment
            if planned != mode:  # say it now, and again where the run ends
                rank_zero_warn(f"{self.why}; logging offline instead")
            if self.run_config is not None:
                run.config.update({**self.run_config, "git": git_state()}, allow_val_change=True)
            self.run_id = run.id
        return self._experiment

    @rank_zero_only
    def log_config(self, config: dict[str, Any]) -> None:
        """The full resolved CLI config (nested) and the git state go into the run's config when it starts."""
        self.run_config = config
        if self._experiment is not None:
            self._experiment.config.update({**config, "git": git_state()}, allow_val_change=True)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self.run_config is None:  # under the CLI the model's hyperparameters are already in the full config
            super().log_hyperparams(params)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status == "success" and self.log_model_as:
            self.log_checkpoints()
        if status == "failed":
            self.close(exit_code=1)
        elif status == "finished":  # SLURM's requeue signal: write everything before SLURM kills the job
            self.close()
            if self.run_id:  # if requeueing fails, training goes on in the same run
                self.resume(self.run_id)

    @rank_zero_only
    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (the CLI calls this when its subcommand is done) and say where an offline run is."""
        run, self._experiment = self._experiment, None
        if run is None:
            return
        offline = run.settings.mode in ("offline", "dryrun")
        run_path = Path(run.dir).parent
        run.finish(exit_code=exit_code)
        if offline:
            rank_zero_info(f"W&B run saved offline in {run_path} ({self.why}); upload it with: wandb sync {run_path}")

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Lightning's hook after each checkpoint save: the checkpoint callbacks whose files become artifacts."""
        if all(c is not checkpoint_callback for c in self.checkpoints):
            self.checkpoints.append(checkpoint_callback)
        if self.log_model_as == "all":
            self.log_checkpoints()

    @rank_zero_only
    def log_checkpoints(self) -> None:
        """Each checkpoint file new since the last call, as a model artifact with the run's ``config.yaml`` and the
        alias ``best`` (the monitored callback's best) or ``last`` (``last.ckpt``), and ``latest``."""
        import wandb

        for callback in self.checkpoints:
            path = Path(callback.best_model_path)
            if not path.is_file() or self.logged.get(path) == path.stat().st_mtime:
                continue
            metadata = {
                "score": float(callback.best_model_score or 0),
                "original_filename": path.name,
                "monitor": callback.monitor,
                "mode": callback.mode,
            }
            artifact = wandb.Artifact(self.artifact_name or f"model-{self.experiment.id}", "model", metadata=metadata)
            artifact.add_file(str(path), name="model.ckpt")
            if (Path(self.save_dir) / "config.yaml").is_file():
                artifact.add_file(str(Path(self.save_dir) / "config.yaml"), name="config.yaml")
            self.experiment.log_artifact(artifact, aliases=["latest", "last" if path.stem == "last" else "best"])
            self.logged[path] = path.stat().st_mtime


class SaveConfigCallback(LightningSaveConfigCallback):
    """Saves ``config.yaml`` in the run folder, as Lightning's does; hands the full config to the W&B logger, and
    keeps the W&B run id in checkpoints (the CLI resumes that run when a fit resumes from one)."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        config = json.loads(json.dumps(self.config.clone().as_dict(), default=str))
        config.pop("config", None)  # the paths of the YAML files given, not values
        for logger in (lg for lg in trainer.loggers if isinstance(lg, WandbLogger)):
            logger.log_config(config)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        for logger in (lg for lg in trainer.loggers if isinstance(lg, WandbLogger)):
            if trainer.is_global_zero and logger.run_id:  # not .experiment: that would start a finished run again
                checkpoint["wandb_run_id"] = logger.run_id
