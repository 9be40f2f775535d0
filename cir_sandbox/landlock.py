"""Landlock (Linux >= 5.13): confine a child's file access to a few trees, through ctypes.

A confined child may read (and map executable) files beneath the read paths -- the Python install,
system libraries, a few files of /etc -- and do anything beneath its private temp dir; every other
open, create, rename or unlink fails with EACCES, even where file permissions would allow it (/tmp,
/dev/shm, /proc -- its own /proc/self included). The zygote builds one ruleset per temp-dir slot and
reuses it (make_ruleset); a child only calls restrict_self. With ABI >= 4 TCP bind/connect are
refused too (seccomp already refuses sockets), and with ABI >= 6 the child cannot signal or reach
abstract Unix sockets of processes outside its own domain (which includes the other children).

Landlock does not govern path walks or stat(): a confined process can still see that a file
exists, its size and its mode. Where the kernel has no Landlock (abi_version() == 0) the child runs
without it; file access is then bounded only by the unprivileged uid and file permissions.
"""
from __future__ import annotations

import ctypes
import os
import stat

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Same numbers on every architecture that has Landlock (new syscalls share one table since 5.x).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TRUNCATE = 1 << 14
_FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | (1 << 15)     # rights valid on non-dirs
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """Landlock ABI the running kernel offers; 0 when it has none (or it is disabled)."""
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(version), 0)


def _handled_fs(abi: int) -> int:
    mask = (1 << 13) - 1                        # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        mask |= 1 << 13                         # REFER
    if abi >= 3:
        mask |= TRUNCATE
    if abi >= 5:
        mask |= 1 << 15                         # IOCTL_DEV
    return mask


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return ret


def path_rule(path: str, writable: bool, abi: int) -> tuple[int, int] | None:
    """(O_PATH fd, allowed access) for one path, or None when it does not exist. Read-only rules
    are opened once in the server and inherited by every child."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    access = _handled_fs(abi) if writable else EXECUTE | READ_FILE | READ_DIR
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        access &= _FILE_ONLY
    return fd, access & _handled_fs(abi)


def make_ruleset(rules: list[tuple[int, int]], abi: int) -> int:
    """A ruleset fd allowing exactly `rules`; every other file access Landlock handles is refused
    once a process restricts itself with it (see restrict_self)."""
    attr = _RulesetAttr(_handled_fs(abi), 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset_fd = _check(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
                        "create_ruleset")
    try:
        for fd, access in rules:
            rule = _PathBeneathAttr(access, fd)
            _check(_libc.syscall(_SYS_ADD_RULE, ruleset_fd, _RULE_PATH_BENEATH, ctypes.byref(rule), 0),
                   f"add_rule(fd {fd})")
    except BaseException:
        os.close(ruleset_fd)
        raise
    return ruleset_fd


def restrict_self(ruleset_fd: int) -> None:
    """Enter the ruleset's domain (no_new_privs must be set); irreversible, inherited by forks."""
    _check(_libc.syscall(_SYS_RESTRICT_SELF, ruleset_fd, 0), "restrict_self")
