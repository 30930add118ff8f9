"""The command line: ``python -m project fit|validate|test|predict --config ...``, a LightningCLI."""

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project import errors
from project.callbacks.checkpoint import ModelCheckpoint, last_checkpoint_of_run
from project.callbacks.interrupt import GracefulInterrupt
from project.callbacks.nan_guard import EmptyEpochCheck, NonFiniteLossGuard
from project.callbacks.prediction_writer import PredictionWriter
from project.callbacks.rng import RNGStateCheckpoint
from project.callbacks.wandb import WandbPredictionMedia, WandbWatch
from project.checkpoint_io import SafeCheckpointIO, load_checkpoint
from project.data.base import ImageDataModule
from project.errors import UserError
from project.loggers import LearningRateMonitor, SaveConfigCallback, close_loggers
from project.models.classifier import ImageClassifier

RUNS_DIR = "runs"


class CLI(LightningCLI):
    """LightningCLI with the data's shape and classes linked into the model, and a checkpoint callback built in."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in [
            ("data.num_classes", "model.init_args.num_classes"),
            ("data.class_names", "model.init_args.class_names"),
            ("data.num_classes", "model.init_args.net.init_args.num_classes"),
            ("data.image_shape", "model.init_args.net.init_args.input_shape"),
        ]:
            parser.link_arguments(source, target, apply_on="instantiate")
        # Accepted by every subcommand, so a fit run's saved config.yaml works for validate/test/predict as is.
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="fit only: then test the best checkpoint on the test set"
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")  # predict: predictions.csv
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch={epoch:03d}-val_acc={val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # Logged by whichever logger is configured (configs/logger/*.yaml); the W&B ones do nothing without W&B.
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(WandbWatch, "wandb_watch")
        parser.add_lightning_class_args(WandbPredictionMedia, "wandb_media")

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit and not self.trainer.interrupted:
            ckpt_path = "best" if self.trainer.checkpoint_callback and not self.trainer.fast_dev_run else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            close_loggers(self.trainer)  # one W&B run per command, finished before the next one starts

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.logger
        for entry in logger if isinstance(logger, list) else [logger]:
            init_args = getattr(entry, "init_args", None)
            if init_args is not None and "name" in init_args and not init_args.name:
                init_args.name = run_name(config.data.class_path)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = last_checkpoint_of_run(config.get("config") or [], config.checkpoint.dirpath)
        errors.check_run_folder_is_new(logger)

    def after_instantiate_classes(self) -> None:
        install_safe_checkpoint_io(self.trainer)
        if self.datamodule is not None:
            errors.guard_data_reading(self.datamodule)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the model's config from --ckpt_path: refuse a missing, foreign or hostile file first."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        errors.check_checkpoint_path(ckpt_path)
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoint = load_checkpoint(ckpt_path)
            if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
                raise UserError(f"{ckpt_path} is not a Lightning checkpoint (no state_dict); pass a .ckpt from fit")
        try:
            super()._parse_ckpt_path()
        except UserError as err:
            raise UserError(
                f"--ckpt_path {ckpt_path} comes from another model: {err}; pass a checkpoint of this project's fit"
            ) from err


def install_safe_checkpoint_io(trainer: Trainer) -> None:
    """Atomic writes and weights-only reads for every checkpoint, unless the user configured their own IO."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = SafeCheckpointIO()


def run_name(data_class_path: str) -> str:
    """``project.data.FashionMNISTDataModule`` -> ``fashion_mnist``."""
    name = data_class_path.rsplit(".", 1)[-1].removesuffix("DataModule")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> CLI:
    """Entry point of ``python -m project`` and the ``project`` script; tests call it in-process with ``args``.

    Errors the user can fix end as one ``error: ...`` line and exit code 2; ``--debug`` or ``PROJECT_DEBUG=1``
    shows the traceback instead.
    """
    if args is None:
        sys.argv[1:], debug = errors.split_debug_flag(sys.argv[1:])
    else:
        args, debug = errors.split_debug_flag(args)
    try:
        errors.check_environment()
        return CLI(
            ImageClassifier,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=42,
            auto_configure_optimizers=False,
            trainer_defaults=trainer_defaults(),
            save_config_callback=SaveConfigCallback,
            args=args,
            run=run,
            parser_class=errors.ArgumentParser,
        )
    except Exception as err:
        message = errors.describe(err)
        if debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def trainer_defaults() -> dict[str, Any]:
    # W&B by default (offline without credentials); configs/logger/{csv,tensorboard,none}.yaml switch it.
    return {
        "logger": {
            "class_path": "project.loggers.WandbLogger",
            "init_args": {"save_dir": RUNS_DIR, "name": None},
        },
        # Always on, added to whatever callbacks a config lists.
        "callbacks": [RNGStateCheckpoint(), NonFiniteLossGuard(), EmptyEpochCheck(), GracefulInterrupt()],
    }
