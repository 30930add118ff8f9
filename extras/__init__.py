"""Extras a fork may delete without touching the core: export, int8 compression, distillation.

Each tool is a function with a command line made from its signature (jsonargparse's ``auto_cli``):
``python -m extras.export``, ``python -m extras.compress``; distillation is a model class for
``python -m project fit`` (``configs/compress/distill.yaml``). The core never imports this package.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentParser, auto_cli

from project.errors import OneLineErrors, exit_on_user_error


def command_line(function: Callable[..., Any], args: Sequence[str] | None = None) -> Any:
    """``python -m extras.<tool>``: ``function``'s arguments from the command line. A problem the user can fix (a bad
    argument, a missing, damaged or hostile checkpoint) ends as one ``error: ...`` line and exit code 2;
    ``--debug`` or ``PROJECT_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if args is None else args)
    parser_class = type("Parser", (OneLineErrors, ArgumentParser), {})
    with exit_on_user_error(debug="--debug" in argv):
        args = [a for a in argv if a != "--debug"]
        return auto_cli(function, args=args, as_positional=False, parser_class=parser_class)
