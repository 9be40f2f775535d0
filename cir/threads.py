"""How many torch threads to use: the CPUs this process may run on, less what runs beside it.

    from cir.threads import configure_threads
    configure_threads(None, reserved=2)   # auto; prints "threads: 1 torch thread (2 CPUs usable, ...)"
    configure_threads(4)                  # --threads 4 / --train.threads 4

CPUs usable = the affinity mask (`os.sched_getaffinity`: taskset, cpusets) capped by the CPU quota of
the process's cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, the tightest of the
cgroup and its ancestors; a fractional quota rounds down), shared by the ranks on this machine
(torchrun's LOCAL_WORLD_SIZE). From that, `reserved` CPUs are left to the processes that work at the
same time as torch: the sandbox workers run model-written code while the engine keeps decoding. The
reward workers are not counted: they score between the rollout and the update, while torch waits.
And the CPUs other programs keep busy are left to them: the 1-minute load average, rounded (taken
once, at start). At least one thread.

Why it matters: OpenMP threads spin while they wait for each other, so more threads than free CPUs
makes every parallel region wait on a descheduled thread: `cir.generate` on this project's 2-core
machine at load 5-7 made 1.0 tokens/s with torch's default (2 threads) and 13.0 with one thread
(bench/RESULTS.md, "threads").

An explicit choice wins: a `--threads` / `train.threads` value, else OMP_NUM_THREADS or
MKL_NUM_THREADS in the environment (torch already read it), and the library then leaves torch alone.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller ("" for cgroup v2) -> the process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _ancestors(root: Path, path: str) -> list[Path]:
    """root/path, then each parent directory up to root itself."""
    out, parts = [], [p for p in path.split("/") if p]
    for i in range(len(parts), -1, -1):
        out.append(root.joinpath(*parts[:i]))
    return out


def _quota_v2(text: str | None) -> float | None:
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        return int(quota) / int(period or 100000)
    except ValueError:
        return None


def _quota_v1(quota: str | None, period: str | None) -> float | None:
    try:
        q, p = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
                     ) -> float | None:
    """CPUs' worth of quota the process's cgroup allows (e.g. 1.5), None when unlimited or unknown."""
    root, paths = Path(cgroup_root), _cgroup_paths(Path(proc_cgroup))
    limits = []
    if "" in paths:  # cgroup v2 (unified), possibly mounted at root/unified in hybrid set-ups
        for base in (root, root / "unified"):
            if (base / "cgroup.controllers").is_file():
                limits += [q for d in _ancestors(base, paths[""]) if (q := _quota_v2(_read(d / "cpu.max")))]
                break
    if "cpu" in paths:  # cgroup v1: the cpu controller's own mount (cpu or cpu,cpuacct)
        for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            base = root / mount
            if base.is_dir():
                limits += [q for d in _ancestors(base, paths["cpu"])
                           if (q := _quota_v1(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")))]
                break
    return min(limits) if limits else None


def usable_cpus(affinity: int | None = None, quota: float | None = None, ranks_here: int = 1) -> int:
    """CPUs this process may use: affinity capped by the cgroup quota, divided among the local ranks."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpus = affinity if quota is None else min(affinity, max(math.floor(quota), 1))
    return max(cpus // max(ranks_here, 1), 1)


def busy_elsewhere(cpus: int, load: float | None = None) -> int:
    """CPUs other programs keep busy: the 1-minute load average, rounded, at most `cpus`."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return 0
    return min(max(round(load), 0), cpus)


def choose_threads(cpus: int, reserved: int = 0, busy: int = 0) -> int:
    """Torch threads for `cpus` usable CPUs with `reserved` of them working beside torch and `busy`
    kept busy by other programs (at least 1)."""
    return max(cpus - max(reserved, 0) - max(busy, 0), 1)


def configure_threads(requested: int | None = None, reserved: int = 0, env: dict | None = None,
                      log: Callable[[str], None] | None = None, cgroup_root: str | Path = "/sys/fs/cgroup",
                      proc_cgroup: str | Path = "/proc/self/cgroup", load: float | None = None) -> int:
    """Set torch's intra-op thread count and say so once through `log` (default: a line on stderr);
    returns the count.

    `requested`: an explicit count (--threads), set as is. Else an OMP_NUM_THREADS / MKL_NUM_THREADS
    in `env` (default os.environ) is respected: torch is left as that made it. Else the count from
    the usable CPUs less `reserved` and less the load of other programs (`load`: the 1-minute load
    average, default read from the system; see the module docstring).
    """
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        threads, why = requested, "as requested"
    elif explicit := next((name for name in ENV_VARS if env.get(name, "").strip()), None):
        threads, why = torch.get_num_threads(), f"from {explicit}={env[explicit].strip()}"
    else:
        quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
        ranks_here = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
        cpus = usable_cpus(quota=quota, ranks_here=ranks_here)
        busy = busy_elsewhere(cpus, load)
        threads = choose_threads(cpus, reserved, busy)
        parts = [f"{cpus} CPU{'s' if cpus != 1 else ''} usable" + (f" (cgroup quota {quota:g})" if quota else "")]
        if ranks_here > 1:
            parts.append(f"{ranks_here} ranks on this machine")
        if reserved:
            parts.append(f"{reserved} left to the sandbox")
        if busy:
            parts.append(f"{busy} busy with other programs (load average)")
        why = ", ".join(parts) + "; --threads to change"
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    (log or _to_stderr)(f"threads: {threads} torch thread{'s' if threads != 1 else ''} ({why})")
    return threads


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
