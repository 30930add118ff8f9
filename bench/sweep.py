"""Hyperband pruning in the Optuna sweep, on real Fashion-MNIST: the same TPE search of the fast recipe
(``configs/sweep/fashion_mnist_fast.yaml``, 4 epochs a trial) with and without ``early_terminate: hyperband``.
Does pruning save training epochs without losing the best configuration?

Both searches run ``python -m extras.sweep`` with the same trial count, sampler seed and ``--workers`` (trials at
once, one torch thread each), each trial a fresh ``python -m project fit`` process (CSV logger). Epochs are the
validations each trial ran (a pruned trial stops early); the best val/acc is that of the best complete trial, read
back from the study.

    python bench/sweep.py [--trials 16] [--seed 0] [--workers 2]    # about 30 min on 2 idle CPU cores
"""

import re
import shutil
import time
from pathlib import Path

import yaml
from common import PYTHON, ROOT, child_env, footer, parser, prepare_fashion_mnist, provenance, save, timed
from quantize import workspace

NAME, TITLE = "sweep", "Sweep"
SWEEP = "configs/sweep/fashion_mnist_fast.yaml"
CSV = "configs/logger/csv.yaml"
EPOCH_GOAL, POINTS_GOAL = 0.6, 0.3  # pruned: <= 60% of the epochs, best val/acc within 0.3 points


def search(folder: Path, sweep: Path, study: str, args) -> dict:
    """One search to its end; what its study holds."""
    import optuna

    from extras.sweep.report import open_storage

    cmd = [PYTHON, "-m", "extras.sweep", str(sweep), f"--study={study}", *flags(args)]
    done = timed(cmd, cwd=folder, env=child_env(OMP_NUM_THREADS="1"))
    journal = folder / "runs" / "sweep" / study / "study.journal"
    loaded = optuna.load_study(study_name=study, storage=open_storage(str(journal)))
    trials_seen = [
        {"trial": t.number, "state": t.state.name.lower(), "epochs": len(t.intermediate_values), "value": t.value}
        for t in loaded.get_trials(deepcopy=False)
    ]
    assert not re.search(r"^trial \d+ failed", done["output"], re.M), done["output"][-3000:]
    return {
        "minutes": round(done["wall"] / 60, 1),
        "epochs": sum(t["epochs"] for t in trials_seen),
        "pruned": sum(t["state"] == "pruned" for t in trials_seen),
        "best_val_acc": loaded.best_value,
        "best_params": loaded.best_params,
        "trials": trials_seen,
    }


def flags(args) -> list[str]:
    return [
        f"--trials={args.trials}",
        f"--seed={args.seed}",
        f"--workers={args.workers}",
        "-c",
        "configs/logger/csv.yaml",
    ]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--trials", type=int, default=16, help="trials of each search")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed, the same for both searches")
    p.add_argument("--workers", type=int, default=2, help="trials at once, one torch thread each")
    args = p.parse_args()
    started, prov = time.time(), provenance()
    prepare_fashion_mnist()
    folder = workspace("bench-sweep-")
    try:
        spec = yaml.safe_load((ROOT / SWEEP).read_text())
        plain = dict(spec)
        plain.pop("early_terminate")
        (folder / "no_pruning.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
        sides = {}
        for side, sweep in (("hyperband", ROOT / SWEEP), ("no_pruning", folder / "no_pruning.yaml")):
            sides[side] = search(folder, sweep, side, args)
            s = sides[side]
            print(f"  {side}: {s['epochs']} epochs, best val/acc {s['best_val_acc']:.4f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    hyperband, full = sides["hyperband"], sides["no_pruning"]
    data = {
        "sweep": SWEEP,
        "early_terminate": spec["early_terminate"],
        **sides,
        "epoch_ratio": hyperband["epochs"] / full["epochs"],
        "gap_points": (full["best_val_acc"] - hyperband["best_val_acc"]) * 100,
    }
    print(render(save(NAME, p, args, prov, data, started)))


def judge(r: dict) -> str:
    return "met" if r["epoch_ratio"] <= EPOCH_GOAL and r["gap_points"] <= POINTS_GOAL else "not met"


def summary(r: dict) -> tuple[str, str, str]:
    goal = f"Hyperband: <= {EPOCH_GOAL:.0%} of the epochs, best val/acc within {POINTS_GOAL} points"
    h, f = r["hyperband"], r["no_pruning"]
    figure = f"{r['epoch_ratio']:.0%} of the epochs, {h['best_val_acc']:.2%} vs {f['best_val_acc']:.2%}"
    return goal, figure, judge(r)


def render(r: dict) -> str:
    h, f = r["hyperband"], r["no_pruning"]
    et = ", ".join(f"{k}: {v}" for k, v in r["early_terminate"].items())
    rows = "\n".join(
        f"| {name} | {s['epochs']} | {s['pruned']} of {len(s['trials'])} | {s['best_val_acc']:.2%} | {s['minutes']} |"
        for name, s in (("with Hyperband", h), ("without pruning", f))
    )
    a = r["args"]
    command = f"python -m extras.sweep {r['sweep']} --trials {a['trials']} --seed {a['seed']} --workers {a['workers']}"
    return f"""
`{command} -c {CSV}`
(TPE on max_lr, weight decay, batch size and label smoothing of the fast recipe, 4 epochs a trial, {a["workers"]}
trials at once with one torch thread each) with the YAML's `early_terminate` ({et}) and with it removed, one search
after the other, the same sampler seed. Epochs: the validations each trial ran, summed; best val/acc: the best
complete trial (2,000 validation images). Wall time includes every trial's start-up.

| search | epochs trained | trials pruned | best val/acc | minutes |
|---|---|---|---|---|
{rows}

Hyperband spent **{r["epoch_ratio"]:.0%}** of the epochs (goal <= {EPOCH_GOAL:.0%}); the best val/acc without
pruning minus the best with it: **{r["gap_points"]:+.2f} points** (goal <= {POINTS_GOAL}): **{judge(r)}** (one
search each: how much a search's outcome varies with its seed is not measured).

{footer(r)}
"""


if __name__ == "__main__":
    main()
