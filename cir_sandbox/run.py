"""Run one snippet in the sandbox and print what happened (for debugging a snippet).

    python -m cir_sandbox.run snippet.py
    echo 'print(2 ** 10)' | python -m cir_sandbox.run
    python -m cir_sandbox.run snippet.py --timeout 2 --memory-mb 256 --warm math,sympy --json

Prints the status, the feedback text the model would see, stdout, stderr and the timings
(or the whole Result as JSON with --json). Exit code 0 when the status is ok, else 1.

A mistake on the command line (a missing file, a directory, a binary file, --timeout 0, a --warm
module that cannot be imported) is one `error: ...` line on stderr and exit code 2; --debug (or
CIR_DEBUG=1) shows its traceback. This is cir's error convention (cir/errors.py), restated here in
a few lines because cir_sandbox/ imports nothing from cir/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from cir_sandbox.client import Sandbox
from cir_sandbox.config import DEFAULT_WARM_MODULES
from cir_sandbox.result import format_feedback

DEBUG_ENV = "CIR_DEBUG"
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user gave: printed as one `error:` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def read_code(file: str | None) -> str:
    """The snippet: the file's text, or stdin. UsageError for a path that is not a UTF-8 text file."""
    if file is None:
        return sys.stdin.read()
    path = Path(file)
    if not path.exists():
        raise UsageError(f"no such file: {file}")
    if path.is_dir():
        raise UsageError(f"{file} is a directory, not a Python file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {file}: {e.strerror}") from None
    if b"\0" in data:
        raise UsageError(f"{file} is a binary file, not Python source")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{file} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, an empty name part
        return False


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m cir_sandbox.run", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", help="Python file to run (default: read stdin)")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall seconds")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory beyond the warm interpreter")
    parser.add_argument("--warm", default=None,
                        help=f"comma-separated modules to import once (default: {','.join(DEFAULT_WARM_MODULES)})")
    parser.add_argument("--json", action="store_true", help="print the Result as one JSON object")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.memory_mb < 1:
        parser.error(f"--memory-mb must be >= 1, got {args.memory_mb}")
    asked = args.warm is not None
    warm = tuple(m.strip() for m in (args.warm if asked else ",".join(DEFAULT_WARM_MODULES)).split(",") if m.strip())
    unknown = [m for m in warm if not _importable(m)] if asked else []
    if unknown:
        raise UsageError(f"--warm: no module named {', '.join(unknown)}")
    code = read_code(args.file)
    with Sandbox(workers=1, timeout=args.timeout, memory_mb=args.memory_mb, warm_modules=warm) as sb:
        missing = [m for m in warm if m not in sb.info()["warm_modules"]]
        if asked and missing:  # the server skips what it cannot import; a module asked for by name is a mistake
            raise UsageError(f"--warm: cannot import {', '.join(missing)} in the sandbox (not installed?)")
        result = sb.run(code)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"status:   {result.status}   wall {result.wall_ms:.2f} ms   cpu {result.cpu_ms:.2f} ms")
        print(f"feedback: {format_feedback(result)!r}")
        if result.error_line:
            print(f"error:    {result.error_line}")
        if result.note:
            print(f"note:     {result.note}")
        print("--- stdout ---")
        print(result.stdout, end="" if result.stdout.endswith("\n") or not result.stdout else "\n")
        if result.stderr:
            print("--- stderr ---")
            print(result.stderr, end="" if result.stderr.endswith("\n") else "\n")
    return 0 if result.ok else 1


def cli(argv: list[str] | None = None) -> int:
    """main() with the error convention: a UsageError is one line and exit code 2, unless debugging."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except UsageError as e:
        if "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(cli())
