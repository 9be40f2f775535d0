"""The zygote: a copy of the warm server that forks the children, and reaps them.

Forking the warm interpreter and tearing a child down cost milliseconds of CPU on small VMs (page
tables of ~70 MB of heap, copy-on-write faults), so the server does not fork on its own loop: it
forks this zygote once, after warm-up and gc.freeze(), and asks it for children. The zygote does
once what every child would otherwise repeat (no_new_privs, signal handlers, environment, stdio
objects, inherited rlimits) and, per child, what is cheaper before the fork than after it: the
temp dir, the descriptors (put straight at fds 0-3), the Landlock ruleset. It hands the server its
ends of each child's control socket and stdout/stderr pipes, plus a pidfd to kill the child with,
over a SOCK_SEQPACKET socket with SCM_RIGHTS. When a child exits it reaps it, reports the wait
status and CPU time, and retires the child's temp dir.

    server -> zygote: {"spawn": n}
    zygote -> server: {"spawned": pid, "tmpdir": path} + fds [ctrl, stdout, stderr, pidfd]
                      {"exited": pid, "status": wait_status, "cpu_ms": float}
                      {"failed": "..."}

Temp dirs live in slots: base/s<k>/<random>, where the Landlock ruleset of slot k (the read paths
plus full access beneath base/s<k>) is built once and reused by every child the slot hosts, one at
a time. Each child gets a new temp dir with a random 128-bit name, created by the zygote; the slot
directories (and base/) belong to the server's user, mode 0711, so a child (uid nobody) can neither
list them nor chmod them, nor so find another child's temp dir: Landlock does not govern chmod,
and every child has the same uid, so a temp dir whose path a child could guess is one it could
chmod to 0 under another call. When a child exits, its temp dir is renamed into base/trash (one
rename, whatever the code left in it) and the janitor process (cleanup.py) removes it there, off
the request path. A slot is reused only if its directory is as the zygote made it (empty, 0711);
otherwise it is retired whole to the trash.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import sys

from cir_sandbox import landlock, policy
from cir_sandbox.child import CTRL_FD, run_child
from cir_sandbox.cleanup import Janitor
from cir_sandbox.plan import ChildPlan


class Zygote:
    """The server's handle on its zygote process."""

    def __init__(self, plan: ChildPlan, base_dir: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server_pid = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self.sock.close()
                _Forker(theirs, plan, base_dir, server_pid).serve()
            finally:
                os._exit(0)
        theirs.close()
        self.sock.setblocking(False)

    def request(self, num_children: int) -> None:
        self.sock.send(json.dumps({"spawn": num_children}).encode())

    def receive(self) -> list[tuple[dict, list[int]]] | None:
        """Messages that arrived (each with the fds it carried); None once the zygote is gone."""
        messages = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 4)
            except BlockingIOError:
                return messages
            except OSError:
                data, fds = b"", []
            if not data:
                return messages or None
            messages.append((json.loads(data), fds))

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.sock.close()


class _Slot:
    def __init__(self, path: str, ruleset_fd: int) -> None:
        self.path, self.ruleset_fd = path, ruleset_fd


