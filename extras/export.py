"""Export a checkpoint's whole inference path to ONNX or TorchScript: uint8 images in, class probabilities out.

    python -m extras.export --ckpt_path runs/fashion_mnist/version_0/checkpoints/last.ckpt --format onnx

The exported graph is the classifier's own ``forward`` plus a softmax: it takes raw pixels, uint8 (N, C, H, W) in
[0, 255] with any batch size N, scales and normalizes them itself (the checkpoint's mean and std are folded in),
and returns probabilities (N, num_classes). Everything a user needs to feed it travels inside the file (ONNX
``metadata_props``; TorchScript extra file ``metadata.json``): class names, input shape (C, H, W), dtype and range,
channel order (PIL mode ``L`` or ``RGB``), the resize rule and, for information only, mean and std.

The checkpoint is read weights-only and the classifier rebuilt from its hyperparameters (:func:`load_classifier`),
so any checkpoint of ``python -m project fit`` exports the same way (a distilled student, a pruned model). The
exported model is checked against PyTorch on a random uint8 batch of another batch size before it is put in place
(atomically); a failed check writes nothing, and an existing file is replaced only with ``--overwrite true``.
"""

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from extras import command_line
from project.checkpoint_io import load_checkpoint
from project.errors import UserError, require
from project.models.classifier import ImageClassifier

Format = Literal["onnx", "torchscript"]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT, OUTPUT = "images", "probabilities"
MODES = {1: "L", 3: "RGB"}  # PIL modes: the channel order the data modules read images in


def build_net(config: Any, where: str) -> nn.Module:
    """The net of a checkpoint's ``net`` config (``{class_path, init_args}``); only ``nn.Module`` classes."""
    from jsonargparse import ArgumentParser

    require(
        isinstance(config, dict) and isinstance(config.get("class_path"), str),
        f"{where} holds no net config (hyper_parameters.net with a class_path); pass a checkpoint written by "
        f"`python -m project fit`",
    )
    config = {"class_path": config["class_path"], "init_args": dict(config.get("init_args") or {})}
    if "pretrained_weights" in config["init_args"]:  # the checkpoint has the trained weights: read no other file
        config["init_args"]["pretrained_weights"] = None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)  # refuses a class_path that is not an nn.Module
    try:
        return parser.instantiate(parser.parse_object({"net": config})).net
    except Exception as err:  # noqa: BLE001 - an unknown class, bad init_args, a net that fails to build
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{where}: cannot build its net {config['class_path']} ({reason})") from err


def load_classifier(ckpt_path: str | os.PathLike, channels_last: bool | None = False) -> ImageClassifier:
    """The trained classifier of a ``python -m project fit`` checkpoint, in eval mode with gradients off.

    The file is read weights-only (``project.checkpoint_io.load_checkpoint``: one-line errors for missing, damaged,
    hostile or foreign files); the classifier is rebuilt as a plain :class:`ImageClassifier` from the checkpoint's
    hyperparameters (net, classes, image shape, mean, std) whatever class trained it, and the net's weights loaded.
    ``channels_last``: the memory layout of its convolutions (None: as trained).
    """
    where = str(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path, mmap=True)  # mmap: a non-zip file is one clear "not readable" line
    hparams, state = checkpoint.get("hyper_parameters"), checkpoint["state_dict"]
    require(isinstance(hparams, dict), f"{where} has no hyper_parameters; pass a checkpoint of `python -m project fit`")
    require(isinstance(state, dict), f"{where}: its state_dict is not a dict of weights; the file is damaged")
    net = build_net(hparams.get("net"), where)
    init_args = hparams["net"].get("init_args") or {}
    options = {key: hparams.get(key) for key in ("num_classes", "class_names", "image_shape", "mean", "std")}
    options["image_shape"] = options["image_shape"] or init_args.get("input_shape")
    options["num_classes"] = options["num_classes"] or init_args.get("num_classes") or 10
    options["channels_last"] = bool(hparams.get("channels_last")) if channels_last is None else channels_last
    try:
        with warnings.catch_warnings():  # the net is given as an object on purpose; ImageClassifier drops it
            warnings.filterwarnings("ignore", message=r"Attribute 'net' is an instance of `nn.Module`")
            model = ImageClassifier(net, **options)
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{where}: malformed hyperparameters ({type(err).__name__}: {err})") from err
    weights = {k.removeprefix("net."): v for k, v in state.items() if isinstance(k, str) and k.startswith("net.")}
    try:
        model.net.load_state_dict(weights)
    except Exception as err:  # noqa: BLE001 - missing/unexpected keys, shapes, non-tensor values
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{where}: its weights do not fit its own net config ({reason}); the file is damaged") from err
    return model.eval().requires_grad_(False)


