"""The main job's speed levers, one at a time: milliseconds per training step of its net and optimizer in a plain
PyTorch loop (its real batches, batch 128, channels_last), the recipe as shipped against the recipe with one lever
changed. Rounds alternate every variant (shipped, each change, shipped, ...), so drift hits all alike.

    python bench/levers.py [--steps 60] [--warmup 10] [--rounds 3]     # about 4 min on 2 CPU cores

Variants: the shipped recipe (``configs/fashion_mnist.yaml``: pool_first, fused AdamW, fp32, torch's threads = the
cores); ``pool_first: false``; AdamW's default per-tensor loop (``fused: false``); ``torch.compile`` (its compile time
reported apart); one thread; bf16 autocast (native or emulated, as the CPU has it). Accuracy is not measured here: the
Main job section does that for the recipe as shipped.
"""

import statistics
import time
from contextlib import nullcontext
from typing import Any

from common import (
    DATA,
    ROOT,
    footer,
    parser,
    prepare_fashion_mnist,
    provenance,
    save,
    spread,
)
from overhead import training_batches

NAME, TITLE = "levers", "Levers"
CONFIG = "configs/fashion_mnist.yaml"


def recipe() -> tuple[dict, dict, dict]:
    """The net's and AdamW's arguments and the data's, as the main job's config gives them."""
    import yaml

    config = yaml.safe_load((ROOT / CONFIG).read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    return dict(model["net"]["init_args"]), dict(model["optimizer"]["init_args"]), dict(data)


def native_bf16() -> bool:
    from project.precision import native_bf16_flags

    return bool(native_bf16_flags())


def variants() -> dict[str, dict[str, Any]]:
    """Name -> what differs from the shipped recipe."""
    return {
        "shipped": {},
        "pool_first: false": {"net": {"pool_first": False}},
        "fused: false": {"optimizer": {"fused": False}},
        "torch.compile": {"compile": True},
        "1 thread": {"threads": 1},
        "bf16 autocast": {"bf16": True},
    }


class Variant:
    """One variant's net, optimizer and step; built once, timed every round."""

    def __init__(self, change: dict[str, Any], batches: Any) -> None:
        import torch

        from project.models.classifier import parameter_groups
        from project.models.nets import SmallCNN

        net_args, opt_args, _ = recipe()
        net_args.update(change.get("net", {}))
        opt_args.update(change.get("optimizer", {}))
        torch.manual_seed(0)
        self.torch, self.batches = torch, batches
        net = SmallCNN(num_classes=10, input_shape=(1, 28, 28), **net_args).to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(parameter_groups(net), **opt_args)
        self.net = torch.compile(net) if change.get("compile") else net
        self.threads = change.get("threads", torch.get_num_threads())
        bf16 = change.get("bf16", False)
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.first_step = self.step()  # compile time (torch.compile) or a cold start

    def step(self) -> float:
        x, y = next(self.batches)
        began = time.perf_counter()
        with self.autocast():
            loss = self.loss(self.net(x).float(), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - began

    def time(self, steps: int, warmup: int) -> float:
        """Median seconds per step over ``steps`` after ``warmup``."""
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads)
        try:
            for _ in range(warmup):
                self.step()
            return statistics.median(self.step() for _ in range(steps))
        finally:
            self.torch.set_num_threads(threads)


def endless_batches() -> Any:
    """The tensor path's training batches, normalized and channels_last, as the net gets them inside ``fit``."""
    import torch

    _, _, data = recipe()
    for x, y in training_batches({**data, "data_dir": DATA}):
        yield x.contiguous(memory_format=torch.channels_last), y


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    started, prov = time.time(), provenance()
    prepare_fashion_mnist()
    batches = endless_batches()
    built = {name: Variant(change, batches) for name, change in variants().items()}
    times: dict[str, list[float]] = {name: [] for name in built}
    for i in range(args.rounds):
        for name, variant in built.items():
            times[name].append(variant.time(args.steps, args.warmup) * 1000)
        done = ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items())
        print(f"  round {i + 1}/{args.rounds}: {done}", flush=True)
    data = {
        "native_bf16": native_bf16(),
        "ms_per_step": {name: spread(t) for name, t in times.items()},
        "first_step_s": {name: v.first_step for name, v in built.items()},
    }
    print(render(save(NAME, p, args, prov, data, started)))


def relative(r: dict, name: str) -> float:
    """Time per step of a variant / the shipped recipe's (below 1: the change is faster)."""
    return r["ms_per_step"][name]["median"] / r["ms_per_step"]["shipped"]["median"]


def summary(r: dict) -> tuple[str, str, str]:
    slower = [n for n in r["ms_per_step"] if n != "shipped" and relative(r, n) >= 1]
    return (
        "each lever left as shipped is the faster choice (no goal)",
        f"{len(slower)} of {len(r['ms_per_step']) - 1} changes slower",
        "-",
    )


def render(r: dict) -> str:
    ms = r["ms_per_step"]
    shipped = ms["shipped"]["median"]
    rows = "\n".join(
        f"| {name} | {s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) | {s['median'] / shipped:.2f}x | "
        f"{r['first_step_s'][name]:.1f} |"
        for name, s in ms.items()
    )
    a = r["args"]
    bf16 = "has" if r["native_bf16"] else "has no"
    return f"""
The main job's net and optimizer (`{CONFIG}`) in a plain training loop on its real batches (batch 128, channels_last),
as shipped and with one lever changed at a time: median milliseconds per step over {a["steps"]} steps after
{a["warmup"]} warm-up steps, {a["rounds"]} rounds alternating every variant, median (min–max) of the rounds. The
first step's seconds (compile time for `torch.compile`) apart. The shipped recipe runs fp32; this CPU {bf16} native
bf16 (its `bf16 autocast` row is {"native" if r["native_bf16"] else "emulated"}).

| variant | ms per step | vs shipped | first step (s) |
|---|---|---|---|
{rows}

{footer(r)}
"""


if __name__ == "__main__":
    main()
