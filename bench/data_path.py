"""Data path: images/s to load and augment one epoch of CIFAR-format data, the tensor path vs torchvision
per-sample transforms in a 2-worker DataLoader (both with the ``standard`` crop + flip preset).

    python bench/data_path.py [--n 50000] [--repeats 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, interleave, machine, median, write_section

sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50000, help="training images in the CIFAR-format fixture")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from torchvision import datasets

    from project.data import CIFAR10DataModule
    from tests.formats import write_cifar

    root = Path(tempfile.mkdtemp(prefix="bench-cifar-"))
    files = write_cifar(root, 10, n_train=args.n, n_test=100, seed=0)
    for attr in ("train_list", "test_list", "meta"):
        setattr(datasets.CIFAR10, attr, files[attr])

    def epoch(loader: str, workers: int) -> float:
        dm = CIFAR10DataModule(
            data_dir=root, loader=loader, augment="standard", batch_size=512, num_workers=workers, val_split=0
        )
        dm.setup("fit")
        start = time.perf_counter()
        n = sum(len(y) for _, y in dm.train_dataloader())
        return n / (time.perf_counter() - start)

    tensor, torchvision = interleave(lambda: epoch("tensor", 0), lambda: epoch("torchvision", 2), args.repeats)
    ratio = median(tensor) / median(torchvision)
    write_section(
        "Data path",
        f"""
One epoch of {args.n} CIFAR-format images (tests/formats.py `write_cifar`), decode + random crop (pad 4,
reflect) + flip + normalize, batch 512, no training. Interleaved, {args.repeats} epochs each, medians.
Machine: {machine()}.

| path | images/s |
|---|---|
| tensor (`loader: tensor`, main process) | {median(tensor):,.0f} |
| torchvision per-sample transforms, DataLoader with 2 workers | {median(torchvision):,.0f} |

**Ratio {ratio:.1f}x** (goal >= 10x: {"met" if ratio >= 10 else "not met"}). Reproduce: `python bench/data_path.py`.
""",
    )


if __name__ == "__main__":
    main()
