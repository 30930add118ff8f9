"""What every benchmark shares: running and timing commands, A B A B interleaving, medians and spreads, verdicts,
the machine and code measured, and each section's results as JSON under ``bench/results/<machine type>/``.

Kept light (no torch import at module level): the reference loop of time_to_accuracy.py imports it too.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "data"  # Fashion-MNIST, unpacked once by prepare_fashion_mnist()
if str(ROOT) not in sys.path:  # this checkout's project and tests, before any installed copy
    sys.path.insert(1, str(ROOT))


# ---- the machine and the code measured -------------------------------------------------------------------------


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the CPU flags that change training speed most
NOT_RECORDED = "not recorded"  # a provenance field of results measured before it was kept


def cpu_info() -> tuple[str, str, list[str]]:
    """The CPU's model name, its family/model numbers (two CPUs named "AMD EPYC" can be generations apart) and which
    of ``SPEED_FLAGS`` it has (``/proc/cpuinfo``; elsewhere no flags)."""
    fields: dict[str, str] = {}
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if key.strip() == "flags":
            break
    flags = set(fields.get("flags", "").split())
    family = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    return (
        fields.get("model name") or platform.processor() or platform.machine(),
        family,
        [f for f in SPEED_FLAGS if f in flags],
    )


def machine_key(model: str, flags: list[str]) -> str:
    """The results folder of a machine type: the first two words of the CPU model, its widest vector unit and its
    native bf16 flag if any, e.g. ``amd-epyc-avx2``, ``intel-xeon-avx512f-amx_bf16``."""
    words = re.sub(r"\((r|tm)\)", " ", model.lower()).split()[:2]  # "Intel(R) Xeon(R) ..." -> intel, xeon
    simd = [f for f in ("avx512f", "avx2") if f in flags][:1]
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags][:1]  # AMX where both
    return "-".join([re.sub(r"[^a-z0-9]+", "-", w).strip("-") for w in words] + simd + bf16) or "unknown"


def provenance() -> dict[str, Any]:
    """Machine type, CPU and its speed flags, cores, torch threads, GPU, versions, date, git commit and
    dirtiness (the bench's own outputs excluded)."""
    import lightning
    import torch
    import torchvision

    cpu, family, flags = cpu_info()
    commit = git("rev-parse", "--short=10", "HEAD")
    dirty = git("status", "--porcelain", "--", ".", ":(exclude)bench/results", ":(exclude)BENCHMARKS.md")
    return {
        "machine": machine_key(cpu, flags),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "dirty": bool(dirty) if commit else None,
        "cpu": cpu,
        "cpu_family_model": family,
        "flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": round(os.getloadavg()[0], 2),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "lightning": lightning.__version__,
        },
    }


