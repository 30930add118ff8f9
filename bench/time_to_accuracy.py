"""Time to accuracy on Fashion-MNIST: ``configs/experiment/fashion_mnist_fast.yaml`` through the CLI vs the
pytorch/examples MNIST recipe as a plain loop, under one stop rule: the test set is evaluated after every training
epoch, and a run's time is from process launch to the end of the first epoch at >= 91% test accuracy (the run is
then stopped). Both sides are fresh processes (start-up included), data unpacked beforehand, runs alternating.

    python bench/time_to_accuracy.py [--runs 3] [--target 0.91]
    python bench/time_to_accuracy.py --reference     # the reference loop alone, one line per epoch
"""

import json
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    DATA,
    OVERLAP,
    PYTHON,
    append_log,
    child_env,
    fmt,
    footer,
    judged,
    kill_group,
    machine_folder,
    parser,
    prepare_fashion_mnist,
    provenance,
    run_dir,
    save,
    spread,
    verdict,
)

NAME, TITLE, GOAL = "time_to_accuracy", "Time to accuracy", 0.15
RECIPE = "python -m project fit -c configs/experiment/fashion_mnist_fast.yaml"
TEMPLATE = f"{RECIPE} --trainer.callbacks+=bench.callbacks.TestAccuracyLog"
REFERENCE = "python bench/time_to_accuracy.py --reference"
INF = float("inf")


