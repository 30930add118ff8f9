"""Errors the user can fix, and how they reach the terminal: one line, ``error: what is wrong; how to fix it``.

``cli_main`` turns a :class:`UserError` (and the library errors :func:`describe` recognizes: parse errors,
refused or mismatched checkpoints, a full or read-only disk) into that line and exit code 2. ``--debug`` or
``PROJECT_DEBUG=1`` shows the full traceback instead.
"""

import difflib
import errno
import importlib
import inspect
import os
import pickle
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

DEBUG_ENV = "PROJECT_DEBUG"
DEBUG_FLAG = "--debug"
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


class UserError(Exception):
    """A problem the user can fix (missing data, bad value). The CLI prints it as one line and exits non-zero."""


def run_tool(function: Any, args: Sequence[str] | None = None) -> Any:
    """``python -m project.<tool>``: ``function``'s arguments from the command line (jsonargparse's ``auto_cli``);
    a :class:`UserError` ends as one ``error: ...`` line and exit code 2."""
    from jsonargparse import auto_cli

    try:
        return auto_cli(function, args=args, as_positional=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def split_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether a traceback was asked for (flag or ``PROJECT_DEBUG=1``)."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    wanted = len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    return rest, wanted


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# ---- parse errors ------------------------------------------------------------------------------------------
class ArgumentParser(LightningArgumentParser):
    """jsonargparse's parser, but a failed parse raises a one-line :class:`UserError` instead of usage + exit."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse probing internally: keep its behaviour
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UserError(describe_parse_error(message, parser)) from ex


def option_names(parser: Any) -> list[str]:
    return [s for action in getattr(parser, "_actions", []) for s in action.option_strings if s.startswith("--")]


def init_parameters(class_path: str) -> list[str]:
    """Named ``__init__`` parameters of ``class_path``, following ``**kwargs`` into the base classes."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def module_members(class_path: str) -> list[str]:
    module = class_path.rpartition(".")[0]
    try:
        members = vars(importlib.import_module(module))
    except ImportError:
        return []
    return [f"{module}.{n}" for n, v in members.items() if inspect.isclass(v) and not n.startswith("_")]


def describe_parse_error(message: str, parser: Any) -> str:
    """jsonargparse's (often nested, multi-line) message as one line with a fix."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    first = lines[0] if lines else message
    subcommand = getattr(parser, "subcommand", None)
    help_hint = f"`python -m project {subcommand + ' ' if subcommand else ''}--help` lists them"

    if m := re.match(r"unrecognized arguments: (.*)", first):
        token = m.group(1).split()[0].split("=")[0]
        return f"unknown option {token}{did_you_mean(token, option_names(parser))}; {help_hint}"
    if m := re.match(r"(?:Subcommand '\w+'|Group '([\w.]+)') does not accept option '([\w.]+)'", first):
        key = "--" + (f"{m.group(1)}." if m.group(1) else "") + m.group(2)
        return f"unknown option {key}{did_you_mean(key, option_names(parser))}; {help_hint}"
    if m := re.match(r"argument subcommand: invalid choice: '([^']*)' \(choose from (.*)\)", first):
        choices = re.findall(r"'(\w+)'", m.group(2))
        return f"unknown subcommand '{m.group(1)}'{did_you_mean(m.group(1), choices)}; choose from {', '.join(choices)}"
    if m := re.search(r'Parser key "config": File does not exist: (.*)', first):
        return f"config file not found: {m.group(1).strip(chr(39))}; check the path given to --config"
    if first.startswith("Problems parsing config"):
        where = next((line for line in reversed(lines) if line.startswith("in ")), "")
        what = next((line for line in reversed(lines) if not line.startswith("in ")), first)
        position = where.removeprefix('in "<unicode string>", ')
        return f"YAML syntax error in {broken_yaml(parser) or 'a --config file'} ({position}): {what}; fix the file"

    # Nested errors: the key path from 'Parser key' and 'class_path' lines, the cause from the innermost line.
    keys: list[str] = []
    leaves: list[str] = []
    class_path = ""
    for line in (line.removeprefix("- ") for line in lines):
        for key in re.findall(r'Parser key "([^"]+)"', line):
            keys.append(key)
        if m := re.match(r"Problem with given class_path '([^']+)':", line):
            class_path = m.group(1)
            keys.append("init_args")
        elif not re.match(
            r"(Parser key|Does not validate|Subtypes:|Errors:|Given value type:|Expected a <class 'NoneType'>)", line
        ):
            leaves.append(line)
    nested = re.search(r"NestedArg\(key='([^']+)', val=(.*)\)$", message, re.M)
    key = ".".join(keys)
    if nested and keys:
        key = f"{keys[0]}.init_args.{nested.group(1)}"
    for leaf in leaves:  # a class that cannot be imported
        if m := re.match(r"module '([\w.]+)' has no attribute '(\w+)'", leaf):
            wanted = f"{m.group(1)}.{m.group(2)}"
            where = re.sub(r"(\.init_args)?\.class_path$|\.init_args$", "", key)
            return f"{where}: cannot import {wanted}{did_you_mean(wanted, module_members(wanted))}"
        if m := re.search(r"No module named '([\w.]+)'", leaf):
            return f"{re.sub(r'.init_args$', '', key)}: no module named {m.group(1)}; check the class_path"
    inner = leaves[0] if leaves else first
    if m := re.match(r"Option '(\w+)' is not accepted", inner):
        name = class_path.rsplit(".", 1)[-1] or "this class"
        hint = did_you_mean(m.group(1), init_parameters(class_path)) if class_path else ""
        where = key.removesuffix(f".{m.group(1)}") or "the config"
        return f"{name} has no parameter '{m.group(1)}'{hint} (in {where})"
    expected = [t for t in re.findall(r"Expected a <class '([\w.]+)'>", message) if t != "NoneType"]
    if expected:
        if nested:
            value = nested.group(2).strip("'")
        else:
            given = re.findall(r"(?:Given|Got) value: (.*?)(?:\. Got value:.*)?$", message, re.M)
            value = given[0] if given else "?"
        return f"{key}: expected {' or '.join(dict.fromkeys(expected))}, got {value!r}"
    return f"{key + ': ' if key else ''}{inner}"


def broken_yaml(parser: Any) -> str | None:
    """Which of the --config files on the command line does not parse."""
    import yaml

    while getattr(parser, "parent_parser", None) is not None:
        parser = parser.parent_parser
    argv = [str(a) for a in getattr(parser, "args", None) or []]
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError:
            return path
        except OSError:
            continue
    return None


# ---- errors raised while running ---------------------------------------------------------------------------
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


def describe(err: BaseException) -> str | None:
    """One line for an error the user can act on, or None for a bug (which keeps its traceback)."""
    cause: BaseException | None = err
    while cause is not None:  # jsonargparse wraps what a class_path object (e.g. a data module) raised
        if isinstance(cause, UserError):
            return str(cause)
        cause = cause.__cause__
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        where = err.filename or "the output folder"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"disk full while writing {where}; "
                f"free some space or pick another output folder (earlier files are intact)"
            )
        return (
            f"cannot write {where}: {err.strerror}; choose a writable output folder, "
            f"e.g. --trainer.logger.init_args.save_dir DIR"
        )
    text = str(err)
    if isinstance(err, (ValueError, TypeError)) and "Does not validate against any of the Union subtypes" in text:
        cause = err
        while cause.__cause__ is not None:  # jsonargparse wraps what a class raised for a bad init value
            cause = cause.__cause__
        if cause is not err:
            given = re.search(r"class_path='([\w.]+)'", text)
            return f"{given.group(1).rsplit('.', 1)[-1] + ': ' if given else ''}{cause}"
    if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in text:
        shapes = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\)).*?"
                           r"current model is (torch.Size\(\[[\d, ]*\]\))", text, re.S)  # fmt: skip
        detail = f" ({shapes.group(1)}: {shapes.group(2)} saved, {shapes.group(3)} here)" if shapes else ""
        return (
            f"the checkpoint does not fit this model{detail}: it was trained with another net or num_classes; "
            f"use the config.yaml saved next to it, e.g. -c runs/<name>/version_<N>/config.yaml"
        )
    if isinstance(err, RuntimeError) and re.search(
        r"Connection reset by peer|Connection closed by peer|NCCL.*(timeout|Timeout)|Watchdog caught collective", text
    ):
        return (
            "a DDP worker stopped answering (it died or hung), so the job stops instead of waiting; "
            "look above for that worker's own error (out of memory, killed), fix it, then resume with --ckpt_path last"
        )
    if isinstance(err, RuntimeError) and "Aborting to avoid overwriting" in text:
        path = re.search(r"expected (\S+) to NOT exist", text)
        return (
            f"{path.group(1) if path else 'the run folder'} belongs to an earlier run and is never overwritten; "
            f"leave trainer.logger.init_args.version unset (a new version folder is made) or pick another name"
        )
    return None


def describe_checkpoint_error(path: str | os.PathLike, err: BaseException) -> str:
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(err))
        reason = f" ({found.group(1)})" if found else ""
        return (
            f"refused to load {path}: it contains Python objects, not just weights{reason}, and loading it could run "
            f"code; only load checkpoints you trust, re-saved as plain data"
        )
    return (
        f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
        f"pass a .ckpt file written by this project's fit"
    )


def check_checkpoint_path(ckpt_path: str | os.PathLike | None) -> None:
    """A --ckpt_path that is neither a file nor one of Lightning's names (last, best, hpc, registry) is a typo."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path)
    if not path.is_file():
        near = did_you_mean(str(path), [str(p) for p in path.parent.glob("*.ckpt")]) if path.parent.is_dir() else ""
        raise UserError(
            f"--ckpt_path {path}: no such file{near}; fit keeps them in runs/<name>/version_<N>/checkpoints"
        )


def check_environment() -> None:
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not a W&B mode; set it to online, offline or disabled (or unset it)")


def guard_data_reading(datamodule: Any) -> None:
    """A data file that exists but cannot be parsed (truncated, corrupt) ends as one line, not a traceback."""
    setup = datamodule.setup

    def guarded_setup(stage: str | None = None) -> None:
        try:
            setup(stage)
        except (AssertionError, EOFError, pickle.UnpicklingError, RuntimeError) as err:
            where = getattr(datamodule, "data_dir", "the data folder")
            detail = (str(err).splitlines() or [""])[0][:160]
            raise UserError(
                f"could not read the data set in {where} ({type(err).__name__}: {detail}); a file is probably "
                f"truncated or corrupt: delete it and copy it again"
            ) from err
        except ValueError as err:  # a setting the data does not allow, e.g. val_split larger than the data set
            raise UserError(f"{type(datamodule).__name__}: {err}") from err

    datamodule.setup = guarded_setup


def check_run_folder_is_new(logger_config: Any) -> None:
    """A logger given a fixed version must not reuse an earlier run's folder (CSVLogger would delete its metrics)."""
    for entry in logger_config if isinstance(logger_config, list) else [logger_config]:
        init_args = getattr(entry, "init_args", None)
        version = getattr(init_args, "version", None) if init_args is not None else None
        save_dir = getattr(init_args, "save_dir", None)
        if version is None or save_dir is None:
            continue
        name = getattr(init_args, "name", None) or ""
        folder = Path(save_dir) / name / (version if isinstance(version, str) else f"version_{version}")
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(
                f"{folder} holds an earlier run and is never overwritten; leave trainer.logger.init_args.version "
                f"unset (a new version folder is made) or pick another version"
            )
