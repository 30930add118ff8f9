"""Time to accuracy on Fashion-MNIST: ``configs/experiment/fashion_mnist_fast.yaml`` through the CLI vs the
pytorch/examples MNIST recipe as a plain loop, both timed from process start to the first test evaluation at
>= the target accuracy. Each side in its own process, interleaved.

    python bench/time_to_accuracy.py [--repeats 2] [--target 0.91]
    python bench/time_to_accuracy.py --reference     # the reference loop alone; prints one line per epoch
"""

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, machine, median, write_section

sys.path.insert(0, str(ROOT))
DATA = ROOT / "data"
RECIPE = ROOT / "configs" / "experiment" / "fashion_mnist_fast.yaml"


def reference(epochs: int) -> None:
    """pytorch/examples ``mnist/main.py`` defaults, on Fashion-MNIST: per-sample ToTensor + Normalize, batch 64,
    Adadelta lr 1.0, StepLR gamma 0.7 per epoch, test set evaluated after every epoch (batch 1000)."""
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
        for x, y in train_loader:
            optimizer.zero_grad()
            F.nll_loss(model(x), y).backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
        print(f"epoch={epoch} wall={time.time():.3f} test_acc={correct / len(test):.4f}", flush=True)


def run_reference(epochs: int, target: float) -> tuple[float | None, float, int]:
    """Seconds from launch to the first epoch at >= target (None if never), the best accuracy, its epoch."""
    start = time.time()
    proc = subprocess.Popen(
        [PYTHON, __file__, "--reference", "--epochs", str(epochs)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    best, best_epoch = 0.0, 0
    for line in proc.stdout:
        fields = dict(item.split("=") for item in line.split())
        acc = float(fields["test_acc"])
        if acc > best:
            best, best_epoch = acc, int(fields["epoch"])
        if acc >= target:
            proc.kill()
            proc.wait()
            return float(fields["wall"]) - start, acc, int(fields["epoch"])
    if proc.wait() != 0:
        raise RuntimeError("reference loop failed")
    return None, best, best_epoch


def run_recipe() -> tuple[float, float]:
    """Seconds from launch to exit of the recipe's ``fit`` (which ends with its test), and its test accuracy."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-tta-"))
    cmd = [
        PYTHON, "-m", "project", "fit", "--config", str(RECIPE), f"--data.init_args.data_dir={DATA}",
        "--config", str(ROOT / "configs" / "logger" / "csv.yaml"), "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    start = time.time()
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True)
    wall = time.time() - start
    (metrics,) = workdir.glob("runs/**/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("test/acc")]
    return wall, float(rows[-1]["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.91)
    parser.add_argument("--epochs", type=int, default=14, help="reference epochs at most (pytorch/examples: 14)")
    parser.add_argument("--reference", action="store_true", help="run the reference loop alone")
    args = parser.parse_args()
    if args.reference:
        return reference(args.epochs)
    from project.data import FashionMNISTDataModule

    FashionMNISTDataModule(data_dir=DATA).prepare_data()  # unpack once, outside both timings
    recipe, ref = [], []
    for _ in range(args.repeats):
        recipe.append(run_recipe())
        ref.append(run_reference(args.epochs, args.target))
        print("recipe (s, acc):", recipe[-1], "reference (s, acc, epoch):", ref[-1], flush=True)
    recipe_ok = [w for w, acc in recipe if acc >= args.target]
    ref_ok = [w for w, _, _ in ref if w is not None]
    rows = "\n".join(
        f"| {i + 1} | {w:.1f} s, {acc:.2%} | "
        + (f"{rw:.1f} s, {racc:.2%} at epoch {ep}" if rw is not None else f"not reached in {args.epochs} epochs "
           f"(best {racc:.2%} at epoch {ep})")
        + " |"
        for i, ((w, acc), (rw, racc, ep)) in enumerate(zip(recipe, ref, strict=True))
    )  # fmt: skip
    if len(recipe_ok) == len(recipe) and len(ref_ok) == len(ref):
        ratio = median(recipe_ok) / median(ref_ok)
        verdict = f"**Ratio {ratio:.3f}x** (goal <= 0.2x: {'met' if ratio <= 0.2 else 'not met'})."
    else:
        verdict = "**No ratio**: a side did not reach the target in every run (see the table)."
    write_section(
        "Time to accuracy",
        f"""
`python -m project fit --config configs/experiment/fashion_mnist_fast.yaml` (its test runs after the last epoch
on the best checkpoint; timed from launch to exit) vs the pytorch/examples MNIST recipe as a plain loop on
Fashion-MNIST (`bench/time_to_accuracy.py --reference`: conv 32 -> conv 64 -> max-pool -> dropout 0.25 -> FC 128
-> dropout 0.5 -> FC 10, Adadelta lr 1.0, StepLR gamma 0.7 per epoch, batch 64, per-sample ToTensor + Normalize,
test set evaluated after every epoch; timed from launch to the first epoch at >= {args.target:.0%} test accuracy).
Data unpacked beforehand for both. Interleaved, {args.repeats} runs each, medians. Machine: {machine()}.

| run | template recipe | reference loop |
|---|---|---|
{rows}

{verdict} Reproduce: `python bench/time_to_accuracy.py`.
""",
    )


if __name__ == "__main__":
    main()
