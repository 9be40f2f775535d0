"""The scrubbed environments: the server's (so that no secret of the caller reaches it) and the
children's (what `os.environ` holds inside a snippet)."""
from __future__ import annotations

import os

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
    """The directory that holds the `sandbox` package (what the server needs on PYTHONPATH)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_environment() -> dict[str, str]:
    """The whole environment of a sandbox server process: nothing from the caller's."""
    return {**CHILD_ENV, **SERVER_ONLY_ENV, "PYTHONPATH": package_root()}


def is_scrubbed(environ: dict[str, str]) -> bool:
    return dict(environ) == server_environment()
