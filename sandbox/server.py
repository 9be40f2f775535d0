"""The fork-server: a small warm Python process that forks one confined child per call.

    python -m sandbox.server --socket /tmp/sb.sock --workers 4 --timeout 10 --memory-mb 1024

`sandbox.Sandbox` starts it for you (a fresh interpreter through subprocess, scrubbed
environment), so it never is a fork of a large process such as a trainer that ran torch: forking
those is slow (~15 ms) and can hang. Run by hand it prints "READY <pid>" once it serves, and stops
on SIGTERM / SIGINT (or, with --watch-stdin, when its stdin closes: the client holds that pipe).

Start-up: import the warm modules (a missing one is skipped with a warning), exercise the heavy
ones once (a sympy solve, a numpy solve) so children do not pay lazy initialisation, compile the
seccomp filter, then gc.freeze() so forked children do not touch the whole heap.

Loop (one thread, epoll): keep `prefork` children forked, confined and waiting (see child.py), so a
request only costs a write to a waiting child; run at most `workers` calls at once, queue the
rest; read each running child's stdout/stderr as it writes (the byte cap kills it); SIGKILL the
child's process group at the wall-time deadline; reap exits through pidfds; remove temp dirs.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import pwd
import selectors
import signal
import socket
import sys
import tempfile
import time
from collections import deque

from sandbox import landlock, policy
from sandbox.child import ChildPlan, build_stdio, run_child
from sandbox.config import ServerConfig
from sandbox.environment import CHILD_ENV, is_scrubbed, server_environment
from sandbox.protocol import MAX_CLIENT_FRAME, FrameBuffer, decode, encode, frame
from sandbox.records import EXIT_SETUP_FAILED, Child, Client, Job, classify_exit
from sandbox.result import STATUSES, Result
from sandbox.warm import read_paths, warm_up

log = logging.getLogger("sandbox.server")


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._sel = selectors.DefaultSelector()
        self._idle: deque[Child] = deque()          # ready, waiting for a job
        self._children: dict[int, Child] = {}       # pid -> every live child
        self._num_starting = 0
        self._num_running = 0
        self._pending: deque[Job] = deque()
        self._sessions: dict[int, Child | None] = {}
        self._session_owner: dict[int, Client] = {}
        self._next_session = self._next_seq = self._next_dir = 0
        self._setup_failures = 0
        self._last_setup_error = ""
        self._fork_after = 0.0
        self._stopping = False
        self.plan: ChildPlan | None = None
        self.base_dir: str | None = None

    # ---- start-up ---------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        self.warm_modules = warm_up(cfg.warm_modules)
        self.plan = self._make_plan()
        self.base_dir = tempfile.mkdtemp(prefix="sandbox-")
        os.chmod(self.base_dir, 0o711)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(cfg.socket_path)
        os.chmod(cfg.socket_path, 0o600)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        if cfg.watch_stdin:
            self._sel.register(0, selectors.EVENT_READ, self._on_stdin)
        gc.collect()
        gc.freeze()
        while not self._idle:                       # the first child proves the set-up works
            if self._setup_failures:
                raise RuntimeError(f"sandbox child set-up failed: {self._last_setup_error}")
            self._step()

    def _make_plan(self) -> ChildPlan:
        cfg = self.config
        abi = landlock.abi_version()
        paths, python_paths = read_paths(self.warm_modules)
        rules = [landlock.path_rule(p, False, abi) for p in paths] if abi else []
        rules.append(landlock.path_rule("/dev/null", True, abi) if abi else None)
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
        self.read_paths = paths
        return ChildPlan(
            filter_bpf=policy.build_filter_bpf(), pid_filter_template=policy.pid_filter_bpf(0),
            cpu_seconds=cfg.cpu_seconds, cpu_hard_seconds=max(cfg.cpu_seconds + 1, 64 * cfg.cpu_seconds),
            memory_bytes=cfg.memory_mb << 20, file_size_bytes=cfg.file_size_mb << 20,
            open_files=cfg.open_files, uid=uid, gid=gid if gid is not None else -1,
            keep_dac_read_search=keep_cap, landlock_abi=abi, read_rules=[r for r in rules if r],
            env=dict(CHILD_ENV), stdio=build_stdio())

    def info(self) -> dict:
        return {"pid": os.getpid(), "uid": self.plan.uid, "landlock_abi": self.plan.landlock_abi,
                "keep_dac_read_search": self.plan.keep_dac_read_search,
                "warm_modules": self.warm_modules, "read_paths": self.read_paths,
                "workers": self.config.workers, "timeout": self.config.timeout,
                "memory_mb": self.config.memory_mb, "base_dir": self.base_dir}

    # ---- loop -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        while not self._stopping:
            self._step()

    def _step(self) -> None:
        self._dispatch()
        now = time.monotonic()
        want_fork = self._wants_child(now)
        timeout = 0.0 if want_fork else self._next_deadline(now)
        for key, mask in self._sel.select(timeout):
            key.data(mask)
        self._expire(time.monotonic())
        self._dispatch()
        if self._wants_child(time.monotonic()):
            self._spawn()

    def _wants_child(self, now: float) -> bool:
        return len(self._idle) + self._num_starting < self.config.prefork and now >= self._fork_after

    def _next_deadline(self, now: float) -> float | None:
        deadlines = [c.job.deadline for c in self._children.values() if c.job and not c.kill_reason]
        if not self._wants_child(now) and len(self._idle) + self._num_starting < self.config.prefork:
            deadlines.append(self._fork_after)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def close(self) -> None:
        for child in list(self._children.values()):
            _killpg(child.pid)
        for child in list(self._children.values()):
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
            self._cleanup(child)
        if self.base_dir:
            _rmtree(self.base_dir)
        for fd, _ in self.plan.read_rules if self.plan else ():
            os.close(fd)
        if self.base_dir:                           # we bound the socket only after mkdtemp
            try:
                os.unlink(self.config.socket_path)
            except FileNotFoundError:
                pass

    # ---- children ---------------------------------------------------------------------------
    def _spawn(self) -> None:
        ctrl, ctrl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._next_dir += 1
        tmpdir = os.path.join(self.base_dir, f"c{self._next_dir}")
        server_pid = os.getpid()
        address_space = policy.address_space_bytes()
        pid = os.fork()
        if pid == 0:
            try:
                run_child(self.plan, tmpdir, ctrl_child.fileno(), out_w, err_w, server_pid, address_space)
            finally:
                os._exit(EXIT_SETUP_FAILED)
        ctrl_child.close()
        os.close(out_w)
        os.close(err_w)
        ctrl.setblocking(False)
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        child = Child(pid, os.pidfd_open(pid), ctrl, out_r, err_r, tmpdir)
        child.on_event = lambda mask: self._on_ctrl(child, mask)
        self._children[pid] = child
        self._num_starting += 1
        self._sel.register(ctrl, selectors.EVENT_READ, child.on_event)
        self._sel.register(out_r, selectors.EVENT_READ, lambda mask: self._on_output(child, out_r))
        self._sel.register(err_r, selectors.EVENT_READ, lambda mask: self._on_output(child, err_r))
        self._sel.register(child.pidfd, selectors.EVENT_READ, lambda mask: self._on_exit(child))

    def _on_ctrl(self, child: Child, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            child.flush(self._sel)
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = child.ctrl.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(child.ctrl)
            child.ctrl_open = False
            return
        try:
            messages = [decode(p) for p in child.ctrl_frames.feed(data)]
        except ValueError:
            self._kill(child, "protocol")
            return
        for msg in messages:
            if msg.get("ready") is True and not child.ready:
                child.ready = True
                self._num_starting -= 1
                self._setup_failures = 0
                self._idle.append(child)
            elif "setup_error" in msg and not child.ready:
                self._last_setup_error = str(msg["setup_error"])[:2000]
            elif child.job is not None and msg.get("seq") == child.job.seq:
                self._finish(child, msg)

    def _on_output(self, child: Child, fd: int) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self._sel.unregister(fd)
            return
        self._on_output_data(child, fd, data)

    def _drain(self, child: Child) -> None:
        for fd in (child.out_fd, child.err_fd):
            for _ in range(64):
                try:
                    data = os.read(fd, 1 << 16)
                except (BlockingIOError, OSError):
                    break
                if not data or child.kill_reason == "output_limit":
                    break
                self._on_output_data(child, fd, data)

    def _on_output_data(self, child: Child, fd: int, data: bytes) -> None:
        if child.job is None or child.kill_reason:
            return
        buf = child.out if fd == child.out_fd else child.err
        room = self.config.output_limit - len(child.out) - len(child.err)
        buf += data[:max(room, 0)]
        if len(data) > room:
            self._kill(child, "output_limit")

    def _finish(self, child: Child, msg: dict) -> None:
        """The child reported its status: answer now, the process is reaped later."""
        self._drain(child)
        job, child.job = child.job, None
        self._num_running -= 1
        status = msg.get("status") if msg.get("status") in STATUSES else "error"
        if child.kill_reason == "output_limit":
            status = "output_limit"
        cpu = msg.get("cpu_ms")
        self._answer(job, Result(
            status, decode_text(child.out), decode_text(child.err), str(msg.get("error_line", ""))[:8000],
            (time.monotonic() - job.started) * 1e3, float(cpu) if isinstance(cpu, (int, float)) else 0.0,
            job.note))
        child.out.clear()
        child.err.clear()
        if job.session is None or child.kill_reason:
            self._kill(child, child.kill_reason or "done")

    def _on_exit(self, child: Child) -> None:
        try:
            pid, wait_status, rusage = os.wait4(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, wait_status, rusage = child.pid, 0, None
        if pid == 0:
            return
        if not child.ready:
            self._num_starting -= 1
            if child.ctrl_open:                     # read a set-up error still in the socket
                self._on_ctrl(child, selectors.EVENT_READ)
            if not child.ready and child.kill_reason is None:
                self._setup_failures += 1
                self._last_setup_error = self._last_setup_error or f"exit status {wait_status}"
                log.warning("sandbox child failed to start: %s", self._last_setup_error)
                self._fork_after = time.monotonic() + min(0.05 * 2 ** self._setup_failures, 5.0)
        if child.job is not None:
            self._drain(child)
            job, child.job = child.job, None
            self._num_running -= 1
            cpu_ms = (rusage.ru_utime + rusage.ru_stime) * 1e3 if rusage else 0.0
            status, error_line = classify_exit(child.kill_reason, wait_status, cpu_ms, self.config,
                                               self.plan.cpu_hard_seconds)
            self._answer(job, Result(status, decode_text(child.out), decode_text(child.err), error_line,
                                     (time.monotonic() - job.started) * 1e3, cpu_ms, job.note))
        self._cleanup(child)

    def _cleanup(self, child: Child) -> None:
        self._children.pop(child.pid, None)
        if child in self._idle:
            self._idle.remove(child)
        if child.session is not None and self._sessions.get(child.session) is child:
            self._sessions[child.session] = None
        for f in (child.ctrl, child.out_fd, child.err_fd, child.pidfd):
            try:
                self._sel.unregister(f)
            except (KeyError, ValueError):
                pass
        child.ctrl.close()
        for fd in (child.out_fd, child.err_fd, child.pidfd):
            os.close(fd)
        _rmtree(child.tmpdir)

    def _kill(self, child: Child, reason: str) -> None:
        if child.kill_reason is None:
            child.kill_reason = reason
        _killpg(child.pid)

    def _expire(self, now: float) -> None:
        for child in list(self._children.values()):
            if child.job is not None and not child.kill_reason and now >= child.job.deadline:
                self._kill(child, "timeout")

    # ---- jobs -------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while self._pending and self._num_running < self.config.workers:
            job = self._pending[0]
            child = self._child_for(job)
            if child is None:
                if self._setup_failures >= 5:       # children keep failing: do not hang callers
                    self._pending.popleft()
                    self._answer(job, Result("error", error_line="SandboxError: children fail to "
                                             f"start: {self._last_setup_error}", note=job.note))
                    continue
                return
            self._pending.popleft()
            self._start_job(child, job)

    def _child_for(self, job: Job) -> Child | None:
        if job.session is not None:
            current = self._sessions.get(job.session)
            if current is not None and current.job is None and not current.kill_reason:
                return current
            if current is not None and current.job is not None:
                return None                         # previous call of this session still running
        if not self._idle:
            return None
        child = self._idle.popleft()
        if job.session is not None:
            if job.session_started:
                job.note = ("session restarted: its previous interpreter ended (timeout, crash or "
                            "limit), so its globals are lost")
            self._sessions[job.session] = child
            child.session = job.session
            job.session_started = True
        return child

    def _start_job(self, child: Child, job: Job) -> None:
        self._next_seq = (self._next_seq + 1) & 0x7FFFFFFF
        job.seq = self._next_seq
        job.started = time.monotonic()
        job.deadline = job.started + self.config.timeout
        child.job = job
        self._num_running += 1
        mode = b"K" if job.session is not None else b"S"
        child.send(frame(mode + job.seq.to_bytes(4, "big") + job.code), self._sel)

    def _answer(self, job: Job, result: Result) -> None:
        job.client.send(encode({"id": job.id, "result": result.to_dict()}), self._sel)

    # ---- clients ----------------------------------------------------------------------------
    def _on_accept(self, mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        client = Client(sock, FrameBuffer(MAX_CLIENT_FRAME))
        client.on_event = lambda m: self._on_client(client, m)
        self._sel.register(sock, selectors.EVENT_READ, client.on_event)

    def _on_client(self, client: Client, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            client.flush(self._sel)
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = client.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            requests = [decode(p) for p in client.frames.feed(data)] if data else None
        except ValueError:
            requests = None
        if requests is None:
            self._drop_client(client)
            return
        for req in requests:
            self._on_request(client, req)

    def _on_request(self, client: Client, req: dict) -> None:
        op, rid = req.get("op"), req.get("id")
        if op == "run":
            session = req.get("session")
            if session is not None and self._session_owner.get(session) is not client:
                self._answer(Job(client, rid, b""), Result("error", error_line=f"SandboxError: "
                             f"unknown session {session!r}"))
                return
            code = str(req.get("code", "")).encode("utf-8", "surrogatepass")
            self._pending.append(Job(client, rid, code, session=session))
        elif op == "open_session":
            self._next_session += 1
            self._sessions[self._next_session] = None
            self._session_owner[self._next_session] = client
            client.sessions.add(self._next_session)
            client.send(encode({"id": rid, "session": self._next_session}), self._sel)
        elif op == "close_session":
            self._close_session(req.get("session"))
            client.sessions.discard(req.get("session"))
            client.send(encode({"id": rid}), self._sel)
        elif op == "info":
            client.send(encode({"id": rid, "info": self.info()}), self._sel)
        else:
            client.send(encode({"id": rid, "error": f"unknown op {op!r}"}), self._sel)

    def _close_session(self, session: object) -> None:
        child = self._sessions.pop(session, None)
        self._session_owner.pop(session, None)
        if child is not None:
            self._kill(child, child.kill_reason or "done")

    def _drop_client(self, client: Client) -> None:
        self._sel.unregister(client.sock)
        client.sock.close()
        client.closed = True
        self._pending = deque(j for j in self._pending if j.client is not client)
        for session in list(client.sessions):
            self._close_session(session)

    def _on_stdin(self, mask: int) -> None:
        if not os.read(0, 4096):
            self._stopping = True


def decode_text(data: bytearray) -> str:
    return data.decode("utf-8", "replace")


def _world_readable(path: str) -> bool:
    """Whether any uid could read `path` (every ancestor searchable by others, path readable)."""
    import stat
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


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rmtree(path: str) -> None:
    import shutil
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.server", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    parser.add_argument("--workers", type=int, default=4, help="calls running at once")
    parser.add_argument("--prefork", type=int, default=None, help="children kept ready (default: workers)")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall seconds per call")
    parser.add_argument("--cpu-seconds", type=int, default=None, help="CPU seconds per call (default: ceil(timeout))")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory a call may add to the warm interpreter")
    parser.add_argument("--output-limit", type=int, default=1 << 20, help="stdout+stderr bytes per call")
    parser.add_argument("--file-size-mb", type=int, default=16, help="largest file a call may write")
    parser.add_argument("--open-files", type=int, default=256, help="RLIMIT_NOFILE of a child")
    parser.add_argument("--warm", default=None, help="comma-separated modules to import up front")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF")
    args = parser.parse_args(argv)
    if not is_scrubbed(os.environ):                  # run by hand: restart without the caller's env
        os.execve(sys.executable, [sys.executable, "-s", "-m", "sandbox.server", *sys.argv[1:]],
                  server_environment())
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="sandbox.server: %(message)s")
    config = ServerConfig(args.socket, workers=args.workers, prefork=args.prefork, timeout=args.timeout,
                          cpu_seconds=args.cpu_seconds, memory_mb=args.memory_mb,
                          output_limit=args.output_limit, file_size_mb=args.file_size_mb,
                          open_files=args.open_files, watch_stdin=args.watch_stdin,
                          **({} if args.warm is None else {"warm_modules": tuple(m for m in args.warm.split(",") if m)}))
    server = Server(config)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.start()
        print(f"READY {os.getpid()}", flush=True)
        server.serve_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
