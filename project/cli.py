"""``python -m project fit|validate|test|predict --config ...``: a LightningCLI for any LightningModule and data."""

import inspect
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _InstantiatorFn
from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.model_helpers import is_overridden

from project.callbacks.interrupt import GracefulInterrupt, hpc_checkpoints, slurm_job_id
from project.callbacks.nan_guard import NonFiniteGuard
from project.callbacks.prediction_writer import PredictionWriter
from project.callbacks.progress import EpochProgressBar
from project.callbacks.rng import RNGState
from project.callbacks.tuners import TunerResults
from project.callbacks.wandb import WandbPredictionMedia, WandbRunId, WandbWatch
from project.checkpoint_io import SafeCheckpointIO
from project.errors import OneLineErrors, UserError, did_you_mean, exit_on_user_error, require
from project.loggers import SaveConfigCallback, WandbLogger, next_run_dir
from project.precision import CPUBf16WhereNative

# what the data decides, never typed twice; a model or net without such an argument is left alone
LINKS = [(name, f"model.init_args.{name}") for name in ("num_classes", "class_names", "image_shape", "mean", "std")] + [
    ("num_classes", "model.init_args.net.init_args.num_classes"),
    ("image_shape", "model.init_args.net.init_args.input_shape"),
]
HELP = {  # this project's meaning where Lightning's docstring says something else
    "--ckpt_path": "a checkpoint file to resume (fit) or evaluate, or `last`: the last.ckpt of the run whose "
    "config.yaml is given with -c (under SLURM a requeued fit resumes from its hpc_ckpt_<N>.ckpt by itself)",
    "--weights_only": "ignored: checkpoints are always read as plain data (weights-only); one that holds Python "
    "objects is refused",
    "--trainer.callbacks": "callbacks to add (`callbacks+=` appends; in YAML `callbacks+:`); always added: "
    "RNGState, NonFiniteGuard, GracefulInterrupt, the two checkpoint callbacks, LearningRateMonitor (with a logger)",
    "--checkpoint.dirpath": "where the best checkpoint goes (default: <run folder>/checkpoints)",
    "--last_checkpoint.dirpath": "where last.ckpt goes (default: <run folder>/checkpoints)",
    "--checkpoint.filename": "the best checkpoint's file name (default: epoch=<E>-<monitor>=<value>)",
}
TITLES = {
    "checkpoint": "The best checkpoint by --checkpoint.monitor (default val/acc, max); Lightning's ModelCheckpoint",
    "last_checkpoint": "last.ckpt, rewritten after every epoch (for resuming); Lightning's ModelCheckpoint",
    "prediction_writer": "predict: predictions.csv / .jsonl of a classifier",
    "lr_monitor": "The learning rate, logged when there is a logger; Lightning's LearningRateMonitor",
    "wandb_watch": "W&B: gradient and parameter histograms (wandb.watch)",
    "wandb_media": "W&B: confusion matrix and sample predictions of a classifier",
}


class ArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser: one-line errors, ``usage: python -m project``, and help in this project's words."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prog", "python -m project")  # also in the parsers jsonargparse makes for --*.help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] in HELP:
            kwargs["help"] = HELP[args[0]]
        return super().add_argument(*args, **kwargs)

    def add_argument_group(self, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        if name in TITLES:
            args = (TITLES[name], *args[1:])
        return super().add_argument_group(*args, name=name, **kwargs)


class CLI(LightningCLI):
    """LightningCLI with the data's facts linked into the model, best and last checkpoints, inputs checked first."""

    checkpoint: dict[str, Any] | None = None  # the one read of --ckpt_path (tensors memory-mapped)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name, target in LINKS:
            fact = partial(self.fact, name, target)
            fact.__name__ = f"checkpoint_or_data.{name}"  # shown by --help
            parser.link_arguments("data", target, fact, apply_on="instantiate")
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")
        # in every subcommand: a fit run's saved config.yaml works for validate/test/predict as is
        parser.add_argument("--test_after_fit", type=bool, default=False, help="fit: then test the best checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt every epoch as the highest step: a monitored ModelCheckpoint's save_last waits for a new best
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.auto_insert_metric_name": False,
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
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        if config.get("ckpt_path") == "last":  # a new process writes into a new folder: the last.ckpt of the run given
            config.ckpt_path = last_checkpoint_of_run(config.get("config") or [], config.last_checkpoint.dirpath)
        path = config.get("ckpt_path")
        if self.config.subcommand == "fit" and path is None and SLURMEnvironment.detect():
            saved = hpc_checkpoints(Path(config.trainer.default_root_dir or "."))
            path = saved[max(saved)] if saved else None  # the newest, which Lightning resumes from
        if path and str(path) not in ("best", "hpc", "registry") and "://" not in str(path):
            near = [str(p) for p in Path(path).parent.glob("*.ckpt")]
            require(Path(path).is_file(), f"--ckpt_path {path}: no such file{did_you_mean(str(path), near)}")
            self.checkpoint_io = SafeCheckpointIO(mmap=True)
            self.checkpoint = self.checkpoint_io.load_checkpoint(path)  # handed to Lightning: the file is read once
            hparams = self.checkpoint.get("hyper_parameters") or {}
            require(
                not hparams or "_class_path" in hparams,
                f"--ckpt_path {path} comes from another model (hyperparameters: {', '.join(map(str, hparams))}); "
                f"pass a checkpoint written by `python -m project fit`",
            )

    def _parse_ckpt_path(self) -> None:
        """Lightning's (private) override of the model config by the checkpoint's hyperparameters, from the one read."""
        hparams = dict((self.checkpoint or {}).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if hparams and "_class_path" in hparams:  # written through this CLI: class and arguments
            model = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)

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
        # Lightning's hparams dump drops a net's init_args when all are linked, then fails to fill the links in
        # ("Expected key net.init_args.num_classes to be in data"): keep it a dict. Validated when parsed, just now.
        dump = self.parser.dump(self.config, skip_link_targets=False, skip_unset=False, skip_validation=True)
        dump = yaml.safe_load(dump)
        self.config_dump = dump[self.subcommand] if self.subcommand else dump
        if isinstance(self.config_dump["model"].get("init_args", {}).get("net"), dict):
            self.config_dump["model"]["init_args"]["net"].setdefault("init_args", {})
        self.parser.add_instantiator(TakenLinks(self), LightningModule, prepend=True)
        if config.checkpoint.filename is None and config.checkpoint.monitor:  # e.g. epoch=003-val_acc=0.9123.ckpt
            monitor, name = config.checkpoint.monitor, re.sub(r"\W", "_", config.checkpoint.monitor)
            config.checkpoint.filename = f"epoch={{epoch:03d}}-{name}={{{monitor}:.4f}}"

    def fact(self, name: str, target: str, data: LightningDataModule) -> Any:
        """A link's value: the loaded checkpoint's (predict needs no training data), else the data module's."""
        saved = (self.checkpoint or {}).get("hyper_parameters") or {}
        *owner, key = target.removeprefix("model.init_args.").split(".init_args.")
        if owner:  # the net's config: {class_path, init_args}
            net = saved.get(owner[0])
            saved = (net.get("init_args") or {}) if isinstance(net, dict) else {}
        value = saved.get(key)
        if value is None:
            value = getattr(data, name, None)
        elif name in ("num_classes", "class_names", "image_shape") and self.subcommand != "predict":
            given = getattr(data, name, None)  # new images to predict need no training data to compare with
            given = list(given) if isinstance(given, tuple) else given
            require(
                given is None or given == value,
                f"the checkpoint does not fit this model and data ({name}: {value} saved, {given} in the data): it was "
                f"trained on other data; use the config.yaml saved next to it, -c runs/<name>/version_<N>/config.yaml",
            )
        return list(value) if isinstance(value, tuple) else value

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config["trainer"]
        plugins = trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins = [*plugins, getattr(self, "checkpoint_io", None) or SafeCheckpointIO()]
        if trainer.get("precision") is not None or torch.cuda.is_available() and trainer.get("accelerator") != "cpu":
            plugins = [p for p in plugins if not isinstance(p, CPUBf16WhereNative)]  # a config's CPU default yields
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
            plugins = [*plugins, SLURMEnvironment(auto_requeue=False)]  # GracefulInterrupt requeues between steps
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if any(isinstance(c, (LearningRateFinder, BatchSizeFinder)) for c in callbacks):
            callbacks = [*callbacks, TunerResults()]  # what they found reaches the schedule, and is saved
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, EpochProgressBar()]
        if trainer.get("logger") not in (False, []):  # Lightning's LearningRateMonitor fails without a logger
            callbacks = [*callbacks, config["lr_monitor"], WandbRunId()]
        elif not trainer.get("fast_dev_run"):  # no logger, no version folder: still a folder of its own
            root = Path(trainer.get("default_root_dir") or ".") / run_name(type(config["data"]).__name__)
            kwargs["default_root_dir"] = str(next_run_dir(root, create=False))
        return super().instantiate_trainer(plugins=plugins, callbacks=callbacks, **kwargs)

    def after_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit" and config.test_after_fit:  # decided before training, not after it
            model, data = type(self.model).__name__, type(self.datamodule).__name__
            require(
                is_overridden("test_step", self.model),
                f"--test_after_fit true but {model} has no test_step; add one, or set --test_after_fit false",
            )
            require(
                getattr(self.datamodule, "has_split", lambda _: True)("test"),
                f"--test_after_fit true but {data} has no test images; add them, or set --test_after_fit false",
            )
        run_id = (self.checkpoint or {}).get("wandb_run_id") if self.subcommand == "fit" else None
        for logger in self.trainer.loggers if run_id else ():  # a resumed fit continues its W&B run
            if isinstance(logger, WandbLogger):
                logger.run_id = run_id

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit and not self.trainer.interrupted:
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


class FailedRunCleanup(Callback):
    """A command that fails before its first training step leaves no run folder (config.yaml, W&B run) behind."""

    def __init__(self) -> None:
        self.trained, self.folders = False, []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.trained = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not self.trained and trainer.is_global_zero:
            self.folders = [Path(getattr(lg, "run_dir", None) or lg.log_dir or "-") for lg in trainer.loggers]

    def remove(self) -> None:
        for folder in self.folders:
            if folder.is_dir() and not any(folder.rglob("*.ckpt")):
                shutil.rmtree(folder, ignore_errors=True)


class TakenLinks:
    """Lightning's model instantiator, told only the links the model or its net takes: Lightning would record in the
    hyperparameters also those with no such argument (an autoencoder's ``num_classes``), and the checkpoint not load."""

    def __init__(self, cli: LightningCLI) -> None:
        self.lightning = _InstantiatorFn(cli=cli, key="model")  # private: Lightning's instantiator of the model

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
        def taken(target: str) -> bool:
            *owner, name = target.removeprefix("model.init_args.").split(".init_args.")
            if not owner:
                return name in kwargs
            return owner[0] in kwargs and name in inspect.signature(type(kwargs[owner[0]])).parameters

        links = {k: v for k, v in applied_instantiation_links.items() if not k.startswith("model.") or taken(k)}
        return self.lightning(class_type, *args, applied_instantiation_links=links, **kwargs)


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
    folders = [Path(dirpath or "-"), *(f.parent / "checkpoints" for f in reversed(paths))]
    if found := next((f / "last.ckpt" for f in folders if (f / "last.ckpt").is_file()), None):
        return str(found)
    raise UserError(
        f"--ckpt_path last: no checkpoints/last.ckpt next to the given configs"
        f" ({', '.join(map(str, paths)) or 'none'}); pass the run's own config, e.g."
        " -c runs/mnist/version_0/config.yaml, or a checkpoint file path"
    )


def no_advertisement(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)  # Lightning's tip for another product, printed by every run


def quiet() -> None:
    """Silence the console lines that look like problems but are not."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(no_advertisement)  # added once
    # Lightning calls isinstance(spec, LeafSpec), deprecated by torch, on every batch transfer
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
    for message in (
        r"The `srun` command is available on your system but is not used",  # srun installed, this run not under it
        r"The dirpath has changed from",  # a run from another run's checkpoint: its own folder and top-k, as intended
        r"LightningCLI's args parameter is intended to run from within Python",  # cli_main(args) in tests, notebooks
    ):
        warnings.filterwarnings("ignore", message=message)


def default_root_dir() -> str:
    """``runs``; under SLURM ``runs/slurm-<job id>``, where a requeued job, and no other, finds its hpc_ckpt_<N>."""
    return f"runs/slurm-{slurm_job_id()}" if SLURMEnvironment.detect() else "runs"


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> CLI:
    """``python -m project``: errors the user can fix end as one ``error: ...`` line, exit code 2 (``--debug`` or
    ``PROJECT_DEBUG=1``: the traceback)."""
    argv = list(sys.argv[1:] if args is None else args)
    if args is None:  # LightningCLI reads sys.argv itself
        sys.argv[1:] = [a for a in argv if a != "--debug"]
    quiet()
    cleanup = FailedRunCleanup()
    with exit_on_user_error(debug="--debug" in argv):
        try:
            cli = CLI(
                LightningModule,
                LightningDataModule,
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
                    "callbacks": [RNGState(), NonFiniteGuard(), GracefulInterrupt(), cleanup],  # added to any list
                },
                args=None if args is None else [a for a in argv if a != "--debug"],
                run=run,
            )
        except BaseException:
            cleanup.remove()
            raise
        for logger in cli.trainer.loggers:  # one W&B run per command, finished before the next one starts
            if isinstance(logger, WandbLogger) and run:
                logger.close()
        return cli
