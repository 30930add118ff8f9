"""Dynamic int8 quantization of an exported ONNX model, with size and accuracy before and after.

    python -m project.compress --run_config runs/fashion_mnist/version_0/config.yaml \\
        --ckpt_path runs/fashion_mnist/version_0/checkpoints/last.ckpt --output_dir runs/fashion_mnist/version_0/int8

The checkpoint is exported to ONNX (``project.export``, parity-checked), its weights are quantized to int8 by ONNX
Runtime (``quantize_dynamic``: weights stored as int8, activations quantized on the fly), and both models are run
with ONNX Runtime on the test split of the run's data module. The report is printed and written as JSON.
"""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lightning.pytorch.cli import instantiate_class

from project.errors import UserError, run_tool


def onnx_accuracy(path: Path, loader: Any) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for batch in loader:
        x, y = batch[0].numpy(), batch[1].numpy()
        correct += int((session.run(None, {name: x})[0].argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def int8_ops(path: Path) -> list[str]:
    """Node types of ``path`` that compute in int8 (``MatMulInteger``, ``ConvInteger``, ...)."""
    import onnx

    return sorted({node.op_type for node in onnx.load(str(path)).graph.node if "Integer" in node.op_type})


def quantize(run_config: str, ckpt_path: str, output_dir: str = "int8", split: str = "test") -> dict[str, Any]:
    """Export ``ckpt_path`` to ONNX, quantize it to int8 and compare both on ``split`` of the run's data.

    Args:
        run_config: the run's ``config.yaml`` (it says which data module and data to use).
        ckpt_path: the checkpoint to compress.
        output_dir: where ``model.onnx``, ``model.int8.onnx`` and ``quantization.json`` go (must not exist yet).
        split: ``test`` or ``val``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from project.export import export

    out = Path(output_dir)
    if out.exists():
        raise UserError(f"{out} exists; choose another --output_dir")
    data = instantiate_class((), yaml.safe_load(Path(run_config).read_text())["data"])
    data.setup("test" if split == "test" else "validate")
    loader = {"test": data.test_dataloader, "val": data.val_dataloader}[split]()

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    fp32 = export(ckpt_path, format="onnx", output=str(partial / "model.onnx"))
    int8 = partial / "model.int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    report = {
        "split": split,
        "fp32": {"bytes": fp32.stat().st_size, "accuracy": onnx_accuracy(fp32, loader)},
        "int8": {"bytes": int8.stat().st_size, "accuracy": onnx_accuracy(int8, loader), "int8_ops": int8_ops(int8)},
    }
    report["size_ratio"] = report["int8"]["bytes"] / report["fp32"]["bytes"]
    report["accuracy_drop"] = report["fp32"]["accuracy"] - report["int8"]["accuracy"]
    (partial / "quantization.json").write_text(json.dumps(report, indent=2))
    os.replace(partial, out)
    print(
        f"fp32: {report['fp32']['bytes'] / 1e3:.1f} kB, {split} accuracy {report['fp32']['accuracy']:.4f}\n"
        f"int8: {report['int8']['bytes'] / 1e3:.1f} kB, {split} accuracy {report['int8']['accuracy']:.4f} "
        f"({', '.join(report['int8']['int8_ops'])})\n"
        f"size x{report['size_ratio']:.2f}, accuracy drop {100 * report['accuracy_drop']:.2f} points -> {out}"
    )
    return report


def main(args: list[str] | None = None) -> None:
    run_tool(quantize, args)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
