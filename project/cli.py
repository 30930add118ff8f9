"""The command line: ``python -m project fit|validate|test|predict --config ...``, a LightningCLI."""

import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.plugins.io import CheckpointIO

from project.callbacks.interrupt import GracefulInterrupt, slurm_job_id
from project.callbacks.nan_guard import NonFiniteGuard
from project.callbacks.prediction_writer import PredictionWriter
from project.callbacks.rng import RNGState
from project.callbacks.tuners import TunerResults
from project.callbacks.wandb import WandbPredictionMedia, WandbWatch
from project.checkpoint_io import SafeCheckpointIO, load_checkpoint
from project.data.base import ImageDataModule
from project.errors import OneLineErrors, UserError, did_you_mean, exit_on_user_error, require
from project.loggers import SaveConfigCallback, WandbLogger, next_run_dir
from project.models.classifier import ImageClassifier

LINKS = [  # the data decides these; they are never typed twice
    ("data.num_classes", "model.init_args.num_classes"),
    ("data.class_names", "model.init_args.class_names"),
    ("data.image_shape", "model.init_args.image_shape"),
    ("data.mean", "model.init_args.mean"),
    ("data.std", "model.init_args.std"),
    ("data.num_classes", "model.init_args.net.init_args.num_classes"),
    ("data.image_shape", "model.init_args.net.init_args.input_shape"),
]


class ArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, but a bad argument raises a one-line :class:`UserError` instead of usage + exit."""


class CLI(LightningCLI):
    """LightningCLI with the data's classes, shape and statistics linked into the model, best and last checkpoints,
    run folders under ``trainer.default_root_dir``, and checks of every input before any work starts."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in LINKS:
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")
        # Accepted by every subcommand, so a fit run's saved config.yaml works for validate/test/predict as is.
        parser.add_argument("--test_after_fit", type=bool, default=False, help="fit: then test the best checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best by val/acc
        # last.ckpt after every epoch, as the checkpoint with the highest step: Lightning refreshes a monitored
        # ModelCheckpoint's save_last only on a new best
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.filename": "epoch={epoch:03d}-val_acc={val/acc:.4f}",
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                "last_checkpoint.monitor": "step",
                "last_checkpoint.mode": "max",
            }
        )
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")  # predict: predictions.csv
        parser.add_class_arguments(LearningRateMonitor, "lr_monitor")  # added to the trainer when it has a logger
        parser.add_lightning_class_args(WandbWatch, "wandb_watch")  # these two do nothing without W&B
        parser.add_lightning_class_args(WandbPredictionMedia, "wandb_media")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except UserError as err:
            raise UserError(name_the_broken_yaml(str(err), list(sys.argv[1:] if args is None else args))) from err
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":  # a new process writes into a new folder: find the last.ckpt of the run given
            ckpt_path = config.ckpt_path = last_checkpoint_of_run(
                config.get("config") or [], config.last_checkpoint.dirpath
            )
        if ckpt_path is None and self.config.get("subcommand") == "fit" and SLURMEnvironment.detect():
            # requeued by SLURM: Lightning resumes from the newest hpc_ckpt_<N>.ckpt in default_root_dir
            saved = Path(config.trainer.default_root_dir or ".").glob("hpc_ckpt_*.ckpt")
            ckpt_path = max(saved, key=lambda p: int(p.stem.removeprefix("hpc_ckpt_")), default=None)
        checkpoint = None
        if ckpt_path and str(ckpt_path) not in ("best", "hpc", "registry") and "://" not in str(ckpt_path):
            # Lightning reads the model's config from this file next: make sure it is one of ours
            near = [str(p) for p in Path(ckpt_path).parent.glob("*.ckpt")]
            require(
                Path(ckpt_path).is_file(), f"--ckpt_path {ckpt_path}: no such file{did_you_mean(str(ckpt_path), near)}"
            )
            checkpoint = load_checkpoint(ckpt_path, mmap=True)
            hparams = checkpoint.get("hyper_parameters", {})
            require(
                isinstance(hparams.get("net"), dict),
                f"--ckpt_path {ckpt_path} comes from another model (hyperparameters: {', '.join(map(str, hparams))}); "
                f"pass a checkpoint written by this project's fit",
            )
        # a fit resumed from a checkpoint continues its W&B run
        fit = self.config.get("subcommand") == "fit"
        self.resume_run_id = checkpoint.get("wandb_run_id") if checkpoint is not None and fit else None

    def after_instantiate_classes(self) -> None:
        for logger in self.trainer.loggers if self.resume_run_id else ():
            if isinstance(logger, WandbLogger):
                logger.resume(self.resume_run_id)  # before Lightning creates the run at setup

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for init_args in [getattr(logger, "init_args", None) or Namespace() for logger in loggers]:
            if "name" in init_args and not init_args.name:
                init_args.name = run_name(config.data.class_path)
            if init_args.get("version") is not None:  # CSV/TensorBoard would write into (or over) that folder
                folder = Path(init_args.get("save_dir") or ".") / (init_args.get("name") or "") / str(init_args.version)
                version = folder if folder.name.startswith("version_") else folder.parent / f"version_{folder.name}"
                require(
                    not (version.is_dir() and any(version.iterdir())),
                    f"{version} holds an earlier run and is never overwritten; leave the logger's version unset",
                )
        for flag, path in [
            ("--trainer.default_root_dir", config.trainer.default_root_dir),
            ("--checkpoint.dirpath", config.checkpoint.dirpath),
            ("--last_checkpoint.dirpath", config.last_checkpoint.dirpath),
            ("--prediction_writer.output_dir", config.prediction_writer.output_dir),
        ]:
            require(not path or writable(Path(path)), f"cannot write to {path}: set {flag} to a writable folder")
        # Lightning's hparams dump drops a net's init_args when all of them are linked (num_classes, input_shape),
        # then fails to fill the links in ("Expected key net.init_args.num_classes to be in data"): keep it a dict.
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        self.config_dump = dump[self.subcommand] if self.subcommand else dump
        if isinstance(self.config_dump["model"].get("init_args", {}).get("net"), dict):
            self.config_dump["model"]["init_args"]["net"].setdefault("init_args", {})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config["trainer"]
        # safe checkpoint IO (atomic, finite, weights-only) unless the user brought their own
        plugins = trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins = [*plugins, SafeCheckpointIO()]
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            plugins = [*plugins, SLURMEnvironment(auto_requeue=False)]  # GracefulInterrupt requeues between steps
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer.get("logger") not in (False, []):  # Lightning's LearningRateMonitor fails without a logger
            callbacks = [*callbacks, config["lr_monitor"]]
        elif not trainer.get("fast_dev_run"):  # no logger, no version folder: still a folder of its own
            root = Path(trainer.get("default_root_dir") or ".") / run_name(type(config["data"]).__name__)
            kwargs["default_root_dir"] = str(next_run_dir(root, create=False))
        return super().instantiate_trainer(plugins=plugins, callbacks=callbacks, **kwargs)

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit and not self.trainer.interrupted:
            best = self.config_init.fit.checkpoint.best_model_path  # none in a fast_dev_run
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def name_the_broken_yaml(message: str, argv: list[str]) -> str:
    """``YAML syntax error (...)`` -> ``YAML syntax error in <the --config file that does not parse> (...)``."""
    if not message.startswith("YAML syntax error"):
        return message
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    for path in [*files, *(a.split("=", 1)[1] for a in argv if a.startswith("--config="))]:
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError:
            return message.replace("YAML syntax error", f"YAML syntax error in {path}")
        except OSError:
            continue
    return message


