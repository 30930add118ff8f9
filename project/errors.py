"""Errors a user can fix, printed as one line ``error: <what is wrong; how to fix it>`` with exit code 2; anything
else is a bug and keeps its traceback (``--debug`` or ``PROJECT_DEBUG=1``: every traceback)."""

import difflib
import errno
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# package name in the message: pyproject's extra
OPTIONAL = {"onnx": "export", "tensorboard": "tensorboard", "litserve": "serve", "prometheus_client": "serve"}


class UserError(Exception):
    """A problem the user can fix (a bad value, a missing file); the message says what to change."""


def require(ok: object, message: str) -> None:
    if not ok:
        raise UserError(message)


def did_you_mean(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def parse_error(message: str, options: list[str]) -> str:
    """jsonargparse's nested, multi-line message as one line: the key, its innermost reason, the value given."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    if lines[0].startswith("Problems parsing config"):  # yaml's own message: the position of the problem last
        where = re.findall(r"line \d+, column \d+", message)[-1]
        return f"YAML syntax error ({where}): {[x for x in lines if not x.startswith('in ')][-1]}; fix the file"
    unknown = re.search(
        r"unrecognized arguments: (?:\w+ )*(--[\w.]+)|(?:Group '([\w.]+)' )?does not accept option '([\w.]+)'", message
    )
    if unknown:
        option = unknown[1] or "--" + ".".join(filter(None, unknown.groups()[1:]))
        return f"unknown option {option}{did_you_mean(option, options)}; --help lists them"
    noise = (
        r"Parser key|Does not validate|Subtypes|Errors|Given value|Expected a <class 'NoneType'>|Expected a path|"
        r"Problem|Type "
    )
    reason = next((line for line in lines if not re.match(noise, line)), lines[0])
    if m := re.match(r"Option '(\w+)' is not accepted", reason):
        cls = re.findall(r"class_path '([\w.]+)'", message)[-1].rsplit(".")[-1]
        return f"{cls} has no parameter '{m[1]}'"
    keys = [k for k in re.findall(r'Parser key "([^"]+)"', message) if k != "config"]
    given = re.findall(r"Given value: (.*)", message) if "Expected a <class" in reason else []
    return f"{'.'.join(keys) + ': ' if keys else ''}{reason}{', got ' + given[0] if given else ''}"


class OneLineErrors:
    """For a jsonargparse parser: a bad argument raises a one-line :class:`UserError` instead of usage + exit."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:  # jsonargparse trying a type internally: keep its behaviour
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UserError(parse_error(message, ["--" + key for key in parser.get_defaults().keys()])) from ex


def one_line(err: BaseException) -> str | None:
    """The line to print for an error the user can act on, or None for a bug."""
    cause, text = err, str(err)
    while cause is not None:  # jsonargparse and Lightning wrap what a class raised
        if isinstance(cause, UserError):  # a DataLoader worker re-raises it with the worker's traceback inside
            return str(cause).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")
        if isinstance(cause, ModuleNotFoundError):  # an optional package (onnx, tensorboard) is not installed
            extra = next((e for name, e in OPTIONAL.items() if name in str(cause)), None)
            hint = f': pip install -e ".[{extra}]" installs it' if extra else ""
            return str(cause).splitlines()[0].rstrip(".") + hint
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {err.filename or 'the output'}; free some space (earlier files are intact)"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return f"cannot write {err.filename}: {err.strerror}; choose a writable folder, e.g. --trainer.default_root_dir"
    if isinstance(err, (RuntimeError, ValueError)) and "HINT:" in text:  # Lightning's own messages that say what to do
        return " ".join(text.split())
    if not isinstance(err, RuntimeError):
        return None
    if m := re.search(r"size mismatch for ([\w.]+): copying a param with shape (\S+).*?model is (\S+)\.", text, re.S):
        return (
            f"the checkpoint does not fit this model ({m[1]}: {m[2]} saved, {m[3]} here): it was trained with "
            f"another net or num_classes; use the config.yaml saved next to it, -c runs/<name>/version_<N>/config.yaml"
        )
    if m := re.search(r"(Missing|Unexpected) key\(s\) in state_dict: ([^.]*)", text):
        return (
            f"the checkpoint does not fit this model ({m[1].lower()} weights {m[2][:120]}): it was trained with "
            f"another model or net; use the config.yaml saved next to it, -c runs/<name>/version_<N>/config.yaml"
        )
    if re.search(r"Connection (reset|closed) by peer|Watchdog caught collective|NCCL.*[Tt]imeout", text):
        return (
            "a DDP worker stopped answering (it died or hung), so the job stops instead of waiting; look above for "
            "that worker's own error (out of memory, killed), fix it, then resume with --ckpt_path last"
        )
    return None


@contextmanager
def exit_on_user_error(debug: bool = False) -> Iterator[None]:
    """Print an error the user can fix as one line and exit with code 2; re-raise everything else."""
    try:
        yield
    except Exception as err:
        message = one_line(err)
        if message is None or debug or os.environ.get("PROJECT_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
