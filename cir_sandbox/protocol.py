"""Framing on the sandbox's sockets: a 4-byte big-endian length, then the payload.

Client <-> server frames carry one JSON object each; requests have an "op" and an "id", and the
server answers each request with one frame holding the same "id" (answers may come out of order):

    {"op": "run", "id": 7, "code": "print(1)", "session": null}  ->  {"id": 7, "result": {...}}
    {"op": "open_session", "id": 8}                                ->  {"id": 8, "session": 3}
    {"op": "close_session", "id": 9, "session": 3}                 ->  {"id": 9}
    {"op": "info", "id": 10}                                       ->  {"id": 10, "info": {...}}

Server -> child: b"S" (stateless: run, report, exit) or b"K" (session: run, report, wait for the
next), then a 4-byte sequence number, then the UTF-8 source. Child -> server, binary frames of
fixed layout (no JSON: nothing to nest, no number without a range):

    b"R"                                      set-up done: the child's first frame, sent before it
                                              reads a request, so before any code of a call runs
    b"E" + UTF-8 message                      set-up failed (instead of b"R"); the child exits
    b"S" + !IBd (seq, status index, cpu ms) + UTF-8 error line     a call's report

The child is untrusted from its first call on: `decode_child_frame` checks sizes and ranges and
raises ValueError for anything else, and the server takes only the frames the protocol expects
next (see server.py); a child that sends anything else is killed, which fails its own call only.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
from dataclasses import dataclass

from cir_sandbox.result import STATUSES

HEADER = struct.Struct("!I")
MAX_CLIENT_FRAME = 256 << 20
MAX_CHILD_FRAME = 64 << 10
MAX_CHILD_TEXT = 16000                      # bytes of a child's error line or set-up error
MAX_CPU_MS = 1e9
_REPORT = struct.Struct("!IBd")
READY, SETUP_ERROR, REPORT = b"R", b"E", b"S"


def encode(obj: dict) -> bytes:
    payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> dict:
    """One JSON object; ValueError for anything else (the sender may be hostile)."""
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


@dataclass
class ChildReport:
    seq: int
    status: str
    error_line: str
    cpu_ms: float


def ready_frame() -> bytes:
    return frame(READY)


def setup_error_frame(message: str) -> bytes:
    return frame(SETUP_ERROR + message.encode("utf-8", "backslashreplace")[:MAX_CHILD_TEXT])


def report_frame(seq: int, status: str, error_line: str, cpu_ms: float) -> bytes:
    text = error_line.encode("utf-8", "backslashreplace")[:MAX_CHILD_TEXT]
    return frame(REPORT + _REPORT.pack(seq, STATUSES.index(status), cpu_ms) + text)


def decode_child_frame(payload: bytes) -> tuple[bytes, str | ChildReport | None]:
    """(kind, value) of one child frame: (READY, None), (SETUP_ERROR, message) or (REPORT,
    ChildReport); ValueError for anything malformed (the sender may be hostile)."""
    kind = payload[:1]
    if kind == READY and len(payload) == 1:
        return READY, None
    if kind in (SETUP_ERROR, REPORT) and len(payload) <= 1 + _REPORT.size + MAX_CHILD_TEXT:
        if kind == SETUP_ERROR:
            return SETUP_ERROR, payload[1:].decode("utf-8", "replace")
        if len(payload) >= 1 + _REPORT.size:
            seq, status, cpu_ms = _REPORT.unpack_from(payload, 1)
            if status < len(STATUSES) and math.isfinite(cpu_ms) and 0.0 <= cpu_ms <= MAX_CPU_MS:
                error_line = payload[1 + _REPORT.size:].decode("utf-8", "replace")
                return REPORT, ChildReport(seq, STATUSES[status], error_line, cpu_ms)
    raise ValueError(f"malformed child frame ({len(payload)} bytes, starting {payload[:8]!r})")


class FrameBuffer:
    """Accumulates bytes from a non-blocking socket and splits them into payloads."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        payloads = []
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                raise ValueError(f"frame of {n} bytes exceeds the limit of {self.max_frame}")
            if len(self._buf) < HEADER.size + n:
                break
            payloads.append(bytes(self._buf[HEADER.size:HEADER.size + n]))
            del self._buf[:HEADER.size + n]
        return payloads


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("sandbox server closed the connection")
        buf += chunk
    return bytes(buf)


def recv_obj(sock: socket.socket) -> dict:
    """Blocking read of one JSON frame (client side)."""
    (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if n > MAX_CLIENT_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds the limit of {MAX_CLIENT_FRAME}")
    return json.loads(_recv_exact(sock, n))


def read_exact_fd(fd: int, n: int) -> bytes | None:
    """Blocking read of exactly n bytes from a file descriptor (child side); None at EOF."""
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def write_all_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
