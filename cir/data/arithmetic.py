"""Multi-digit arithmetic a small model cannot do in its head but can print with Python.

    python -m cir.data.arithmetic cir/data/arith.jsonl      # regenerate the embedded problem set

Each exercise is a problem (text + exact answer) and the one-line program that solves it, e.g.
"What is 481 times 325?" / `print(481*325)` / 156325. The embedded problem set (`arith.jsonl`,
what `python train.py` trains on) is `exercises(EMBEDDED_SIZE, EMBEDDED_SEED)`; the warm start
(`cir.rl.warm_start`) draws fresh exercises from another seed, excluding the run's problems, so
its supervised traces never contain an answer of the problems the run is scored on.

Why these: SmolLM2-135M-Instruct gets none of them right without the interpreter (3-digit products,
squares of 3-digit numbers and 6-digit remainders are out of reach of its mental arithmetic) and,
after a short warm start, copies the operands into `print(...)` and the printed result into
`\\boxed{}` reliably, so accuracy follows tool use and RL has something to reward.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass

from cir.data.problems import Problem

EMBEDDED_SEED = 11
EMBEDDED_SIZE = 240
KINDS = ("product", "square", "remainder")


@dataclass(frozen=True)
class Exercise:
    problem: Problem
    code: str
    """A program whose output is exactly the answer."""


def _product(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(101, 999), rng.randint(101, 999)
    return f"What is {a} times {b}?", f"print({a}*{b})", a * b


def _square(rng: random.Random) -> tuple[str, str, int]:
    a = rng.randint(101, 999)
    return f"What is {a} squared?", f"print({a}**2)", a * a


def _remainder(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(100_001, 999_999), rng.randint(13, 97)
    return f"What is the remainder when {a} is divided by {b}?", f"print({a}%{b})", a % b


_MAKERS = {"product": _product, "square": _square, "remainder": _remainder}


def exercises(num: int, seed: int, kinds: tuple[str, ...] = KINDS, prefix: str = "arith",
              exclude: set[str] | frozenset[str] = frozenset()) -> list[Exercise]:
    """`num` distinct exercises, kinds in turn, reproducible from `seed` (ids `{prefix}-0001`, ...);
    none whose problem text is in `exclude`."""
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < num:
        text, code, answer = _MAKERS[kinds[len(out) % len(kinds)]](rng)
        if text in seen:
            continue
        seen.add(text)
        out.append(Exercise(Problem(text, str(answer), id=f"{prefix}-{len(out) + 1:04d}"), code))
    return out


def embedded_problems() -> list[Problem]:
    """The problems of `arith.jsonl`, generated (the file is this list written out)."""
    return [e.problem for e in exercises(EMBEDDED_SIZE, EMBEDDED_SEED)]


def write_jsonl(problems: list[Problem], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cir.data.arithmetic OUT.jsonl")
    write_jsonl(embedded_problems(), sys.argv[1])
