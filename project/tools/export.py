"""Export a checkpoint's net to TorchScript or ONNX, with a dynamic batch size and a parity check.

    python -m project.export --ckpt_path runs/x/version_0/checkpoints/last.ckpt --format onnx --output model.onnx

The checkpoint is read with ``torch.load(weights_only=True)``: only tensors and plain data, no pickled code. The
net is rebuilt from its config in the checkpoint's hyperparameters, so this works for any ``ImageClassifier``
subclass (a distilled student, a pruned model) without its training-only parts. The class names travel inside the
exported file (ONNX metadata ``class_names``; TorchScript extra file ``class_names.json``).
"""

import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import instantiate_class
from torch import nn

from project.errors import UserError, run_tool

Format = Literal["torchscript", "onnx"]
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


def load_net(ckpt_path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The trained net (eval mode) and the checkpoint's hyperparameters."""
    if not Path(ckpt_path).is_file():
        raise UserError(f"checkpoint {ckpt_path} not found")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    config = hparams.get("net")
    if not isinstance(config, dict) or "class_path" not in config:
        raise UserError(f"{ckpt_path} holds no net config (train it through `python -m project fit`)")
    net = instantiate_class((), config)
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval(), hparams


def input_shape(hparams: dict[str, Any]) -> tuple[int, ...]:
    shape = hparams["net"].get("init_args", {}).get("input_shape")
    if shape is None:
        raise UserError("the checkpoint's net config has no input_shape; pass --input_shape C,H,W")
    return tuple(int(s) for s in shape)


def run_exported(path: Path, format: Format, x: torch.Tensor) -> np.ndarray:
    if format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is marked deprecated, still works
            return torch.jit.load(str(path), map_location="cpu")(x).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def write_model(net: nn.Module, format: Format, path: Path, example: torch.Tensor, class_names: list[str]) -> None:
    # torch 2.9+ marks TorchScript and the TorchScript-based ONNX exporter deprecated; both still work and the
    # torch.export-based ONNX exporter needs the extra onnxscript package.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export", DeprecationWarning)
        _write_model(net, format, path, example, class_names)


def _write_model(net: nn.Module, format: Format, path: Path, example: torch.Tensor, class_names: list[str]) -> None:
    if format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(net, example)
        torch.jit.save(traced, str(path), _extra_files={"class_names.json": json.dumps(class_names)})
        return
    import onnx

    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load(str(path))
    model.metadata_props.add(key="class_names", value=json.dumps(class_names))
    onnx.save(model, str(path))


def export(
    ckpt_path: str,
    format: Format = "onnx",
    output: str | None = None,
    batch_size: int = 2,
    check_batch_size: int = 5,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> Path:
    """Export the net of ``ckpt_path`` and check the exported model against PyTorch on a random batch.

    Args:
        ckpt_path: a checkpoint written by ``python -m project fit``.
        format: ``torchscript`` or ``onnx``.
        output: the file to write; default: next to the checkpoint, ``<name>.pt`` or ``<name>.onnx``.
        batch_size: batch size of the example used for tracing (the exported batch size is dynamic).
        check_batch_size: batch size of the parity check, on purpose different from ``batch_size``.
        atol: largest allowed absolute difference of logits between PyTorch and the exported model.
        overwrite: replace ``output`` if it exists.

    Returns:
        The path written. Nothing is written when the parity check fails.
    """
    out = Path(output) if output else Path(ckpt_path).with_suffix(SUFFIX[format])
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another --output or pass --overwrite true")
    net, hparams = load_net(ckpt_path)
    shape = input_shape(hparams)
    names = [str(n) for n in hparams.get("class_names") or []]
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, *shape, generator=generator)
    check = torch.randn(check_batch_size, *shape, generator=generator)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        write_model(net, format, partial, example, names)
        with torch.no_grad():
            expected = net(check).numpy()
        got = run_exported(partial, format, check)
        diff = float(np.abs(got - expected).max())
        if got.shape != expected.shape or not diff <= atol:
            raise UserError(f"{format} export differs from PyTorch: max |logits diff| = {diff:.3g} > {atol}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {out} ({format}, input (N, {', '.join(map(str, shape))}), max |logits diff| {diff:.2e} <= {atol})")
    return out


def main(args: list[str] | None = None) -> None:
    run_tool(export, args)


if __name__ == "__main__":
    main()
