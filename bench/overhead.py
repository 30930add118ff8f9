"""Overhead and memory: ``fit`` through the CLI vs an identical plain PyTorch loop (same net, data tensors,
batch size, optimizer, steps) on Fashion-MNIST, each in its own process, interleaved.

    python bench/overhead.py [--steps 300] [--repeats 3]
    python bench/overhead.py --plain --steps 300     # one side alone (what the benchmark runs)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, interleave, machine, median, timed_command, write_section

sys.path.insert(0, str(ROOT))
BATCH = 128


def plain(steps: int) -> None:
    import torch

    from project.data import FashionMNISTDataModule
    from project.models.nets import SmallCNN

    torch.manual_seed(42)
    dm = FashionMNISTDataModule(loader="tensor", batch_size=BATCH)
    dm.prepare_data()
    dm.setup("fit")
    net = SmallCNN().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=0.003, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    done, start = 0, time.perf_counter()
    while done < steps:
        for x, y in dm.train_dataloader():
            loss = loss_fn(net(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    print(f"train_seconds={time.perf_counter() - start:.3f}")


def cli_args(steps: int) -> list[str]:
    return [
        "-m", "project", "fit", "--config", str(ROOT / "configs" / "fashion_mnist.yaml"),
        "--data.init_args.loader=tensor",
        f"--data.init_args.batch_size={BATCH}", "--model.init_args.scheduler=null", f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--checkpoint.save_top_k=0", "--checkpoint.save_last=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--test_after_fit=false",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="run the plain loop alone")
    args = parser.parse_args()
    if args.plain:
        return plain(args.steps)
    cli = [PYTHON, *cli_args(args.steps)]  # each run in a fresh folder: the CLI saves config.yaml there
    loop = [PYTHON, __file__, "--plain", "--steps", str(args.steps)]
    a, b = interleave(
        lambda: timed_command(cli, cwd=Path(tempfile.mkdtemp())), lambda: timed_command(loop), args.repeats
    )
    wall_ratio = median([w for w, _ in b]) / median([w for w, _ in a])
    rss_ratio = median([r for _, r in a]) / median([r for _, r in b])
    where = f"Machine: {machine()} (shared with other jobs)."
    write_section(
        "Overhead",
        f"""
{args.steps} optimizer steps of SmallCNN on Fashion-MNIST (tensor data path, batch {BATCH}, AdamW, channels_last,
no validation, no logger) through `python -m project fit` vs the same steps in a plain PyTorch loop
(`bench/overhead.py --plain`). Whole processes timed (start-up included, so the ratio is a lower bound on the
training-loop ratio), interleaved, {args.repeats} runs each, medians. {where}

| side | median wall (s) |
|---|---|
| CLI `fit` | {median([w for w, _ in a]):.1f} |
| plain loop | {median([w for w, _ in b]):.1f} |

**Throughput ratio (plain time / CLI time) {wall_ratio:.2f}**
(goal >= 0.97: {"met" if wall_ratio >= 0.97 else "not met"}).
Reproduce: `python bench/overhead.py`.
""",
    )
    write_section(
        "Memory",
        f"""
Peak RSS (`/usr/bin/time -v`) of the same two processes as in Overhead. {where}

| side | median peak RSS (MiB) |
|---|---|
| CLI `fit` | {median([r for _, r in a]) / 1024:.0f} |
| plain loop | {median([r for _, r in b]) / 1024:.0f} |

**Ratio {rss_ratio:.2f}x** (goal <= 1.5x: {"met" if rss_ratio <= 1.5 else "not met"}).
Reproduce: `python bench/overhead.py`.
""",
    )


if __name__ == "__main__":
    main()
