"""User mistakes versus bugs: one error convention for every command.

A mistake of the user's (a bad file, a bad value, a missing path, no GPU) raises `UserError`. A
command prints it as ONE line on stderr and exits with status 2:

    error: <what> (<file>:<line>); <hint>

`--debug` on the command line, or CIR_DEBUG=1 in the environment, re-raises it with its traceback.
Every other exception is a bug and keeps its traceback. A command's module ends with

    if __name__ == "__main__":
        run_main(main)            # main(argv) -> exit status or None

and builds its parser with `ArgumentParser` (argparse whose usage errors are that one line too).

`UserError` is a ValueError (the house rule: bad input raises ValueError naming the value), and
`MissingPathError` is also a FileNotFoundError, so code catching those keeps working. cir_sandbox/run.py
follows the same convention with a few lines of its own: cir_sandbox/ imports nothing from cir/.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

DEBUG_ENV = "CIR_DEBUG"
EXIT_USER_ERROR = 2  # argparse's status for a usage error; 1 stays free for "ran, and failed"


class UserError(ValueError):
    """A mistake in what the user gave: `what` went wrong, `where` (file:line) when it applies, and
    a `hint` when there is an obvious next step. str() is the whole one-line message."""

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what, self.where, self.hint = what, where, hint
        message = what + (f" ({where})" if where else "") + (f"; {hint}" if hint else "")
        super().__init__(message)


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


def location(path: str | os.PathLike, line: int | None = None) -> str:
    """`path:line` (or `path`), the way compilers and editors spell a place in a file."""
    return f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line convention: a usage error prints `error: ...; see PROG --help` and
    exits with status 2 (argparse prints the usage block first). Adds --debug."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        add_debug_flag(self)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {message}; see {self.prog} --help\n")


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a command's `main(argv)` and exit with its status; a UserError is one line on stderr
    (status 2) unless debugging was asked for."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = main(argv)
    except UserError as e:
        if debug_requested(argv):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(status or 0)
