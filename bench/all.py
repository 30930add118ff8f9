"""Measure every section with its script's default arguments, then rewrite BENCHMARKS.md whole from the results.

    python bench/all.py                          # every section (about 100 min on 2 CPU cores), then BENCHMARKS.md
    python bench/all.py --only overhead          # one script (or several: --only startup,data_path); keep the rest
    python bench/all.py --render                 # measure nothing: rewrite BENCHMARKS.md from bench/results/
    python bench/all.py --results DIR --output PATH   # other places, for trying things out

Each section's script stores its figures, arguments and provenance (machine, versions, date, commit) in
``bench/results/<machine type>/<section>.json`` (a run replaces only its own machine's files); this file turns all
machines' files into BENCHMARKS.md and nothing else writes it.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import NOT_RECORDED, PYTHON, RESULTS, ROOT, SPEED_FLAGS

# (script, title, render, summary), in the order of BENCHMARKS.md; a script may give several sections
SECTIONS = [
    ("main_job", "Main job", "render", "summary"),
    ("time_to_accuracy", "Time to accuracy", "render", "summary"),
    ("overhead", "Overhead", "render", "summary"),
    ("overhead", "Memory", "render_memory", "summary_memory"),
    ("levers", "Levers", "render", "summary"),
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

Written by `python bench/all.py` from `bench/results/<machine type>/*.json`; nothing here is typed by hand. Every
figure comes from the script named in its section, run with its default arguments (a section says so when not), and
each section ends with the command that measures it again alone. A machine type is the CPU model, its widest vector
unit and its native bf16 flag (`amd-epyc-avx2`, `intel-xeon-avx512f-amx_bf16`; `amd-epyc`: measured before flags
were recorded, faster than `amd-epyc-avx2` on the same scripts (compare their tables), so another generation): each
has its own results folder, its own summary table and its own block in each section, newest first, headed by the
machine and the code measured; a run rewrites only its own machine's folder. Side-by-side figures alternate the two
sides (A B A B ...) and give the median and the spread (min–max) of the runs. A goal is **met** or **not met** only
when every run of one side lies on the same side of the goal as every run of the other (scaled by the goal); when
the ranges overlap the spread is wider than the difference and the verdict is **not shown**. Figures quoted from an
issue, raw results not kept, say so and are not judged.
"""


def measure(script: str, results: Path) -> bool:
    print(f"== {script}", flush=True)
    start = time.time()
    done = subprocess.run([PYTHON, str(ROOT / "bench" / f"{script}.py"), "--results", str(results)], cwd=ROOT)
    print(f"== {script}: {'done' if done.returncode == 0 else 'FAILED'} in {(time.time() - start) / 60:.1f} min")
    return done.returncode == 0


def load(results: Path, output: Path) -> dict[str, dict[str, dict]]:
    """``{machine type: {script: result}}`` from ``<results>/<machine type>/<script>.json``."""
    machines = {}
    for folder in sorted(d for d in results.iterdir() if d.is_dir()) if results.is_dir() else []:
        found = {s: json.loads((folder / f"{s}.json").read_text()) for s in SCRIPTS if (folder / f"{s}.json").exists()}
        for r in found.values():
            if r.get("plot"):  # images are linked relative to the written file
                r["plot"] = os.path.relpath(folder / r["plot"], output.resolve().parent)
        if found:
            machines[folder.name] = found
    return machines


def newest_first(machines: dict[str, dict[str, dict]], script: str | None = None) -> list[str]:
    """Machine types by the date of ``script`` there (or of their newest section), newest first."""
    dates = {
        key: max(r["provenance"]["date"] for s, r in found.items() if script in (None, s))
        for key, found in machines.items()
        if script is None or script in found
    }
    return sorted(dates, key=dates.get, reverse=True)


def one(values: list[str], none: str = NOT_RECORDED) -> str:
    """The value all sections share, or each of them."""
    values = list(dict.fromkeys(values))
    return values[0] if len(values) == 1 else "differs between sections: " + "; ".join(values) if values else none


