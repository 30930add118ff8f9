"""Measure every section with its script's default arguments, then rewrite BENCHMARKS.md whole from the results.

    python bench/all.py                          # every section (about 100 min on 2 CPU cores), then BENCHMARKS.md
    python bench/all.py --only overhead          # one script (or several: --only startup,data_path); keep the rest
    python bench/all.py --render                 # measure nothing: rewrite BENCHMARKS.md from bench/results/*.json
    python bench/all.py --results DIR --output PATH   # other places, for trying things out

Each section's script stores its figures, arguments and provenance (machine, versions, date, commit) in
``bench/results/<section>.json``; this file turns those into BENCHMARKS.md and nothing else writes it.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import PYTHON, RESULTS, ROOT

# (script, title, render, summary), in the order of BENCHMARKS.md; a script may give several sections
SECTIONS = [
    ("main_job", "Main job", "render", "summary"),
    ("time_to_accuracy", "Time to accuracy", "render", "summary"),
    ("overhead", "Overhead", "render", "summary"),
    ("overhead", "Memory", "render_memory", "summary_memory"),
    ("startup", "Start-up", "render", "summary"),
    ("data_path", "Data path", "render", "summary"),
    ("distill", "Distillation", "render", "summary"),
    ("quantize", "int8 quantization", "render", "summary"),
    ("serve", "Serving", "render", "summary"),
    ("sweep", "Sweep", "render", "summary"),
    ("gpu", "GPU", "render", "summary"),
]
SCRIPTS = list(dict.fromkeys(s for s, *_ in SECTIONS))

HEADER = """# Benchmarks

Written by `python bench/all.py` from `bench/results/*.json`; nothing here is typed by hand. Every figure comes from
the script named in its section, run with its default arguments (a section says so when not), and each section
ends with the command that measures it again alone. Side-by-side figures alternate the two sides (A B A B ...)
and give the median and the spread (min–max) of the runs. A goal is **met** or **not met** only when every run
of one side lies on the same side of the goal as every run of the other (scaled by the goal); when the ranges
overlap the spread is wider than the difference and the verdict is **not shown**.
"""


def measure(script: str, results: Path) -> bool:
    print(f"== {script}", flush=True)
    start = time.time()
    done = subprocess.run([PYTHON, str(ROOT / "bench" / f"{script}.py"), "--results", str(results)], cwd=ROOT)
    print(f"== {script}: {'done' if done.returncode == 0 else 'FAILED'} in {(time.time() - start) / 60:.1f} min")
    return done.returncode == 0


def describe(p: dict) -> str:
    gpu = p["gpu"] or "no GPU"
    v = p["versions"]
    return (
        f"{p['cores']} CPU cores ({p['cpu']}), {gpu}; Python {v['python']}, torch {v['torch']}, "
        f"torchvision {v['torchvision']}, lightning {v['lightning']}"
    )


def code(p: dict) -> str:
    dirty = {True: " (tree dirty: uncommitted changes)", False: " (clean tree)", None: ""}[p["dirty"]]
    return f"commit `{p['commit']}`{dirty}"


def render(results: Path, output: Path) -> str:
    loaded = {s: json.loads((results / f"{s}.json").read_text()) for s in SCRIPTS if (results / f"{s}.json").exists()}
    for r in loaded.values():
        if r.get("plot"):  # images are linked relative to the written file
            r["plot"] = os.path.relpath(results / r["plot"], output.resolve().parent)
    provs = [r["provenance"] for r in loaded.values()]
    machines, codes = sorted({describe(p) for p in provs}), sorted({code(p) for p in provs})
    dates = sorted(p["date"] for p in provs)
    parts = [HEADER]
    if provs:
        varies = "differs between sections: "
        parts.append(
            f"Machine: {machines[0] if len(machines) == 1 else varies + '; '.join(machines)}.  \n"
            f"Code: {codes[0] if len(codes) == 1 else varies + '; '.join(codes)}.  \n"
            f"Measured: {dates[0]}{' to ' + dates[-1] if dates[-1] != dates[0] else ''}.\n"
        )
    rows = []
    for script, title, _, summary in SECTIONS:
        if script in loaded:
            goal, figure, verdict = getattr(importlib.import_module(script), summary)(loaded[script])
            verdict += "" if loaded[script]["default_args"] else " (not the default arguments)"
            rows.append(f"| [{title}](#{title.lower().replace(' ', '-')}) | {goal} | {figure} | {verdict} |")
        else:
            rows.append(f"| {title} | | not measured yet | |")
    parts.append("| section | goal | median figure | verdict |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    for script, title, render_name, _ in SECTIONS:
        if script in loaded:
            body = getattr(importlib.import_module(script), render_name)(loaded[script])
        else:
            body = f"\nNot measured yet: `python bench/all.py --only {script}`.\n"
        parts.append(f"## {title}\n{body}")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated scripts to measure: {', '.join(SCRIPTS)}")
    p.add_argument("--render", action="store_true", help="measure nothing, only rewrite the file")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    chosen = [] if args.render else args.only.split(",") if args.only else SCRIPTS
    chosen = list(dict.fromkeys("overhead" if name == "memory" else name for name in chosen))  # Memory: overhead.py
    unknown = set(chosen) - set(SCRIPTS)
    if unknown:
        p.error(f"unknown section {', '.join(sorted(unknown))}; choose from {', '.join(SCRIPTS)}")
    if chosen and os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: the machine is busy, timings will be off", flush=True)
    failed = [script for script in chosen if not measure(script, args.results)]
    args.output.write_text(render(args.results, args.output))
    print(f"wrote {args.output}" + (f"; FAILED: {', '.join(failed)} (their old results kept)" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
