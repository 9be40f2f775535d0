"""The server's side that faces clients: connections, requests, sessions (a mixin of Server).

Each request frame (protocol.py) becomes a queued Job, a session record, or an immediate answer.
A client that disconnects loses its queued jobs and its sessions; its running jobs finish unseen.
When the client that started the server (holding its stdin) goes away, the server exits.
"""
from __future__ import annotations

import os
import selectors
from collections import deque

from cir_sandbox.protocol import MAX_CLIENT_FRAME, FrameBuffer, decode, encode
from cir_sandbox.records import Client, Job
from cir_sandbox.result import Result


class Frontend:
    """Needs from Server: listener, _sel, _pending, _sessions, _session_owner, _sessions_lost,
    _next_session, _answer, _kill, info."""

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
        if client.closed:
            return
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
        except (ValueError, RecursionError):        # not JSON, not an object, nested too deep
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
        self._sessions_lost.discard(session)
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
        if not os.read(0, 4096):                    # the client is gone, wherever we are
            raise SystemExit(0)
