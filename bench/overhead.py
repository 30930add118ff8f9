"""Overhead and memory: training steps through ``python -m project fit -c bench/overhead.yaml`` vs the same steps in
a plain PyTorch loop (same net, optimizer, data tensors, batch size, seed), each a fresh process, interleaved.

Throughput is steps per second over the steps after a warm-up (``bench.callbacks.StepTimer`` on the CLI side, the
same clocks in the plain loop), per CPU second of the process (user + system, all threads: the verdict, less swayed
than wall time by other load on a shared machine) and per wall second beside it; peak RSS of each whole process is
the Memory section.

    python bench/overhead.py [--steps 300] [--warmup 30] [--runs 5]
    python bench/overhead.py --plain --steps 300 --warmup 30     # the plain loop alone
"""

import re
import time
from pathlib import Path

from common import (
    PYTHON,
    ROOT,
    cpu_seconds,
    fmt,
    footer,
    interleave,
    judged,
    parser,
    prepare_fashion_mnist,
    provenance,
    runs_in_order,
    save,
    spread,
    timed,
    verdict,
)

NAME, TITLE, GOAL, MEMORY_GOAL = "overhead", "Overhead", 0.97, 1.5
CONFIG = Path("bench/overhead.yaml")


def cli_command(steps: int, warmup: int) -> str:
    return (
        f"python -m project fit -c {CONFIG} --trainer.max_steps {steps} "
        f"--trainer.callbacks+=bench.callbacks.StepTimer --trainer.callbacks.warmup {warmup}"
    )


def plain_command(steps: int, warmup: int) -> str:
    return f"python bench/overhead.py --plain --steps {steps} --warmup {warmup}"


def training_batches(data_args: dict):
    """Endless training batches of the tensor path, as the net gets them inside ``fit``: normalized float images.
    The one place that knows the data module's API."""
    import torch

    from project.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(**data_args)
    dm.prepare_data()
    dm.setup("fit")
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (dm.mean, dm.std))
    while True:
        for x, y in dm.train_dataloader():
            if x.dtype == torch.uint8:  # uint8 batches: augmentation (the preset; none here), then what the model does
                x = dm.augment_batch(x)
                x = ((x.float() / 255 if x.dtype == torch.uint8 else x) - mean) / std
            yield x, y


