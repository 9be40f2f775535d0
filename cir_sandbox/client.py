"""The caller's side: `Sandbox` starts a sandbox server and sends it code; `Session` keeps state.

    with Sandbox(workers=8, timeout=10) as sb:
        sb.run("print(1 + 1)").stdout                  # '2\n'
        sb.run_many(["print(1)", "print(2)"])          # in parallel, results in order
        future = sb.submit("print(3)")                 # concurrent.futures.Future[Result]
        with sb.session() as s:                        # one interpreter that keeps its globals
            s.run("x = 41"); s.run("print(x + 1)")

The server is a fresh interpreter (`python -s -m cir_sandbox.server`, started through subprocess with
a scrubbed environment), so it is cheap to start from a process that already runs torch. Each
calling thread gets its own connection, so `run` is a blocking round trip with no hand-off between
threads; `run_many` pipelines its calls on that connection; `submit` runs `run` on a thread pool.
If the server dies, the next call (or the call that saw it die) starts a new one, retries once,
and says so in `Result.note` and in a warning on the "cir_sandbox" logger.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

from cir_sandbox.cleanup import remove_tree
from cir_sandbox.config import DEFAULT_WARM_MODULES, ServerConfig
from cir_sandbox.environment import server_environment
from cir_sandbox.protocol import encode, recv_obj
from cir_sandbox.result import Result

log = logging.getLogger("cir_sandbox")
_ids = itertools.count(1)
RESTART_CLEANUP_SECONDS = 1.0
"""How long a restart spends removing the dead server's files; what is left goes at close."""


class _Server:
    """One running server process."""

    def __init__(self, config: ServerConfig, startup_timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-m", "cir_sandbox.server", *config.to_args()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=server_environment(),
            cwd="/", close_fds=True, start_new_session=True)
        line = _readline_with_timeout(self.proc, startup_timeout)
        if not line.startswith(b"READY"):
            self.stop()
            raise RuntimeError(f"sandbox server failed to start (exit code {self.proc.returncode}); "
                               "its stderr is above")
        self.pid = self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def exit_description(self, wait: float) -> str:
        try:
            code = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


def _readline_with_timeout(proc: subprocess.Popen, timeout: float) -> bytes:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else b""


class _Connection:
    def __init__(self, path: str, generation: int) -> None:
        self.generation = generation
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def request(self, messages: list[dict]) -> list[dict]:
        """Send all, then read one answer per message; answers are matched by id."""
        self.sock.sendall(b"".join(encode(m) for m in messages))
        answers = {}
        while len(answers) < len(messages):
            answer = recv_obj(self.sock)
            answers[answer["id"]] = answer
        return [answers[m["id"]] for m in messages]

    def close(self) -> None:
        self.sock.close()


class Sandbox:
    """A pool of confined Python interpreters; thread-safe.

    workers: calls running at once (more are queued). timeout: wall seconds per call.
    memory_mb: memory a call may allocate beyond the warm interpreter. warm_modules: imported
    once in the server (missing ones are skipped). cpu_seconds: CPU limit per call (default
    ceil(timeout)). output_limit: bytes of stdout + stderr per call.
    """

    def __init__(self, workers: int = 4, timeout: float = 10.0, memory_mb: int = 1024,
                 warm_modules: tuple[str, ...] | list[str] = DEFAULT_WARM_MODULES, *,
                 cpu_seconds: int | None = None, output_limit: int = 1 << 20,
                 startup_timeout: float = 120.0) -> None:
        self.config = ServerConfig("", workers=workers, timeout=timeout, cpu_seconds=cpu_seconds,
                                   memory_mb=memory_mb, output_limit=output_limit,
                                   warm_modules=tuple(warm_modules), watch_stdin=True)
        self._dir = tempfile.mkdtemp(prefix="sandbox-client-")
        os.chmod(self._dir, 0o711)                  # children walk through it to their temp dirs
        self.config.socket_path = os.path.join(self._dir, "server.sock")
        self.config.base_dir = os.path.join(self._dir, "children-0")
        self._startup_timeout = startup_timeout
        self._lock = threading.Lock()
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._generation = 0
        self.num_restarts = 0
        self._restart_note = ""
        self._holder: list[_Server] = []            # the current server, for the finalizer
        self._finalizer = weakref.finalize(self, _shut_down, self._holder, self._dir)
        try:
            self._server = _Server(self.config, startup_timeout)
        except BaseException:
            self._finalizer()
            raise

    @property
    def _server(self) -> _Server:
        if not self._holder:
            raise RuntimeError("the sandbox server is not running")
        return self._holder[0]

    @_server.setter
    def _server(self, server: _Server) -> None:
        self._holder[:] = [server]

    # ---- public -----------------------------------------------------------------------------
    def run(self, code: str) -> Result:
        return self.run_many([code])[0]

    def run_many(self, codes: list[str]) -> list[Result]:
        """Run the snippets in parallel (up to `workers` at once); results in input order."""
        messages = [{"op": "run", "id": next(_ids), "code": _check_code(c), "session": None}
                    for c in codes]
        return [Result.from_dict(a["result"]) if "result" in a else _failed(a, "")
                for a in self._call(messages)]

    def submit(self, code: str) -> Future:
        """Run in the background; the Future resolves to a Result (it never raises for the code)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max(2, self.config.workers), "cir_sandbox")
            return self._executor.submit(self.run, code)

    def session(self) -> Session:
        """A child that keeps its globals from call to call; close it (or use `with`)."""
        return Session(self)

    def info(self) -> dict:
        """The server's pid, uid of its children, Landlock ABI, warm modules, read paths, ..."""
        return self._call([{"op": "info", "id": next(_ids)}])[0]["info"]

    @property
    def server_pid(self) -> int:
        return self._server.pid

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- connection management ----------------------------------------------------------------
    def _connection(self) -> tuple[_Connection, str]:
        """This thread's connection to the live server (restarting a dead one), and a note."""
        note = ""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.generation != self._generation or not self._server.is_alive():
            if conn is not None:
                conn.close()
                self._local.conn = None
            if not self._server.is_alive():
                note = self._restart(self._generation)
            conn = self._local.conn = _Connection(self.config.socket_path, self._generation)
        return conn, note

    def _restart(self, generation: int) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("the Sandbox is closed")
            if generation != self._generation:       # another thread already restarted it
                return self._restart_note
            reason = self._server.exit_description(wait=2.0)
            self._server.stop()
            try:
                os.unlink(self.config.socket_path)
            except FileNotFoundError:
                pass
            _remove(self.config.base_dir, time.monotonic() + RESTART_CLEANUP_SECONDS)  # a dead server's leftovers
            self.config.base_dir = os.path.join(self._dir, f"children-{self._generation + 1}")
            self._server = _Server(self.config, self._startup_timeout)
            self._generation += 1
            self.num_restarts += 1
            self._restart_note = (f"sandbox server {reason}; restarted it (restart "
                                  f"#{self.num_restarts}, new pid {self._server.pid})")
            log.warning(self._restart_note)
            return self._restart_note

    def _call(self, messages: list[dict]) -> list[dict]:
        answers: dict[object, dict] = {}
        note = ""
        for attempt in range(2):
            todo = [m for m in messages if m["id"] not in answers]
            conn, fresh_note = self._connection()
            note = fresh_note or note
            try:
                for answer in conn.request(todo):
                    answers[answer["id"]] = answer
                break
            except (OSError, EOFError, ValueError):
                conn.close()
                self._local.conn = None
                note = self._restart(conn.generation) or note
                if attempt == 1:
                    for m in todo:
                        answers.setdefault(m["id"], {"id": m["id"], "error": "sandbox server died"})
        if note:
            for answer in answers.values():
                if "result" in answer:
                    notes = (answer["result"].get("note"), note)
                    answer["result"]["note"] = "; ".join(x for x in notes if x)
        return [answers[m["id"]] for m in messages]


