"""The command line: ``python -m project fit|validate|test|predict --config ...``, a LightningCLI."""

import re
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from project.callbacks.wandb import WandbPredictionMedia, WandbWatch
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


def run_name(data_class_path: str) -> str:
    """``project.data.FashionMNISTDataModule`` -> ``fashion_mnist``."""
    name = data_class_path.rsplit(".", 1)[-1].removesuffix("DataModule")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> CLI:
    """Entry point of ``python -m project`` and the ``project`` script; tests call it in-process with ``args``."""
    try:
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
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def trainer_defaults() -> dict[str, Any]:
    # W&B by default (offline without credentials); configs/logger/{csv,tensorboard,none}.yaml switch it.
    return {
        "logger": {
            "class_path": "project.loggers.WandbLogger",
            "init_args": {"save_dir": RUNS_DIR, "name": None},
        },
    }