# ---- running commands -------------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every measured process: the repository first on the path (for ``bench.callbacks``),
    W&B offline (what it is anyway without credentials; never a network wait)."""
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", **extra}


def run_dir() -> Path:
    """A fresh working folder with ``configs``, ``data`` and ``bench`` linked in, so the CLI runs exactly as in the
    README (``-c configs/...``, ``data_dir: data``) and its ``runs/`` land outside the repository."""
    folder = Path(tempfile.mkdtemp(prefix="bench-run-"))
    (folder / "configs").symlink_to(ROOT / "configs")
    (folder / "data").symlink_to(DATA)
    (folder / "bench").symlink_to(ROOT / "bench")
    return folder


def timed(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to its end: wall seconds from just before launch, peak RSS (MiB) and its output."""
    cwd = cwd or run_dir()
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if cwd.name.startswith("bench-run-"):
        shutil.rmtree(cwd, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{text[-3000:]}")
    return {"wall": wall, "rss_mib": usage.ru_maxrss / 1024, "output": text}


def kill_group(proc: subprocess.Popen) -> None:
    """End a process started with ``start_new_session=True`` and whatever it started (e.g. W&B's service)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


LAUNCH = float(os.environ.get("BENCH_LAUNCH", time.time()))  # set by the runner just before it launched us


def append_log(epoch: int, accuracy: float) -> None:
    """One line ``{"seconds", "epoch", "test_acc"}``, seconds since launch, printed and appended to ``$BENCH_LOG``."""
    line = json.dumps({"seconds": round(time.time() - LAUNCH, 3), "epoch": epoch, "test_acc": accuracy})
    print(line, flush=True)
    if os.environ.get("BENCH_LOG"):
        with open(os.environ["BENCH_LOG"], "a") as f:
            f.write(line + "\n")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its children that have ended (DataLoader
    workers count once they exit; the Overhead runs have none)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare_fashion_mnist() -> None:
    """Unpack Fashion-MNIST into ``data/`` once (the data module does it), outside every timing."""
    code = f"from project.data import FashionMNISTDataModule as D; D(data_dir={str(DATA)!r}).prepare_data()"
    subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=child_env(), check=True)


# ---- repeats, spreads, verdicts ---------------------------------------------------------------------------------


def interleave(runs: int, a: Callable[[], Any], b: Callable[[], Any], names: tuple[str, str] = ("A", "B")) -> tuple:
    """``a`` and ``b`` alternately, ``runs`` times each (A B A B ...), so a machine's drift hits both alike."""
    xs, ys = [], []
    for i in range(runs):
        for fn, out, name in ((a, xs, names[0]), (b, ys, names[1])):
            start = time.perf_counter()
            out.append(fn())
            print(f"  {name} run {i + 1}/{runs}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return xs, ys


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every run in order."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def verdict(a: list[float], b: list[float], goal: float, at_most: bool) -> str:
    """Is A <= goal x B (``at_most``) or A >= goal x B? ``met`` / ``not met`` only when every run of A is on the
    same side of goal x every run of B; when the two ranges overlap the spread is wider than the difference and
    the answer is ``not shown``. An absolute goal is ``b=[1]``."""
    lo, hi = goal * min(b), goal * max(b)
    good, bad = (max(a) <= lo, min(a) > hi) if at_most else (min(a) >= hi, max(a) < lo)
    return "met" if good else "not met" if bad else "not shown"


OVERLAP = "the runs of the two sides overlap once one side is scaled by the goal: the spread is wider than the gap"


def judged(v: str, why: str = OVERLAP) -> str:
    """The verdict as printed: ``not shown`` says why."""
    return f"**{v}**" + (f" ({why})" if v == "not shown" else "")


def both(*verdicts: str) -> str:
    """Several goals that must all hold."""
    return "not met" if "not met" in verdicts else "met" if all(v == "met" for v in verdicts) else "not shown"


def fmt(s: dict[str, Any], spec: str = ".2f") -> str:
    """``8.33 (8.10–8.90)``: median, then min–max."""
    f = lambda v: "not reached" if v == float("inf") else format(v, spec)  # noqa: E731
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def percent(s: dict[str, Any]) -> dict[str, Any]:
    """A spread of fractions as percentages."""
    return {k: [x * 100 for x in v] if k == "runs" else v * 100 for k, v in s.items()}


def runs_in_order(s: dict[str, Any], spec: str = ".2f") -> str:
    return ", ".join("not reached" if v == float("inf") else format(v, spec) for v in s["runs"])


# ---- one section's script: arguments, results file -----------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the machine folders of section JSON files")
    return p


def machine_folder(results: Path, prov: dict) -> Path:
    """Where the sections measured on this machine type go; a run elsewhere leaves them alone."""
    return results / prov["machine"]


def save(name: str, p: argparse.ArgumentParser, args: argparse.Namespace, prov: dict, data: dict, started: float):
    """Write ``<results>/<machine type>/<name>.json``: the data, how it was made (arguments, whether they are the
    defaults, the command) and what was measured (machine, versions, commit)."""
    given = {k: v for k, v in vars(args).items() if k != "results"}
    changed = {k: v for k, v in given.items() if v != p.get_default(k)}
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}") for k, v in changed.items()]
    command = " ".join(["python", f"bench/{name}.py", *flags])
    result = {
        "section": name,
        "command": command,
        "default_args": not changed,
        "args": given,
        "provenance": prov,
        "minutes": round((time.time() - started) / 60, 1),
        **data,
    }
    path = machine_folder(args.results, prov) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return result


def footer(result: dict) -> str:
    """The last line of every section: the load, how long, how to reproduce, and a warning if not the defaults
    (machine, date and commit head the section's block in BENCHMARKS.md)."""
    line = (
        f"Load average {result['provenance']['load_average']} at the start, {result['minutes']} min. "
        f"Reproduce: `python bench/all.py --only {result['section']}` (runs `python bench/{result['section']}.py`)."
    )
    if not result["default_args"]:
        line += f"\n\n**Not the default arguments** (`{result['command']}`): not a published figure."
    return line
