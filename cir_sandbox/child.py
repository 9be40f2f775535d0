"""One sandbox child: the last steps of its confinement, then the code it is sent.

The zygote (zygote.py) prepares what children inherit: no_new_privs, default signal handlers, the
scrubbed environment (HOME and TMPDIR are ".", the call's private temp dir), stdin on /dev/null,
stdout/stderr on the server's pipes, the control socket on fd 3, rlimits on file size, core dumps,
locked memory and message queues, and a Landlock ruleset for the child's temp dir. It forks; the
child, in `run_child`:

  1) becomes a session leader and moves into its temp dir,
  2) sets its rlimits on CPU seconds, address space (its size at fork + the memory limit) and
     open files,
  3) enters its Landlock domain, closes every inherited descriptor above fd 3,
  4) drops root (uid nobody, no groups, no capabilities -- but see plan.keep_dac_read_search),
     becomes non-dumpable (its /proc entries turn root-owned) and asks for SIGKILL if the zygote
     dies,
  5) reseeds numpy's global RNG (Python's `random` reseeds itself after a fork),
  6) loads the seccomp filters: "signal only yourself", then the allowlist,
  7) makes one dry-run call through a pipe (see below),
  8) tells the server its set-up is done (a b"R" frame on fd 3; or b"E" and a message if a step
     failed),

and only then reads its control socket, so code never runs unconfined, and nothing a call's code
does -- its exit code, what it writes to fd 3 -- can pass for a failed set-up: the server knows
set-up worked from a frame sent before any code ran. Forking the warm interpreter
and tearing it down cost milliseconds here, so every step that can be done once in the zygote is,
and the child runs as little Python as possible: each page it writes costs a copy-on-write fault.
The dry run takes the faults of a call's own path (~75 pages) before the call: measured, a stateless
`print(1)` went from ~2.5 ms to ~0.5 ms server-side. A stateless call runs in fresh globals,
reports, and is killed by the server; a session child keeps its globals and waits for the next call.
"""
from __future__ import annotations

import builtins
import io
import math
import os
import resource
import signal
import sys
import time
import traceback

from cir_sandbox import landlock, policy
from cir_sandbox.plan import ChildPlan
from cir_sandbox.protocol import (HEADER, frame, read_exact_fd, ready_frame, report_frame, setup_error_frame,
                                  write_all_fd)
from cir_sandbox.records import EXIT_NO_CONTROL, EXIT_SETUP_FAILED

CTRL_FD = 3
MAX_ERROR_LINE = 4000


def build_stdio() -> tuple:
    """Text files over fds 0, 1, 2 (built in the server, installed by the zygote)."""
    stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 1 << 16),
                              encoding="utf-8", errors="backslashreplace")
    stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                              encoding="utf-8", errors="backslashreplace", write_through=True)
    return stdin, stdout, stderr


def run_child(plan: ChildPlan, rundir: str, ruleset_fd: int, zygote_pid: int,
              address_space: int) -> None:
    """Entry point right after the zygote's fork (fds 0-3 already in place); never returns."""
    try:
        _prepare(plan, rundir, ruleset_fd, zygote_pid, address_space)
    except BaseException as exc:                    # report, then die: the server logs it
        try:
            message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            write_all_fd(CTRL_FD, setup_error_frame(message))
        finally:
            os._exit(EXIT_SETUP_FAILED)
    try:
        write_all_fd(CTRL_FD, ready_frame())        # 8)
        _serve(plan)
    finally:
        os._exit(0)


def _prepare(plan: ChildPlan, rundir: str, ruleset_fd: int, zygote_pid: int,
             address_space: int) -> None:
    # 1) + 2)
    os.setsid()
    os.chdir(rundir)
    resource.setrlimit(resource.RLIMIT_CPU, (plan.cpu_hard_seconds, plan.cpu_hard_seconds))
    limit = address_space + plan.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_NOFILE, (plan.open_files, plan.open_files))
    # 3)
    if ruleset_fd >= 0:
        landlock.restrict_self(ruleset_fd)
    os.closerange(CTRL_FD + 1, 1 << 20)
    # 4)
    if plan.uid is not None:
        policy.drop_privileges(plan.uid, plan.gid, plan.keep_dac_read_search)
    policy.prctl(policy.PR_SET_DUMPABLE, 0)
    policy.prctl(policy.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote_pid:
        os._exit(0)
    # 5)
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed(int.from_bytes(os.urandom(4), "little"))
    # 6)
    plan.pid_filter.set_pid(os.getpid())
    plan.pid_filter.load()
    plan.seccomp_filter.load()
    # 7) one dry-run call through a pipe: the pages a call touches (this module's code, the
    #    compiler, json, the stdio buffers) get copied now rather than on the first call's time
    dry_r, dry_w = os.pipe()
    os.write(dry_w, frame(b"S" + bytes(4) + b"pass"))
    _call(plan, dry_r, dry_w, {})
    os.close(dry_r)
    os.close(dry_w)


def _serve(plan: ChildPlan) -> None:
    session_globals = _fresh_globals()
    while _call(plan, CTRL_FD, CTRL_FD, session_globals):
        pass
    read_exact_fd(CTRL_FD, 1)       # stateless: the server SIGKILLs us once it has answered
                                    # (exiting now would compete with it for the CPU)


def _call(plan: ChildPlan, in_fd: int, out_fd: int, session_globals: dict) -> bool:
    """Read one request from in_fd, run it, report on out_fd; True when the session goes on."""
    header = read_exact_fd(in_fd, HEADER.size)
    payload = read_exact_fd(in_fd, HEADER.unpack(header)[0]) if header else None
    if payload is None:
        os._exit(0)                                 # the server closed the channel
    keep = payload[:1] == b"K"
    seq = int.from_bytes(payload[1:5], "big")
    code = payload[5:].decode("utf-8", "surrogatepass")
    used = resource.getrusage(resource.RUSAGE_SELF)     # CPU allowance of this call alone
    soft = math.ceil(used.ru_utime + used.ru_stime) + plan.cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft, plan.cpu_hard_seconds), plan.cpu_hard_seconds))
    stdin, stdout, stderr = plan.stdio
    sys.stdin, sys.stdout, sys.stderr = plan.stdio
    status, error_line, cpu_ms = execute(code, session_globals if keep else _fresh_globals(),
                                         not keep, stderr)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:
        write_all_fd(out_fd, report_frame(seq, status, error_line, max(cpu_ms, 0.0)))
    except OSError:
        os._exit(EXIT_NO_CONTROL)
    return keep


def _join_threads() -> None:
    threading = sys.modules.get("threading")
    if threading is not None:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()


def _fresh_globals() -> dict:
    return {"__name__": "__main__", "__builtins__": builtins}


def execute(code: str, globals_: dict, discard_globals: bool,
            stderr: io.TextIOBase) -> tuple[str, str, float]:
    """Run code like `python -c`; return (status, last traceback line, CPU ms)."""
    t0 = time.process_time()
    status, error_line = "ok", ""
    try:
        exec(compile(code, "<string>", "exec", dont_inherit=True), globals_)
        if discard_globals:                     # like `python -c`: wait for non-daemon threads
            _join_threads()
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
