"""The reward: +1 when the last boxed answer of a response is mathematically equal to the reference.

Equality is decided by math-verify (`parse` + `verify`, with its own signal-based timeouts turned
off, so it works off the main thread). math-verify hands expressions to sympy, and a few inputs make
sympy run far too long (`\\boxed{9^{9^{9^{9}}}}` did not finish in 20 s here), so by default the
comparison runs in a small pool of persistent worker processes, each request under a deadline; a
worker that misses it is killed and replaced, and the sample scores -1. Cheap cases never reach the
pool: identical strings (after removing spacing commands) and two plain integers are decided in the
caller.

Measured on a 2-core CPU (no GPU, shared with concurrent work), 31 mixed answer pairs (fractions,
radicals, intervals, sets, text), warm caches: math-verify in process 9-11 ms/pair, through a worker
the same within noise (the pipe round trip of a trivial pair: 0.30 ms vs 0.25-0.33 ms in process);
starting a worker (python + import of math-verify) 0.5-0.6 s, paid once and off the request's deadline.
So the guard costs nothing measurable, and `num_workers` sets the parallelism of `score_many`.

    score(r"... so the answer is \\boxed{\\frac{1}{2}}", "0.5")   # -> 1.0
    with MathVerifier(num_workers=4, timeout_s=5) as v: v.score_many(responses, references)
"""
import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import queue
from concurrent.futures import ThreadPoolExecutor

from cir.rewards.boxed import extract_boxed, strip_math_delimiters

CORRECT = 1.0
INCORRECT = -1.0
WORKER_START_TIMEOUT_S = 120.0  # python start + import of sympy on a loaded machine

_SPACING_RE = re.compile(r"\s+|\\[,;:! ]|\\left(?![A-Za-z])|\\right(?![A-Za-z])")
_INT_RE = re.compile(r"[+-]?\d+")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; here that is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def normalize_reference(reference: str) -> str:
    """A reference answer as bare LaTeX: the content of its box if boxed, without `$...$`."""
    boxed = extract_boxed(reference)
    return strip_math_delimiters(boxed if boxed is not None else reference)


def _canonical(s: str) -> str:
    s = _SPACING_RE.sub("", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def quick_equal(answer: str, reference: str) -> bool | None:
    """Decide the cheap cases without sympy: True / False, or None when math-verify must decide."""
    a, r = _canonical(answer), _canonical(reference)
    if not a:
        return False
    if a == r:
        return True
    if _INT_RE.fullmatch(a) and _INT_RE.fullmatch(r):
        return int(a) == int(r)
    return None


def verify_in_process(answer: str, reference: str) -> bool:
    """math-verify on two bare answers, in this process and without any time limit."""
    from math_verify import parse, verify

    try:
        gold = parse("\\boxed{" + reference + "}", parsing_timeout=None)
        pred = parse("\\boxed{" + answer + "}", parsing_timeout=None)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
    except Exception:  # math-verify / sympy raise on odd input: not equal
        return False


def _worker_main() -> None:
    """Worker loop: one JSON `[answer, reference]` per stdin line -> `1` / `0` per stdout line."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the protocol
    import math_verify  # noqa: F401  (warm the import before saying ready)

    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        answer, reference = json.loads(line)
        protocol.write("1\n" if verify_in_process(answer, reference) else "0\n")
        protocol.flush()


class _Worker:
    """One verification process and its pipes."""

    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from cir.rewards.math_equal import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        self.is_ready = False
        self._buf = b""

    def _read_line(self, deadline: float) -> str | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None  # the worker died
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def request(self, answer: str, reference: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None when it missed the deadline or died."""
        if not self.is_ready:
            if self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S) != "ready":
                raise RuntimeError(f"math-verify worker did not start (exit code {self.proc.poll()})")
            self.is_ready = True
        try:
            self.proc.stdin.write((json.dumps([answer, reference]) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        return None if line is None else line == "1"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


def default_num_workers() -> int:
    """Half the CPUs this process may use, between 1 and 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


class MathVerifier:
    """Scores responses against references; math-verify calls run under a per-sample deadline.

    num_workers: processes running math-verify (None: `default_num_workers()`); 0 runs it in the
        calling thread with no deadline (for debugging, or when inputs are trusted).
    timeout_s: deadline of one comparison (default 5 s: math-verify's own default); a miss scores
        -1 and is counted in `num_timeouts`. Slowest honest pair seen: 0.09 s (31-pair table above).
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0) -> None:
        num_workers = default_num_workers() if num_workers is None else num_workers
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.num_timeouts = 0
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._is_closed = False

    # -- worker bookkeeping -------------------------------------------------
    def _acquire(self) -> _Worker:
        with self._lock:
            if self._is_closed:
                raise RuntimeError("MathVerifier is closed")
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            if len(self._workers) < self.num_workers:
                worker = _Worker()
                self._workers.add(worker)
                return worker
        return self._idle.get()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
            if not self._is_closed:
                fresh = _Worker()  # starts importing now, so it is warm by the next request
                self._workers.add(fresh)
                self._idle.put(fresh)

    # -- scoring ------------------------------------------------------------
    def equivalent(self, answer: str, reference: str) -> bool:
        """Whether two bare answers are equal; False when the comparison misses its deadline."""
        quick = quick_equal(answer, reference)
        if quick is not None:
            return quick
        if self.num_workers == 0:
            return verify_in_process(answer, reference)
        worker = self._acquire()
        verdict = worker.request(answer, reference, self.timeout_s)
        if verdict is None:
            with self._lock:
                self.num_timeouts += 1
            self._replace(worker)
            return False
        self._idle.put(worker)
        return verdict

    def score(self, response: str, reference: str) -> float:
        """+1 when the last boxed answer of `response` equals `reference`, else -1 (no box: -1)."""
        answer = extract_boxed(response)
        if answer is None:
            return INCORRECT
        return CORRECT if self.equivalent(answer, normalize_reference(reference)) else INCORRECT

    def score_many(self, responses: list[str], references: list[str]) -> list[float]:
        """`score` for each pair, the math-verify calls spread over the workers."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        if self.num_workers <= 1 or len(responses) <= 1:
            return [self.score(r, ref) for r, ref in zip(responses, references, strict=True)]
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            return list(pool.map(self.score, responses, references))

    def close(self) -> None:
        """Kill the worker processes; the verifier can't be used afterwards."""
        with self._lock:
            self._is_closed = True
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.kill()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def configure(num_workers: int | None = None, timeout_s: float = 5.0) -> MathVerifier:
    """Replace the verifier used by the module-level `score` / `score_many`."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = MathVerifier(num_workers=num_workers, timeout_s=timeout_s)
        return _default


def default_verifier() -> MathVerifier:
    """The shared verifier, created on first use and closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()


def score(response: str, reference: str) -> float:
    """+1.0 when the last `\\boxed{}` of `response` is mathematically equal to `reference`, else -1.0.

    The reference may be bare LaTeX, boxed, or wrapped in `$...$`. Thread-safe.
    """
    return default_verifier().score(response, reference)


def score_many(responses: list[str], references: list[str]) -> list[float]:
    """`score` over pairs, in parallel over the shared verifier's worker processes."""
    return default_verifier().score_many(responses, references)
