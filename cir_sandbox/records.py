"""The server's records: a connected client, a queued or running job, a forked child; and how a
child's exit turns into a status."""
from __future__ import annotations

import os
import selectors
import signal
import socket
from dataclasses import dataclass
from collections.abc import Callable

from cir_sandbox.config import ServerConfig
from cir_sandbox.protocol import HEADER, MAX_CHILD_FRAME, FrameBuffer, decode
from cir_sandbox.result import Result

EXIT_SETUP_FAILED = 70          # a child's exit code when its confinement failed (for people: the
                                # server knows set-up worked by the child's b"R" frame, not by codes)
EXIT_NO_CONTROL = 71            # ... when the code closed or replaced fd 3, so it could not report


class _Outbox:
    """A non-blocking socket's unsent bytes; EVENT_WRITE is watched only while some remain."""

    sock: socket.socket
    on_event: Callable[[int], None]

    def _init_outbox(self) -> None:
        self.outbuf = bytearray()
        self.closed = False

    def send(self, data: bytes, sel: selectors.BaseSelector) -> None:
        if self.closed:
            return
        if not self.outbuf:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                pass
            except OSError:
                return
            if not data:
                return
            sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self.on_event)
        self.outbuf += data

    def flush(self, sel: selectors.BaseSelector) -> None:
        try:
            del self.outbuf[:self.sock.send(self.outbuf)]
        except BlockingIOError:
            return
        except OSError:
            self.outbuf.clear()
        if not self.outbuf:
            sel.modify(self.sock, selectors.EVENT_READ, self.on_event)


class Client(_Outbox):
    def __init__(self, sock: socket.socket, frames: FrameBuffer) -> None:
        self.sock = sock
        self.frames = frames
        self.sessions: set[int] = set()
        self._init_outbox()


@dataclass
class Job:
    client: Client
    id: object
    code: bytes
    session: int | None = None
    seq: int = 0
    started: float = 0.0
    deadline: float = 0.0
    note: str = ""
    retried: bool = False


class Child(_Outbox):
    def __init__(self, pid: int, pidfd: int, ctrl: socket.socket, out_fd: int, err_fd: int,
                 tmpdir: str) -> None:
        self.pid, self.pidfd, self.sock = pid, pidfd, ctrl
        self.out_fd, self.err_fd, self.tmpdir = out_fd, err_fd, tmpdir
        self.ctrl_frames = FrameBuffer(MAX_CHILD_FRAME)
        self.ctrl_open = True
        self.ready = False                        # sent its set-up-done frame (before any code ran)
        self.setup_error = ""
        self.linger_deadline: float | None = None  # a session's leftover threads must end by then
        self.gone = False                         # reaped and its descriptors closed
        self.job: Job | None = None
        self.session: int | None = None
        self.kill_reason: str | None = None       # timeout | output_limit | protocol | threads | done
        self.out = bytearray()
        self.err = bytearray()
        self._init_outbox()

    @property
    def ctrl(self) -> socket.socket:
        return self.sock

    def add_output(self, fd: int, data: bytes, limit: int) -> bool:
        """Keep data, up to a byte limit shared by stdout and stderr; True once it is exceeded."""
        buf = self.out if fd == self.out_fd else self.err
        room = limit - len(self.out) - len(self.err)
        buf += data[:max(room, 0)]
        return len(data) > room


class Probe:
    """Stands in for a client during the server's start-up self-test."""
    closed = False
    result: Result | None = None

    def send(self, data: bytes, sel: object) -> None:
        self.result = Result.from_dict(decode(data[HEADER.size:])["result"])


def decode_text(data: bytearray) -> str:
    return data.decode("utf-8", "replace")


def classify_exit(kill_reason: str | None, wait_status: int, cpu_ms: float, config: ServerConfig,
                  cpu_hard_seconds: int) -> tuple[str, str]:
    """(status, error_line) of a child that died before reporting."""
    if kill_reason == "timeout":
        return "timeout", f"TimeoutError: wall time limit of {config.timeout:g} s exceeded"
    if kill_reason == "output_limit":
        return "output_limit", f"OutputLimitError: output exceeded {config.output_limit} bytes"
    if kill_reason == "protocol":
        return "killed", "SandboxError: the child broke the control protocol"
    if kill_reason == "threads":
        return "timeout", "TimeoutError: threads still running at the wall time limit"
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_ms >= cpu_hard_seconds * 1e3 - 50):
            return "timeout", f"TimeoutError: CPU time limit of {config.cpu_seconds} s exceeded"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "killed", f"Killed by signal {name}"
    code = os.waitstatus_to_exitcode(wait_status)
    if code == 0:
        return "ok", ""
    if code == EXIT_NO_CONTROL:
        return "error", "SandboxError: the code closed the sandbox's control channel (fd 3)"
    return "error", f"SystemExit: {code}"


def num_threads(pid: int) -> int:
    """Threads of a live child, from the kernel (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def describe_death(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"signal {os.WTERMSIG(wait_status)}"
    return f"exit code {os.waitstatus_to_exitcode(wait_status)}"
