"""The zygote: a copy of the warm server whose only job is to fork children and reap them.

Forking the warm interpreter costs ~1.5 ms here (page tables of ~70 MB of heap), so the server
does not fork on its own loop: it forks this zygote once, after warm-up and gc.freeze(), and asks
it for children. For each child the zygote makes the control socket and the stdout/stderr pipes,
forks, and hands the server its ends (plus a pidfd to kill the child with) over a SOCK_SEQPACKET
socket with SCM_RIGHTS. When a child exits the zygote reaps it, reports the wait status and CPU
time to the server, and removes the child's temp dir.

    server -> zygote: {"spawn": n}
    zygote -> server: {"spawned": pid, "tmpdir": path} + fds [ctrl, stdout, stderr, pidfd]
                      {"exited": pid, "status": wait_status, "cpu_ms": float}
                      {"failed": "fork: ..."}
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket

from sandbox import policy
from sandbox.child import ChildPlan, run_child


class Zygote:
    """The server's handle on its zygote process."""

    def __init__(self, plan: ChildPlan, base_dir: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server_pid = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self.sock.close()
                _zygote_main(theirs, plan, base_dir, server_pid)
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
                return None if not messages else messages
            messages.append((json.loads(data), fds))

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.sock.close()


def _zygote_main(sock: socket.socket, plan: ChildPlan, base_dir: str, server_pid: int) -> None:
    policy.prctl(policy.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    zygote_pid = os.getpid()
    children: dict[int, tuple[int, str]] = {}           # pidfd -> (pid, tmpdir)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    num_spawned = 0
    while True:
        for fd, _ in poller.poll():
            if fd == sock.fileno():
                data = sock.recv(4096)
                if not data:                                # the server is gone
                    for pid, _ in children.values():
                        os.kill(pid, signal.SIGKILL)
                    return
                for _ in range(int(json.loads(data).get("spawn", 0))):
                    num_spawned += 1
                    spawned = _spawn(sock, plan, os.path.join(base_dir, f"c{num_spawned}"), zygote_pid)
                    if spawned is not None:
                        children[spawned[0]] = spawned[1:]
                        poller.register(spawned[0], select.POLLIN)
            elif fd in children:                            # a child exited
                pid, tmpdir = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _, status, usage = os.wait4(pid, 0)
                sock.send(json.dumps({"exited": pid, "status": status,
                                      "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1e3}).encode())
                _remove(tmpdir)


def _spawn(sock: socket.socket, plan: ChildPlan, tmpdir: str, zygote_pid: int) -> tuple[int, int, str] | None:
    """Fork one child; send the server its fds; return (pidfd, pid, tmpdir) for our own reaping."""
    ctrl, ctrl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    address_space = policy.address_space_bytes()
    try:
        pid = os.fork()
    except OSError as exc:
        sock.send(json.dumps({"failed": f"fork: {exc}"}).encode())
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        ctrl.close()
        ctrl_child.close()
        return None
    if pid == 0:
        try:
            run_child(plan, tmpdir, ctrl_child.fileno(), out_w, err_w, zygote_pid, address_space)
        finally:
            os._exit(70)
    ctrl_child.close()
    os.close(out_w)
    os.close(err_w)
    pidfd = os.pidfd_open(pid)
    socket.send_fds(sock, [json.dumps({"spawned": pid, "tmpdir": tmpdir}).encode()],
                    [ctrl.fileno(), out_r, err_r, pidfd])
    ctrl.close()
    os.close(out_r)
    os.close(err_r)
    return pidfd, pid, tmpdir


def _remove(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
