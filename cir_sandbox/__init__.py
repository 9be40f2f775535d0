"""cir_sandbox: run untrusted Python snippets in milliseconds, each in a confined fork of a warm server.

    from cir_sandbox import Sandbox, format_feedback
    with Sandbox(workers=8, timeout=10, memory_mb=1024) as sb:
        result = sb.run("import sympy as sp; x = sp.Symbol('x'); print(sp.solve(x**2 - 4, x))")
        result.status, result.stdout, format_feedback(result)   # 'ok', '[-2, 2]\\n', '[-2, 2]'

    python -m cir_sandbox.run snippet.py          # debug one snippet (or pipe it on stdin)

Standalone: imports the standard library and `pyseccomp` only (the server also imports its warm
modules, numpy and sympy by default, when installed); nothing from `cir`.

Files: client.py (Sandbox, Session -- the caller's side), server.py (the loop: queue, limits,
answers), frontend.py (the server's connections, requests, sessions), zygote.py (forks and reaps the
children), cleanup.py (removes what calls leave, off the request path), child.py (what a child does
to itself, then runs), plan.py (what the server works out once for all children), policy.py
(seccomp, rlimits, privilege drop), landlock.py (file confinement), warm.py (warm modules, readable
paths, huge pages), records.py (the server's bookkeeping), protocol.py (framing), config.py,
environment.py, result.py (Result, format_feedback), run.py (CLI).

What each call gets: a fresh process forked from a warm zygote, in its own session; no_new_privs;
rlimits on CPU seconds, address space (its size at fork + memory_mb), file size, open files, no core
dumps; a private temp dir as cwd, HOME and TMPDIR, new for each call, with a random name in a
directory the code can neither list nor chmod (renamed away when the call ends and removed by a
background process, whatever depth or number of files it holds); a scrubbed environment; stdin at
EOF; stdout/stderr captured with a byte cap; single-threaded BLAS; fresh random seeds; a seccomp
allowlist (no sockets, no exec, no fork -- threads only --, no ptrace, no signals to other
processes, no mount/unshare/setns/bpf/perf_event_open/keyctl/io_uring, ...); when the server runs as
root, uid `nobody` with no groups; Landlock file confinement where the kernel has it (read the
Python install and system libraries, write only the temp dir, no /proc).
The server enforces the wall time with SIGKILL. Like `python -c`, a stateless call ends when its
non-daemon threads end; threads a session call leaves running may run until that call's wall-time
limit, after which the session's interpreter is ended (the next call says so in its note).

What the sandbox guarantees about itself: nothing a snippet does (its exit code, what it writes to
fd 3, stdout or stderr, files it leaves, chmod) ends the server, fails, repeats or changes another
call, or is taken for a failure of the sandbox. Set-up success is a frame the child sends before
any code runs, so no exit code or output passes for an infrastructure failure; everything read
from a child is checked (fixed frame layouts, sizes, ranges, the order the protocol allows), and
a child that breaks the protocol is killed, failing its own call only. Every text field of a
Result is valid UTF-8 (lone surrogates replaced).

What is NOT covered -- do not rely on this sandbox for these:
- Kernel exploits. seccomp narrows the syscall surface but the allowed calls (read, mmap, futex,
  ...) still reach the kernel; this is not a VM or gVisor.
- Reading: the code can read everything under the Python install, /usr, /lib*, a few /etc files
  (passwd, group, ld.so.cache, ...) and /sys/devices/system/cpu, and stat() any path (Landlock
  does not govern path walks). Without Landlock (kernel < 5.13 or disabled) it can read whatever
  file permissions let `nobody` read -- /tmp, other processes' /proc/<pid>/cmdline -- and write
  where `nobody` may write.
- Capabilities: when the Python install is not readable by `nobody` (e.g. pyenv under a 0700
  /root) and Landlock is available, children keep ONE capability, CAP_DAC_READ_SEARCH, so they can
  import; Landlock then is what limits their reads. Without Landlock they keep none and can import
  only the warm modules.
- Disk: RLIMIT_FSIZE caps each file, not the number of files; code can fill the temp dir's file
  system (usually /tmp) until its time runs out, and what it wrote stays until the janitor (which
  runs at idle priority) has removed it: removal is off the request path, not instant. No cgroup
  limits (memory is an address-space rlimit, so memory that is mapped but never touched also
  counts; there is no pids/io limit).
- Children share one uid (`nobody`): without Landlock, one child could read another's temp dir
  if it learnt its random name.
- Side channels and timing; CPU contention between children; resource use of the server itself.
- Threads in a snippet are allowed (clone with CLONE_THREAD); they die with the process; a
  session's leftover threads keep running (and printing) between its calls, up to the wall-time
  limit of the call that started them.
- A snippet can forge its own result (it can read its call's sequence number from the child's
  stack and write a well-formed report to fd 3): only its own call's status / error line / CPU
  time, never another call's.
- Native code: ctypes and executable memory are allowed, so code can run machine code -- which
  still meets the same seccomp filter, rlimits and Landlock domain.
- Not root: without root there is no uid drop, so children run as the caller's uid; chmod by
  path is then refused by the seccomp filter (Landlock does not govern it), but a child can still
  stat, and read or write per Landlock, as that uid; the other layers still apply.
- Speed is machine-bound: each call costs a fork and an exit of a ~70 MB process (see
  bench/RESULTS.md for what that costs on a small VM).
- Non-Linux systems: not supported (seccomp, Landlock, pidfd are Linux-only; Linux >= 5.3).
"""
from cir_sandbox.client import Sandbox, Session, session
from cir_sandbox.result import STATUSES, Result, format_feedback, truncate

__all__ = ["Sandbox", "Session", "session", "Result", "STATUSES", "format_feedback", "truncate"]
