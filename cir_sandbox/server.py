"""The fork-server: a small warm Python process that forks one confined child per call.

    python -m cir_sandbox.server --socket /tmp/sb.sock --workers 4 --timeout 10 --memory-mb 1024

`cir_sandbox.Sandbox` starts it for you (a fresh interpreter through subprocess, scrubbed
environment), so it never is a fork of a large process such as a trainer that ran torch: forking
those is slow (~15 ms) and can hang. Run by hand it prints "READY <pid>" once it serves, and stops
on SIGTERM / SIGINT (or, with --watch-stdin, when its stdin closes: the client holds that pipe).

Start-up: import the warm modules (a missing one is skipped with a warning), exercise the heavy
ones once (a sympy solve, a numpy solve) so children do not pay lazy initialisation, compile the
seccomp filter (plan.py), gc.freeze() so forked children do not touch the whole heap, then fork the
zygote (zygote.py), which does all further forking off this process's loop.

Loop (one thread, epoll): keep `prefork` children forked, confined and waiting (child.py), so a
request only costs a write to a waiting child; run at most `workers` calls at once, queue the
rest; read each running child's stdout/stderr as it writes (the byte cap kills it); SIGKILL the
child at the wall-time deadline (through a pidfd: it cannot have made other processes); answer
when the child reports, or when the zygote reports its death.

What a child sends is untrusted once its first call has started: frames are checked against the
protocol (protocol.py: fixed layouts, sizes, ranges) and against what the child may send next
(its set-up frame first, then one report per call, for the call it runs); a child that breaks
this, or whose handling raises anything at all, is killed, which fails its own call and nothing
else. A child is infrastructure until its set-up frame arrives: a death before it is retried
once elsewhere and counts towards the back-off; a death after it is the code's own result, whatever
its exit code. A session call's leftover threads may run until that call's wall-time limit; a
session child that still has them then is killed (its session restarts, with a note).
"""
from __future__ import annotations

import gc
import logging
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
from collections import deque

from cir_sandbox.child import build_stdio
from cir_sandbox.cleanup import remove_tree
from cir_sandbox.config import ServerConfig
from cir_sandbox.environment import is_scrubbed, server_environment
from cir_sandbox.frontend import Frontend
from cir_sandbox.plan import ChildPlan, make_plan
from cir_sandbox.protocol import READY, REPORT, SETUP_ERROR, ChildReport, decode_child_frame, encode, frame
from cir_sandbox.records import (Child, Client, Job, Probe, classify_exit, decode_text, describe_death,
                                 num_threads)
from cir_sandbox.result import Result
from cir_sandbox.warm import collapse_heap, warm_up
from cir_sandbox.zygote import Zygote

log = logging.getLogger("cir_sandbox.server")


