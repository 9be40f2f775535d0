"""The restrictions a sandbox child puts on itself: seccomp filter, rlimits, privilege drop.

The seccomp filter is an allowlist (everything not listed fails with EPERM) compiled once in the
server with libseccomp (`pyseccomp`) and exported as raw BPF; each child loads those bytes with one
prctl. A second, tiny hand-written BPF program is built per child: kill / tkill / tgkill may only
target the child itself (kill(0) = its own process group, which holds only itself).

Notable rules: chmod by path only where children run as their own uid (nobody), not the caller's;
clone only with CLONE_THREAD (threads yes, processes no); clone3 fails with ENOSYS so
glibc falls back to clone; no socket calls at all; no execve; ioctl, fcntl and prctl only with a
few harmless commands; prlimit64 only on the calling process; a syscall from a foreign
architecture (int 0x80, x32) kills the process.
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
import tempfile

import pyseccomp as seccomp

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_THREAD = 0x00010000
CAP_DAC_READ_SEARCH = 2

ALLOWED_SYSCALLS = (
    # file descriptors and file I/O
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "lseek", "close", "close_range", "dup", "dup2", "dup3", "flock", "fsync",
    "fdatasync", "ftruncate", "truncate", "fallocate", "fadvise64", "readahead", "sendfile",
    "copy_file_range", "splice", "pipe", "pipe2",
    # paths (Landlock and file permissions decide which ones)
    "open", "openat", "openat2", "creat", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs",
    "fstatfs", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents",
    "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat",
    "rename", "renameat", "renameat2", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
    "fchmodat2", "utime", "utimes", "utimensat", "futimesat", "umask", "getxattr", "lgetxattr",
    "fgetxattr", "listxattr", "llistxattr", "flistxattr",
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync", "membarrier",
    # signals (kill family further limited to the process itself by the per-child filter)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait",
    "rt_sigsuspend", "sigaltstack", "pause", "alarm", "setitimer", "getitimer", "kill", "tkill",
    "tgkill", "signalfd", "signalfd4", "restart_syscall",
    # threads, time, identity, scheduling (read-only)
    "futex", "futex_waitv", "set_robust_list", "rseq", "set_tid_address", "arch_prctl", "exit",
    "exit_group", "wait4", "waitid", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid",
    "getegid", "getresuid", "getresgid", "getgroups", "getpgrp", "getpgid", "getsid", "capget",
    "getrusage", "times", "uname", "sysinfo", "getpriority", "getcpu", "sched_yield",
    "sched_getaffinity", "sched_getparam", "sched_getscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "ioprio_get", "getrlimit", "setrlimit", "getrandom",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun", "timer_delete",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # readiness
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
)
"""Everything else (sockets, execve, fork/vfork, ptrace, mount, unshare, setns, bpf,
perf_event_open, keyctl, io_uring, chown, link, setuid, seccomp, landlock, ...) -> EPERM."""

IOCTL_COMMANDS = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)
"""TCGETS (isatty), TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX."""
FCNTL_COMMANDS = (0, 1, 2, 3, 4, 5, 6, 7, 36, 37, 38, 1030, 1031, 1032, 1033, 1034)
"""F_DUPFD..F_SETLKW, F_OFD_*, F_DUPFD_CLOEXEC, pipe size, seals. Not F_SETOWN / F_SETSIG (SIGIO
to another process), F_SETLEASE, F_NOTIFY."""
PRCTL_OPTIONS = (2, 3, 15, 16, 21, 23, 30, 39, 0x53564D41)
"""PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET/GET_NAME, PR_GET_SECCOMP, PR_CAPBSET_READ,
PR_GET_TIMERSLACK, PR_GET_NO_NEW_PRIVS, PR_SET_VMA (glibc names its mappings)."""


def _nr(name: str) -> int:
    return seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)


PATH_CHMOD_SYSCALLS = ("chmod", "fchmodat", "fchmodat2")


def build_filter_bpf(allow_path_chmod: bool = True) -> bytes:
    """Compile the allowlist with libseccomp and return the raw BPF program (done once).
    allow_path_chmod=False refuses chmod by path (fchmod of an open file stays allowed): Landlock
    does not govern chmod, so a child that runs as the caller's uid (no root to drop to) could
    otherwise chmod any of the caller's files and directories, the sandbox's own included."""
    f = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in ALLOWED_SYSCALLS:
        if _nr(name) >= 0 and (allow_path_chmod or name not in PATH_CHMOD_SYSCALLS):
            f.add_rule(seccomp.ALLOW, name)
    f.add_rule(seccomp.ALLOW, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    if _nr("clone3") >= 0:
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for cmd in IOCTL_COMMANDS:
        f.add_rule(seccomp.ALLOW, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, cmd))
    for cmd in FCNTL_COMMANDS:
        f.add_rule(seccomp.ALLOW, "fcntl", seccomp.Arg(1, seccomp.EQ, cmd))
    for option in PRCTL_OPTIONS:
        f.add_rule(seccomp.ALLOW, "prctl", seccomp.Arg(0, seccomp.EQ, option))
    f.add_rule(seccomp.ALLOW, "prlimit64", seccomp.Arg(0, seccomp.EQ, 0))
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


# BPF instruction encoding (linux/filter.h): struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return code.to_bytes(2, sys.byteorder) + bytes((jt, jf)) + (k & 0xFFFFFFFF).to_bytes(4, sys.byteorder)


def pid_filter_bpf(pid: int) -> bytes:
    """kill(pid | 0), tkill(pid), tgkill(pid, ...) allowed; any other target -> EPERM."""
    arg0_low = 16 if sys.byteorder == "little" else 20     # offsetof(seccomp_data, args[0]) low word
    allow = _insn(_RET_K, _SECCOMP_RET_ALLOW)
    deny = _insn(_RET_K, _SECCOMP_RET_ERRNO | errno.EPERM)
    prog = [
        _insn(_LD_W_ABS, 4),                                # 0: A = arch
        _insn(_JEQ_K, seccomp.system_arch(), 0, 12),        # 1: foreign arch -> 14 (main filter kills it)
        _insn(_LD_W_ABS, 0),                                # 2: A = nr
        _insn(_JEQ_K, _nr("kill"), 3, 0),                   # 3: -> 7
        _insn(_JEQ_K, _nr("tkill"), 7, 0),                  # 4: -> 12
        _insn(_JEQ_K, _nr("tgkill"), 6, 0),                 # 5: -> 12
        allow,                                              # 6
        _insn(_LD_W_ABS, arg0_low),                         # 7: kill: A = pid argument
        _insn(_JEQ_K, pid, 2, 0),                           # 8: -> 11
        _insn(_JEQ_K, 0, 1, 0),                             # 9: -> 11
        deny,                                               # 10
        allow,                                              # 11
        _insn(_LD_W_ABS, arg0_low),                         # 12: tkill / tgkill: A = (t)gid argument
        _insn(_JEQ_K, pid, 1, 0),                           # 13: -> 15
        deny,                                               # 14 (also the foreign-arch target: EPERM)
        allow,                                              # 15
    ]
    return b"".join(prog)


_PID_SLOTS = (8, 13)             # instructions of pid_filter_bpf that compare against the pid


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class BpfProgram:
    """A seccomp BPF program in ctypes memory, built once in the server: a child loads it with a
    single prctl and allocates nothing (every object a child creates costs copy-on-write faults)."""

    def __init__(self, program: bytes) -> None:
        self._buf = ctypes.create_string_buffer(program, len(program))
        self._prog = _SockFprog(len(program) // 8, ctypes.addressof(self._buf))
        self._address = ctypes.addressof(self._prog)

    def set_pid(self, pid: int) -> None:
        """Turn pid_filter_bpf(0) into pid_filter_bpf(pid), in place."""
        for i in _PID_SLOTS:
            self._buf[8 * i + 4:8 * i + 8] = pid.to_bytes(4, sys.byteorder)

    def load(self) -> None:
        """Install the program on the calling thread (no_new_privs must be set)."""
        if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._address, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"loading seccomp filter: {os.strerror(err)}")


def prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}): {os.strerror(err)}")


def set_inherited_rlimits(file_size_bytes: int) -> None:
    """The limits the zygote sets once for all its children: largest file written, no core
    dumps, no locked memory, no POSIX message queues. (CPU, address space and open files are set
    by each child: they would bind the zygote too.)"""
    for limit, value in ((resource.RLIMIT_FSIZE, file_size_bytes), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_MEMLOCK, 0), (resource.RLIMIT_MSGQUEUE, 0)):
        resource.setrlimit(limit, (value, value))


def address_space_bytes() -> int:
    """Current virtual size of the calling process (the base the memory limit is added to)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CAP_HEADER = _CapHeader(0x20080522, 0)                     # _LINUX_CAPABILITY_VERSION_3
_CAP_KEEP_DAC_READ_SEARCH = (_CapData * 2)()
_CAP_KEEP_DAC_READ_SEARCH[0].effective = _CAP_KEEP_DAC_READ_SEARCH[0].permitted = 1 << CAP_DAC_READ_SEARCH
_NR_CAPSET = _nr("capset")


def drop_privileges(uid: int, gid: int, keep_dac_read_search: bool) -> None:
    """Become uid/gid with no supplementary groups. Every capability is lost, except, when asked,
    CAP_DAC_READ_SEARCH (read any file, search any directory): kept only when the Python install
    is not readable by `uid` and Landlock confines reads (see plan.py)."""
    if keep_dac_read_search:
        prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_dac_read_search:
        if _libc.syscall(_NR_CAPSET, ctypes.byref(_CAP_HEADER), ctypes.byref(_CAP_KEEP_DAC_READ_SEARCH)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"capset: {os.strerror(err)}")
        prctl(PR_SET_KEEPCAPS, 0)
