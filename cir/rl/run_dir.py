"""A run directory belongs to one run.

A run writes into `train.output_dir`: config.yaml, metrics.jsonl, samples.jsonl, eval.jsonl, tb/,
curves.png and checkpoints/step_K/. A new run started where another one left its checkpoints or
metrics would mix the two (metrics overwritten, evaluation appended, the old run's later checkpoints
outliving the new ones and picked up by a later --resume), so `claim` refuses it with one line
naming the ways out:

    python train.py ... --resume                  # continue the run that is there
    python train.py ... --train.overwrite true    # delete that run's files, then start over

Overwriting deletes only what a run writes (the names below); other files in the directory stay.
Under torchrun, rank 0 looks and clears; every rank gets the same verdict.

A resumed run's files hold each step once: metrics are written before the step's checkpoint, so a run
killed between the two (or during a save) left rows of steps the resumed run does again.
`drop_records_after(output_dir, step)` removes them before the run goes on (each file rewritten
whole, then renamed over the old one, so a kill during it loses nothing).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cir.errors import UserError
from cir.rl import checkpoint, distributed

RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "curves.png")
RUN_DIRS = ("checkpoints", "tb")
_RECORD_FILES = ("metrics.jsonl", "eval.jsonl", "samples.jsonl")  # non-empty: a run got that far


def previous_run(output_dir: str | Path) -> str | None:
    """What another run left in `output_dir` ("2 checkpoints (last step_000002), metrics.jsonl"),
    or None when it holds none (a config.yaml alone, or nothing, is no run)."""
    root = Path(output_dir)
    found = []
    done = checkpoint.checkpoints(root / "checkpoints")  # complete ones: a step_K.tmp is no checkpoint
    if done:
        found.append(f"{len(done)} checkpoint{'s' * (len(done) > 1)} (last {done[-1].name})")
    found += [name for name in _RECORD_FILES if (root / name).is_file() and (root / name).stat().st_size > 0]
    return ", ".join(found) if found else None


def clear(output_dir: str | Path) -> None:
    """Delete what a run writes into `output_dir` (RUN_FILES, RUN_DIRS); nothing else."""
    root = Path(output_dir)
    for name in RUN_DIRS:
        shutil.rmtree(root / name, ignore_errors=True)
    for name in RUN_FILES:
        (root / name).unlink(missing_ok=True)


def claim(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Make `output_dir` this run's: with `resume`, continue what is there; else stop with a UserError
    if another run left checkpoints or metrics, unless `overwrite`, which clears them first."""
    if resume and overwrite:
        raise UserError("--resume continues the run in the output directory and --train.overwrite true "
                        "deletes it", hint="choose one")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"train.output_dir {output_dir} is a file, not a directory")
    if resume:
        return
    verdict = None
    if distributed.rank() == 0:
        found = previous_run(output_dir)
        if found is not None and not overwrite:
            verdict = f"{output_dir} holds another run ({found})"
        elif found is not None:
            clear(output_dir)
            distributed.print0(f"--train.overwrite: cleared the earlier run in {output_dir} ({found})")
    verdict = distributed.all_gather_object(verdict)[0]  # also the barrier after rank 0 cleared
    if verdict is not None:
        raise UserError(verdict, hint="continue it with --resume, start over with --train.overwrite true "
                        "(deletes its checkpoints and metrics), or choose another --train.output_dir")


# the `when` of the held-out evaluations a run resumed at step k makes (again) at step k: the one at the
# start of a resumed run ("at step k (resumed)", Trainer.train) and, when k is the last step, the final one
REDONE_EVALS = ("(resumed)", "after RL")


def drop_records_after(output_dir: str | Path, step: int) -> dict[str, int]:
    """Before a run resumed at `step` goes on: drop the rows of metrics.jsonl, samples.jsonl and
    eval.jsonl of later steps, the held-out evaluations at `step` that this run makes again (REDONE_EVALS)
    and, at step 0 (nothing to resume from), every evaluation row (warm start and "before RL" are made
    again). A last line cut off by a kill (no newline) goes too. Returns the rows dropped per file."""
    dropped = {}
    for name in _RECORD_FILES:
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        complete, torn = lines[:-1], lines[-1]  # the part after the last newline: b"" or a cut-off row
        kept = [line for line in complete if not _is_redone(line, step, is_eval=name == "eval.jsonl")]
        num_dropped = len(complete) - len(kept) + bool(torn)
        if num_dropped:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(line + b"\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        dropped[name] = num_dropped
    return dropped


def _is_redone(line: bytes, step: int, is_eval: bool) -> bool:
    """Whether a record row is one the run resumed at `step` writes again."""
    try:
        row = json.loads(line)
        row_step = int(row["step"])
    except (ValueError, TypeError, KeyError):
        return False  # not a row of ours: left as it is
    if row_step > step:
        return True
    return is_eval and row_step == step and (step == 0 or str(row.get("when", "")).endswith(REDONE_EVALS))
