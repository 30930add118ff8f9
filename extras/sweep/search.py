"""The search: check the sweep against the fit's config, open (or continue) the study, run trials as processes.

Each trial is ``python -m project fit`` with the sweep's command, the fit flags given and the trial's parameters
as ``--key=value`` (as ``wandb agent`` writes them), plus a run folder of its own under the sweep's folder, W&B
grouped by study, ``--test_after_fit=false`` (the search sees validation only) and the reporting callback
(``report.py``). One process runs up to ``--workers`` trials at once; any number of processes (machines, SLURM
array tasks) share a study through its storage.

A trial's sweep process records itself and a heartbeat in the trial. A RUNNING trial whose sweep process is gone
(the same machine: its process id no longer runs; elsewhere: no heartbeat for ``STALE_S`` seconds) was
interrupted: the next sweep on the study marks it failed and runs its parameters again.
"""

import argparse
import ctypes
import fcntl
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extras.sweep import results, space
from extras.sweep.report import PRUNED, REPORTER, open_storage, pruner
from project.errors import OneLineErrors, UserError, did_you_mean, exit_on_user_error, require

OWNER, HEARTBEAT = "sweep:owner", "sweep:heartbeat"
HEARTBEAT_S, STALE_S = 30, 300
FIRST_FAILURES = 3  # the first trials of a sweep process all failing: stop and say why (a setup problem)
HOST = socket.gethostname()


def resolved_config(args: list[str]) -> dict[str, Any]:
    """``python -m project fit <args> --print_config``, in this process: the whole resolved config, or the CLI's
    one-line error as a :class:`UserError`."""
    from project.cli import cli_main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli_main(["fit", *args, "--print_config"])
        except SystemExit as exit:
            code = exit.code
    if code:
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error: ")]
        raise UserError(lines[-1].removeprefix("error: ") if lines else err.getvalue().strip()[-500:])
    return yaml.safe_load(out.getvalue())


def find_key(config: dict[str, Any], key: str) -> bool:
    """Whether ``key`` names a value of ``config``; ``init_args`` may be left out, as on the command line."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and isinstance(node.get("init_args"), dict) and part in node["init_args"]:
            node = node["init_args"][part]
        else:
            return False
    return True


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a nested config."""
    if not isinstance(config, dict) or not config:
        return [prefix]
    return [k for key, value in config.items() for k in flat_keys(value, f"{prefix}.{key}" if prefix else key)]


def check(sweep: space.Sweep, fit_args: list[str], extra: list[str]) -> dict[str, Any]:
    """The fit's resolved config with the sweep's own arguments; every parameter key must be in it, and every
    value the search can give must parse (types, choices: what ``--print_config`` checks; a class's own checks of
    a value run in the trial). Raises one :class:`UserError` naming the key."""
    config = resolved_config([*fit_args, *sweep.tail, *extra])
    keys = flat_keys(config)
    shown = f"python -m project fit {' '.join(fit_args)} --print_config"
    for p in sweep.parameters:
        require(
            find_key(config, p.key),
            f"{sweep.path}: parameter {p.key} is not a key of the fit's config{did_you_mean(p.key, keys)}; "
            f"`{shown}` shows them",
        )
    for i in range(max(len(p.picks()) for p in sweep.parameters)):
        args = [f"--{p.key}={space.cli_value(p.picks()[i % len(p.picks())])}" for p in sweep.parameters]
        try:
            resolved_config([*fit_args, *args, *sweep.tail])
        except UserError as err:
            for arg in args:
                try:
                    resolved_config([*fit_args, arg, *sweep.tail])
                except UserError as one:
                    raise UserError(f"{sweep.path}: parameter {arg.removeprefix('--')} is refused: {one}") from None
            raise UserError(f"{sweep.path}: parameters {' '.join(args)} are refused together: {err}") from None
    return config


