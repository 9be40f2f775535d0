"""`ChildPlan`: everything the server works out once (seccomp program, limits, uid, Landlock
rules) and every child then applies to itself, and `make_plan`, which works it out."""
from __future__ import annotations

import logging
import os
import pwd
import stat
from dataclasses import dataclass, field

from cir_sandbox import landlock, policy
from cir_sandbox.config import ServerConfig
from cir_sandbox.environment import CHILD_ENV
from cir_sandbox.warm import read_paths

log = logging.getLogger("cir_sandbox.server")


@dataclass
class ChildPlan:
    seccomp_filter: policy.BpfProgram   # the allowlist, compiled
    pid_filter: policy.BpfProgram       # policy.pid_filter_bpf(0); each child sets its pid
    cpu_seconds: int
    cpu_hard_seconds: int
    memory_bytes: int                   # on top of the address space at fork time
    file_size_bytes: int
    open_files: int
    uid: int | None                     # None: not root, keep the uid
    gid: int
    keep_dac_read_search: bool
    landlock_abi: int
    read_rules: list[tuple[int, int]]   # Landlock (O_PATH fd, access), opened once, inherited
    read_paths: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdio: tuple = ()                   # (stdin, stdout, stderr) text files on fds 0-2, built once


def make_plan(config: ServerConfig, warm_modules: list[str], stdio: tuple) -> ChildPlan:
    abi = landlock.abi_version()
    paths, python_paths = read_paths(warm_modules)
    rules = [landlock.path_rule(p, False, abi) for p in paths] if abi else []
    if abi:
        rules.append(landlock.path_rule("/dev/null", True, abi))
    uid = gid = None
    keep_cap = False
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("nobody")
            uid, gid = entry.pw_uid, entry.pw_gid
        except KeyError:
            uid = gid = 65534
        readable = all(_world_readable(p) for p in python_paths)
        keep_cap = not readable and abi > 0
        if not readable and abi == 0:
            log.warning("the Python install is not readable by uid %d and the kernel has no "
                        "Landlock: snippets can import only the warm modules", uid)
    return ChildPlan(
        seccomp_filter=policy.BpfProgram(policy.build_filter_bpf(allow_path_chmod=uid is not None)),
        pid_filter=policy.BpfProgram(policy.pid_filter_bpf(0)),
        cpu_seconds=config.cpu_seconds,
        cpu_hard_seconds=max(config.cpu_seconds + 1, 64 * config.cpu_seconds),
        memory_bytes=config.memory_mb << 20, file_size_bytes=config.file_size_mb << 20,
        open_files=config.open_files, uid=uid, gid=gid if gid is not None else -1,
        keep_dac_read_search=keep_cap, landlock_abi=abi, read_rules=[r for r in rules if r],
        read_paths=paths, env=dict(CHILD_ENV), stdio=stdio)


def _world_readable(path: str) -> bool:
    """Whether any uid can read `path` (every ancestor searchable by others, path readable)."""
    current = os.path.realpath(path)
    try:
        mode = os.stat(current).st_mode
        if not mode & stat.S_IROTH or (stat.S_ISDIR(mode) and not mode & stat.S_IXOTH):
            return False
        while current != "/":
            current = os.path.dirname(current)
            if not os.stat(current).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True
