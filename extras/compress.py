"""Dynamic int8 quantization of the exported model, with size and accuracy before and after.

    python -m extras.compress --ckpt_path runs/fashion_mnist/version_0/checkpoints/last.ckpt

The checkpoint is exported to ONNX (``extras.export``: uint8 images in, probabilities out, parity-checked),
its weights are quantized to int8 by ONNX Runtime (``quantize_dynamic``: weights stored as int8, activations
quantized on the fly), and both models are run with ONNX Runtime on the test split of the run's data (the data
section of the run's ``config.yaml``). ``model.onnx``, ``model.int8.onnx`` and ``quantization.json`` are written
into a new folder, all at once (a folder that exists is never written into); the report names the final paths.
"""

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml

from extras import command_line, load_trained
from extras.export import INPUT, image_shape, trained_background, write_checked
from project.errors import UserError, require


def load_data(run_config: Path, data_dir: str | None, eval_batch_size: int | None) -> Any:
    """The data module of a run's ``config.yaml`` (its ``data`` section), with ``data_dir`` replaced if given."""
    from jsonargparse import ArgumentParser

    from project.data.base import ImageDataModule

    require(run_config.is_file(), f"run config not found: {run_config}; pass the run's config.yaml as --run_config")
    try:
        config = yaml.safe_load(run_config.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{run_config} is not valid YAML ({' '.join(str(err).split())[:120]})") from err
    data = config.get("data") if isinstance(config, dict) else None
    require(isinstance(data, dict), f"{run_config} has no data section; pass the config.yaml saved by fit")
    data = {"class_path": data.get("class_path"), "init_args": dict(data.get("init_args") or {})}
    if data_dir is not None:
        data["init_args"]["data_dir"] = data_dir
    if eval_batch_size is not None:
        data["init_args"]["eval_batch_size"] = eval_batch_size
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=ImageDataModule)
    try:
        return parser.instantiate(parser.parse_object({"data": data})).data
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - jsonargparse wraps what the data module raised
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from err
            cause = cause.__cause__ or cause.__context__
        raise UserError(f"{run_config}: cannot build its data module ({' '.join(str(err).split())[:200]})") from err


def onnx_accuracy(path: Path, loader: Any) -> float:
    """Accuracy of an exported model on ``loader``'s (uint8 images, labels) batches, with ONNX Runtime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = total = 0
    for images, labels in loader:
        correct += int((session.run(None, {INPUT: images.cpu().numpy()})[0].argmax(-1) == labels.cpu().numpy()).sum())
        total += len(labels)
    return correct / total


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing" not in str(record.msg)


@contextmanager
def without_preprocessing_advice() -> Iterator[None]:
    """ONNX Runtime advises pre-processing (shape inference, fusions) on every quantization; for these nets it
    changes nothing that matters (measured on Fashion-MNIST: the same int8 test accuracy, a 0.3 kB larger file)."""
    root, advice = logging.getLogger(), _DropAdvice()
    handlers = [root, *root.handlers]
    for h in handlers:
        h.addFilter(advice)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(advice)


def int8_ops(path: Path) -> list[str]:
    """Node types of ``path`` that compute in integers (``ConvInteger``, ``MatMulInteger``, ...)."""
    import onnx

    return sorted({node.op_type for node in onnx.load(str(path)).graph.node if "Integer" in node.op_type})


def quantize(
    ckpt_path: str,
    output_dir: str | None = None,
    run_config: str | None = None,
    data_dir: str | None = None,
    split: Literal["test", "val"] = "test",
    eval_batch_size: int | None = 1000,
    per_channel: bool = False,
) -> dict[str, Any]:
    """Export ``ckpt_path`` to ONNX, quantize it to int8 and compare both on ``split`` of the run's data.

    Args:
        ckpt_path: a checkpoint written by ``python -m project fit``.
        output_dir: a new folder for ``model.onnx``, ``model.int8.onnx`` and ``quantization.json``; default:
            ``<checkpoint name>.int8`` next to the checkpoint. Never written into when it exists.
        run_config: the run's ``config.yaml`` (which data module, which data); default: the one of the run the
            checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``).
        data_dir: read the data from here instead of the run config's ``data_dir``.
        split: ``test`` or ``val``.
        eval_batch_size: batch size of the evaluation; null: the run config's.
        per_channel: one int8 scale per output channel instead of one per weight tensor.

    Returns:
        The report (also written as ``quantization.json``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ckpt = Path(ckpt_path)
    out = Path(output_dir) if output_dir else ckpt.with_name(f"{ckpt.stem}.int8")
    require(not out.exists(), f"{out} exists and is never written into; choose another --output_dir")
    model = load_trained(ckpt, "compress", channels_last=False)  # one line for a bad checkpoint, before anything
    config = Path(run_config) if run_config else ckpt.resolve().parents[1] / "config.yaml"
    data = load_data(config, data_dir, eval_batch_size)
    require(
        data.num_classes == model.num_classes and tuple(data.image_shape) == image_shape(model),
        f"the data of {config} ({data.num_classes} classes, images {tuple(data.image_shape)}) does not fit the "
        f"checkpoint ({model.num_classes} classes, images {image_shape(model)}); pass the run's own --run_config",
    )
    data.prepare_data()
    data.setup("test" if split == "test" else "validate")
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.mkdir()
    try:
        fp32, int8 = partial / "model.onnx", partial / "model.int8.onnx"
        write_checked(model, "onnx", fp32, background=trained_background(ckpt, model))
        with without_preprocessing_advice():
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=per_channel)
        final = {name: out / name for name in ("model.onnx", "model.int8.onnx", "quantization.json")}
        report = {
            "checkpoint": str(ckpt),
            "split": split,
            "samples": len(loader.dataset),
            "per_channel": per_channel,
            "fp32": {
                "path": str(final["model.onnx"]),
                "bytes": fp32.stat().st_size,
                "accuracy": onnx_accuracy(fp32, loader),
            },
            "int8": {
                "path": str(final["model.int8.onnx"]),
                "bytes": int8.stat().st_size,
                "accuracy": onnx_accuracy(int8, loader),
                "int8_ops": int8_ops(int8),
            },
        }
        report["size_ratio"] = report["int8"]["bytes"] / report["fp32"]["bytes"]
        report["accuracy_drop"] = report["fp32"]["accuracy"] - report["int8"]["accuracy"]
        (partial / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
        require(not out.exists(), f"{out} appeared while quantizing and is never written into; nothing moved")
        os.replace(partial, out)
    finally:
        if partial.exists():
            for file in partial.iterdir():
                file.unlink()
            partial.rmdir()
    print(
        f"fp32: {report['fp32']['bytes'] / 1e3:.1f} kB, {split} accuracy {report['fp32']['accuracy']:.2%} "
        f"-> {final['model.onnx']}\n"
        f"int8: {report['int8']['bytes'] / 1e3:.1f} kB, {split} accuracy {report['int8']['accuracy']:.2%} "
        f"({', '.join(report['int8']['int8_ops'])}) -> {final['model.int8.onnx']}\n"
        f"size x{report['size_ratio']:.2f}, accuracy drop {100 * report['accuracy_drop']:.2f} points; "
        f"report: {final['quantization.json']}"
    )
    return report


def main(args: Sequence[str] | None = None) -> None:
    command_line(quantize, args)


if __name__ == "__main__":
    main()
