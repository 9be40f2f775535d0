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
"""
from __future__ import annotations

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
