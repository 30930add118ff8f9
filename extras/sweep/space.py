"""The W&B sweep YAML, read for Optuna: ``method`` -> sampler, ``parameters`` -> distributions, ``metric`` -> the
value and direction, ``early_terminate`` -> the pruner, ``command`` -> the trial's ``python -m project fit``.

A key W&B knows that Optuna cannot follow without changing the search (a normal or beta distribution, nested
parameters, another ``${args...}`` form) is an error naming it; one that changes nothing searched here (``controller``,
``probabilities``, ``strict``) is one note line; a key W&B does not know is an error (a typo).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from project.errors import UserError, did_you_mean, require

TOP = {"method", "metric", "parameters", "early_terminate", "command", "program", "project", "entity", "name"}
TOP |= {"description", "run_cap"}
TOP_NOT_HERE = {"controller", "job", "image_uri"}  # W&B's own controller and W&B Launch
PARAM = {"values", "value", "distribution", "min", "max", "q"}
PARAM_NOT_HERE = {"probabilities"}  # Optuna draws categorical values uniformly
PARAM_CANNOT = {"mu", "sigma", "a", "b", "parameters"}
DISTRIBUTIONS = {"constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values"}
W_AND_B_ONLY = {  # W&B distributions Optuna has no equivalent for
    "q_log_uniform",
    "q_log_uniform_values",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
    "beta",
    "q_beta",
}
HYPERBAND = {"type", "min_iter", "max_iter", "s", "eta"}


@dataclass
class Parameter:
    """One searched key: ``kind`` is an Optuna distribution name (``categorical``, ``float``, ``int``) or ``fixed``."""

    key: str
    kind: str
    values: list[Any] = field(default_factory=list)  # categorical choices, or the fixed value
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(self.values)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list[Any]:
        """Every value a grid search tries."""
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1))
        if self.kind == "float" and self.step:
            return [self.low + i * self.step for i in range(int(round((self.high - self.low) / self.step)) + 1)]
        return list(self.values)

    def picks(self) -> list[Any]:
        """Values that cover what the search can give: each choice, or both ends of a range."""
        return list(self.values) if self.kind in ("categorical", "fixed") else [self.low, self.high]


@dataclass
class Sweep:
    path: Path
    method: str
    metric: str
    goal: str  # maximize | minimize
    parameters: list[Parameter]
    head: list[str]  # the command's words before ${args}: the fit's own arguments (after `-m project fit`)
    tail: list[str]  # after ${args}
    hyperband: dict[str, Any] | None = None  # min_iter, max_iter, eta as given
    target: float | None = None
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    run_cap: int | None = None
    notes: list[str] = field(default_factory=list)  # keys followed only by W&B

    @property
    def searched(self) -> list[Parameter]:
        return [p for p in self.parameters if p.kind != "fixed"]

    def grid_size(self) -> int:
        return math.prod(len(p.grid()) for p in self.searched)

    def sampler(self, seed: int | None = None) -> Any:
        import optuna

        if self.method == "grid":
            return grid_sampler()({p.key: p.grid() for p in self.searched}, seed=seed)
        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def pruner_settings(self, validations: int | None) -> dict[str, Any] | None:
        """``HyperbandPruner`` arguments for W&B's early termination: a trial is checked after ``min_iter`` x
        ``eta``^k validations and stopped unless in the top 1/``eta`` there, as W&B checks its runs: one bracket
        (``max_resource`` = ``min_resource``). With ``max_iter`` and ``s`` instead: ``min_iter`` = ``max_iter`` /
        ``eta``^``s``. None: nothing to prune (none asked for, or trials that end by the first check)."""
        if self.hyperband is None:
            return None
        eta, low = self.hyperband.get("eta", 3), self.hyperband.get("min_iter")
        if low is None and self.hyperband.get("max_iter") and self.hyperband.get("s"):
            low = max(1, round(self.hyperband["max_iter"] / eta ** self.hyperband["s"]))
        low = low or 1
        if validations is not None and validations <= low:
            return None
        return {"min_resource": low, "max_resource": low, "reduction_factor": eta}

    def description(self) -> dict[str, Any]:
        """What a study must keep to be continued: the search itself."""
        return {
            "method": self.method,
            "metric": self.metric,
            "goal": self.goal,
            "parameters": {p.key: [p.kind, p.values, p.low, p.high, p.log, p.step] for p in self.parameters},
            "hyperband": self.hyperband,
        }


def grid_sampler() -> type:
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, *args: Any) -> None:
            """Optuna's calls ``study.stop()``, which works inside ``optimize`` only; the sweep counts trials itself."""

    return GridSampler


