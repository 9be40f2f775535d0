"""Limits and sizes of one sandbox server (shared by the client, which passes them on the
server's command line, and the server)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

DEFAULT_WARM_MODULES = (
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "statistics",
    "random", "re", "string", "heapq", "bisect", "json", "numpy", "sympy",
)


@dataclass
class ServerConfig:
    socket_path: str
    workers: int = 4
    """Calls running at once; more are queued in the server."""
    prefork: int | None = None
    """Children kept forked and confined, waiting for a call (default: workers)."""
    timeout: float = 10.0
    """Wall seconds per call; the server SIGKILLs the child's process group at the deadline."""
    cpu_seconds: int | None = None
    """CPU seconds per call (RLIMIT_CPU, whole seconds of the process: a call gets between
    cpu_seconds and cpu_seconds + 1; default ceil(timeout)). Matters for multi-threaded code."""
    memory_mb: int = 1024
    """Address space a call may add on top of the warm interpreter it was forked from."""
    output_limit: int = 1 << 20
    """Bytes of stdout + stderr per call; one more and the child is killed (status output_limit)."""
    file_size_mb: int = 16
    """Largest file a call may write (RLIMIT_FSIZE)."""
    open_files: int = 256
    warm_modules: tuple[str, ...] = DEFAULT_WARM_MODULES
    base_dir: str | None = None
    """Directory (not existing yet) for the children's temp dirs; default: a new one in /tmp."""
    watch_stdin: bool = False
    """Exit when stdin reaches EOF (the client that started the server holds the other end)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.prefork is None:
            self.prefork = self.workers
        if self.prefork < 1:
            raise ValueError(f"prefork must be >= 1, got {self.prefork}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.cpu_seconds is None:
            self.cpu_seconds = max(1, math.ceil(self.timeout))
        if self.cpu_seconds < 1:
            raise ValueError(f"cpu_seconds must be >= 1, got {self.cpu_seconds}")
        if self.memory_mb < 16:
            raise ValueError(f"memory_mb must be >= 16, got {self.memory_mb}")
        if self.output_limit < 1:
            raise ValueError(f"output_limit must be >= 1 byte, got {self.output_limit}")
        if self.file_size_mb < 0 or self.open_files < 16:
            raise ValueError(f"need file_size_mb >= 0 and open_files >= 16, got "
                             f"{self.file_size_mb}, {self.open_files}")
        self.warm_modules = tuple(self.warm_modules)

    @classmethod
    def from_args(cls, argv: list[str]) -> ServerConfig:
        """Parse the command line of `python -m cir_sandbox.server` (the inverse of to_args)."""
        p = argparse.ArgumentParser(prog="python -m cir_sandbox.server",
                                    description="The sandbox fork-server (see cir_sandbox/server.py).")
        p.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
        p.add_argument("--workers", type=int, default=4, help="calls running at once")
        p.add_argument("--prefork", type=int, default=None, help="children kept ready (default: workers)")
        p.add_argument("--timeout", type=float, default=10.0, help="wall seconds per call")
        p.add_argument("--cpu-seconds", type=int, default=None, help="CPU seconds per call")
        p.add_argument("--memory-mb", type=int, default=1024, help="memory a call may add")
        p.add_argument("--output-limit", type=int, default=1 << 20, help="stdout+stderr bytes per call")
        p.add_argument("--file-size-mb", type=int, default=16, help="largest file a call may write")
        p.add_argument("--open-files", type=int, default=256, help="RLIMIT_NOFILE of a child")
        p.add_argument("--warm", default=",".join(DEFAULT_WARM_MODULES), help="modules to import once")
        p.add_argument("--base-dir", default=None, help="new directory for the children's temp dirs")
        p.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF")
        a = p.parse_args(argv)
        return cls(a.socket, workers=a.workers, prefork=a.prefork, timeout=a.timeout,
                   cpu_seconds=a.cpu_seconds, memory_mb=a.memory_mb, output_limit=a.output_limit,
                   file_size_mb=a.file_size_mb, open_files=a.open_files,
                   warm_modules=tuple(m for m in a.warm.split(",") if m), base_dir=a.base_dir,
                   watch_stdin=a.watch_stdin)

    def to_args(self) -> list[str]:
        """Command-line arguments of `python -m cir_sandbox.server` for this configuration."""
        args = ["--socket", self.socket_path, "--workers", str(self.workers),
                "--prefork", str(self.prefork), "--timeout", repr(self.timeout),
                "--cpu-seconds", str(self.cpu_seconds), "--memory-mb", str(self.memory_mb),
                "--output-limit", str(self.output_limit), "--file-size-mb", str(self.file_size_mb),
                "--open-files", str(self.open_files), "--warm", ",".join(self.warm_modules)]
        if self.base_dir:
            args += ["--base-dir", self.base_dir]
        return args + (["--watch-stdin"] if self.watch_stdin else [])