def writable(path: Path) -> bool:
    """Whether ``path`` is or could be made a folder we can write into (nothing is created)."""
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK)


def run_name(data_class_path: str) -> str:
    """``project.data.FashionMNISTDataModule`` -> ``fashion_mnist``."""
    name = data_class_path.rsplit(".", 1)[-1].removesuffix("DataModule")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def last_checkpoint_of_run(config_files: Sequence[Any], dirpath: str | None = None) -> str:
    """``last.ckpt`` in ``--last_checkpoint.dirpath`` when given, else next to the run's saved ``config.yaml`` among
    ``config_files`` (the last wins): ``python -m project fit -c runs/mnist/version_0/config.yaml --ckpt_path last``."""
    paths = [Path(str(f)) for f in config_files]
    for candidate in [
        Path(dirpath or "-") / "last.ckpt",
        *(f.parent / "checkpoints" / "last.ckpt" for f in reversed(paths)),
    ]:
        if candidate.is_file():
            return str(candidate)
    raise UserError(
        f"--ckpt_path last: no checkpoints/last.ckpt next to the given configs"
        f" ({', '.join(map(str, paths)) or 'none'}); pass the run's own config, e.g."
        " -c runs/mnist/version_0/config.yaml, or a checkpoint file path"
    )


def no_advertisement(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)  # Lightning's tip for another product, printed by every run


def quiet() -> None:
    """Silence the console lines that look like problems but are not, here and only here."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(no_advertisement)  # added once
    # torch deprecates isinstance(spec, LeafSpec), which Lightning still calls on every batch transfer
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
    # SLURM's srun is installed but this run is not under SLURM: Lightning warns on every start
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    # test, predict or a resumed fit from another run's checkpoint: this run's checkpoints go to its own version
    # folder, so Lightning's checkpoint callbacks start a top-k of their own there, as intended
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    # cli_main(args) from a test or a notebook: the host process has arguments of its own
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")


def default_root_dir() -> str:
    """``runs``; under SLURM ``runs/slurm-<job id>``: a folder per job that a requeued job finds again, and where no
    other job finds the checkpoint Lightning resumes a SLURM job from (its ``hpc_ckpt_<N>.ckpt``)."""
    return f"runs/slurm-{slurm_job_id()}" if SLURMEnvironment.detect() else "runs"


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> CLI:
    """Entry point of ``python -m project``; tests call it in-process with ``args``. Errors the user can fix end as
    one ``error: ...`` line and exit code 2 (``--debug`` or ``PROJECT_DEBUG=1``: the traceback instead)."""
    argv = list(sys.argv[1:] if args is None else args)
    if args is None:  # LightningCLI reads sys.argv itself
        sys.argv[1:] = [a for a in argv if a != "--debug"]
    quiet()
    with exit_on_user_error(debug="--debug" in argv):
        cli = CLI(
            ImageClassifier,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=42,
            auto_configure_optimizers=False,
            parser_class=ArgumentParser,
            save_config_callback=SaveConfigCallback,
            trainer_defaults={
                "default_root_dir": default_root_dir(),
                # W&B by default (offline without credentials); configs/logger/{csv,tensorboard,none}.yaml switch it
                "logger": {"class_path": "project.loggers.WandbLogger", "init_args": {"name": None}},
                # always on, added to any list
                "callbacks": [RNGState(), NonFiniteGuard(), GracefulInterrupt(), TunerResults()],
            },
            args=None if args is None else [a for a in argv if a != "--debug"],
            run=run,
        )
        for logger in cli.trainer.loggers:  # one W&B run per command, finished before the next one starts
            if isinstance(logger, WandbLogger) and run:
                logger.close()
        return cli