class Server(Frontend):
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
        self._sessions_lost: set[int] = set()       # sessions whose interpreter died
        self._next_session = self._next_seq = 0
        self._setup_failures = 0
        self._last_setup_error = ""
        self._fork_after = 0.0
        self.plan: ChildPlan | None = None
        self.base_dir: str | None = None
        self.zygote: Zygote | None = None

    # ---- start-up ---------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        self.warm_modules = warm_up(cfg.warm_modules)
        self.plan = make_plan(cfg, self.warm_modules, build_stdio())
        if cfg.base_dir:
            os.mkdir(cfg.base_dir, 0o711)
            self.base_dir = cfg.base_dir
        else:
            self.base_dir = tempfile.mkdtemp(prefix="sandbox-")
        os.chmod(self.base_dir, 0o711)
        gc.collect()
        gc.freeze()
        self.huge_mb = collapse_heap()
        self.zygote = Zygote(self.plan, self.base_dir)
        self._sel.register(self.zygote.sock, selectors.EVENT_READ, self._on_zygote)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(cfg.socket_path)
        os.chmod(cfg.socket_path, 0o600)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        if cfg.watch_stdin:
            self._sel.register(0, selectors.EVENT_READ, self._on_stdin)
        probe = Probe()                            # one call proves that the set-up works
        self._pending.append(Job(probe, 0, b"pass"))
        give_up = time.monotonic() + 60
        while probe.result is None:
            if time.monotonic() > give_up:
                raise RuntimeError("sandbox self-test got no answer in 60 s")
            self._step()
        if probe.result.status != "ok":
            raise RuntimeError(f"sandbox self-test failed: {probe.result.error_line} "
                               f"{probe.result.stderr}")

    def info(self) -> dict:
        return {"pid": os.getpid(), "uid": self.plan.uid, "landlock_abi": self.plan.landlock_abi,
                "keep_dac_read_search": self.plan.keep_dac_read_search,
                "warm_modules": self.warm_modules, "read_paths": self.plan.read_paths,
                "workers": self.config.workers, "timeout": self.config.timeout,
                "memory_mb": self.config.memory_mb, "base_dir": self.base_dir,
                "huge_page_mb": self.huge_mb}

    # ---- loop -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        while True:
            self._step()

    def _step(self) -> None:
        self._dispatch()
        self._request_children(time.monotonic())
        for key, mask in self._sel.select(self._next_deadline(time.monotonic())):
            key.data(mask)
        self._expire(time.monotonic())

    def _request_children(self, now: float) -> None:
        missing = self.config.prefork - len(self._idle) - self._num_starting
        if missing > 0 and now >= self._fork_after:
            self.zygote.request(missing)
            self._num_starting += missing

    def _next_deadline(self, now: float) -> float | None:
        deadlines = [c.job.deadline for c in self._children.values() if c.job and not c.kill_reason]
        deadlines += [c.linger_deadline for c in self._children.values()
                      if c.linger_deadline is not None and c.job is None and not c.kill_reason]
        if len(self._idle) + self._num_starting < self.config.prefork:
            deadlines.append(self._fork_after)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def close(self) -> None:
        for child in list(self._children.values()):
            self._kill(child, "done")
            self._cleanup(child)
        if self.zygote is not None:
            self.zygote.close()
        if self.base_dir:
            try:
                remove_tree(self.base_dir)
            except OSError as exc:
                log.warning("could not remove %s: %s", self.base_dir, exc)
            try:
                os.unlink(self.config.socket_path)
            except FileNotFoundError:
                pass
        for fd, _ in self.plan.read_rules if self.plan else ():
            os.close(fd)

    # ---- children ---------------------------------------------------------------------------
    def _on_zygote(self, mask: int) -> None:
        messages = self.zygote.receive()
        if messages is None:
            log.error("the zygote died; stopping")
            raise SystemExit(1)
        for msg, fds in messages:
            if "spawned" in msg and len(fds) == 4:
                ctrl = socket.socket(fileno=fds[0])
                ctrl.setblocking(False)
                child = Child(msg["spawned"], fds[3], ctrl, fds[1], fds[2], msg["tmpdir"])
                child.on_event = lambda mask, child=child: self._guarded(child, self._on_ctrl, child, mask)
                self._children[child.pid] = child
                self._num_starting -= 1
                self._idle.append(child)
                self._sel.register(ctrl, selectors.EVENT_READ, child.on_event)
                for fd in (child.out_fd, child.err_fd):
                    os.set_blocking(fd, False)
                    self._sel.register(fd, selectors.EVENT_READ, lambda mask, child=child, fd=fd:
                                       self._guarded(child, self._on_output, child, fd))
            elif "exited" in msg and msg["exited"] in self._children:
                self._on_exit(self._children[msg["exited"]], msg["status"], msg["cpu_ms"])
            elif "failed" in msg:
                self._num_starting -= 1
                self._child_failed(str(msg["failed"]))

    def _child_failed(self, error: str) -> None:
        self._setup_failures += 1
        self._last_setup_error = error
        log.warning("sandbox child failed to start: %s", error)
        self._fork_after = time.monotonic() + min(0.05 * 2 ** self._setup_failures, 5.0)

    def _guarded(self, child: Child, handler, *args) -> None:
        """Run a handler of what a child sent; if it raises, whatever the child did, only the child
        (and so only its own call) pays."""
        try:
            handler(*args)
        except Exception:
            log.exception("handling sandbox child %d failed; killing it", child.pid)
            if not child.gone:
                self._kill(child, "protocol")

    def _on_ctrl(self, child: Child, mask: int, drain: bool = False) -> None:
        """Read the control socket (once, or until empty when the child is dead: drain)."""
        if child.gone:                              # cleaned up earlier in this batch of events
            return
        if mask & selectors.EVENT_WRITE:
            child.flush(self._sel)
        if not mask & selectors.EVENT_READ:
            return
        while child.ctrl_open:
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
            if child.kill_reason is None:           # what a dying child says no longer counts
                try:
                    for payload in child.ctrl_frames.feed(data):
                        self._on_child_frame(child, *decode_child_frame(payload))
                        if child.kill_reason is not None:
                            break
                except ValueError as exc:
                    log.debug("sandbox child %d broke the protocol: %s", child.pid, exc)
                    self._kill(child, "protocol")
            if not drain:
                return

    def _on_child_frame(self, child: Child, kind: bytes, value: str | ChildReport | None) -> None:
        """Take a frame only where the protocol expects it; ValueError for any other."""
        if not child.ready and not child.setup_error:
            if kind == READY:
                child.ready = True
                self._setup_failures = 0
                return
            if kind == SETUP_ERROR:
                child.setup_error = value or "unknown error"
                return
        elif kind == REPORT and child.job is not None and value.seq == child.job.seq:
            self._finish(child, value)
            return
        raise ValueError(f"unexpected frame {kind!r} (ready {child.ready}, running {child.job is not None})")

    def _on_output(self, child: Child, fd: int) -> None:
        if child.gone:
            return
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self._sel.unregister(fd)
            return
        self._on_output_data(child, fd, data)

    def _drain(self, child: Child) -> None:
        """Read what the child wrote before reporting or dying (everything is in the pipes)."""
        for fd in (child.out_fd, child.err_fd):
            while child.job is not None and not child.kill_reason:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:
                    break
                if not data:
                    break
                self._on_output_data(child, fd, data)

    def _on_output_data(self, child: Child, fd: int, data: bytes) -> None:
        if (child.job is not None and not child.kill_reason
                and child.add_output(fd, data, self.config.output_limit)):
            self._kill(child, "output_limit")

    def _finish(self, child: Child, report: ChildReport) -> None:
        """The child reported its status: answer now, the process is reaped later."""
        self._drain(child)
        status = "output_limit" if child.kill_reason == "output_limit" else report.status
        result = Result(status, decode_text(child.out), decode_text(child.err), report.error_line,
                        (time.monotonic() - child.job.started) * 1e3, report.cpu_ms, child.job.note)
        job, child.job = child.job, None
        self._num_running -= 1
        self._answer(job, result)
        child.out.clear()
        child.err.clear()
        if job.session is None or child.kill_reason:
            self._kill(child, child.kill_reason or "done")
        elif num_threads(child.pid) <= 1:
            child.linger_deadline = None
        elif child.linger_deadline is None:
            child.linger_deadline = job.deadline
        elif time.monotonic() >= child.linger_deadline:
            self._kill(child, "threads")

    def _on_exit(self, child: Child, wait_status: int, cpu_ms: float) -> None:
        if child.ctrl_open:                         # its last frames may still be in the socket
            self._guarded(child, self._on_ctrl, child, selectors.EVENT_READ, True)
        failed_setup = not child.ready and child.kill_reason != "done"
        if failed_setup:                            # no code of a call ran: the infrastructure failed
            child.setup_error = child.setup_error or f"the child ended during set-up ({describe_death(wait_status)})"
            self._child_failed(child.setup_error)
        if child.job is not None:
            self._drain(child)
            job, child.job = child.job, None
            self._num_running -= 1
            if failed_setup and not job.retried:    # not the code's fault: run it elsewhere
                job.retried = True
                self._pending.appendleft(job)
            else:
                status, error_line = classify_exit(child.kill_reason, wait_status, cpu_ms, self.config,
                                                   self.plan.cpu_hard_seconds)
                if failed_setup:
                    status, error_line = "error", f"SandboxError: child set-up failed: {child.setup_error}"
                self._answer(job, Result(status, decode_text(child.out), decode_text(child.err),
                                         error_line, (time.monotonic() - job.started) * 1e3, cpu_ms,
                                         job.note, infrastructure=failed_setup))
        self._cleanup(child)

    def _cleanup(self, child: Child) -> None:
        child.gone = True
        self._children.pop(child.pid, None)
        if child in self._idle:
            self._idle.remove(child)
        if child.session is not None and self._sessions.get(child.session) is child:
            self._sessions[child.session] = None
            self._sessions_lost.add(child.session)
        for f in (child.ctrl, child.out_fd, child.err_fd):
            try:
                self._sel.unregister(f)
            except (KeyError, ValueError):
                pass
        child.ctrl.close()
        for fd in (child.out_fd, child.err_fd, child.pidfd):
            os.close(fd)

    def _kill(self, child: Child, reason: str) -> None:
        if child.kill_reason is None:
            child.kill_reason = reason
        try:
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _expire(self, now: float) -> None:
        for child in list(self._children.values()):
            if child.kill_reason:
                continue
            if child.job is not None and now >= child.job.deadline:
                self._kill(child, "timeout")
            elif child.job is None and child.linger_deadline is not None and now >= child.linger_deadline:
                if num_threads(child.pid) > 1:     # a session's leftover threads: time is up
                    self._kill(child, "threads")
                else:
                    child.linger_deadline = None

    # ---- jobs -------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while self._pending and self._num_running < self.config.workers:
            job = self._pending[0]
            child = self._child_for(job)
            if child is None:
                if self._setup_failures >= 5:       # children keep failing: do not hang callers
                    self._pending.popleft()
                    self._answer(job, Result("error", error_line="SandboxError: children fail to "
                                             f"start: {self._last_setup_error}", note=job.note,
                                             infrastructure=True))
                    continue
                return
            self._pending.popleft()
            self._start_job(child, job)

    def _child_for(self, job: Job) -> Child | None:
        if job.session is not None:
            current = self._sessions.get(job.session)
            if current is not None and current.job is not None:
                return None                         # previous call of this session still running
            if current is not None and not current.kill_reason:
                return current
            if current is not None:                 # killed between calls, not reaped yet
                self._sessions_lost.add(job.session)
        if not self._idle:
            return None
        child = self._idle.popleft()
        if job.session is not None:
            if job.session in self._sessions_lost:
                self._sessions_lost.discard(job.session)
                job.note = ("session restarted: its previous interpreter ended (timeout, crash, "
                            "limit, or threads left running past the time limit), so its globals are lost")
            self._sessions[job.session] = child
            child.session = job.session
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


def main(argv: list[str] | None = None) -> None:
    config = ServerConfig.from_args(sys.argv[1:] if argv is None else argv)
    if not is_scrubbed(os.environ):                  # run by hand: restart without the caller's env
        os.execve(sys.executable, [sys.executable, "-s", "-m", "cir_sandbox.server", *config.to_args()],
                  server_environment())
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="cir_sandbox.server: %(message)s")
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
