"""Data path: images/s of one training epoch of CIFAR-format images (``tests/formats.py`` ``write_cifar``, written
once into a temporary folder), random crop (pad 4, reflect) + horizontal flip + normalize, batch 512, no
training: the in-memory tensor path (``CIFAR10DataModule``, ``loader: tensor``, ``augment: standard``; whole
batches augmented at once) vs a standard torchvision pipeline (``datasets.CIFAR10`` with per-sample ``v2``
transforms, a DataLoader with 2 workers). Set-up (reading the files into a data set or tensors) is timed apart:
images/s with it and without. CPU, one process, interleaved.

    python bench/data_path.py [--n 50000] [--runs 5]
"""

import shutil
import tempfile
import time
from pathlib import Path

from common import fmt, footer, interleave, judged, parser, provenance, runs_in_order, save, spread, verdict

NAME, TITLE, GOAL = "data_path", "Data path", 10
BATCH = 512
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def tensor_epoch(root: Path) -> tuple[float, float, int]:
    """Set-up seconds, epoch seconds and images of the tensor path. The one place that knows the data module's API:
    the batches end as the model sees them (augmented, normalized float)."""
    import torch

    from project.data import CIFAR10DataModule

    start = time.perf_counter()
    dm = CIFAR10DataModule(data_dir=root, batch_size=BATCH, loader="tensor", augment="standard", val_split=0)
    dm.prepare_data()
    dm.setup("fit")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (MEAN, STD))
    setup = time.perf_counter() - start
    n = 0
    for x, y in dm.train_dataloader():
        if x.dtype == torch.uint8:  # uint8 batches: the augmentation runs on the batch, normalization in the model
            x = (dm.augment_batch(x) - mean) / std
        n += len(y)
    return setup, time.perf_counter() - start - setup, n


def torchvision_epoch(root: Path) -> tuple[float, float, int]:
    """The same for the standard per-sample pipeline."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    start = time.perf_counter()
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomCrop(32, padding=4, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(datasets.CIFAR10(root, train=True, transform=transform), BATCH, shuffle=True, num_workers=2)
    setup = time.perf_counter() - start
    n = sum(len(y) for _, y in loader)
    return setup, time.perf_counter() - start - setup, n


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=50000, help="training images in the CIFAR-format files")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    started, prov = time.time(), provenance()
    from torchvision import datasets

    from tests.formats import write_cifar

    root = Path(tempfile.mkdtemp(prefix="bench-cifar-"))
    files = write_cifar(root, 10, n_train=args.n, n_test=100, seed=0)
    for attr in ("train_list", "test_list", "meta"):  # torchvision checks the files' MD5s against these
        setattr(datasets.CIFAR10, attr, files[attr])
    a, b = interleave(args.runs, lambda: tensor_epoch(root), lambda: torchvision_epoch(root), ("tensor", "torchvision"))
    shutil.rmtree(root)
    data = {
        side: {
            "with_setup": spread([n / (s + e) for s, e, n in runs]),
            "without_setup": spread([n / e for s, e, n in runs]),
            "setup_s": spread([s for s, e, n in runs]),
            "images": runs[0][2],
        }
        for side, runs in (("tensor", a), ("torchvision", b))
    }
    print(render(save(NAME, p, args, prov, data, started)))


def judge(r: dict, key: str = "with_setup") -> str:
    return verdict(r["tensor"][key]["runs"], r["torchvision"][key]["runs"], GOAL, at_most=False)


def ratio(r: dict, key: str = "with_setup") -> float:
    return r["tensor"][key]["median"] / r["torchvision"][key]["median"]


def summary(r: dict) -> tuple[str, str, str]:
    return f"tensor / torchvision data path, images/s with set-up >= {GOAL}x", f"{ratio(r):.1f}x", judge(r)


def render(r: dict) -> str:
    t, v = r["tensor"], r["torchvision"]
    return f"""
One training epoch of {r["args"]["n"]:,} CIFAR-format images (`tests/formats.py` `write_cifar`), random crop
(pad 4, reflect) + horizontal flip + normalize, batch {BATCH}, no training, CPU. Tensor path:
`CIFAR10DataModule(loader="tensor", augment="standard")` in the main process ({t["images"]:,} images per epoch);
torchvision path: `datasets.CIFAR10` with per-sample `v2.RandomCrop(32, padding=4, padding_mode="reflect")`,
`RandomHorizontalFlip`, `ToImage`/`ToDtype`/`Normalize`, DataLoader with 2 workers ({v["images"]:,} images).
Set-up: from nothing to a ready loader (the data module's `prepare_data` + `setup`, which read and decode the files
into tensors; the data set's construction).
Interleaved, {r["args"]["runs"]} runs each in one process: median (min–max).

| path | images/s, set-up included | images/s, set-up excluded | set-up (s) |
|---|---|---|---|
| tensor | {fmt(t["with_setup"], ",.0f")} | {fmt(t["without_setup"], ",.0f")} | {fmt(t["setup_s"])} |
| torchvision per-sample | {fmt(v["with_setup"], ",.0f")} | {fmt(v["without_setup"], ",.0f")} | {fmt(v["setup_s"])} |

**Ratio with set-up {ratio(r):.1f}x** (goal >= {GOAL}x: {judged(judge(r))}); without set-up
{ratio(r, "without_setup"):.1f}x ({judge(r, "without_setup")} against the same goal).
Each run, in order, images/s with set-up: tensor {runs_in_order(t["with_setup"], ",.0f")}; torchvision
{runs_in_order(v["with_setup"], ",.0f")}.

{footer(r)}
"""


if __name__ == "__main__":
    main()
