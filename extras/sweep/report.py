"""Inside each trial (a ``python -m project fit`` process the sweep starts): the metric after every validation goes
to the study's storage, and training stops when the study's pruner says so.

optuna-integration's ``PyTorchLightningPruningCallback`` needs the ``Trial`` object of the process that runs
``study.optimize``, raises ``TrialPruned`` out of ``fit`` and, under DDP, wants an RDB storage and a
``check_pruned()`` call after fit. Here the trial is its own process: the callback takes the storage, study and
trial number as plain arguments (``--trainer.callbacks+=`` adds it), rank 0 reports to the shared storage (journal
file or database), every rank stops together when the pruner says so, and the sweep reads the outcome back from
the storage when the process has exited.
"""

import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

REPORTER = f"{__name__}.ReportToStudy"  # its class_path
PRUNED = "sweep:pruned_at"  # system attribute: the validation the pruner stopped the trial after


def open_storage(spec: str) -> Any:
    """An Optuna storage: a database URL (``sqlite:///...``, ``postgresql://...``) or a journal file's path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(spec))


def pruner(settings: dict[str, Any] | None) -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner(**settings) if settings else optuna.pruners.NopPruner()


def load_study(storage: Any, name: str) -> Any:
    """The study with the pruner it was created for (kept in its user attributes by the sweep)."""
    import optuna

    summary = storage.get_study_user_attrs(storage.get_study_id_from_name(name))["sweep"]
    # a sampler that never writes to a trial: this process only reports
    return optuna.load_study(
        study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(), pruner=pruner(summary["pruner"])
    )


class ReportToStudy(Callback):
    """Reports the sweep's metric after each validation to trial ``trial`` of ``study`` in ``storage``, and stops
    training when the study's pruner prunes it."""

    def __init__(self, storage: str, study: str, trial: int) -> None:
        self.storage_spec, self.study_name, self.number = storage, study, trial
        self.reported, self.metric = 0, None  # the metric: set up on rank 0 of a fit

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        self.storage = open_storage(self.storage_spec)
        self.study = load_study(self.storage, self.study_name)
        self.metric = self.study.user_attrs["sweep"]["metric"]
        study_id = self.storage.get_study_id_from_name(self.study_name)
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        if self.storage.get_trial(self.trial_id).state.is_finished():  # a trial's config.yaml run again by hand
            rank_zero_warn(f"trial {self.number} of study {self.study_name} is finished: this run reports nothing")
            self.metric = None
            return
        self.storage.set_trial_user_attr(self.trial_id, "run_dir", str(trainer.log_dir))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero and self.metric and self.metric in trainer.callback_metrics:
            value = float(trainer.callback_metrics[self.metric])
            self.reported += 1  # the step Hyperband counts: validations so far
            if math.isfinite(value):
                self.storage.set_trial_intermediate_value(self.trial_id, self.reported, value)
                prune = self.study.pruner.prune(self.study, self.storage.get_trial(self.trial_id))
        if trainer.strategy.broadcast(prune):
            trainer.should_stop = True
            if trainer.is_global_zero:
                self.storage.set_trial_system_attr(self.trial_id, PRUNED, self.reported)
                rank_zero_info(f"trial {self.number} pruned by the study after validation {self.reported}")