def reference(epochs: int, limit_batches: int) -> None:
    """pytorch/examples ``mnist/main.py`` defaults on Fashion-MNIST: per-sample ToTensor + Normalize, batch 64,
    Adadelta lr 1.0, StepLR gamma 0.7 per epoch; the test set evaluated after every epoch (batch 1000), its
    accuracy appended to ``$BENCH_LOG`` with the seconds since ``$BENCH_LAUNCH``."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision import datasets, transforms

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
            return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)

    torch.manual_seed(1)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = datasets.FashionMNIST(DATA, train=True, transform=transform)
    test = datasets.FashionMNIST(DATA, train=False, transform=transform)
    train_loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    for epoch in range(1, epochs + 1):
        model.train()
        for i, (x, y) in enumerate(train_loader):
            if i == limit_batches:
                break
            optimizer.zero_grad()
            F.nll_loss(model(x), y).backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
        append_log(epoch, correct / len(test))


def read_log(path: Path) -> list[dict]:
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only
    return [json.loads(line) for line in lines]


def until_target(command: str, cwd: Path, target: float) -> dict:
    """Launch ``command``; stop it at the end of the first epoch at >= target (or let it end). Its epochs, and
    the seconds from launch to that epoch (inf: never reached)."""
    log = cwd / "bench-epochs.jsonl"
    env = child_env(BENCH_LOG=str(log))
    with tempfile.TemporaryFile() as out:
        env["BENCH_LAUNCH"] = repr(time.time())
        proc = subprocess.Popen(
            [PYTHON, *shlex.split(command)[1:]],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while proc.poll() is None and not any(e["test_acc"] >= target for e in read_log(log)):
                time.sleep(0.5)
        finally:
            kill_group(proc)
        out.seek(0)
        text = out.read().decode(errors="replace")
    epochs = read_log(log)
    hit = next((e for e in epochs if e["test_acc"] >= target), None)
    if hit is None and proc.returncode != 0:
        raise RuntimeError(f"{command} exited with {proc.returncode}:\n{text[-3000:]}")
    return {"epochs": epochs, "seconds": hit["seconds"] if hit else INF, "epoch": hit["epoch"] if hit else None}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--target", type=float, default=0.91)
    p.add_argument("--extra", default="", help="more CLI arguments for the template side (trying out only)")
    p.add_argument("--epochs", type=int, default=14, help="reference: epochs at most (pytorch/examples: 14)")
    p.add_argument("--limit-batches", type=int, default=-1, help="reference: batches per epoch at most (trying out)")
    p.add_argument("--reference", action="store_true", help="run the reference loop alone")
    args = p.parse_args()
    if args.reference:
        return reference(args.epochs, args.limit_batches)
    started, prov = time.time(), provenance()
    prepare_fashion_mnist()
    template_cmd = f"{TEMPLATE} {args.extra}".strip()
    reference_cmd = f"{REFERENCE} --epochs {args.epochs} --limit-batches {args.limit_batches}"
    template, ref = [], []
    for i in range(args.runs):
        for side, name, command in ((template, "template", template_cmd), (ref, "reference", reference_cmd)):
            folder = run_dir()
            side.append(until_target(command, folder, args.target))
            shutil.rmtree(folder, ignore_errors=True)
            print(f"  {name} run {i + 1}: {side[-1]['seconds']:.1f} s, epoch {side[-1]['epoch']}", flush=True)
    data = {
        "template": {**spread([r["seconds"] for r in template]), "each": template},
        "reference": {**spread([r["seconds"] for r in ref]), "each": ref},
        "plot": f"{NAME}.png",
    }
    result = save(NAME, p, args, prov, data, started)
    plot(result, machine_folder(args.results, prov) / data["plot"])
    print(render(result))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for side, color, label in (("template", "C0", "template recipe (CLI)"), ("reference", "C1", "reference loop")):
        for i, run in enumerate(r[side]["each"]):
            xs, ys = [e["seconds"] for e in run["epochs"]], [e["test_acc"] * 100 for e in run["epochs"]]
            ax.plot(xs, ys, color=color, lw=0.8, marker=".", ms=4, label=label if i == 0 else None)
    ax.axhline(r["args"]["target"] * 100, color="grey", lw=0.6, ls="--")
    ax.set(xlabel="seconds since launch", ylabel="test accuracy (%)", xlim=(0, None))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reached(r: dict) -> bool:
    return INF not in r["template"]["runs"] + r["reference"]["runs"]


def judge(r: dict) -> str:
    template, ref = r["template"]["runs"], r["reference"]["runs"]
    if not reached(r):  # only a template that never gets there while the reference always does is a verdict
        return "not met" if INF not in ref and all(t == INF for t in template) else "not shown"
    return verdict(template, ref, GOAL, at_most=True)


def ratio(r: dict) -> str:
    return f"{r['template']['median'] / r['reference']['median']:.3f}x" if reached(r) else "target missed"


def summary(r: dict) -> tuple[str, str, str]:
    return f"time to {r['args']['target']:.0%}: template / reference <= {GOAL}x", ratio(r), judge(r)


def render(r: dict) -> str:
    target = r["args"]["target"]

    def cell(run: dict) -> str:
        if run["epoch"] is None:
            best = max(run["epochs"], key=lambda e: e["test_acc"], default={"test_acc": 0, "epoch": 0})
            return f"not reached in {len(run['epochs'])} epochs (best {best['test_acc']:.2%})"
        hit = next(e for e in run["epochs"] if e["epoch"] == run["epoch"])
        return f"{run['seconds']:.1f} s (epoch {run['epoch']}, {hit['test_acc']:.2%})"

    rows = "\n".join(
        f"| {i + 1} | {cell(a)} | {cell(b)} |"
        for i, (a, b) in enumerate(zip(r["template"]["each"], r["reference"]["each"], strict=True))
    )
    extra = f" {r['args']['extra']}" if r["args"]["extra"] else ""
    ratio_text = f"**Ratio {ratio(r)}**" if reached(r) else "**No ratio**: not every run reached the target"
    why = OVERLAP if reached(r) else "some runs missed the target"
    image = f"\n![test accuracy vs seconds since launch]({r['plot']})\n" if r.get("plot") else ""
    return f"""
Template: `{TEMPLATE}{extra}` (the fast recipe through the real CLI, W&B offline; the bench-only callback
`bench/callbacks.py` `TestAccuracyLog` evaluates the whole test set after every training epoch). Reference:
`{REFERENCE}`, the pytorch/examples MNIST recipe as a plain loop on Fashion-MNIST (conv 32 -> conv 64 ->
max-pool -> dropout 0.25 -> FC 128 -> dropout 0.5 -> FC 10, Adadelta lr 1.0, StepLR gamma 0.7 per epoch, batch 64,
per-sample ToTensor + Normalize, at most {r["args"]["epochs"]} epochs), the test set evaluated after every epoch.
Same stop rule on both sides: time from process launch (start-up included) to the end of the first epoch whose
test accuracy is >= {target:.0%}, evaluation included; the run is then stopped. Data unpacked beforehand for both;
each run a fresh process in a fresh folder. Alternating, {r["args"]["runs"]} runs each.

| run | template recipe | reference loop |
|---|---|---|
{rows}
| median (min–max), s | {fmt(r["template"], ".1f")} | {fmt(r["reference"], ".1f")} |

{ratio_text} (goal <= {GOAL}x: {judged(judge(r), why)}).
{image}
{footer(r)}
"""


if __name__ == "__main__":
    main()