def plain(steps: int, warmup: int) -> None:
    import torch
    import yaml

    from project.models.classifier import parameter_groups  # the template's own grouping, as fit uses it
    from project.models.nets import SmallCNN

    config = yaml.safe_load((ROOT / CONFIG).read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    torch.manual_seed(config["seed_everything"])
    batches = training_batches({**data, "data_dir": ROOT / data["data_dir"]})
    net = SmallCNN(**model["net"]["init_args"]).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(net), **model["optimizer"]["init_args"])
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    start = cpu_start = 0.0
    for step in range(steps):
        if step == warmup:
            start, cpu_start = time.perf_counter(), cpu_seconds()
        x, y = next(batches)
        loss = loss_fn(net(x.contiguous(memory_format=torch.channels_last)).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    print(f"steady_seconds={wall:.3f} steady_steps={steps - warmup} steady_cpu_seconds={cpu:.3f}", flush=True)


def steady(output: str) -> float:
    """Steps per wall second after the warm-up, from the line the run printed."""
    seconds, steps = re.search(r"steady_seconds=([\d.]+) steady_steps=(\d+)", output).groups()
    return int(steps) / float(seconds)


def steady_cpu(output: str) -> float:
    """Steps per CPU second of the process after the warm-up, from the same line."""
    steps, cpu = re.search(r"steady_steps=(\d+) steady_cpu_seconds=([\d.]+)", output).groups()
    return int(steps) / float(cpu)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--plain", action="store_true", help="run the plain loop alone")
    args = p.parse_args()
    if args.plain:
        return plain(args.steps, args.warmup)
    started, prov = time.time(), provenance()
    prepare_fashion_mnist()
    cli = [PYTHON, *cli_command(args.steps, args.warmup).split()[1:]]
    loop = [PYTHON, *plain_command(args.steps, args.warmup).split()[1:]]
    a, b = interleave(args.runs, lambda: timed(cli), lambda: timed(loop), ("cli", "plain"))
    data = {
        side: {key: spread([f(run) for run in runs]) for key, f in FIGURES.items()}
        for side, runs in (("cli", a), ("plain", b))
    }
    result = save(NAME, p, args, prov, data, started)
    print(render(result), render_memory(result))


FIGURES = {
    "steps_per_s": lambda run: steady(run["output"]),
    "steps_per_cpu_s": lambda run: steady_cpu(run["output"]),
    "wall": lambda run: run["wall"],
    "rss": lambda run: run["rss_mib"],
}


def on_cpu(r: dict) -> bool:
    """Whether the runs recorded CPU time (results from before it was kept have wall time only)."""
    return "steps_per_cpu_s" in r["cli"]


def judge(r: dict, key: str | None = None) -> str:
    """The goal on steps per CPU second (per wall second where CPU time was not recorded, or when ``key`` says)."""
    key = key or ("steps_per_cpu_s" if on_cpu(r) else "steps_per_s")
    return verdict(r["cli"][key]["runs"], r["plain"][key]["runs"], GOAL, at_most=False)


def judge_memory(r: dict) -> str:
    return verdict(r["cli"]["rss"]["runs"], r["plain"]["rss"]["runs"], MEMORY_GOAL, at_most=True)


def ratio(r: dict, key: str) -> float:
    return r["cli"][key]["median"] / r["plain"][key]["median"]


def summary(r: dict) -> tuple[str, str, str]:
    goal = f"fit / plain loop, steady steps per CPU second >= {GOAL}"
    if not on_cpu(r):
        return goal, f"{ratio(r, 'steps_per_s'):.3f} wall (CPU time not recorded)", judge(r) + " (on wall)"
    return goal, f"{ratio(r, 'steps_per_cpu_s'):.3f} (wall {ratio(r, 'steps_per_s'):.3f})", judge(r)


def summary_memory(r: dict) -> tuple[str, str, str]:
    return f"fit / plain loop, peak RSS <= {MEMORY_GOAL}x", f"{ratio(r, 'rss'):.2f}x", judge_memory(r)


def render(r: dict) -> str:
    a = r["args"]
    cli, plain_ = r["cli"], r["plain"]
    wall_ratio = f"{ratio(r, 'steps_per_s'):.3f}"
    per_cpu = " per CPU second of the process (user + system, all threads: the goal) and" if on_cpu(r) else ""
    if on_cpu(r):
        cpu_rows = f"""
| side | steps per CPU second after warm-up | each run, in order |
|---|---|---|
| CLI `fit` | {fmt(cli["steps_per_cpu_s"])} | {runs_in_order(cli["steps_per_cpu_s"])} |
| plain loop | {fmt(plain_["steps_per_cpu_s"])} | {runs_in_order(plain_["steps_per_cpu_s"])} |
"""
        ratios = f"""**CPU-time throughput ratio (CLI / plain) {ratio(r, "steps_per_cpu_s"):.3f}** (goal >= {GOAL}: \
{judged(judge(r))}); wall-time throughput ratio {wall_ratio} (goal >= {GOAL} on wall: \
{judged(judge(r, "steps_per_s"))})."""
    else:
        cpu_rows = ""
        ratios = f"""CPU time not recorded in these runs: **wall-time throughput ratio (CLI / plain) {wall_ratio}** \
(goal >= {GOAL} on wall: {judged(judge(r))})."""
    return f"""
{a["steps"]} training steps of SmallCNN (width 32) on Fashion-MNIST, CPU, batch 128, AdamW, channels_last, tensor data
path, no validation, logger or checkpoint (`{CONFIG}`): `{cli_command(a["steps"], a["warmup"])}` vs
the same steps in a plain PyTorch loop, `{plain_command(a["steps"], a["warmup"])}` (same net, optimizer with the
same parameter groups, batches and seed). The CLI side also does what the template adds to every step: train
accuracy/F1 metrics and loss logging. Throughput over the steps after the first {a["warmup"]},{per_cpu} per wall
second; whole processes timed too (start-up included). Interleaved, {a["runs"]} runs each, each a fresh process:
median (min–max).
{cpu_rows}
| side | steps per wall second after warm-up | each run, in order | wall, whole process (s) |
|---|---|---|---|
| CLI `fit` | {fmt(cli["steps_per_s"])} | {runs_in_order(cli["steps_per_s"])} | {fmt(cli["wall"], ".1f")} |
| plain loop | {fmt(plain_["steps_per_s"])} | {runs_in_order(plain_["steps_per_s"])} | {fmt(plain_["wall"], ".1f")} |

{ratios}
Whole-process wall ratio (CLI / plain): {ratio(r, "wall"):.2f}.

{footer(r)}
"""


def render_memory(r: dict) -> str:
    cli, plain_ = r["cli"]["rss"], r["plain"]["rss"]
    return f"""
Peak RSS (the kernel's `ru_maxrss` of each process) of the same runs as in Overhead: median (min–max).

| side | peak RSS (MiB) | each run, in order |
|---|---|---|
| CLI `fit` | {fmt(cli, ".0f")} | {runs_in_order(cli, ".0f")} |
| plain loop | {fmt(plain_, ".0f")} | {runs_in_order(plain_, ".0f")} |

**Ratio {ratio(r, "rss"):.2f}x** (goal <= {MEMORY_GOAL}x: {judged(judge_memory(r))}).

{footer(r)}
"""


if __name__ == "__main__":
    main()