def machine(p: dict) -> str:
    """CPU model, speed flags, cores, torch threads, GPU."""
    flags = p.get("flags", NOT_RECORDED)
    if isinstance(flags, list):
        flags = ", ".join(flags) or f"none of {', '.join(SPEED_FLAGS)}"
    cores = f"{p['cores']} cores" if isinstance(p["cores"], int) else f"cores: {p['cores']}"
    gpu = "no GPU" if p["gpu"] is None else f"GPU: {p['gpu']}"
    family = f" (family/model {p['cpu_family_model']})" if p.get("cpu_family_model") else ""
    return (
        f"{p['cpu']}{family} · flags: {flags} · {cores} · torch threads: {p.get('torch_threads', NOT_RECORDED)} · {gpu}"
    )


def versions(p: dict) -> str:
    v = p["versions"]
    if not isinstance(v, dict):
        return f"versions {v}"
    return f"Python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, lightning {v['lightning']}"


def code(p: dict) -> str:
    dirty = {True: " (tree dirty: uncommitted changes)", False: " (clean tree)", None: ""}[p["dirty"]]
    return f"commit `{p['commit']}`{dirty}"


def block_heading(key: str, r: dict) -> str:
    """The line above a machine's figures in a section: machine, date, code, and the source when quoted."""
    p = r["provenance"]
    quoted = f" Quoted from {r['quoted']}." if r.get("quoted") else ""
    return f"\n**`{key}`**: {machine(p)} · measured {p['date']} · {code(p)}.{quoted}\n"


def quoted_body(r: dict) -> str:
    """A quoted result: its figures as rows (no runs, no spread, no verdict)."""
    rows = "\n".join(f"| {label} | {value} |" for label, value in r["figures"])
    return f"\n| figure (as quoted) | value |\n|---|---|\n{rows}\n"


def summary_table(key: str, found: dict[str, dict]) -> str:
    provs = [r["provenance"] for r in found.values()]
    dates = sorted(p["date"] for p in provs)
    head = (
        f"**`{key}`**: {one([machine(p) for p in provs])} · {one([versions(p) for p in provs])}.  \n"
        f"Code: {one([code(p) for p in provs])}.  \n"
        f"Measured: {dates[0]}{' to ' + dates[-1] if dates[-1] != dates[0] else ''}.\n"
    )
    rows = []
    for script, title, _, summary in SECTIONS:
        r = found.get(script)
        if r is None:
            continue
        if r.get("quoted"):
            goal, figure, verdict = (r["summary"][k] for k in ("goal", "figure", "verdict"))
        else:
            goal, figure, verdict = getattr(importlib.import_module(script), summary)(r)
            verdict += "" if r["default_args"] else " (not the default arguments)"
        rows.append(f"| [{title}](#{title.lower().replace(' ', '-')}) | {goal} | {figure} | {verdict} |")
    return head + "\n| section | goal | median figure | verdict |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def render(results: Path, output: Path) -> str:
    machines = load(results, output)
    parts = [HEADER, *(summary_table(key, machines[key]) for key in newest_first(machines))]
    nowhere = [title for script, title, *_ in SECTIONS if not any(script in found for found in machines.values())]
    if nowhere:
        parts.append(f"Not measured on any machine yet: {', '.join(nowhere)}.\n")
    for script, title, render_name, _ in SECTIONS:
        blocks = []
        for key in newest_first(machines, script):
            r = machines[key][script]
            if r.get("quoted"):
                if render_name == "render":  # a quoted figure once, not in the sections derived from its script
                    blocks.append(block_heading(key, r) + quoted_body(r))
            else:
                blocks.append(block_heading(key, r) + getattr(importlib.import_module(script), render_name)(r))
        body = "".join(blocks) or f"\nNot measured yet: `python bench/all.py --only {script}`.\n"
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
