"""Export a checkpoint's whole inference path as ONNX or a torch.export program: uint8 images in, probabilities out.

    python -m extras.export --ckpt_path runs/fashion_mnist/version_0/checkpoints/last.ckpt
    python -m extras.export --ckpt_path runs/fashion_mnist/version_0/checkpoints/last.ckpt --format pt2

The exported graph is the classifier's own ``forward`` plus a softmax, captured by ``torch.export`` (ONNX through
the torch.export-based exporter): it takes raw pixels, uint8 (N, C, H, W) in [0, 255] with any batch size N,
scales and normalizes them itself (the checkpoint's mean and std are folded in), and returns probabilities
(N, num_classes). A ``.pt2`` file loads with ``torch.export.load`` alone, an ``.onnx`` file with any ONNX runtime.
Everything a user needs to feed it travels inside the file (ONNX ``metadata_props``; the ``.pt2`` extra file
``metadata.json``): class names, input shape (C, H, W), dtype and range, the image mode (``L`` or ``RGB``), the
background colour and the whole image rule of ``project.data.images`` (how training read image files), and, for
information only, mean and std.

The classifier is loaded by Lightning (:func:`extras.load_trained`), so any checkpoint of ``python -m project fit``
exports the same way (a distilled student, a pruned model, a net from the user's own file). The exported model is
checked against PyTorch on a random uint8 batch of another batch size before it is put in place (atomically); a
failed check writes nothing, and an existing file is replaced only with ``--overwrite true``.
"""

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from extras import command_line, load_trained
from project.data.images import RULE, read_image, rgb
from project.errors import UserError, require
from project.files import atomic_write
from project.models.classifier import ImageClassifier

Format = Literal["onnx", "pt2"]
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}
INPUT, OUTPUT = "images", "probabilities"
MODES = {1: "L", 3: "RGB"}  # PIL modes: the channel order the data modules read images in
METADATA = "metadata.json"  # the .pt2 file's extra file
WHITE = inspect.signature(read_image).parameters["background"].default


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


def trained_background(ckpt_path: str | os.PathLike, model: ImageClassifier) -> str:
    """The colour transparent pixels were composited onto in training: the model's ``background`` hyperparameter,
    else the data section's in the run's ``config.yaml`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``),
    else read_image's default."""
    if model.hparams.get("background"):
        return str(model.hparams["background"])
    try:
        config = yaml.safe_load((Path(ckpt_path).resolve().parents[1] / "config.yaml").read_text())
        background = config["data"]["init_args"]["background"]
    except (OSError, IndexError, KeyError, TypeError, yaml.YAMLError):
        return WHITE
    return str(background) if background else WHITE


def metadata(model: ImageClassifier, background: str = WHITE) -> dict[str, Any]:
    """How to feed the exported model, stored inside the file."""
    c, h, w = image_shape(model)
    mode = MODES.get(c, f"{c} channels")
    try:
        rgb(background)
    except ValueError as err:
        raise UserError(f"background {background!r} is not a colour (a name or #rrggbb)") from err
    return {
        "class_names": list(model.class_names),
        "input_name": INPUT,
        "input_shape": [c, h, w],
        "input_layout": "NCHW, any batch size N",
        "input_dtype": "uint8",
        "input_range": [0, 255],
        "image_mode": mode,
        "background": background,
        "image_rule": f"{RULE}; here: background {background}, image mode {mode}, {h}x{w} (height x width)",
        "mean": [float(v) for v in model.mean.flatten()],
        "std": [float(v) for v in model.std.flatten()],
        "normalization": "inside the model ((pixels / 255 - mean) / std): feed raw uint8 pixels; mean and std "
        "are for information only",
        "output_name": OUTPUT,
        "output": "probabilities (softmax), float32 (N, num_classes), in the order of class_names",
    }