def load(path: Path) -> Sweep:
    """Read and check a sweep YAML; raises :class:`UserError` naming the key at fault."""
    require(
        path.is_file(), f"sweep file not found: {path}; pass a W&B sweep YAML such as configs/sweep/fashion_mnist.yaml"
    )
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({' '.join(str(err).split())[:160]}); fix the file") from err
    require(isinstance(spec, dict), f"{path}: a sweep YAML is a mapping with method, metric and parameters")
    notes = []
    for key in spec:
        if key in TOP_NOT_HERE:
            notes.append(f"{path}: '{key}' is used by W&B only; ignored here")
        elif key not in TOP | TOP_NOT_HERE:
            raise UserError(f"{path}: unknown key '{key}'{did_you_mean(key, sorted(TOP))}; see W&B's sweep keys")
    method = spec.get("method")
    require(
        method in ("grid", "random", "bayes"),
        f"{path}: method must be grid, random or bayes, got {method!r}",
    )
    metric = spec.get("metric")
    require(
        isinstance(metric, dict) and isinstance(metric.get("name"), str),
        f"{path}: metric needs a name, e.g. metric: {{name: val/acc, goal: maximize}}",
    )
    goal = metric.get("goal", "minimize")  # W&B's default
    require(goal in ("maximize", "minimize"), f"{path}: metric.goal must be maximize or minimize, got {goal!r}")
    unknown = set(metric) - {"name", "goal", "target"}
    require(not unknown, f"{path}: metric has unknown keys {sorted(unknown)}; it takes name, goal and target")
    params = spec.get("parameters")
    require(isinstance(params, dict) and params, f"{path}: no parameters to search; add a parameters: mapping")
    parameters = [parameter(path, key, value, notes) for key, value in params.items()]
    require(any(p.kind != "fixed" for p in parameters), f"{path}: every parameter is a single value; nothing to search")
    if method == "grid":
        for p in parameters:
            require(
                p.kind != "float" or p.step,
                f"{path}: grid search needs a list of values for each parameter; {p.key} is a continuous range",
            )
    head, tail = command(path, spec)
    run_cap = spec.get("run_cap")
    require(run_cap is None or (isinstance(run_cap, int) and run_cap > 0), f"{path}: run_cap must be a positive int")
    return Sweep(
        path=path,
        method=method,
        metric=metric["name"],
        goal=goal,
        parameters=parameters,
        head=head,
        tail=tail,
        hyperband=hyperband(path, spec.get("early_terminate"), notes),
        target=metric.get("target"),
        project=spec.get("project"),
        entity=spec.get("entity"),
        name=spec.get("name"),
        run_cap=run_cap,
        notes=notes,
    )