def validations(config: dict[str, Any]) -> int | None:
    """How many times a whole trial validates (Hyperband's largest budget), when the config says."""
    trainer = config["trainer"]
    epochs, every = trainer.get("max_epochs"), trainer.get("check_val_every_n_epoch") or 1
    if not epochs or epochs < 0 or trainer.get("val_check_interval") not in (None, 1.0):
        return None
    return max(1, epochs // every)


@dataclass
class Run:
    number: int
    trial_id: int
    process: subprocess.Popen
    folder: Path
    beat: float


def die_with_sweep(sweep_pid: int, prctl: Any) -> Any:
    """For ``preexec_fn``: the trial process is killed when the sweep process dies (Linux), even by SIGKILL."""

    def setup() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != sweep_pid:  # died before that
            os._exit(1)

    return setup


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_error(log: Path) -> str | None:
    """The ``error: ...`` line a trial's fit printed last, if any."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else None


class Search:
    """Runs trials of ``study`` until ``trials`` of them are done (complete, pruned or failed by themselves)."""

    def __init__(self, sweep: space.Sweep, study: Any, storage: Any, spec: str, folder: Path, trials: int) -> None:
        import optuna

        self.optuna, self.sweep, self.study, self.storage, self.spec = optuna, sweep, study, storage, spec
        self.folder, self.trials, self.workers = folder, trials, 1
        self.fit_args: list[str] = []  # before the parameters
        self.logger_args: list[str] = []  # last
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.distributions = {p.key: p.distribution() for p in sweep.searched}
        self.fixed = [p for p in sweep.parameters if p.kind == "fixed"]
        self.names = results.short_names([p.key for p in sweep.searched])
        self.running: dict[int, Run] = {}
        self.outcomes: list[str] = []
        self.stopping, self.interrupted, self.failure = False, False, None
        libc = ctypes.CDLL(None) if sys.platform == "linux" else None
        self.prctl = libc.prctl if libc is not None else None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # see start()

    # ---- the study --------------------------------------------------------------------------------------------

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def tally(self) -> tuple[int, int]:
        """(trials done, trials running anywhere)."""
        done = running = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state.name in ("COMPLETE", "PRUNED") or (
                t.state.name == "FAIL" and results.INTERRUPTED not in t.system_attrs
            ):
                done += 1
            running += t.state.name == "RUNNING"
        return done, running

    def reached_target(self) -> bool:
        target, sign = self.sweep.target, 1 if self.sweep.goal == "maximize" else -1
        complete = [t for t in self.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        return target is not None and any(sign * (t.value - target) >= 0 for t in complete)

    def wanted(self) -> bool:
        done, running = self.tally()
        if self.reached_target():
            print(f"{self.sweep.metric} reached its target {self.sweep.target} (metric.target): no more trials")
            self.stopping = True
        return not self.stopping and done + running < self.trials

    def retry(self, trial: Any, why: str) -> None:
        """Mark a trial that was interrupted (not its own failure) failed and queue its parameters again."""
        trials = self.study.get_trials(deepcopy=False)
        if not any(t.user_attrs.get("retry_of") == trial.number for t in trials):
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        trial_id = self.trial_id(trial.number)
        self.storage.set_trial_system_attr(trial_id, results.INTERRUPTED, why)
        try:
            self.storage.set_trial_state_values(trial_id, self.optuna.trial.TrialState.FAIL)
        except (RuntimeError, self.optuna.exceptions.UpdateFinishedTrialError):
            return  # it finished meanwhile
        print(f"trial {trial.number} was interrupted ({why}): marked failed, queued to run again")

    def reclaim(self) -> None:
        """Trials left RUNNING by a sweep process that is gone."""
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            host, _, pid = str(t.system_attrs.get(OWNER, "")).rpartition(":")
            started = t.datetime_start.timestamp() if t.datetime_start else now
            if host == HOST and pid.isdigit():
                if int(pid) != os.getpid() and not alive(int(pid)):
                    self.retry(t, f"its sweep process {pid} is gone")
            elif now - float(t.system_attrs.get(HEARTBEAT, started)) > STALE_S:
                self.retry(t, f"no heartbeat from {host or 'its sweep'} for {STALE_S} s")

    # ---- trial processes --------------------------------------------------------------------------------------

    def command(self, number: int, params: dict[str, Any]) -> list[str]:
        values = {**{p.key: p.values[0] for p in self.fixed}, **params}
        reporter = {
            "class_path": REPORTER,
            "init_args": {"storage": self.spec, "study": self.study.study_name, "trial": number},
        }
        return [
            sys.executable,
            "-m",
            "project",
            "fit",
            *self.fit_args,
            *(f"--{key}={space.cli_value(value)}" for key, value in values.items()),
            *self.sweep.tail,
            f"--trainer.default_root_dir={self.folder / f'trial_{number}'}",
            "--test_after_fit=false",
            f"--trainer.callbacks+={json.dumps(reporter)}",
            *self.logger_args,
        ]

    @contextmanager
    def counting_alone(self) -> Iterator[None]:
        """Held while counting the trials and starting one: sweep processes sharing a journal file then never start
        one trial too many, nor one grid point twice. (A database's processes are not serialized.)"""
        if "://" in self.spec:
            yield
            return
        with open(f"{self.spec}.start-lock", "a") as lock:  # not optuna's own <journal>.lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def start(self) -> None:
        trial = self.study.ask(self.distributions)
        number, trial_id = trial.number, self.trial_id(trial.number)
        self.storage.set_trial_system_attr(trial_id, OWNER, f"{HOST}:{os.getpid()}")
        self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        folder = self.folder / f"trial_{number}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "fit.log", "w") as log:
            # Not an srun task of the job but a process inside it: without SLURM's variables Lightning does not
            # take ranks from SLURM, and the CLI does not look for a requeued job's checkpoint.
            process = subprocess.Popen(
                self.command(number, trial.params),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches the sweep, which passes it on once
                preexec_fn=die_with_sweep(os.getpid(), self.prctl),
            )
        self.running[number] = Run(number, trial_id, process, folder, time.monotonic())
        shown = ", ".join(f"{self.names[k]}={results.cell(v)}" for k, v in trial.params.items())
        retry = trial.user_attrs.get("retry_of")
        print(f"trial {number} started{f' (again: trial {retry})' if retry is not None else ''}: {shown}", flush=True)

    def finish(self, run: Run) -> None:
        """Tell the study how the trial's process ended."""
        code, states = run.process.returncode, self.optuna.trial.TrialState
        trial = self.storage.get_trial(run.trial_id)
        values = trial.intermediate_values
        last = values[max(values)] if values else None
        metric, log = self.sweep.metric, run.folder / "fit.log"
        if code != 0 and self.interrupted:
            self.retry(trial, "the sweep was stopped")
            return
        if code == 0 and last is not None:
            state = states.PRUNED if PRUNED in trial.system_attrs else states.COMPLETE
            self.study.tell(run.number, last if state == states.COMPLETE else None, state=state)
            said = f"{state.name.lower()} after {len(values)} validations, {metric} {last:.4f}"
        else:
            if code == 0:
                why = f"no {metric} was logged"
            else:
                why = last_error(log) or (f"exit code {code}" if code > 0 else f"killed by signal {-code}")
            self.storage.set_trial_user_attr(run.trial_id, "error", why)
            self.study.tell(run.number, state=states.FAIL)
            state, said = states.FAIL, f"failed: {why} (log: {log})"
        print(f"trial {run.number} {said}", flush=True)
        self.outcomes.append(state.name)
        if self.outcomes == ["FAIL"] * FIRST_FAILURES:  # a problem of the setup, not of the trials' values
            self.stopping = True
            self.failure = f"the first {FIRST_FAILURES} trials failed; the last: {said.removeprefix('failed: ')}"

    def run(self) -> None:
        """Start trials while more are wanted, up to ``workers`` at once; on Ctrl-C pass it on to the trials (they
        save their state and stop), a second time to stop them at once."""
        if self.workers > 1 and "OMP_NUM_THREADS" not in self.env:  # trials share the cores
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
        self.reclaim()
        while True:
            try:
                while len(self.running) < self.workers:
                    with self.counting_alone():
                        if not self.wanted():
                            break
                        self.start()
                if not self.running:
                    return
                for number, run in list(self.running.items()):
                    if run.process.poll() is not None:
                        self.finish(self.running.pop(number))
                    elif time.monotonic() - run.beat > HEARTBEAT_S:
                        self.storage.set_trial_system_attr(run.trial_id, HEARTBEAT, time.time())
                        run.beat = time.monotonic()
                time.sleep(0.5)
            except KeyboardInterrupt:
                self.stopping = self.interrupted = True
                for run in self.running.values():
                    run.process.send_signal(signal.SIGINT)
                print("stopping: the running trials save their state and stop (Ctrl-C again: at once)", flush=True)


def open_study(sweep: space.Sweep, name: str, spec: str, summary: dict[str, Any], seed: int | None) -> tuple[Any, Any]:
    """Create the study, or load it to continue: then it must be the same search with the same fit flags."""
    import optuna

    storage = open_storage(spec)
    direction = sweep.goal
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=sweep.sampler(seed),
        pruner=pruner(summary["pruner"]),
        direction=direction,
        load_if_exists=True,
    )
    summary = json.loads(json.dumps(summary))
    saved = study.user_attrs.get("sweep")
    if saved is None:
        study.set_user_attr("sweep", summary)
    elif saved != summary:
        differ = [k for k in summary if saved.get(k) != summary[k]]
        raise UserError(
            f"study {name} in {spec} was started with another {' and '.join(differ)}; continue it with the same "
            f"command, or start another with --study NEW_NAME"
        )
    return study, storage


def sweep_folder(config: dict[str, Any], name: str) -> tuple[Path, bool]:
    """``<trainer.default_root_dir>/sweep/<study>``; ``runs`` when the fit's root is the automatic one (under SLURM
    it names the job: each array task would get a folder of its own)."""
    from project.cli import default_root_dir

    root = config["trainer"].get("default_root_dir")
    given = bool(root) and root != default_root_dir()
    return Path(root if given else "runs") / "sweep" / name, given


def logger_args(sweep: space.Sweep, config: dict[str, Any], study: str) -> list[str]:
    """W&B's group (the study), project and entity for the trials, when the fit logs to W&B."""
    logger = config["trainer"].get("logger")
    if not (isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger")):
        return []
    args = [f"--trainer.logger.init_args.group={study}"]
    args += [f"--trainer.logger.init_args.project={sweep.project}"] if sweep.project else []
    args += [f"--trainer.logger.init_args.entity={sweep.entity}"] if sweep.entity else []
    return args


def search(
    sweep_file: Path,
    fit_args: list[str],
    trials: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    study: str | None = None,
    seed: int | None = None,
    command: str = "",
) -> int:
    """Run (or continue) the search; returns the exit code. ``command``: the one the user typed."""
    try:
        import optuna
    except ImportError as err:
        raise UserError(f'{err}: pip install -e ".[sweep]" installs it') from err
    sweep = space.load(sweep_file)
    for note in sweep.notes:
        print(f"note: {note}", file=sys.stderr)
    name = study or sweep.name or sweep_file.stem
    require(re.fullmatch(r"[\w.-]+", name), f"--study {name!r}: use letters, digits, '.', '-' and '_' only")
    fit_args = [*sweep.head, *fit_args]
    probe = {"class_path": REPORTER, "init_args": {"storage": "-", "study": name, "trial": 0}}
    config = check(sweep, fit_args, [f"--trainer.callbacks+={json.dumps(probe)}"])
    if trials is None:
        require(
            sweep.method == "grid" or sweep.run_cap,
            f"--trials N: how many trials to run ({sweep_file} has no run_cap and is not a grid)",
        )
        trials = sweep.grid_size() if sweep.method == "grid" else sweep.run_cap
    if sweep.method == "grid" and trials > sweep.grid_size():
        print(f"note: the grid has {sweep.grid_size()} points: {sweep.grid_size()} trials", file=sys.stderr)
        trials = sweep.grid_size()
    folder, root_given = sweep_folder(config, name)
    spec = storage or str(folder / "study.journal")
    pruning = sweep.pruner_settings(validations(config))
    if sweep.hyperband and not pruning:
        print(f"note: trials validate {validations(config)} times: too few for Hyperband to stop any", file=sys.stderr)
    summary = {
        "metric": sweep.metric,
        "pruner": pruning,
        "search": sweep.description(),
        "fit": [*fit_args, *sweep.tail],
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module prints a line per trial
    opened, store = open_study(sweep, name, spec, summary, seed)
    print(f"study {name} in {spec}: {trials} trials, {workers} at a time; trial folders in {folder}", flush=True)
    runner = Search(sweep, opened, store, spec, folder, trials)
    runner.fit_args, runner.logger_args, runner.workers = fit_args, logger_args(sweep, config, name), workers
    runner.run()
    results.report(opened, [p.key for p in sweep.searched], folder, config, root_given)
    if runner.failure:
        raise UserError(runner.failure)
    if runner.interrupted:
        done, _ = runner.tally()
        print(f"interrupted with {done} of {trials} trials done; the same command continues: {command}", flush=True)
        return 1
    return 0


OPTIONS = ("--trials", "--workers", "--storage", "--study", "--seed")


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """The sweep's own arguments (the YAML, then ``OPTIONS``, ``--help``) and the rest, the fit flags."""
    own, fit, i = argv[:1], [], 1
    while i < len(argv):
        word = argv[i]
        take = 1 if "=" in word or word in ("-h", "--help") else 2
        if word.split("=", 1)[0] in (*OPTIONS, "-h", "--help"):
            own += argv[i : i + take]
            i += take
        else:
            fit.append(word)
            i += 1
    return own, fit


def main(argv: list[str] | None = None) -> None:
    """``python -m extras.sweep SWEEP.yaml [--trials N] [--workers N] [--storage URL] [--study NAME] [--seed S]
    [fit flags]``; a problem the user can fix is one ``error:`` line and exit code 2 (``--debug``: the traceback)."""
    from jsonargparse import ArgumentParser, DefaultHelpFormatter
    from jsonargparse.typing import PositiveInt

    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error(debug="--debug" in argv):
        own, fit = split([a for a in argv if a != "--debug"])
        parser = type("Parser", (OneLineErrors, ArgumentParser), {})(
            prog="python -m extras.sweep",
            description=sys.modules["extras.sweep"].__doc__,
            formatter_class=type("Help", (DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter), {}),
        )
        parser.add_argument("sweep", type=str, help="a W&B sweep YAML, e.g. configs/sweep/fashion_mnist.yaml")
        parser.add_argument(
            "--trials", type=PositiveInt | None, help="trials to finish (default: run_cap, or the grid)"
        )
        parser.add_argument("--workers", type=PositiveInt, default=1, help="trials at once on this machine")
        parser.add_argument("--storage", type=str | None, help="database URL or journal file (default: in the folder)")
        parser.add_argument("--study", type=str | None, help="the study's name (default: the YAML's name or stem)")
        parser.add_argument("--seed", type=int | None, help="the sampler's seed (one sweep process only)")
        options = parser.parse_args(own)
        code = search(
            Path(options.sweep),
            fit,
            options.trials,
            options.workers,
            options.storage,
            options.study,
            options.seed,
            command=shlex.join(["python", "-m", "extras.sweep", *argv]),
        )
    sys.exit(code)