def save(module: Probabilities, format: Format, file: IO[bytes], example: Tensor, meta: dict[str, Any]) -> None:
    """``module`` captured by torch.export with a dynamic batch size, written to ``file`` with ``meta`` inside."""
    shapes = {INPUT: {0: torch.export.Dim("batch", min=1)}}
    try:
        with torch.no_grad():
            if format == "pt2":
                program = torch.export.export(module, (example,), dynamic_shapes=shapes)
                torch.export.save(program, file, extra_files={METADATA: json.dumps(meta)})
                return
            onnx_program = torch.onnx.export(
                module, (example,), input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=shapes, verbose=False
            )
    except (ImportError, UserError):
        raise
    except Exception as err:  # noqa: BLE001 - torch.export and the ONNX translation refuse code in many ways
        net = type(module.model.net).__name__
        reason = " ".join(str(err).split())[:300]
        raise UserError(f"cannot export the net {net} to {format} ({type(err).__name__}: {reason})") from err
    for key, value in meta.items():
        onnx_program.model.metadata_props[key] = value if isinstance(value, str) else json.dumps(value)
    file.write(onnx_program.model_proto.SerializeToString())


def write_checked(
    model: ImageClassifier,
    format: Format,
    out: Path,
    overwrite: bool = False,
    batch_size: int = 2,
    check_batch_size: int = 5,
    atol: float = 1e-5,
    background: str = WHITE,
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
    meta = metadata(model, background)
    with atomic_write(out) as file:
        save(module, format, file, example, meta)
        file.flush()
        with torch.no_grad():
            expected = module(check).numpy()
        got = (run_onnx if format == "onnx" else run_pt2)(file.name, check.numpy())
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not diff <= atol:
            raise UserError(
                f"the {format} export differs from PyTorch on a batch of {check_batch_size}: max |probability "
                f"difference| {diff:.3g} > --atol {atol}; nothing written"
            )
    return diff


def run_onnx(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """An ONNX model's output for uint8 ``images``, with ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: images})[0]


def run_pt2(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """A torch.export program's output for uint8 ``images``, loaded with ``torch.export.load``."""
    with open(path, "rb") as f, torch.no_grad():  # a file object: the partial file's name does not end in .pt2
        return torch.export.load(f).module()(torch.from_numpy(images)).numpy()


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
        format: ``onnx`` or ``pt2`` (a ``torch.export`` program).
        output: the file to write; default: next to the checkpoint, ``<name>.onnx`` or ``<name>.pt2``.
        overwrite: replace ``output`` if it exists.
        batch_size: batch size of the example used for capturing (the exported batch size is dynamic).
        check_batch_size: batch size of the parity check, another one on purpose.
        atol: largest allowed absolute difference of probabilities between PyTorch and the exported model.

    Returns:
        The path written.
    """
    out = Path(output) if output else Path(ckpt_path).with_suffix(SUFFIX.get(format, ""))
    require(not out.exists() or overwrite, f"{out} exists; choose another --output or pass --overwrite true")
    model = load_trained(ckpt_path, "export", channels_last=False)  # plain layout: the graph needs no reordering
    background = trained_background(ckpt_path, model)
    diff = write_checked(model, format, out, overwrite, batch_size, check_batch_size, atol, background)
    c, h, w = image_shape(model)
    print(
        f"wrote {out} ({format}: uint8 images (N, {c}, {h}, {w}) -> probabilities of {model.num_classes} classes; "
        f"max |difference| to PyTorch {diff:.1e} on a batch of {check_batch_size})"
    )
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored in an exported file (``.onnx`` or ``.pt2``), values decoded."""
    path = Path(path)
    require(path.suffix in (".onnx", ".pt2"), f"{path} is not an exported model; pass a .onnx or .pt2 file")
    require(path.is_file(), f"exported model not found: {path}")
    try:
        if path.suffix == ".pt2":
            extra = {METADATA: ""}
            torch.export.load(str(path), extra_files=extra)
            return json.loads(extra[METADATA])
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except (ImportError, UserError):
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: each reader raises its own types
        raise UserError(f"{path} is not a readable exported model ({type(err).__name__}); export it again") from err
    decoded = {}
    for key, value in props.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def main(args: Sequence[str] | None = None) -> None:
    command_line(export, args)


if __name__ == "__main__":
    main()
