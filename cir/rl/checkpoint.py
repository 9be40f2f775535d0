"""Training checkpoints: atomic, resumable, and a model directory transformers loads unchanged.

    <output_dir>/checkpoints/step_000050/
        model/            HF format (config.json, safetensors, tokenizer files) - rank 0
          manifest.json   size and SHA-256 of each file of model/ (it travels with the model)
          cir.json        how it was trained (prompt mode, sampling; cir/trained_settings.py)
        train_state/      model + optimizer state (torch.distributed.checkpoint: works sharded)
        rank_<r>.pt       per rank: step, lr scheduler, data position, RNG states (torch, python,
                          numpy, the engine's sampling generator)
        manifest.json     size and SHA-256 of every other file, model/manifest.json included: LAST

Written into `step_K.tmp` and renamed when complete, so a run killed mid-save never leaves a
checkpoint that looks whole. The manifests (cir/manifest.py) are written after every other file,
the hashing shared over the ranks (each hashes about 1/world of the bytes). `--resume` takes the
newest checkpoint whose files all match its manifests: a damaged one (a truncated .distcp, a
flipped bit in the weights, no manifest at all) is skipped with a warning naming the file, and the
previous one is used; when none is whole, the run stops with one error line naming the file.
The last `keep_last` checkpoints (by step number) are kept, and the one just written always is one
of them, whatever else the directory holds.
"""
from __future__ import annotations

import contextlib
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cir import manifest
from cir.errors import MissingPathError, UserError
from cir.model import save_pretrained
from cir.rl import distributed as dist_utils
from cir.trained_settings import write_trained_settings

_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (no .tmp), by step number."""
    steps = sorted((int(m.group(1)), p) for p in Path(root).glob("step_*") if (m := _STEP_DIR.match(p.name)))
    return [p for _, p in steps]


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def rotate(root: Path, keep: Path, keep_last: int) -> list[Path]:
    """Keep `keep` (the checkpoint just written) and the `keep_last - 1` newest before it; delete the
    rest, and any of a later step (they would shadow `keep` for --resume). Returns the deleted paths."""
    found, step = checkpoints(root), int(_STEP_DIR.match(keep.name).group(1))
    earlier = [p for p in found if int(_STEP_DIR.match(p.name).group(1)) < step]
    kept = {keep, *earlier[max(len(earlier) - (max(keep_last, 1) - 1), 0):]}
    doomed = [p for p in found if p not in kept]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def save(root: Path, step: int, policy: torch.nn.Module, model: torch.nn.Module, optimizer, extra: dict,
         tokenizer=None, keep_last: int = 2, model_meta: dict | None = None) -> Path:
    """Every rank calls this. `extra` is this rank's own state (scheduler, data, generator...);
    `model_meta` (rank 0) goes to model/cir.json."""
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    rank = dist_utils.rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    with _single_process_dcp():
        dcp.save(state, checkpoint_id=str(tmp / "train_state"))
    full = dist_utils.full_state_dict(model)  # collective under FSDP
    if rank == 0:
        save_pretrained(_with_state(model, full), tmp / "model", tokenizer=tokenizer)
        if model_meta is not None:
            write_trained_settings(tmp / "model", model_meta)
    torch.save({**extra, "step": step, "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    _barrier()
    _write_manifests(tmp)  # last: a checkpoint with its manifest is one whose every file was written
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        rotate(root, final, keep_last)
    _barrier()
    return final


def _write_manifests(path: Path) -> None:
    """Every rank hashes its share of the checkpoint's files; rank 0 writes model/manifest.json, then
    manifest.json (the other files and model/manifest.json). Returns on every rank when written."""
    files = manifest.list_files(path)
    sizes = {name: {"size": (path / name).stat().st_size} for name in files}
    mine = manifest.share(sizes, dist_utils.world_size())[dist_utils.rank()]
    parts = dist_utils.all_gather_object(manifest.digest_files(path, mine))
    if dist_utils.rank() == 0:
        entries = {name: entry for part in parts for name, entry in part.items()}
        model = {name.removeprefix("model/"): e for name, e in entries.items() if name.startswith("model/")}
        manifest.write(path / "model", model)
        rest = {name: e for name, e in entries.items() if not name.startswith("model/")}
        rest.update(manifest.digest_files(path, ["model/" + manifest.MANIFEST]))
        manifest.write(path, rest)
    _barrier()


def damage(path: Path) -> tuple[str, str] | None:
    """Whether checkpoint `path` is whole: None, or (the first file that does not match its manifest,
    what is wrong). Every rank calls it and checks its share of the bytes; all get the same answer."""
    try:
        outer = manifest.read(path)
        if outer is None:
            return str(path / manifest.MANIFEST), "missing (a save that did not finish, or an older cir's)"
        inner = manifest.read(path / "model")
        if inner is None:
            return str(path / "model" / manifest.MANIFEST), "missing"
    except manifest.DamagedFileError as e:
        return e.file, str(e)
    entries = {**outer, **{f"model/{name}": entry for name, entry in inner.items()}}
    mine = manifest.share(entries, dist_utils.world_size())[dist_utils.rank()]
    found = [p for p in dist_utils.all_gather_object(manifest.check(path, {n: entries[n] for n in mine}))
             if p is not None]
    return min(found) if found else None


def latest_verified(root: Path) -> Path | None:
    """The newest checkpoint under `root` whose files match its manifests; each newer damaged one is
    reported in a warning naming its file. None when there is no checkpoint; a UserError naming the
    newest one's damaged file when none is whole."""
    found = checkpoints(root)
    problems = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            return path
        problems.append(problem)
        dist_utils.print0(f"warning: checkpoint {path.name} is damaged, not resuming from it: "
                          f"{problem[0]}: {problem[1]}")
    if not found:
        return None
    file, what = problems[0]
    raise UserError(f"no whole checkpoint under {root}: the newest, {found[-1].name}, has a damaged file "
                    f"{file}: {what}", hint="start over with --train.overwrite true, or restore the file")


def load(path: Path, policy: torch.nn.Module, optimizer) -> dict:
    """Restore model + optimizer in place; returns this rank's extra state (with "step")."""
    rank_file = path / f"rank_{dist_utils.rank()}.pt"
    if not rank_file.is_file():
        raise MissingPathError(f"checkpoint {path} has no {rank_file.name}",
                               hint="it was written by fewer ranks; resume with the world size that wrote it")
    state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, optimizer)}
    with _single_process_dcp():
        dcp.load(state, checkpoint_id=str(path / "train_state"))
    set_model_state_dict(policy, state["model"])
    set_optimizer_state_dict(policy, optimizer, state["optim"])
    extra = torch.load(rank_file, weights_only=False)
    set_rng_state(extra["rng"])
    return extra


class _with_state:
    """A view of `model` whose state_dict() is the gathered full one (for save_pretrained)."""

    def __init__(self, model: torch.nn.Module, full: dict):
        self._model, self._full = model, full
        self.config = model.config

    def state_dict(self):
        return self._full

    def __getattr__(self, name):
        return getattr(self._model, name)


@contextlib.contextmanager
def _single_process_dcp():
    """torch.distributed.checkpoint warns at every save and load without a process group that it
    "assumes the intent is to save in a single process" (even with no_dist=True). A run without
    torchrun is exactly that, so there, and only there, that one warning is not shown."""
    with warnings.catch_warnings():
        if not dist_utils.is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                                    category=UserWarning)
        yield


def _barrier() -> None:
    if dist_utils.is_distributed():
        torch.distributed.barrier()