class _Forker:
    """The zygote process's own state and loop."""

    def __init__(self, sock: socket.socket, plan: ChildPlan, base_dir: str, server_pid: int) -> None:
        policy.prctl(policy.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server_pid:
            os._exit(0)
        self.plan, self.base_dir, self.pid = plan, base_dir, os.getpid()
        # keep only our socket and the Landlock read rules (moved to fds 100+); fds 0-3 always
        # hold /dev/null or the next child's stdio, so no other descriptor can land there
        keep = sorted({sock.fileno(), *(fd for fd, _ in plan.read_rules)})
        assert keep[-1] < 100, keep
        moved = {fd: os.dup2(fd, 100 + i) for i, fd in enumerate(keep)}
        self.sock = socket.socket(fileno=moved[sock.fileno()])
        sock.detach()
        self.read_rules = [(moved[fd], access) for fd, access in plan.read_rules]
        os.closerange(0, 100)
        os.closerange(100 + len(moved), 1 << 20)
        self.devnull = os.open("/dev/null", os.O_RDONLY)
        assert self.devnull == 0, self.devnull
        for fd in (1, 2, CTRL_FD):
            os.dup2(self.devnull, fd)
        # what every child inherits
        policy.prctl(policy.PR_SET_NO_NEW_PRIVS, 1)
        policy.set_inherited_rlimits(plan.file_size_bytes)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(plan.env, HOME=".", TMPDIR=".")
        sys.argv[:] = [""]
        if "tempfile" in sys.modules:
            sys.modules["tempfile"].tempdir = None
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = plan.stdio
        self.free_slots: list[_Slot] = []
        self.num_slots = 0
        self.children: dict[int, tuple[int, _Slot, str]] = {}    # pidfd -> (pid, slot, temp dir)
        self.trash_dir = os.path.join(base_dir, "trash")
        os.mkdir(self.trash_dir, 0o700)
        self.janitor = Janitor(self.trash_dir, [self.sock.fileno(), *(fd for fd, _ in self.read_rules)])
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)

    def serve(self) -> None:
        while True:
            for fd, _ in self.poller.poll():
                if fd == self.sock.fileno():
                    data = self.sock.recv(4096)
                    if not data:                                # the server is gone
                        for pid, _, _ in self.children.values():
                            os.kill(pid, signal.SIGKILL)
                        self.janitor.close()
                        return
                    for _ in range(int(json.loads(data).get("spawn", 0))):
                        self._spawn()
                elif fd in self.children:
                    self._reap(fd)

    def _slot(self) -> _Slot:
        if self.free_slots:
            return self.free_slots.pop()
        self.num_slots += 1
        path = os.path.join(self.base_dir, f"s{self.num_slots}")
        os.chmod(self.base_dir, 0o711)          # as the server made it (a same-uid child could chmod it)
        os.mkdir(path, 0o711)
        abi = self.plan.landlock_abi
        ruleset_fd = -1
        if abi:
            rule = landlock.path_rule(path, True, abi)
            try:
                ruleset_fd = landlock.make_ruleset(self.read_rules + [rule], abi)
            finally:
                os.close(rule[0])
        return _Slot(path, ruleset_fd)

    def _spawn(self) -> None:
        try:
            slot = self._slot()
            rundir = os.path.join(slot.path, os.urandom(16).hex())
            os.mkdir(rundir, 0o700)
            if self.plan.uid is not None:
                os.chown(rundir, self.plan.uid, self.plan.gid)
        except Exception as exc:
            self.sock.send(json.dumps({"failed": f"temp dir for a child: {exc!r}"}).encode())
            return
        ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for target, fd in ((1, out_w), (2, err_w), (CTRL_FD, theirs.fileno())):
            os.dup2(fd, target)                     # the child finds its stdio in place
        os.close(out_w)
        os.close(err_w)
        theirs.close()
        address_space = policy.address_space_bytes()
        try:
            pid = os.fork()
        except OSError as exc:
            pid = -1
            self.sock.send(json.dumps({"failed": f"fork: {exc!r}"}).encode())
        if pid == 0:
            try:
                run_child(self.plan, rundir, slot.ruleset_fd, self.pid, address_space)
            finally:
                os._exit(70)
        for fd in (1, 2, CTRL_FD):
            os.dup2(self.devnull, fd)
        if pid < 0:
            ctrl.close()
            os.close(out_r)
            os.close(err_r)
            self._free(slot, rundir)
            return
        pidfd = os.pidfd_open(pid)
        socket.send_fds(self.sock, [json.dumps({"spawned": pid, "tmpdir": rundir}).encode()],
                        [ctrl.fileno(), out_r, err_r, pidfd])
        ctrl.close()
        os.close(out_r)
        os.close(err_r)
        self.children[pidfd] = (pid, slot, rundir)
        self.poller.register(pidfd, select.POLLIN)

    def _reap(self, pidfd: int) -> None:
        pid, slot, rundir = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        _, status, usage = os.wait4(pid, 0)
        self.sock.send(json.dumps({"exited": pid, "status": status,
                                   "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1e3}).encode())
        self._free(slot, rundir)

    def _free(self, slot: _Slot, rundir: str) -> None:
        """Move the child's temp dir to the trash (constant time, whatever it holds) and let the
        janitor remove it; the slot hosts another child only if its directory is as it was made."""
        try:
            self._to_trash(rundir)
            if self._is_pristine(slot):
                self.free_slots.append(slot)
                return
            self._to_trash(slot.path)
        except OSError:                          # left where it is; removed with base/ at the end
            pass
        finally:
            self.janitor.poke()
        if slot.ruleset_fd >= 0:
            os.close(slot.ruleset_fd)

    def _to_trash(self, path: str) -> None:
        target = os.path.join(self.trash_dir, os.urandom(16).hex())
        try:
            os.rename(path, target)
        except FileNotFoundError:
            pass
        except PermissionError:                 # a same-uid child may have chmod'ed what it owns
            for directory, mode in ((self.base_dir, 0o711), (self.trash_dir, 0o700), (path, 0o700)):
                os.chmod(directory, mode)
            os.rename(path, target)

    def _is_pristine(self, slot: _Slot) -> bool:
        st = os.lstat(slot.path)
        return (stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o711 and st.st_uid == os.getuid()
                and not os.listdir(slot.path))
