"""Run one snippet in the sandbox and print what happened (for debugging a snippet).

    python -m sandbox.run snippet.py
    echo 'print(2 ** 10)' | python -m sandbox.run
    python -m sandbox.run snippet.py --timeout 2 --memory-mb 256 --warm math,sympy --json

Prints the status, the feedback text the model would see, stdout, stderr and the timings
(or the whole Result as JSON with --json). Exit code 0 when the status is ok, else 1.
"""
from __future__ import annotations

import argparse
import json
import sys

from sandbox.client import Sandbox
from sandbox.config import DEFAULT_WARM_MODULES
from sandbox.result import format_feedback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.run", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", help="Python file to run (default: read stdin)")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall seconds")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory beyond the warm interpreter")
    parser.add_argument("--warm", default=",".join(DEFAULT_WARM_MODULES), help="comma-separated modules")
    parser.add_argument("--json", action="store_true", help="print the Result as one JSON object")
    args = parser.parse_args(argv)
    if args.file is None:
        code = sys.stdin.read()
    else:
        with open(args.file, encoding="utf-8") as f:
            code = f.read()
    warm = tuple(m for m in args.warm.split(",") if m)
    with Sandbox(workers=1, timeout=args.timeout, memory_mb=args.memory_mb, warm_modules=warm) as sb:
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


if __name__ == "__main__":
    sys.exit(main())
