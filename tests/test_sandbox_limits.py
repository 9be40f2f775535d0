"""Sandbox limits, one property each: wall time, CPU time, memory, output. Small sandboxes
(warm set: math only) start in a fraction of a second, so each limit gets its own."""
import time

import pytest

from cir_sandbox import Sandbox, format_feedback


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout=1.0, memory_mb=256, warm_modules=("math",),
                 output_limit=10_000) as sandbox:
        yield sandbox


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import time\ntime.sleep(60)",
    "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM,\n"
    "          signal.SIGXCPU, signal.SIGUSR1):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
    "import threading, time\nfor _ in range(4):\n    threading.Thread(target=time.sleep, args=(60,)).start()",
], ids=["busy-loop", "sleep", "ignores-signals", "non-daemon-threads"])
def test_wall_timeout_kills(sb, code):
    start = time.monotonic()
    r = sb.run(code)
    assert r.status == "timeout" and format_feedback(r) == "Timeout Error"
    assert r.wall_ms >= 1000 and time.monotonic() - start >= 1.0
    assert sb.run("print('next')").stdout == "next\n"


def test_partial_output_before_a_timeout_is_kept(sb):
    r = sb.run("print('started', flush=True)\nwhile True:\n    pass")
    assert r.status == "timeout" and r.stdout == "started\n"


def test_cpu_limit():
    with Sandbox(workers=1, timeout=60, cpu_seconds=1, warm_modules=("math",)) as cpu_sb:
        start = time.monotonic()
        r = cpu_sb.run("import threading\ndef burn():\n    while True:\n        pass\n"
                       "threading.Thread(target=burn, daemon=True).start()\nburn()")
        assert r.status == "timeout" and "CPU" in r.error_line, r
        assert time.monotonic() - start < 30                 # the CPU limit, not the 60 s wall limit


@pytest.mark.parametrize("code", [
    "x = bytearray(1 << 30)",
    "blocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))",
    "x = [0] * (1 << 29)",
], ids=["one-big", "growing", "list"])
def test_memory_bomb_is_memory(sb, code):
    r = sb.run(code)
    assert r.status == "memory" and r.error_line == "MemoryError", r
    assert sb.run("print('next')").stdout == "next\n"


def test_memory_within_the_limit_is_fine(sb):
    assert sb.run("x = bytearray(64 << 20)\nprint(len(x) >> 20)").stdout == "64\n"


@pytest.mark.parametrize("code", [
    "while True:\n    print('x' * 100)",
    "import sys\nwhile True:\n    sys.stderr.write('y' * 100)",
    "import os\nwhile True:\n    os.write(1, b'z' * 4096)",
], ids=["print", "stderr", "raw-fd"])
def test_output_flood_is_capped(sb, code):
    r = sb.run(code)
    assert r.status == "output_limit", r
    assert len(r.stdout) + len(r.stderr) <= 10_000
    assert sb.run("print('next')").stdout == "next\n"


def test_thread_bomb_is_contained(sb):
    r = sb.run("import threading, time\nn = 0\ntry:\n    while True:\n"
               "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
               "        n += 1\nexcept Exception as e:\n    print(type(e).__name__)")
    assert r.status in ("ok", "memory", "timeout"), r
    assert sb.run("print('next')").stdout == "next\n"
