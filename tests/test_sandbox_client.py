"""The sandbox client: concurrency, sessions, server restarts, the CLI."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

import cir_sandbox
from cir_sandbox import Sandbox


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=4, timeout=5, warm_modules=("math",)) as sandbox:
        yield sandbox


def test_200_concurrent_submits_all_complete_correctly(sb):
    futures = [sb.submit(f"print({i} * {i})") for i in range(200)]
    results = [f.result(timeout=120) for f in futures]
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(200)]
    assert all(r.ok for r in results)


def test_run_many_keeps_the_input_order(sb):
    results = sb.run_many([f"import time\ntime.sleep({(9 - i) / 100})\nprint({i})" for i in range(10)])
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(10)]


def test_run_from_many_threads(sb):
    out = {}

    def call(i):
        out[i] = sb.run(f"print({i})").stdout

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out == {i: f"{i}\n" for i in range(16)}


def test_a_sleeping_call_does_not_block_the_others(sb):
    order = []
    slow = sb.submit("import time\ntime.sleep(3)\nprint('slow')")
    slow.add_done_callback(lambda f: order.append("slow"))
    fast = [sb.submit(f"print({i})") for i in range(8)]
    for f in fast:
        f.add_done_callback(lambda f: order.append("fast"))
    slow.result(timeout=60)
    [f.result(timeout=60) for f in fast]
    assert order[-1] == "slow" and order.count("fast") == 8


def test_session_keeps_state(sb):
    with sb.session() as s:
        assert s.run("x = 41\nimport math\nmath.tau = 1").ok
        r = s.run("print(x + 1, math.tau)")
    assert r.stdout == "42 1\n"
    assert sb.run("print('x' in globals())").stdout == "False\n"


def test_session_restarts_after_a_timeout_and_says_so():
    with Sandbox(workers=1, timeout=1, warm_modules=("math",)) as small:
        with small.session() as s:
            s.run("x = 1")
            assert s.run("while True:\n    pass").status == "timeout"
            r = s.run("print(x)")
        assert r.error_line == "NameError: name 'x' is not defined" and "session restarted" in r.note


def test_module_level_session_owns_its_sandbox():
    with cir_sandbox.session(warm_modules=("math",), timeout=5) as s:
        s.run("acc = [1]")
        s.run("acc.append(2)")
        assert s.run("print(acc)").stdout == "[1, 2]\n"


def test_server_restarts_after_being_killed(sb):
    assert sb.run("print(1)").ok
    old = sb.server_pid
    os.kill(old, signal.SIGKILL)
    r = sb.run("print(2)")
    assert (r.status, r.stdout) == ("ok", "2\n")
    assert sb.server_pid != old and "restarted" in r.note
    assert sb.run("print(3)").note == ""


def test_invalid_arguments_are_value_errors(sb):
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=0)
    with pytest.raises(ValueError, match="timeout"):
        Sandbox(timeout=-1)
    with pytest.raises(ValueError, match="str"):
        sb.run(b"print(1)")


def test_cli_runs_stdin():
    proc = subprocess.run([sys.executable, "-m", "cir_sandbox.run", "--warm", "math", "--json"],
                          input="print(6 * 7)", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"stdout": "42\\n"' in proc.stdout.splitlines()[-1]


def test_cli_runs_a_file_and_fails_on_error(tmp_path):
    path = tmp_path / "snippet.py"
    path.write_text("print('before')\n1 / 0\n")
    proc = subprocess.run([sys.executable, "-m", "cir_sandbox.run", str(path), "--warm", ""],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "feedback: 'ZeroDivisionError: division by zero'" in proc.stdout


def test_a_missing_warm_module_is_skipped():
    with Sandbox(workers=1, warm_modules=("math", "no_such_module_for_cir_tests")) as small:
        assert small.info()["warm_modules"] == ["math"]
        assert small.run("import math\nprint(math.factorial(5))").stdout == "120\n"


def test_a_module_on_the_callers_pythonpath_is_importable_warm(tmp_path):
    """Dependencies that reach the caller only through PYTHONPATH (a `pip install --target` dir, a
    cluster module system) must reach the server too: there a warm module imports, and a snippet
    can import it. The caller here is a fresh process whose PYTHONPATH names a temp dir; this test's
    own process cannot import the module."""
    name = "cir_pythonpath_probe"
    (tmp_path / f"{name}.py").write_text("VALUE = 6 * 7\n")
    with pytest.raises(ImportError):
        __import__(name)
    caller = (
        "import json\nfrom cir_sandbox import Sandbox\n"
        f"with Sandbox(workers=1, warm_modules=('math', {name!r})) as sb:\n"
        f"    r = sb.run('import {name}\\nprint({name}.VALUE)')\n"
        "    print(json.dumps({'warm': sb.info()['warm_modules'], 'stdout': r.stdout, 'error': r.error_line}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True, timeout=120, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["warm"] == ["math", name], proc.stderr
    assert out["stdout"] == "42\n", out


def test_server_environment_carries_the_import_path_and_no_variable(monkeypatch, tmp_path):
    from cir_sandbox.environment import import_path, is_scrubbed, package_root, server_environment

    monkeypatch.setenv("CIR_SANDBOX_TEST_SECRET", "s3cret")
    env = server_environment(["", str(tmp_path), "/no/such/dir", str(tmp_path), package_root()])
    assert env["PYTHONPATH"].split(os.pathsep) == [package_root(), str(tmp_path)]
    assert "s3cret" not in "".join(env.values()) and "CIR_SANDBOX_TEST_SECRET" not in env
    assert is_scrubbed(env) and not is_scrubbed({**env, "CIR_SANDBOX_TEST_SECRET": "s3cret"})
    assert import_path() == import_path(import_path())  # a server re-reading its own path: no re-exec loop
