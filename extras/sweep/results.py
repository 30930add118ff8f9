"""What a search leaves for a person: a Rich table of the trials, the same as CSV, ``best.yaml`` (the best trial's
whole config, which ``python -m project fit -c best.yaml`` re-runs) and Optuna's plots as PNG."""

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from extras.sweep.report import REPORTER
from project.files import atomic_write

INTERRUPTED = "sweep:interrupted"


def short_names(keys: list[str]) -> dict[str, str]:
    """``model.init_args.optimizer.init_args.lr`` -> ``lr``: the shortest tail (without ``init_args``) that is
    unique among ``keys``."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] for k in keys}
    names = {}
    for key, words in parts.items():
        for n in range(1, len(words) + 1):
            tail = words[-n:]
            if sum(other[-n:] == tail for other in parts.values()) == 1:
                break
        names[key] = ".".join(tail)
    return names


def state(trial: Any) -> str:
    """complete, pruned, failed, interrupted (to run again), running, or queued."""
    if trial.state.name == "FAIL":
        return "interrupted" if INTERRUPTED in trial.system_attrs else "failed"
    return "queued" if trial.state.name == "WAITING" else trial.state.name.lower()


def rows(study: Any, keys: list[str]) -> list[dict[str, Any]]:
    """One row per trial: number, state, the metric (the last reported for pruned trials), epochs (validations
    reported), seconds, the parameters, the run folder and the error of a failed trial."""
    out = []
    for t in study.get_trials(deepcopy=False):
        end = t.datetime_complete
        params = t.params or t.system_attrs.get("fixed_params", {})  # a queued trial's: given, not sampled yet
        out.append(
            {
                "trial": t.number,
                "state": state(t),
                "value": t.value,
                "epochs": len(t.intermediate_values),
                "seconds": round((end - t.datetime_start).total_seconds(), 1) if end and t.datetime_start else None,
                **{key: params.get(key) for key in keys},
                "run_dir": t.user_attrs.get("run_dir"),
                "error": t.user_attrs.get("error"),
            }
        )
    return out


def table(data: list[dict[str, Any]], keys: list[str], metric: str, best: int | None) -> Table:
    names = short_names(keys)
    grid = Table(title=f"{len(data)} trials", title_justify="left")
    for column in ["trial", "state", metric, "epochs", "time", *(names[k] for k in keys)]:
        grid.add_column(column, justify="left" if column == "state" else "right")
    for row in data:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f} s"
        cells = [str(row["trial"]), row["state"], value, str(row["epochs"]), seconds]
        cells += [cell(row[k]) for k in keys]
        grid.add_row(*cells, style="bold green" if row["trial"] == best else None)
    return grid


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_csv(path: Path, data: list[dict[str, Any]], metric: str) -> None:
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        header = list(data[0]) if data else ["trial", "state", "value"]
        writer.writerow([metric if h == "value" else h for h in header])
        writer.writerows([[row[h] for h in header] for row in data])


def best_config(run_dir: Path, base: dict[str, Any], root_given: bool) -> dict[str, Any]:
    """The trial's saved ``config.yaml`` with what the sweep added taken out again: its reporting callback, its
    run folder, its W&B group and its ``test_after_fit: false`` (trials are judged on validation only)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    trainer = config["trainer"]
    callbacks = trainer.get("callbacks") or []
    kept = [c for c in callbacks if not (isinstance(c, dict) and c.get("class_path") == REPORTER)]
    trainer["callbacks"] = kept or None
    if root_given:
        trainer["default_root_dir"] = base["trainer"]["default_root_dir"]
    else:
        trainer.pop("default_root_dir", None)
    logger, base_logger = trainer.get("logger"), base["trainer"].get("logger")
    if isinstance(logger, dict) and isinstance(base_logger, dict) and "group" in logger.get("init_args", {}):
        logger["init_args"]["group"] = base_logger.get("init_args", {}).get("group")
    config["test_after_fit"] = base.get("test_after_fit", False)
    return config


def write_best(folder: Path, study: Any, base: dict[str, Any], root_given: bool) -> tuple[Any, Path | None] | None:
    """The best complete trial, and ``best.yaml`` when its run folder is on this machine."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    best = study.best_trial
    run_dir = Path(best.user_attrs["run_dir"])
    if not (run_dir / "config.yaml").is_file():  # run by another machine, on its own disk
        return best, None
    path = folder / "best.yaml"
    header = (
        f"# The best trial of study {study.study_name}: trial {best.number}, {study.user_attrs['sweep']['metric']} "
        f"{best.value:.6g} (run folder {run_dir}).\n#   python -m project fit -c {path}\n"
    )
    with atomic_write(path, "w") as f:
        f.write(header + yaml.safe_dump(best_config(run_dir, base, root_given), sort_keys=False))
    return best, path


def write_plots(folder: Path, study: Any) -> tuple[list[Path], list[str]]:
    """Optimization history, parameter importances and each trial's metric per validation, as PNG files; and why a
    plot was left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots
    except ImportError:
        return [], ['no plots: matplotlib is not installed (pip install -e ".[sweep]" installs it)']
    done, skipped = [], []
    finished = [t for t in study.get_trials(deepcopy=False) if t.value is not None and math.isfinite(t.value)]
    for name, draw, needs in (
        ("history", plots.plot_optimization_history, 1),
        ("importances", plots.plot_param_importances, 2),
        ("intermediate", plots.plot_intermediate_values, 1),
    ):
        if len(finished) < needs:
            skipped.append(f"no {name}.png: it needs {needs} finished trial{'s' if needs > 1 else ''}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances of parameters that never varied
                skipped.append(f"no {name}.png: {err}")
                continue
        figure = axes.figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        with atomic_write(folder / f"{name}.png") as f:
            figure.savefig(f, format="png", dpi=100)
        plt.close(figure)
        done.append(folder / f"{name}.png")
    return done, skipped


def report(study: Any, keys: list[str], folder: Path, base: dict[str, Any], root_given: bool) -> None:
    """Print the table and write the CSV, best.yaml and plots into ``folder``; say where."""
    metric = study.user_attrs["sweep"]["metric"]
    data = rows(study, keys)
    best = write_best(folder, study, base, root_given)
    console = Console()
    if not console.is_terminal:  # a log file: no 80-column wrapping
        console.width = 160
    console.print(table(data, keys, metric, best[0].number if best else None))
    write_csv(folder / "trials.csv", data, metric)
    plots, skipped = write_plots(folder, study)
    for line in skipped:
        print(f"note: {line}")
    print(f"results: {', '.join(str(p) for p in [folder / 'trials.csv', *plots])}")
    if best is None:
        print("best: no trial completed yet")
        return
    trial, path = best
    again = f"re-run it: python -m project fit -c {path}"
    if path is None:
        again = f"no best.yaml: its run folder {trial.user_attrs['run_dir']} is not on this machine"
    print(f"best: trial {trial.number}, {metric} {trial.value:.4f}; {again}")
