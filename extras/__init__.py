"""Extras a fork may delete without touching the core: export, int8 compression, distillation, serving.

Each tool is a function with a command line made from its signature (jsonargparse's ``auto_cli``):
``python -m extras.export``, ``python -m extras.compress``, ``python -m extras.serve``; distillation is a model
class for ``python -m project fit`` (``configs/compress/distill.yaml``). The core never imports this package.
"""

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from jsonargparse import ArgumentParser, auto_cli

from project.errors import OneLineErrors, UserError, exit_on_user_error, require

if TYPE_CHECKING:
    from project.models.classifier import ImageClassifier


def command_line(function: Callable[..., Any], args: Sequence[str] | None = None) -> Any:
    """``python -m extras.<tool>``: ``function``'s arguments from the command line. A problem the user can fix (a bad
    argument, a missing, damaged or hostile checkpoint) ends as one ``error: ...`` line and exit code 2;
    ``--debug`` or ``PROJECT_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if args is None else args)
    parser_class = type("Parser", (OneLineErrors, ArgumentParser), {})
    with exit_on_user_error(debug="--debug" in argv):
        args = [a for a in argv if a != "--debug"]
        return auto_cli(function, args=args, as_positional=False, parser_class=parser_class)


def load_trained(ckpt_path: str | os.PathLike, tool: str, **hparams: Any) -> "ImageClassifier":
    """The classifier of a ``python -m project fit`` checkpoint, loaded by Lightning
    (``ImageClassifier.load_from_checkpoint(path, weights_only=True)``) on the CPU, in eval mode, gradients off.

    ``tool`` names who needs it in the error lines: a missing, damaged or hostile file, or a checkpoint of another
    LightningModule (a task that is not classification), is one line. ``hparams`` replace saved hyperparameters.
    The net is built as fit built it (any ``nn.Module`` fit accepts), but reads no weights file of its own: the
    checkpoint has the trained weights. A distilled student loads without its teacher.
    """
    from project.checkpoint_io import load_checkpoint
    from project.models.classifier import ImageClassifier

    where = str(ckpt_path)
    saved = load_checkpoint(ckpt_path, mmap=True).get("hyper_parameters")  # one line for a bad file, code never run
    class_path = saved.get("_class_path") if isinstance(saved, dict) else None
    require(
        isinstance(class_path, str) and "." in class_path,
        f"{where} names no model class (hyper_parameters._class_path); {tool} needs a checkpoint written by "
        f"`python -m project fit`",
    )
    module, _, name = class_path.rpartition(".")
    try:  # Lightning loads only classes already imported: the user's own module, as fit imported it
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UserError(
            f"{where} holds a {class_path}, which cannot be imported ({err}); run {tool} from the folder that holds "
            f"its module (or put that on PYTHONPATH)"
        ) from err
    require(
        isinstance(cls, type) and issubclass(cls, ImageClassifier),
        f"{where} holds a {class_path}, not an image classifier; {tool} needs a checkpoint of "
        f"project.models.ImageClassifier (or a subclass) trained by `python -m project fit`",
    )
    net = saved.get("net")
    if isinstance(net, dict) and "pretrained_weights" in (net.get("init_args") or {}):
        hparams.setdefault("net", {**net, "init_args": {**net["init_args"], "pretrained_weights": None}})
    if "teacher_ckpt" in saved:  # extras.distill: the student alone
        hparams.setdefault("teacher_ckpt", None)
    try:
        model = ImageClassifier.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **hparams)
    except Exception as err:  # noqa: BLE001 - jsonargparse and Lightning raise many types on a config they refuse
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UserError):  # what a net or the classifier refused
            cause = cause.__cause__ or cause.__context__
        reason = str(cause) if cause is not None else f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        raise UserError(f"{where}: cannot build its {class_path} ({reason})") from err
    return model.eval().requires_grad_(False)