class Session:
    """One persistent interpreter (same limits as stateless calls; the wall time applies per
    call). If it dies (timeout, crash) the next call gets a fresh one and says so in its note."""

    def __init__(self, sandbox: Sandbox, owns_sandbox: bool = False) -> None:
        self._sandbox = sandbox
        self._owns_sandbox = owns_sandbox
        self._conn: _Connection | None = None
        self._id: int | None = None
        self._lock = threading.Lock()

    def run(self, code: str) -> Result:
        _check_code(code)
        with self._lock:
            note = ""
            for _attempt in range(2):
                try:
                    if self._conn is None or self._conn.generation != self._sandbox._generation:
                        if self._conn is not None:
                            note = "sandbox server restarted: the session's globals are lost"
                        self._open()
                    answer = self._conn.request([{"op": "run", "id": next(_ids), "code": code,
                                                  "session": self._id}])[0]
                    result = (Result.from_dict(answer["result"]) if "result" in answer
                              else _failed(answer, ""))
                    result.note = "; ".join(x for x in (result.note, note) if x)
                    return result
                except (OSError, EOFError, ValueError):
                    if self._conn is not None:
                        self._conn.close()
                        self._sandbox._restart(self._conn.generation)
                    note = "sandbox server restarted: the session's globals are lost"
            return _failed({}, note)

    def _open(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if not self._sandbox._server.is_alive():
            self._sandbox._restart(self._sandbox._generation)
        self._conn = _Connection(self._sandbox.config.socket_path, self._sandbox._generation)
        self._id = self._conn.request([{"op": "open_session", "id": next(_ids)}])[0]["session"]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.request([{"op": "close_session", "id": next(_ids), "session": self._id}])
                except (OSError, EOFError, ValueError):
                    pass
                self._conn.close()
                self._conn = None
        if self._owns_sandbox:
            self._sandbox.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def session(sandbox: Sandbox | None = None, **sandbox_kwargs: object) -> Session:
    """A persistent-globals interpreter: on `sandbox` if given, else on a private one-worker
    Sandbox (built from sandbox_kwargs) that closes with the session."""
    if sandbox is not None:
        return Session(sandbox)
    return Session(Sandbox(**{"workers": 1, **sandbox_kwargs}), owns_sandbox=True)


def _shut_down(holder: list[_Server], directory: str) -> None:
    """Stop the server and remove the client's directory (on close, collection or exit)."""
    for server in holder:
        server.stop()
    holder.clear()
    _remove(directory, None)


def _remove(path: str, deadline: float | None) -> None:
    try:
        remove_tree(path, deadline)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def _check_code(code: str) -> str:
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    return code


def _failed(answer: dict, note: str) -> Result:
    return Result("killed", error_line=f"SandboxError: {answer.get('error', 'sandbox server died')}",
                  note=note, infrastructure=True)