def parameter(path: Path, key: str, spec: Any, notes: list[str]) -> Parameter:
    where = f"{path}: parameter {key}"
    require(isinstance(spec, dict), f"{where}: give values, value, or distribution with min and max")
    for name in spec:
        if name in PARAM_CANNOT:
            hint = "write the full dotted key instead" if name == "parameters" else "Optuna has no such distribution"
            raise UserError(f"{where}: '{name}' cannot be followed by Optuna ({hint})")
        if name in PARAM_NOT_HERE:
            notes.append(f"{where}: '{name}' is used by W&B only; Optuna tries each value equally often")
        elif name not in PARAM:
            raise UserError(f"{where}: unknown key '{name}'{did_you_mean(name, sorted(PARAM))}")
    kind = spec.get("distribution")
    if kind is None:  # W&B infers it
        if "values" in spec:
            kind = "categorical"
        elif "value" in spec:
            kind = "constant"
        elif isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
            kind = "int_uniform"
        else:
            kind = "uniform"
    if kind in W_AND_B_ONLY:
        raise UserError(
            f"{where}: Optuna has no {kind} distribution; use values, uniform, int_uniform, q_uniform, "
            "log_uniform or log_uniform_values"
        )
    require(
        kind in DISTRIBUTIONS, f"{where}: unknown distribution {kind!r}{did_you_mean(str(kind), sorted(DISTRIBUTIONS))}"
    )
    if kind == "constant":
        require("value" in spec, f"{where}: a constant needs value:")
        return Parameter(key, "fixed", [spec["value"]])
    if kind == "categorical":
        values = spec.get("values")
        require(isinstance(values, list) and values, f"{where}: values must be a non-empty list")
        if len(values) == 1:
            return Parameter(key, "fixed", values)
        values = [tuple(v) if isinstance(v, list) else v for v in values]  # Optuna's choices must be hashable
        require(len(set(map(repr, values))) == len(values), f"{where}: values has repeats")
        return Parameter(key, "categorical", values)
    low, high = spec.get("min"), spec.get("max")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    require(numbers and low < high, f"{where}: {kind} needs numbers min < max, got min {low!r}, max {high!r}")
    if kind == "int_uniform":
        require(isinstance(low, int) and isinstance(high, int), f"{where}: int_uniform needs int min and max")
        return Parameter(key, "int", low=low, high=high)
    if kind == "log_uniform":  # W&B: min and max are natural logs
        return Parameter(key, "float", low=math.exp(low), high=math.exp(high), log=True)
    if kind == "log_uniform_values":
        require(low > 0, f"{where}: log_uniform_values needs min > 0, got {low}")
        return Parameter(key, "float", low=float(low), high=float(high), log=True)
    step = spec.get("q") if kind == "q_uniform" else None
    require(kind != "q_uniform" or (isinstance(step, (int, float)) and step > 0), f"{where}: q_uniform needs q > 0")
    return Parameter(key, "float", low=float(low), high=float(high), step=step)


def hyperband(path: Path, spec: Any, notes: list[str]) -> dict[str, Any] | None:
    if spec is None:
        return None
    where = f"{path}: early_terminate"
    require(
        isinstance(spec, dict) and spec.get("type") == "hyperband",
        f"{where}: only type: hyperband is known (W&B's one early termination)",
    )
    for name in spec:
        if name == "strict":
            notes.append(f"{where}: 'strict' is used by W&B only; Optuna's Hyperband pruner has its own rule")
        elif name not in HYPERBAND:
            raise UserError(f"{where}: unknown key '{name}'{did_you_mean(name, sorted(HYPERBAND))}")
    for name in ("min_iter", "max_iter", "s"):
        require(
            spec.get(name) is None or (isinstance(spec[name], int) and spec[name] >= 1),
            f"{where}: {name} must be a positive int",
        )
    eta = spec.get("eta", 3)
    require(isinstance(eta, int) and eta >= 2, f"{where}: eta must be an int of at least 2, got {eta!r}")
    return {k: v for k, v in spec.items() if k in HYPERBAND - {"type"}}


def command(path: Path, spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The fit arguments of the YAML's ``command`` around ``${args}`` (W&B's default without one:
    ``${env} ${interpreter} ${program} ${args}``; without a program either: ``-m project fit ${args}``)."""
    words = spec.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    require(isinstance(words, list), f"{path}: command must be a list of words")
    program = spec.get("program")
    out: list[str] = []
    for word in map(str, words):
        if word in ("${env}", "${interpreter}"):
            continue
        if word == "${program}":
            out += [str(program)] if program else ["-m", "project", "fit"]
        elif word.startswith("${") and word != "${args}":
            raise UserError(
                f"{path}: command word {word} cannot be followed here: the trial takes --key=value (${{args}})"
            )
        else:
            out.append(word)
    require(
        out[:3] == ["-m", "project", "fit"],
        f"{path}: the command must run python -m project fit (each trial is a fit), got {' '.join(out[:3])}",
    )
    out = out[3:]
    if "${args}" not in out:
        return out, []
    return out[: out.index("${args}")], out[out.index("${args}") + 1 :]


def cli_value(value: Any) -> str:
    """A value as ``wandb agent`` writes it after ``--key=``, readable by the project's CLI."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(cli_value(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)
