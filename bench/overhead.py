"""Overhead and memory: ``fit`` through the CLI vs an identical plain PyTorch loop (same net, data tensors,
batch size, optimizer, steps) on Fashion-MNIST, each in its own process, interleaved.

Throughput is taken over the training steps after a warm-up (``bench/step_timer.py`` on the CLI side, the same
clock in the plain loop); whole-process wall time and peak RSS are reported beside it.

    python bench/overhead.py [--steps 400] [--warmup 30] [--repeats 3]
    python bench/overhead.py --plain --steps 400     # the plain loop alone
"""

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, interleave, machine, median, timed_command, write_section

sys.path.insert(0, str(ROOT))
BATCH = 128


def plain(steps: int, warmup: int) -> None:
    import torch

    from project.data import FashionMNISTDataModule
    from project.models.nets import SmallCNN

    torch.manual_seed(42)
    dm = FashionMNISTDataModule(data_dir=ROOT / "data", loader="tensor", batch_size=BATCH)
    dm.prepare_data()
    dm.setup("fit")
    net = SmallCNN().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=0.003, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    done, start = 0, 0.0
    while done < steps:
        for x, y in dm.train_dataloader():
            if done == warmup:
                start = time.perf_counter()
            loss = loss_fn(net(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    print(f"steady_seconds={time.perf_counter() - start:.3f} steady_steps={steps - warmup}")


def cli_args(steps: int, warmup: int) -> list[str]:
    return [
        "-m", "project", "fit", "--config", str(ROOT / "configs" / "fashion_mnist.yaml"),
        f"--data.init_args.data_dir={ROOT / 'data'}", "--data.init_args.loader=tensor",
        f"--data.init_args.batch_size={BATCH}", "--model.init_args.scheduler=null", f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--checkpoint.save_top_k=0", "--checkpoint.save_last=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--test_after_fit=false",
        "--trainer.callbacks+=step_timer.StepTimer", f"--trainer.callbacks.warmup={warmup}",
    ]  # fmt: skip


def steady(stdout: str) -> float:
    """Steps per second after the warm-up, from the line the run printed."""
    seconds, steps = re.search(r"steady_seconds=([\d.]+) steady_steps=(\d+)", stdout).groups()
    return int(steps) / float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="run the plain loop alone")
    args = parser.parse_args()
    if args.plain:
        return plain(args.steps, args.warmup)
    cli = [PYTHON, *cli_args(args.steps, args.warmup)]
    loop = [PYTHON, __file__, "--plain", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    # each CLI run in a fresh folder: it saves its config.yaml there
    a, b = interleave(
        lambda: timed_command(cli, env=env, cwd=Path(tempfile.mkdtemp())), lambda: timed_command(loop), args.repeats
    )
    cli_rates, loop_rates = [steady(o) for *_, o in a], [steady(o) for *_, o in b]
    cli_rate, loop_rate = median(cli_rates), median(loop_rates)
    cli_wall, loop_wall = median([w for w, *_ in a]), median([w for w, *_ in b])
    cli_rss, loop_rss = median([r for _, r, _ in a]) / 1024, median([r for _, r, _ in b]) / 1024
    ratio, rss_ratio = cli_rate / loop_rate, cli_rss / loop_rss
    where = f"Machine: {machine()}."
    write_section(
        "Overhead",
        f"""
{args.steps} optimizer steps of SmallCNN (width 32) on Fashion-MNIST (tensor data path, batch {BATCH}, AdamW,
channels_last, no validation, no logger, no checkpoint) through `python -m project fit` vs the same steps in a
plain PyTorch loop (`bench/overhead.py --plain`). Throughput over the steps after the first {args.warmup};
whole processes timed too (start-up included). Interleaved, {args.repeats} runs each, medians. {where}
The CLI side also does what the template adds to every step: train accuracy/F1 metrics and loss logging.

| side | steps/s (steady), median | each run, in order | median wall, whole process (s) |
|---|---|---|---|
| CLI `fit` | {cli_rate:.2f} | {", ".join(f"{r:.2f}" for r in cli_rates)} | {cli_wall:.1f} |
| plain loop | {loop_rate:.2f} | {", ".join(f"{r:.2f}" for r in loop_rates)} | {loop_wall:.1f} |

**Throughput ratio (CLI / plain) {ratio:.3f}** (goal >= 0.97: {"met" if ratio >= 0.97 else "not met"}).
Whole-process ratio (plain wall / CLI wall): {loop_wall / cli_wall:.2f}. Reproduce: `python bench/overhead.py`.
""",
    )
    write_section(
        "Memory",
        f"""
Peak RSS (`/usr/bin/time -v`) of the same two processes as in Overhead. {where}

| side | median peak RSS (MiB) |
|---|---|
| CLI `fit` | {cli_rss:.0f} |
| plain loop | {loop_rss:.0f} |

**Ratio {rss_ratio:.2f}x** (goal <= 1.5x: {"met" if rss_ratio <= 1.5 else "not met"}).
Reproduce: `python bench/overhead.py`.
""",
    )


if __name__ == "__main__":
    main()
