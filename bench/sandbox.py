"""Interpreter-call latency and throughput: the sandbox fork-server against the usual ways.

    python bench/sandbox.py              # about two minutes on a 2-core machine
    python bench/sandbox.py --quick      # fewer calls, for a smoke test
    (it re-runs itself as `python -m bench.sandbox`, so that its name does not shadow `sandbox`)

Side by side, on the same snippets (a trivial print, a sympy solve, a numpy computation):
  (a) server   this package: one warm server, a pre-forked confined child per call
  (b) fresh    a fresh `python -c` per call that imports the same modules (numpy, sympy) first:
               what most RL stacks do
  (c) pool     a multiprocessing pool (fork) created per batch of calls and closed after it, from a
               parent that already imported numpy and sympy: what the paper's executor does
               (a batch is the set of concurrent calls: 1 at one caller, 16 at sixteen)
at 1 caller (sequential calls) and 16 concurrent callers (threads). Reported per call: p50 / p99
latency and calls/s; warm-up calls are excluded. Also reported: (a) with calls 20 ms apart
(the pool is refilled between calls, as when a sequence's code arrives now and then), and the
floor under (a): fork + exit + wait of the same warm interpreter doing nothing (no confinement,
no I/O), sequentially and from 2 processes at once.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/sandbox.py` this file would shadow the `sandbox` package it measures (the
    # script's folder comes first on sys.path): run it again as the module bench.sandbox.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.sandbox", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": _path})

import argparse
import contextlib
import functools
import io
import json
import multiprocessing
import platform
import subprocess
import threading
import time

from cir_sandbox import Sandbox  # noqa: E402

SNIPPETS = {
    "trivial": "print(1 + 1)",
    "sympy": "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))",
    "numpy": ("import numpy as np\na = np.arange(10000, dtype=np.float64).reshape(100, 100) / 1e4\n"
              "print(float(np.linalg.norm(a @ a.T)))"),
}
EXPECTED = {"trivial": "2\n", "sympy": "[2, 3]\n", "numpy": None}
PRELUDE = "import math, numpy, sympy\n"          # (b): the imports the server keeps warm


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _stats(latencies_s: list[float], wall_s: float) -> dict:
    return {"n": len(latencies_s), "p50_ms": _percentile(latencies_s, 0.5) * 1e3,
            "p99_ms": _percentile(latencies_s, 0.99) * 1e3, "calls_per_s": len(latencies_s) / wall_s}


def _check(name: str, stdout: str) -> None:
    if EXPECTED[name] is not None and stdout != EXPECTED[name]:
        raise RuntimeError(f"{name}: unexpected output {stdout!r}")


def _concurrent(num_callers: int, calls_each: int, one_call) -> dict:
    """num_callers threads, each making calls_each sequential calls; per-call latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        mine = []
        for _ in range(calls_each):
            t0 = time.perf_counter()
            one_call()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller) for _ in range(num_callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _stats(latencies, time.perf_counter() - t0)


# ---- (a) -------------------------------------------------------------------------------------
def bench_server(calls: int, workers: int) -> dict:
    out = {}
    with Sandbox(workers=workers, timeout=30) as sb:
        for name, code in SNIPPETS.items():
            def one(name: str = name, code: str = code) -> None:
                r = sb.run(code)
                _check(name, r.stdout)
            for _ in range(10):
                one()
            out[(name, 1)] = _concurrent(1, calls, one)
            out[(name, 16)] = _concurrent(16, max(2, calls // 8), one)
            paced = []
            for _ in range(max(10, calls // 4)):
                time.sleep(0.02)
                t0 = time.perf_counter()
                one()
                paced.append(time.perf_counter() - t0)
            out[(name, "1, paced")] = _stats(paced, sum(paced))
    return out


# ---- (b) -------------------------------------------------------------------------------------
def _fresh_call(name: str, code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True,
                          timeout=300)
    _check(name, proc.stdout)


def bench_fresh_process(calls: int) -> dict:
    out = {}
    for name, code in SNIPPETS.items():
        _fresh_call(name, code)                             # warm the page cache
        out[(name, 1)] = _concurrent(1, calls, functools.partial(_fresh_call, name, code))
        out[(name, 16)] = _concurrent(16, 1, functools.partial(_fresh_call, name, code))
    return out


# ---- (c) -------------------------------------------------------------------------------------
def _exec_capture(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {"__name__": "__main__"})
    return buf.getvalue()


def _pool_batch(codes: list[str]) -> list[str]:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes=min(len(codes), os.cpu_count() or 1)) as pool:
        return pool.map(_exec_capture, codes)


def bench_pool_per_batch(calls: int, batches: int) -> dict:
    import numpy  # noqa: F401  -- a parent that already paid for its imports, as a trainer has
    import sympy  # noqa: F401
    out = {}
    for name, code in SNIPPETS.items():
        _pool_batch([code])
        for batch_size, num_batches in ((1, calls), (16, batches)):
            latencies, t_all = [], time.perf_counter()
            for _ in range(num_batches):
                t0 = time.perf_counter()
                for stdout in _pool_batch([code] * batch_size):
                    _check(name, stdout)
                latencies += [time.perf_counter() - t0] * batch_size   # all answered together
            out[(name, batch_size)] = _stats(latencies, time.perf_counter() - t_all)
    return out


FLOOR_SCRIPT = """
import gc, json, os, sys, time
import math, numpy, sympy
from cir_sandbox.warm import collapse_heap, warm_up
warm_up(("numpy", "sympy"))
gc.collect(); gc.freeze(); collapse_heap()
n, procs = int(sys.argv[1]), int(sys.argv[2])
for _ in range(procs - 1):
    if os.fork() == 0:
        break
lat = []
for _ in range(n):
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    lat.append(time.perf_counter() - t0)
print(json.dumps(lat), flush=True)
"""


def bench_fork_floor(calls: int) -> dict:
    out = {}
    for procs in (1, 2):
        proc = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, str(calls), str(procs)],
                              capture_output=True, text=True, timeout=600, check=True,
                              env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        latencies = [x for line in proc.stdout.splitlines() for x in json.loads(line)]
        stats = _stats(latencies, 1.0)
        stats["calls_per_s"] = procs * len(latencies) / sum(latencies)   # processes run side by side
        out[("nothing", procs)] = stats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--workers", type=int, default=16, help="server workers")
    args = parser.parse_args()
    n_server, n_fresh, n_pool, n_batches = (40, 2, 5, 2) if args.quick else (200, 5, 20, 6)

    results = {"server": bench_server(n_server, args.workers),
               "fresh": bench_fresh_process(n_fresh),
               "pool": bench_pool_per_batch(n_pool, n_batches),
               "floor": bench_fork_floor(n_server)}

    print(f"sandbox calls -- {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'method':8s} {'snippet':8s} {'callers':>9s} {'n':>5s} {'p50 ms':>9s} {'p99 ms':>9s} {'calls/s':>9s}")
    rows = []
    for method, table in results.items():
        for (name, callers), s in table.items():
            print(f"{method:8s} {name:8s} {str(callers):>9s} {s['n']:5d} {s['p50_ms']:9.2f} "
                  f"{s['p99_ms']:9.2f} {s['calls_per_s']:9.1f}")
            rows.append({"method": method, "snippet": name, "callers": callers,
                         **{k: round(v, 3) for k, v in s.items()}})
    server, fresh = results["server"], results["fresh"]
    goals = {
        "trivial_p50_ms_1_caller": round(server[("trivial", 1)]["p50_ms"], 3),
        "trivial_calls_per_s_16_callers": round(server[("trivial", 16)]["calls_per_s"], 1),
        "sympy_p50_speedup_vs_fresh": round(fresh[("sympy", 1)]["p50_ms"] / server[("sympy", 1)]["p50_ms"], 1),
    }
    print(f"goals: trivial p50 at 1 caller {goals['trivial_p50_ms_1_caller']:.2f} ms (goal <= 0.5); "
          f"trivial at 16 callers {goals['trivial_calls_per_s_16_callers']:.0f} calls/s (goal >= 500); "
          f"sympy p50 {goals['sympy_p50_speedup_vs_fresh']:.0f}x faster than fresh python -c (goal >= 25)")
    print(json.dumps({"bench": "cir_sandbox", "cpus": os.cpu_count(), "rows": rows, "goals": goals}))


if __name__ == "__main__":
    main()