class Probabilities(nn.Module):
    """What is exported: raw uint8 images (N, C, H, W) -> the classifier's normalization and net -> softmax."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images).float().softmax(dim=-1)


def image_shape(model: ImageClassifier) -> tuple[int, int, int]:
    shape = model.hparams.get("image_shape")
    require(
        shape is not None and len(shape) == 3,
        "the checkpoint states no image shape (C, H, W); it was not written by this project's fit",
    )
    return tuple(int(s) for s in shape)


def metadata(model: ImageClassifier) -> dict[str, Any]:
    """How to feed the exported model, stored inside the file."""
    c, h, w = image_shape(model)
    mode = MODES.get(c)
    return {
        "class_names": list(model.class_names),
        "input_name": INPUT,
        "input_shape": [c, h, w],
        "input_layout": "NCHW, any batch size N",
        "input_dtype": "uint8",
        "input_range": [0, 255],
        "image_mode": mode or f"{c} channels",
        "channel_order": {"L": "L (grayscale)", "RGB": "RGB"}.get(mode, f"{c} channels"),
        "resize": f"bilinear to {h}x{w} (height x width), after converting to the image mode: "
        f"PIL Image.open(f).convert(image_mode).resize(({w}, {h}), Image.BILINEAR)",
        "mean": [float(v) for v in model.mean.flatten()],
        "std": [float(v) for v in model.std.flatten()],
        "normalization": "inside the model ((pixels / 255 - mean) / std): feed raw uint8 pixels; mean and std "
        "are for information only",
        "output_name": OUTPUT,
        "output": "probabilities (softmax), float32 (N, num_classes), in the order of class_names",
    }


def write_model(module: Probabilities, format: Format, path: Path, example: Tensor, meta: dict[str, Any]) -> None:
    # torch marks TorchScript and the TorchScript-based ONNX exporter deprecated; both still work, while the
    # torch.export-based ONNX exporter needs the extra onnxscript package.
    classifier = module.model
    classifier._jit_is_scripting = True  # Lightning's own flag for tracing: no trainer lookups on the module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if format == "torchscript":
                with torch.no_grad():
                    traced = torch.jit.trace(module, example)
                torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(meta)})
                return
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    finally:
        classifier._jit_is_scripting = False
    import onnx

    model = onnx.load(str(path))
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(model, str(path))


def run_exported(path: Path, format: Format, images: np.ndarray) -> np.ndarray:
    """The exported model's output for uint8 ``images``, run as a user would (onnxruntime or torch.jit.load)."""
    if format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")(torch.from_numpy(images)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: images})[0]


def write_checked(
    model: ImageClassifier,
    format: Format,
    out: Path,
    overwrite: bool = False,
    batch_size: int = 2,
    check_batch_size: int = 5,
    atol: float = 1e-5,
) -> float:
    """Export ``model`` to ``out``; returns the largest probability difference to PyTorch. Nothing is written when
    the check fails or ``out`` exists (unless ``overwrite``)."""
    require(format in SUFFIX, f"--format must be one of {', '.join(SUFFIX)}, got {format}")
    require(not out.exists() or overwrite, f"{out} exists; choose another --output or pass --overwrite true")
    require(batch_size >= 1 and check_batch_size >= 1, "--batch_size and --check_batch_size must be at least 1")
    module = Probabilities(model.eval()).eval()
    shape = image_shape(model)
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, generator=generator)
    check = torch.randint(0, 256, (check_batch_size, *shape), dtype=torch.uint8, generator=generator)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        write_model(module, format, partial, example, metadata(model))
        with torch.no_grad():
            expected = module(check).numpy()
        got = run_exported(partial, format, check.numpy())
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not diff <= atol:
            raise UserError(
                f"the {format} export differs from PyTorch on a batch of {check_batch_size}: max |probability "
                f"difference| {diff:.3g} > --atol {atol}; nothing written"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return diff


def export(
    ckpt_path: str,
    format: Format = "onnx",
    output: str | None = None,
    overwrite: bool = False,
    batch_size: int = 2,
    check_batch_size: int = 5,
    atol: float = 1e-5,
) -> Path:
    """Export a checkpoint's classifier: uint8 images (N, C, H, W) in, class probabilities out, metadata inside.

    Args:
        ckpt_path: a checkpoint written by ``python -m project fit``.
        format: ``onnx`` or ``torchscript``.
        output: the file to write; default: next to the checkpoint, ``<name>.onnx`` or ``<name>.pt``.
        overwrite: replace ``output`` if it exists.
        batch_size: batch size of the example used for tracing (the exported batch size is dynamic).
        check_batch_size: batch size of the parity check, another one on purpose.
        atol: largest allowed absolute difference of probabilities between PyTorch and the exported model.

    Returns:
        The path written.
    """
    out = Path(output) if output else Path(ckpt_path).with_suffix(SUFFIX.get(format, ""))
    require(not out.exists() or overwrite, f"{out} exists; choose another --output or pass --overwrite true")
    model = load_classifier(ckpt_path)
    diff = write_checked(model, format, out, overwrite, batch_size, check_batch_size, atol)
    c, h, w = image_shape(model)
    print(
        f"wrote {out} ({format}: uint8 images (N, {c}, {h}, {w}) -> probabilities of {model.num_classes} classes; "
        f"max |difference| to PyTorch {diff:.1e} on a batch of {check_batch_size})"
    )
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored in an exported file (ONNX or TorchScript), values decoded."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        decoded = {}
        for key, value in props.items():
            try:
                decoded[key] = json.loads(value)
            except json.JSONDecodeError:
                decoded[key] = value
        return decoded
    extra = {"metadata.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["metadata.json"])


def main(args: Sequence[str] | None = None) -> None:
    command_line(export, args)


if __name__ == "__main__":
    main()
