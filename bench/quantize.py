"""int8 quantization on real Fashion-MNIST: the main job's best checkpoint (``python -m project fit -c
configs/fashion_mnist.yaml``, trained here unless ``--ckpt`` gives one) through ``python -m extras.compress``:
exported to ONNX (uint8 images in, probabilities out), quantized by ONNX Runtime (dynamic: int8 weights), and both
files run with ONNX Runtime on the test split (10,000 images). File sizes and test accuracies, and Lightning's own
test accuracy of the checkpoint for reference (it must equal the fp32 ONNX model's).

    python bench/quantize.py [--ckpt CKPT]       # about 3 min on 2 idle CPU cores with training, seconds without
"""

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from common import (
    DATA,
    PYTHON,
    ROOT,
    child_env,
    footer,
    parser,
    prepare_fashion_mnist,
    provenance,
    save,
    timed,
    verdict,
)

NAME, TITLE = "quantize", "int8 quantization"
MAIN_JOB = "python -m project fit -c configs/fashion_mnist.yaml"
COMPRESS = "python -m extras.compress --ckpt_path {ckpt}"
GOAL_SIZE, GOAL_DROP = 0.5, 0.005  # int8 at most half the fp32 file, at most 0.5 points of test accuracy lost


def workspace(prefix: str) -> Path:
    """A kept working folder with ``configs`` and ``data`` linked in (the CLI runs as in the README there)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / "configs").symlink_to(ROOT / "configs")
    (folder / "data").symlink_to(DATA)
    return folder


def train_main_job(folder: Path, threads: int, extra: list[str] | None = None) -> tuple[Path, float]:
    """Run the main job in ``folder`` (CSV logs); its best checkpoint and the test accuracy it printed."""
    env = child_env(OMP_NUM_THREADS=str(threads))
    done = timed([PYTHON, *MAIN_JOB.split()[1:], "-c", "configs/logger/csv.yaml", *(extra or [])], cwd=folder, env=env)
    found = re.search(r"test/acc\s*[│|]\s*([0-9.]+)", done["output"])
    if not found:
        raise RuntimeError(f"no test/acc in the output of {MAIN_JOB}:\n{done['output'][-2000:]}")
    best = [p for p in folder.glob("runs/fashion_mnist/version_*/checkpoints/epoch=*.ckpt")]
    if len(best) != 1:
        raise RuntimeError(f"expected one best checkpoint under {folder}/runs, found {best}")
    print(f"  main job: test accuracy {float(found.group(1)):.2%}, {done['wall']:.0f} s -> {best[0]}", flush=True)
    return best[0], float(found.group(1))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt", type=Path, help="a main-job checkpoint to quantize instead of training one")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training (speed only)")
    args = p.parse_args()
    started, prov = time.time(), provenance()
    prepare_fashion_mnist()
    folder = workspace("bench-quantize-")
    try:
        if args.ckpt:
            ckpt, lightning_acc = args.ckpt.resolve(), None
        else:
            ckpt, lightning_acc = train_main_job(folder, args.threads)
        out = folder / "int8"
        cmd = [
            PYTHON,
            "-m",
            "extras.compress",
            "--ckpt_path",
            str(ckpt),
            "--output_dir",
            str(out),
            "--data_dir",
            str(DATA),
        ]
        printed = timed(cmd, cwd=folder)["output"]
        report = json.loads((out / "quantization.json").read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    data = {
        "checkpoint": "trained by the main job" if not args.ckpt else str(args.ckpt),
        "lightning_test_acc": lightning_acc,
        "samples": report["samples"],
        "fp32": {k: report["fp32"][k] for k in ("bytes", "accuracy")},
        "int8": {k: report["int8"][k] for k in ("bytes", "accuracy", "int8_ops")},
        "size_ratio": report["size_ratio"],
        "accuracy_drop": report["accuracy_drop"],
        "printed": printed.strip().splitlines()[-3:],
    }
    print(render(save(NAME, p, args, prov, data, started)))


def judge(r: dict) -> str:
    size = verdict([r["size_ratio"]], [1], GOAL_SIZE, at_most=True)
    drop = verdict([r["accuracy_drop"]], [1], GOAL_DROP, at_most=True)
    return "met" if size == drop == "met" else "not met"


def summary(r: dict) -> tuple[str, str, str]:
    return (
        f"int8 <= {GOAL_SIZE:g}x the fp32 file, <= {GOAL_DROP * 100:g} points of test accuracy lost",
        f"{r['size_ratio']:.2f}x the size, accuracy {-r['accuracy_drop'] * 100:+.2f} points",
        judge(r),
    )


def render(r: dict) -> str:
    fp32, int8 = r["fp32"], r["int8"]
    source = "trained in this run" if r["args"]["ckpt"] is None else f"given: `{r['args']['ckpt']}`"
    reference = (
        f" Lightning's own test accuracy of the checkpoint: {r['lightning_test_acc']:.2%} (the fp32 ONNX model's must"
        f" be the same)."
        if r["lightning_test_acc"] is not None
        else ""
    )
    return f"""
The main job's best checkpoint (`{MAIN_JOB}`, {source}) exported to ONNX and quantized with
`{COMPRESS.format(ckpt="runs/fashion_mnist/version_0/checkpoints/epoch=....ckpt")}` (ONNX Runtime dynamic
quantization: int8 weights, activations quantized on the fly; {", ".join(int8["int8_ops"])}). Both files run with ONNX
Runtime on CPU on the {r["samples"]:,} test images, fed raw uint8 pixels in batches of 1000.{reference}

| model | file size | test accuracy |
|---|---|---|
| fp32 ONNX | {fp32["bytes"] / 1e3:.1f} kB | {fp32["accuracy"]:.2%} |
| int8 ONNX (dynamic) | {int8["bytes"] / 1e3:.1f} kB | {int8["accuracy"]:.2%} |

{r["size_ratio"]:.2f}x the size, test accuracy {-r["accuracy_drop"] * 100:+.2f} points. One run: for a given
checkpoint the figures are deterministic (dynamic quantization scales activations per batch, so the int8 figure
depends a little on the batch size). Goal: int8 at most {GOAL_SIZE:g}x the fp32 file and at most
{GOAL_DROP * 100:g} points of accuracy lost: **{judge(r)}**.

{footer(r)}
"""


if __name__ == "__main__":
    main()
