"""Manifests: the size and SHA-256 of every file of a directory, so a damaged file is found before use.

    entries = digest_files(root, ["model.safetensors", "config.json"])   # {path: {"size", "sha256"}}
    write(root, entries)                     # root/manifest.json, written last, renamed into place
    problem = check(root, read(root))        # None, or "model.safetensors: 40412 bytes, expected 80824"
    verify(root)                             # a UserError naming the damaged file (no manifest: nothing)

A file's digest is a list: the SHA-256 of each CHUNK_BYTES piece of it, so one large file is hashed
by several threads at once (hashlib releases the GIL) and any piece can be checked by hand with
`dd bs=256M skip=i count=1 | sha256sum`. Sizes are compared first: a truncated file is reported
without reading anything. SHA-256 runs at about 1.3 GB/s per core on the 2-core development VM
(bench/RESULTS.md, "Checkpoint manifests"); a training checkpoint shares the hashing over its ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cir.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "cir-manifest-1"
CHUNK_BYTES = 256 << 20  # one hashing task: a 15 GB 7B model in 60 tasks, over all the threads
_READ_BYTES = 16 << 20


class DamagedFileError(UserError):
    """A file of a directory with a manifest does not match it (missing, another size, another hash)."""

    def __init__(self, what: str, file: str | os.PathLike, hint: str | None = None):
        self.file = os.fspath(file)
        super().__init__(what, hint=hint)


def num_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _chunk_digest(path: Path, index: int) -> str:
    h = hashlib.sha256()
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(index * CHUNK_BYTES)
        left = CHUNK_BYTES
        while left > 0:
            n = f.readinto(view[: min(_READ_BYTES, left)])
            if not n:
                break
            h.update(view[:n])
            left -= n
    return h.hexdigest()


def _num_chunks(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


def digest_files(root: str | os.PathLike, files: list[str], threads: int | None = None) -> dict[str, dict]:
    """{relative path: {"size": bytes, "sha256": [hex digest per CHUNK_BYTES piece]}} of `files` under
    `root`, the pieces hashed by `threads` threads."""
    root = Path(root)
    sizes = {name: (root / name).stat().st_size for name in files}
    tasks = [(name, i) for name in files for i in range(_num_chunks(sizes[name]))]
    with ThreadPoolExecutor(threads or num_threads()) as pool:
        digests = list(pool.map(lambda task: _chunk_digest(root / task[0], task[1]), tasks))
    entries = {name: {"size": sizes[name], "sha256": []} for name in files}
    for (name, _), digest in zip(tasks, digests, strict=True):
        entries[name]["sha256"].append(digest)
    return entries


def list_files(root: str | os.PathLike, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every file under `root` (relative POSIX paths, sorted) but its manifest and the paths in `exclude`
    (a directory there excludes what is under it)."""
    root = Path(root)
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST and not any(rel == e or rel.startswith(e + "/") for e in exclude):
            found.append(rel)
    return sorted(found)


def write(root: str | os.PathLike, entries: dict[str, dict]) -> Path:
    """root/manifest.json from `entries`, made durable and renamed into place (so it is whole or absent)."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "algorithm": "sha256", "chunk_bytes": CHUNK_BYTES,
                   "files": dict(sorted(entries.items()))}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read(root: str | os.PathLike) -> dict[str, dict] | None:
    """The entries of root/manifest.json; None when there is none; DamagedFileError when it is unreadable."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != FORMAT or data.get("chunk_bytes") != CHUNK_BYTES:
            raise ValueError(f"format {data.get('format')!r} / chunk_bytes {data.get('chunk_bytes')!r}, "
                             f"expected {FORMAT!r} / {CHUNK_BYTES}")
        files = data["files"]
        for name, entry in files.items():
            if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], list)
                    and len(entry["sha256"]) == _num_chunks(entry["size"])):
                raise ValueError(f"bad entry for {name}")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"damaged manifest {path}: {e}", path) from None
    return files


def check(root: str | os.PathLike, entries: dict[str, dict], threads: int | None = None) -> tuple[str, str] | None:
    """The first file under `root` that does not match its entry, as (path, what is wrong); None when all do."""
    root = Path(root)
    for name in sorted(entries):
        path, size = root / name, entries[name]["size"]
        if not path.is_file():
            return str(path), "missing"
        actual = path.stat().st_size
        if actual != size:
            return str(path), f"{actual} bytes, the manifest says {size} (truncated or overwritten)"
    digests = digest_files(root, sorted(entries), threads)
    for name in sorted(entries):
        if digests[name]["sha256"] != entries[name]["sha256"]:
            piece = next(i for i, (a, b) in enumerate(zip(digests[name]["sha256"], entries[name]["sha256"],
                                                          strict=True)) if a != b)
            return str(root / name), f"content differs from the manifest (SHA-256 of bytes from {piece * CHUNK_BYTES})"
    return None


def verify(root: str | os.PathLike, threads: int | None = None) -> bool:
    """Check root against root/manifest.json; DamagedFileError naming the first file that differs.
    False when there is no manifest (nothing to check against), True when every file matches."""
    entries = read(root)
    if entries is None:
        return False
    problem = check(root, entries, threads)
    if problem is not None:
        file, what = problem
        raise DamagedFileError(f"damaged file {file}: {what}", file)
    return True


def share(entries: dict[str, dict], world_size: int) -> list[list[str]]:
    """The paths split into `world_size` lists of about equal bytes (largest first to the least loaded):
    which files each rank hashes. Deterministic, so every rank computes the same split."""
    loads = [[0, r, []] for r in range(world_size)]
    for name in sorted(entries, key=lambda n: (-entries[n]["size"], n)):
        least = min(loads, key=lambda load: (load[0], load[1]))
        least[0] += entries[name]["size"]
        least[2].append(name)
    return [sorted(load[2]) for load in loads]
