"""Framing on the sandbox's sockets: a 4-byte big-endian length, then the payload.

Client <-> server frames carry one JSON object each; requests have an "op" and an "id", and the
server answers each request with one frame holding the same "id" (answers may come out of order):

    {"op": "run", "id": 7, "code": "print(1)", "session": null}  ->  {"id": 7, "result": {...}}
    {"op": "open_session", "id": 8}                                ->  {"id": 8, "session": 3}
    {"op": "close_session", "id": 9, "session": 3}                 ->  {"id": 9}
    {"op": "info", "id": 10}                                       ->  {"id": 10, "info": {...}}

Server -> child: b"S" (stateless: run, report, exit) or b"K" (session: run, report, wait for the
next), then a 4-byte sequence number, then the UTF-8 source. Child -> server: one JSON object per
frame: {"ready": true}, {"setup_error": "..."} or a status {"seq", "status", "error_line",
"cpu_ms"}. The child is untrusted, so the server caps and validates what it reads from it.
"""
from __future__ import annotations

import json
import os
import socket
import struct

HEADER = struct.Struct("!I")
MAX_CLIENT_FRAME = 256 << 20
MAX_CHILD_FRAME = 64 << 10


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
