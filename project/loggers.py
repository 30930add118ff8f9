"""Weights & Biases for the CLI: never waits on an unreachable network, one folder per run, the full config and code
state in the run, and a resumed fit continuing the same run."""

import hashlib
import json
import netrc
import os
import re
import secrets
import site
import subprocess
import sys
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
    if env := os.environ.get("WANDB_MODE"):
        return aliases.get(env, env), f"WANDB_MODE={env}"
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


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_state() -> dict[str, Any]:
    """The commit, whether the code differs from it, and the SHA-256 of imported Python files git does not track."""
    commit = git("rev-parse", "HEAD")
    tracked = {str(PROJECT_ROOT / f) for f in (git("ls-files") or "").splitlines()}
    installed = {sys.prefix, sys.base_prefix, *site.getsitepackages()}
    installed = tuple(installed | {os.path.realpath(p) for p in installed})
    files = {getattr(m, "__file__", None) or "-" for m in list(sys.modules.values())}  # realpath: only those left
    imported = {os.path.realpath(f) for f in files if f.endswith(".py") and not f.startswith(installed)}
    untracked = {
        f: hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16]
        for f in sorted(imported)
        if f.endswith(".py") and os.path.isfile(f) and not f.startswith(installed) and f not in tracked
    }
    changed = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"commit": commit, "dirty": None if changed is None else changed or bool(untracked), "untracked": untracked}


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
        log_model: the monitored checkpoints as model artifacts (aliases ``best``, ``latest``): ``True`` at the
            end of training, ``"all"`` as they are saved.
        checkpoint_name: the model artifact's name (default ``model-<run id>``).
        id: the run id (default: a new one); prefix: put before every metric name; **kwargs: to ``wandb.init``.
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
        id: str | None = None,
        prefix: str = "",
        **kwargs: Any,
    ) -> None:
        import wandb

        given = mode or os.environ.get("WANDB_MODE")
        if given not in (None, "", "online", "offline", "disabled", "dryrun", "run"):
            raise UserError(f"W&B mode {given!r} (WANDB_MODE or the logger's mode) must be online, offline or disabled")
        self.run_id = id or secrets.token_hex(4)  # kept when the run is finished: a later start resumes it
        if kwargs.get("settings") is None:  # wandb records the commit of this project, wherever the run starts
            kwargs["settings"] = wandb.Settings(git_root=str(PROJECT_ROOT))
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            entity=entity,
            group=group,
            tags=tags,
            notes=notes,
            job_type=job_type,
            log_model=log_model,
            checkpoint_name=checkpoint_name,
            prefix=prefix,
            resume="allow",  # Lightning's default, given here so that jsonargparse offers no --*.resume
            **kwargs,
        )
        self.root, self.run_dir = Path(save_dir) / (name or ""), None
        self.mode, self.timeout, self.why = mode, timeout, ""
        self.run_config: dict[str, Any] | None = None

    @property
    def save_dir(self) -> str:
        """The run's own folder (``Trainer.log_dir``), with config.yaml, checkpoints/ and wandb/."""
        if self.run_dir is None:  # only rank 0 creates it; Lightning broadcasts rank 0's paths to the others
            self.run_dir = next_run_dir(self.root, create=rank_zero_only.rank == 0)
        return str(self.run_dir)

    @property
    def name(self) -> str:
        return ""  # ModelCheckpoint writes to save_dir/name/version/checkpoints: keep it <run folder>/checkpoints

    @property
    def version(self) -> str:
        return ""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:  # private: Lightning's handle of the run, None until it starts (or is closed)
            import wandb

            planned, self.why = resolve_mode(self.mode)
            modes = [planned, "offline"] if planned == "online" else [planned]  # refused online: keep the run, offline
            if planned == "online" and (problem := unreachable(base_url(), self.timeout)):
                modes, self.why = ["offline"], f"{base_url()} did not answer: {problem}"
            if wandb.run is not None:  # left open by another logger in this process: never log into it
                wandb.run.finish()
            for mode in modes:
                # private: Lightning's wandb.init arguments; an absolute dir (wandb resolves a relative one against the
                # cwd of its first run in this process); `anonymous` is deprecated in wandb
                self._wandb_init = {k: v for k, v in self._wandb_init.items() if k != "anonymous"} | dict(
                    dir=os.path.abspath(self.save_dir), mode=mode, id=self.run_id
                )
                try:
                    run = super().experiment
                    break
                except Exception as err:
                    if mode == modes[-1]:
                        raise
                    self.why = f"W&B could not start online: {err}"
            if planned != mode:  # say it now, and again where the run ends
                rank_zero_warn(f"{self.why}; logging offline instead")
            if self.run_config is not None:
                run.config.update(self.run_config, allow_val_change=True)
        return super().experiment

    @rank_zero_only
    def log_config(self, config: dict[str, Any]) -> None:
        """The full resolved CLI config goes into the run's config, now and whenever it starts again."""
        self.run_config = config
        self.experiment.config.update(config, allow_val_change=True)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self.run_config is None:  # under the CLI the model's hyperparameters are already in the full config
            super().log_hyperparams(params)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if checkpoint_callback.monitor != "step":  # last.ckpt (highest step) is for resuming here, not an artifact
            super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)  # Lightning's log_model: the monitored checkpoints as artifacts
        if status in ("failed", "finished"):  # finished: SLURM's requeue signal, write everything before the kill
            self.close(exit_code=int(status == "failed"))

    @rank_zero_only
    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run and say where an offline run is; the next ``experiment`` starts the same run again."""
        run, self._experiment = self._experiment, None
        if run is None:
            return
        offline = run.settings.mode in ("offline", "dryrun")
        run_path = Path(run.dir).parent
        run.finish(exit_code=exit_code)
        if offline:
            rank_zero_info(f"W&B run saved offline in {run_path} ({self.why}); upload it with: wandb sync {run_path}")


class SaveConfigCallback(LightningSaveConfigCallback):
    """Lightning's, with the code's state in the header of ``config.yaml``; hands both to the W&B logger."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and trainer.is_global_zero:
            self.code = code_state()
            untracked = ", ".join(f"{p} (sha256 {h})" for p, h in self.code["untracked"].items()) or "none"
            changes = " with uncommitted changes" if self.code["dirty"] else ""
            self.parser.dump_header = [
                *(self.parser.dump_header or [])[:1],  # Lightning's version line
                f"code: commit {self.code['commit']}{changes}; untracked files imported: {untracked}",
            ]
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        config = json.loads(json.dumps(self.config.clone().as_dict(), default=str))
        config.pop("config", None)  # the paths of the YAML files given, not values
        config["code"] = {k: v for k, v in self.code.items() if k != "commit"}  # wandb records the commit
        for logger in (lg for lg in trainer.loggers if isinstance(lg, WandbLogger)):
            logger.log_config(config)
