"""The scrubbed environments: the server's (so that no secret of the caller reaches it) and the
children's (what `os.environ` holds inside a snippet)."""
from __future__ import annotations

import os
import sys

CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    # single-threaded BLAS / OpenMP: read when numpy is imported in the server, kept for snippets
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}
"""Children also get HOME, TMPDIR and PWD set to their temp dir."""

SERVER_ONLY_ENV = {
    "MALLOC_ARENA_MAX": "2",          # threads in a child do not each reserve a 64 MB malloc arena
}


def package_root() -> str:
    """The directory that holds the `sandbox` package (first on the server's PYTHONPATH)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_path(path: list[str] | None = None) -> list[str]:
    """The server's PYTHONPATH entries: the package root, then every entry of the caller's
    `sys.path` (or `path`) that exists on disk (a directory, a zip file), absolute, each once, in
    order; "" (the caller's working directory) left out. The server then imports what its caller
    can: dependencies reached through the caller's PYTHONPATH (a `pip install --target` dir, a
    cluster module system, a zipapp) included. Only paths travel, none of the caller's variables."""
    entries = []
    for entry in [package_root(), *(sys.path if path is None else path)]:
        if entry and os.path.exists(entry):
            entry = os.path.abspath(entry)
            if entry not in entries:
                entries.append(entry)
    return entries


def server_environment(path: list[str] | None = None) -> dict[str, str]:
    """The whole environment of a sandbox server process: nothing from the caller's but its
    import path (`import_path`)."""
    return {**CHILD_ENV, **SERVER_ONLY_ENV, "PYTHONPATH": os.pathsep.join(import_path(path))}


def is_scrubbed(environ: dict[str, str]) -> bool:
    """Whether `environ` is a server environment (for the import path it names)."""
    python_path = environ.get("PYTHONPATH", "")
    return dict(environ) == server_environment(python_path.split(os.pathsep) if python_path else [])
