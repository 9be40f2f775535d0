"""One sandbox child: confine itself right after the fork, then run the code it is sent.

The server forks children ahead of time; each one runs `run_child`, which

  1) makes itself a session leader (so the server can SIGKILL its whole process group),
  2) sets no_new_privs, puts /dev/null on stdin, the server's pipes on stdout/stderr, its control
     socket on fd 3, and closes every other inherited descriptor,
  3) creates its private temp dir and moves into it, sets rlimits (CPU, address space = current
     size + memory limit, file size, open files, no core dumps, no locked memory),
  4) confines file access with Landlock (when the kernel has it), drops root (when it is root),
     becomes non-dumpable (its /proc entries turn root-owned) and asks for SIGKILL if the server
     dies,
  5) scrubs the environment, reseeds numpy's global RNG (Python's `random` reseeds itself at fork),
  6) loads the seccomp filters: the per-child "signal only yourself" filter, then the allowlist,
  7) reports {"ready": true} and blocks reading its control socket.

All of that happens before any request arrives, so a call only pays for its own code. Stateless
calls run in fresh globals and the child exits after reporting; a session child keeps its globals
and waits for the next call.
"""
from __future__ import annotations

import builtins
import fcntl
import io
import json
import math
import os
import resource
import signal
import sys
import time
import traceback

from sandbox import landlock, policy
from sandbox.plan import ChildPlan
from sandbox.protocol import HEADER, frame, read_exact_fd, write_all_fd
from sandbox.records import EXIT_NO_CONTROL, EXIT_SETUP_FAILED

CTRL_FD = 3
MAX_ERROR_LINE = 4000


def build_stdio() -> tuple:
    """Text files over fds 0, 1, 2 (built in the server, installed by each child)."""
    stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 1 << 16),
                              encoding="utf-8", errors="backslashreplace")
    stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                              encoding="utf-8", errors="backslashreplace", write_through=True)
    return stdin, stdout, stderr


def run_child(plan: ChildPlan, tmpdir: str, ctrl_fd: int, out_fd: int, err_fd: int,
              server_pid: int, address_space: int) -> None:
    """Entry point right after os.fork(); never returns."""
    try:
        _prepare(plan, tmpdir, ctrl_fd, out_fd, err_fd, server_pid, address_space)
    except BaseException as exc:                    # report, then die: the server logs it
        try:
            message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            write_all_fd(CTRL_FD, frame(json.dumps({"setup_error": message}).encode()))
        finally:
            os._exit(EXIT_SETUP_FAILED)
    try:
        _serve(plan)
    finally:
        os._exit(0)


def _prepare(plan: ChildPlan, tmpdir: str, ctrl_fd: int, out_fd: int, err_fd: int,
             server_pid: int, address_space: int) -> None:
    # 1)
    os.setsid()
    policy.prctl(policy.PR_SET_NO_NEW_PRIVS, 1)
    # 3) (before 2: the Landlock rules use inherited descriptors)
    os.mkdir(tmpdir, 0o700)
    if plan.uid is not None:
        os.chown(tmpdir, plan.uid, plan.gid)
    os.chdir(tmpdir)
    policy.set_rlimits(cpu_seconds=plan.cpu_seconds, cpu_hard_seconds=plan.cpu_hard_seconds,
                       address_space_bytes=address_space + plan.memory_bytes,
                       file_size_bytes=plan.file_size_bytes, open_files=plan.open_files)
    if plan.landlock_abi:
        own = [landlock.path_rule(tmpdir, True, plan.landlock_abi),
               landlock.path_rule(f"/proc/{os.getpid()}", False, plan.landlock_abi)]
        landlock.confine(plan.read_rules + [r for r in own if r], plan.landlock_abi)
    # 2)
    devnull = os.open("/dev/null", os.O_RDONLY)
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (devnull, out_fd, err_fd, ctrl_fd)]
    for target, source in enumerate(sources):
        os.dup2(source, target)
    os.closerange(CTRL_FD + 1, 1 << 20)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    # 4)
    if plan.uid is not None:
        policy.drop_privileges(plan.uid, plan.gid, plan.keep_dac_read_search)
    policy.prctl(policy.PR_SET_DUMPABLE, 0)
    policy.prctl(policy.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:
        os._exit(0)
    # 5)
    os.environ.clear()
    os.environ.update(plan.env, HOME=tmpdir, TMPDIR=tmpdir, PWD=tmpdir)
    sys.argv[:] = [""]
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = tmpdir
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = plan.stdio
    # 6) + 7)
    policy.load_bpf(policy.with_pid(plan.pid_filter_template, os.getpid()))
    policy.load_bpf(plan.filter_bpf)
    write_all_fd(CTRL_FD, frame(b'{"ready":true}'))


def _serve(plan: ChildPlan) -> None:
    stdout, stderr, stdin = sys.stdout, sys.stderr, sys.stdin
    session_globals = _fresh_globals()
    while True:
        header = read_exact_fd(CTRL_FD, HEADER.size)
        if header is None:
            return
        payload = read_exact_fd(CTRL_FD, HEADER.unpack(header)[0])
        if payload is None:
            return
        keep = payload[:1] == b"K"
        seq = int.from_bytes(payload[1:5], "big")
        code = payload[5:].decode("utf-8", "surrogateescape")
        if keep:                                 # sessions: a fresh CPU allowance per call
            used = resource.getrusage(resource.RUSAGE_SELF)
            soft = math.ceil(used.ru_utime + used.ru_stime) + plan.cpu_seconds
            resource.setrlimit(resource.RLIMIT_CPU, (min(soft, plan.cpu_hard_seconds), plan.cpu_hard_seconds))
        sys.stdout, sys.stderr, sys.stdin = stdout, stderr, stdin
        status, error_line, cpu_ms = execute(code, session_globals if keep else _fresh_globals(),
                                             not keep, stderr)
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except Exception:
                pass
        report = {"seq": seq, "status": status, "error_line": error_line, "cpu_ms": cpu_ms}
        try:
            write_all_fd(CTRL_FD, frame(json.dumps(report).encode()))
        except OSError:
            os._exit(EXIT_NO_CONTROL)
        if not keep:                             # the server SIGKILLs us once it has answered:
            read_exact_fd(CTRL_FD, 1)            # exiting now would compete with it for the CPU
            return


def _fresh_globals() -> dict:
    return {"__name__": "__main__", "__builtins__": builtins}


def execute(code: str, globals_: dict, discard_globals: bool,
            stderr: io.TextIOBase) -> tuple[str, str, float]:
    """Run code like `python -c`; return (status, last traceback line, CPU ms)."""
    t0 = time.process_time()
    status, error_line = "ok", ""
    try:
        exec(compile(code, "<string>", "exec", dont_inherit=True), globals_)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            status, error_line = "error", f"SystemExit: {exc.code}"
    except BaseException as exc:
        if discard_globals:
            globals_.clear()                     # free what a memory bomb holds before formatting
        status = "memory" if isinstance(exc, MemoryError) else (
            "denied" if isinstance(exc, PermissionError) else "error")
        try:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
            error_line = text.rstrip("\n").rsplit("\n", 1)[-1]
        except BaseException:
            text = error_line = type(exc).__name__
        try:
            stderr.write(text)
        except BaseException:
            pass
    if len(error_line) > MAX_ERROR_LINE:
        error_line = error_line[:MAX_ERROR_LINE // 2] + "..." + error_line[-MAX_ERROR_LINE // 2:]
    return status, error_line, (time.process_time() - t0) * 1e3
