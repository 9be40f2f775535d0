"""Removing what calls leave behind: a tree of any depth and size, without recursion, off the
request path.

`remove_tree` deletes a directory tree the way a hostile tree needs: no recursion (a call can nest
directories far deeper than Python's stack), never following a symbolic link, through directory
descriptors (paths can be longer than PATH_MAX), two descriptors open at a time, directories whose
permissions the code took away reopened (for an owner without CAP_DAC_OVERRIDE), and an optional
deadline. It flattens as it goes: each nested directory is renamed up into the tree's top
directory, then emptied and removed, so the work list is a list of names in one directory.

The `Janitor` is a process of its own, forked from the zygote, that empties the zygote's trash
directory: when a child exits, the zygote renames the child's temp dir into the trash (one
rename, whatever the tree holds) and pokes the janitor through a pipe. The janitor runs at a low
priority (not SCHED_IDLE: see JANITOR_NICE), so removing even a ~160k-file tree costs the zygote
nothing and the children only a low-priority neighbour's share of the CPU.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import time

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_A_DIR = (errno.ENOTDIR, errno.ELOOP)
_CHECK_EVERY = 256                          # entries between two looks at the clock
JANITOR_NICE = 10
BATCH_SECONDS = 0.05
"""The janitor runs at nice 10 and wakes at most every 50 ms. Measured on the loaded 2-core VM
(300 sequential trivial calls, p99): under SCHED_IDLE it held directory locks the zygote needed
while starved of CPU, and p99 went from 31-38 ms (before the janitor) to 110-183 ms; at nice 10,
38-52 ms (load average 8-9 from other work; p50 within noise of before)."""


def remove_tree(path: str, deadline: float | None = None) -> bool:
    """Remove `path` (a directory tree, a file or a link; a missing path is fine); True once it is
    gone, False when `deadline` (time.monotonic()) came first -- the rest stays, flattened, for a
    later call. Raises nothing for what the tree holds; OSError only if the parent cannot be opened."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        parent_fd = os.open(parent, _DIR_FLAGS)
    except FileNotFoundError:
        return True
    try:
        return _remove_entry(parent_fd, name, deadline)
    finally:
        os.close(parent_fd)


def _remove_entry(parent_fd: int, name: str, deadline: float | None) -> bool:
    for _ in range(3):                      # a scan can miss entries renamed into the top meanwhile
        top_fd = _open_dir(parent_fd, name)
        if top_fd is None:                  # gone already, or not a directory
            _unlink(parent_fd, name)
            return True
        try:
            if not _empty(top_fd, deadline):
                return False
        finally:
            os.close(top_fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
    raise OSError(errno.ENOTEMPTY, "directory keeps entries", name)


def _empty(top_fd: int, deadline: float | None) -> bool:
    """Remove everything inside the directory top_fd; False at the deadline."""
    work: list[str | None] = [None]         # None: the top itself; else the name of a directory in it
    num_renamed = num_seen = 0
    num_rescans: dict[str, int] = {}
    while work:
        name = work.pop()
        fd = os.dup(top_fd) if name is None else _open_dir(top_fd, name)
        if fd is None:
            _unlink(top_fd, name)
            continue
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    num_seen += 1
                    if deadline is not None and num_seen % _CHECK_EVERY == 0 and time.monotonic() > deadline:
                        return False
                    if not _is_dir(entry):
                        _unlink(fd, entry.name)
                    elif name is None:
                        work.append(entry.name)
                    else:                   # move it up into the top directory, under a free name
                        num_renamed = _move_up(fd, entry.name, top_fd, num_renamed)
                        work.append(f".rm{num_renamed - 1}")
        finally:
            os.close(fd)
        if name is not None:                # its files are gone, its directories moved up
            try:
                os.rmdir(name, dir_fd=top_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:          # an entry the listing missed: scan it again
                num_rescans[name] = num_rescans.get(name, 0) + 1
                if exc.errno != errno.ENOTEMPTY or num_rescans[name] > 3:
                    raise
                work.append(name)
    return True


def _move_up(fd: int, name: str, top_fd: int, num_renamed: int) -> int:
    """Rename directory `name` of fd into top_fd as .rm<k> (first free k); returns the next k."""
    while True:
        target = f".rm{num_renamed}"
        num_renamed += 1
        try:
            os.rename(name, target, src_dir_fd=fd, dst_dir_fd=top_fd)
            return num_renamed
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM) and _allow(fd, name):
                num_renamed -= 1            # it could not be moved (no write permission on it)
                continue
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _open_dir(parent_fd: int, name: str) -> int | None:
    """An fd of directory `name` (never through a link); None when it is missing or not a directory."""
    for attempt in range(2):
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _NOT_A_DIR:
                return None
            if exc.errno in (errno.EACCES, errno.EPERM) and attempt == 0 and _allow(parent_fd, name):
                continue
            raise
        if os.geteuid() != 0:               # an owner needs write permission to empty it
            try:
                os.fchmod(fd, 0o700)
            except OSError:
                pass
        return fd
    return None


def _allow(parent_fd: int, name: str) -> bool:
    """Give the owner back full access to directory `name` (the code may have chmod'ed it to 0).
    Only a process that lacks CAP_DAC_OVERRIDE needs this, and such a process runs as the same uid
    as the code, so a link swapped in at this moment reaches nothing the code could not chmod."""
    if os.geteuid() == 0:
        return False
    try:
        os.chmod(name, 0o700, dir_fd=parent_fd)
        return True
    except OSError:
        return False


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:              # raced into a directory: the next scan handles it
        pass


class Janitor:
    """The zygote's handle on its clean-up process (see the module docstring)."""

    def __init__(self, trash_dir: str, fds_to_close: list[int]) -> None:
        self.trash_dir = trash_dir
        self._fds_to_close = fds_to_close
        self.pid = -1
        self._start()

    def _start(self) -> None:
        wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._wake_w, False)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self._wake_w)
                for fd in self._fds_to_close:
                    os.close(fd)
                _janitor_loop(self.trash_dir, wake_r, parent)
            finally:
                os._exit(0)
        os.close(wake_r)

    def poke(self) -> None:
        """There is trash to remove (never blocks: a full pipe means a wake-up is pending)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        except BrokenPipeError:             # it died: reap it and start another
            self._reap()
            os.close(self._wake_w)
            self._start()
            self.poke()

    def _reap(self) -> None:
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def close(self) -> None:
        os.close(self._wake_w)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap()


def _janitor_loop(trash_dir: str, wake_fd: int, parent: int) -> None:
    from cir_sandbox import policy

    policy.prctl(policy.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    os.nice(JANITOR_NICE)
    while True:
        select.select([wake_fd], [], [])
        if not os.read(wake_fd, 4096):      # the zygote is gone
            return
        try:
            with os.scandir(trash_dir) as entries:
                names = [entry.name for entry in entries]
        except OSError:
            continue
        for name in names:
            try:
                remove_tree(os.path.join(trash_dir, name))
            except OSError:
                pass                        # what is left is retried at the next wake-up
        time.sleep(BATCH_SECONDS)           # let trash gather: fewer wake-ups, each removing more
