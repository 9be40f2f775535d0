"""Adversarial sandbox tests, one property each: what a snippet can and cannot reach.

One warm Sandbox (numpy + sympy) serves the whole module. A snippet "fails" here when its status
is not ok and it printed nothing; most of these end as `denied` (an uncaught PermissionError).
"""
import os
import sysconfig
import tempfile
import time

import pytest

from cir_sandbox import Sandbox

SECRET = "cir-test-secret-4b1d"


@pytest.fixture(scope="module")
def sb():
    os.environ["CIR_SANDBOX_TEST_SECRET"] = SECRET          # must not reach any snippet
    try:
        with Sandbox(workers=2, timeout=10) as sandbox:
            yield sandbox
    finally:
        os.environ.pop("CIR_SANDBOX_TEST_SECRET", None)


@pytest.fixture(scope="module")
def info(sb):
    return sb.info()


def needs_root(info):
    if info["uid"] is None:
        pytest.skip("the server does not run as root, so children keep its uid")


def needs_landlock(info):
    if not info["landlock_abi"]:
        pytest.skip("this kernel has no Landlock")


def assert_refused(result, *statuses):
    assert result.status in (statuses or ("denied",)), result
    assert result.stdout == "", result


# ---- what a call sees --------------------------------------------------------------------------
def test_stdout_and_stderr_are_captured(sb):
    r = sb.run("import sys\nprint('to out')\nprint('to err', file=sys.stderr)")
    assert (r.status, r.stdout, r.stderr) == ("ok", "to out\n", "to err\n")


def test_error_reports_the_last_traceback_line(sb):
    r = sb.run("x = 1\ndef f():\n    return 1 / 0\nf()")
    assert r.status == "error"
    assert r.error_line == "ZeroDivisionError: division by zero"
    assert r.stderr.startswith("Traceback (most recent call last):")
    assert 'File "<string>", line 3, in f' in r.stderr


def test_syntax_error_is_an_error(sb):
    r = sb.run("def f(:\n    pass")
    assert r.status == "error" and r.error_line.startswith("SyntaxError")


def test_warm_modules_work(sb):
    r = sb.run("import sympy as sp, numpy as np\nx = sp.Symbol('x')\n"
               "print(sp.solve(x**2 - 5*x + 6, x), round(np.linalg.det(np.eye(3) * 2)))")
    assert (r.status, r.stdout) == ("ok", "[2, 3] 8\n")


def test_modules_outside_the_warm_set_can_be_imported(sb):
    assert sb.run("import wave, textwrap; print(textwrap.fill('a b', 10))").stdout == "a b\n"


def test_stdin_is_closed(sb):
    r = sb.run("import sys\nprint(repr(sys.stdin.read()))\ninput()")
    assert r.stdout == "''\n" and r.error_line == "EOFError: EOF when reading a line"


def test_environment_is_scrubbed(sb):
    r = sb.run("import os\nprint(sorted(os.environ))\nprint(any('SECRET' in k for k in os.environ))")
    assert r.status == "ok" and SECRET not in r.stdout and "False" in r.stdout
    assert "OPENBLAS_NUM_THREADS" in r.stdout                # single-threaded BLAS


def test_globals_are_fresh_between_calls(sb):
    assert sb.run("x = 41\nimport math\nmath.pi = 3").ok
    r = sb.run("import math\nprint(math.pi)\nprint(x)")
    assert r.stdout == "3.141592653589793\n" and r.error_line == "NameError: name 'x' is not defined"


def test_random_state_differs_between_calls(sb):
    code = "import random, numpy\nprint(random.random(), numpy.random.rand())"
    assert sb.run(code).stdout != sb.run(code).stdout


# ---- files -------------------------------------------------------------------------------------
def test_writes_stay_in_the_temp_dir_which_is_removed_afterwards(sb):
    r = sb.run("import os\nopen('f.txt', 'w').write('x' * 100)\nos.mkdir('d')\nprint(os.getcwd())")
    assert r.status == "ok"
    cwd = r.stdout.strip()
    deadline = time.monotonic() + 30                         # removed right after the child exits (the
    while os.path.exists(cwd) and time.monotonic() < deadline:  # reaper may run late on a loaded CI machine)
        time.sleep(0.05)
    assert not os.path.exists(cwd)


def test_writing_next_to_the_temp_dir_fails(sb):
    assert_refused(sb.run("open('../escape.txt', 'w').write('x')"))


def test_writing_to_tmp_fails(sb, info):
    needs_landlock(info)                                     # /tmp is world-writable otherwise
    assert_refused(sb.run("open('/tmp/cir-sandbox-escape.txt', 'w').write('x')"))
    assert not os.path.exists("/tmp/cir-sandbox-escape.txt")


def test_site_packages_is_not_writable(sb, info):
    needs_root(info)
    target = os.path.join(sysconfig.get_paths()["purelib"], "cir_sandbox_evil.py")
    assert_refused(sb.run(f"open({target!r}, 'w').write('import os')"))
    assert not os.path.exists(target)


def test_files_outside_the_allowed_trees_cannot_be_read(sb, info):
    needs_landlock(info)
    folder = tempfile.mkdtemp()
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "answers.txt")
    with open(path, "w") as f:
        f.write("42")
    os.chmod(path, 0o644)                                    # world-readable: only Landlock stops it
    try:
        assert_refused(sb.run(f"print(open({path!r}).read())"))
    finally:
        os.unlink(path)
        os.rmdir(folder)


def test_server_environment_is_unreadable(sb, info):
    needs_root(info)
    assert_refused(sb.run(f"print(open('/proc/{sb.server_pid}/environ').read())"))
    assert_refused(sb.run(f"print(open('/proc/{os.getpid()}/environ').read())"))


def test_children_run_as_an_unprivileged_user(sb, info):
    needs_root(info)
    assert sb.run("import os; print(os.getuid(), os.getgroups())").stdout == f"{info['uid']} []\n"
    assert_refused(sb.run("import os; os.setuid(0)"))


def test_file_size_is_capped(sb):
    r = sb.run("open('big', 'wb').write(b'x' * (64 << 20))")
    assert r.status == "error" and "File too large" in r.error_line


# ---- network, processes, signals ---------------------------------------------------------------
@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
    "import socket\nsocket.socket(socket.AF_UNIX).connect('/tmp/x.sock')",
    "import socket\nprint(socket.getaddrinfo('example.com', 80))",
    "import urllib.request\nprint(urllib.request.urlopen('http://1.1.1.1', timeout=2).read())",
], ids=["socket", "connect", "unix", "dns", "http"])
def test_no_network(sb, code):
    assert_refused(sb.run(code), "denied", "error")


@pytest.mark.parametrize("code", [
    "import os\nprint(os.system('echo pwned') == 0)",
    "import subprocess\nprint(subprocess.run(['echo', 'pwned']))",
    "import os\nos.execv('/bin/echo', ['echo', 'pwned'])",
    "import os\nos.posix_spawn('/bin/echo', ['echo', 'pwned'], {})",
], ids=["os.system", "subprocess", "os.exec", "posix_spawn"])
def test_no_exec(sb, code):
    r = sb.run(code)
    assert "pwned" not in r.stdout and r.stdout in ("", "False\n"), r


@pytest.mark.parametrize("code", [
    "import os\nos.fork()",
    "import multiprocessing as mp\np = mp.Process(target=print, args=('child',))\np.start()\np.join()",
    "import multiprocessing as mp\nprint(mp.Pool(2).map(abs, [-1]))",
], ids=["os.fork", "multiprocessing.Process", "multiprocessing.Pool"])
def test_no_fork(sb, code):
    assert_refused(sb.run(code), "denied", "error")


def test_threads_are_allowed(sb):
    r = sb.run("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) "
               "for i in range(8)]\n[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out))")
    assert r.stdout == f"{list(range(8))}\n"


def test_fork_bomb_is_contained(sb):
    r = sb.run("import os\nfailed = 0\nfor _ in range(5000):\n    try:\n        os.fork()\n"
               "    except OSError:\n        failed += 1\nprint(failed)")
    assert r.stdout == "5000\n"
    assert sb.run("print('alive')").stdout == "alive\n"


@pytest.mark.parametrize("target", ["server", "caller", "everyone"])
def test_no_signals_to_other_processes(sb, target):
    pid = {"server": sb.server_pid, "caller": os.getpid(), "everyone": -1}[target]
    assert_refused(sb.run(f"import os, signal\nos.kill({pid}, signal.SIGKILL)"))
    assert sb.run("print('alive')").stdout == "alive\n"


def test_raw_syscalls_through_ctypes_are_filtered(sb):
    calls = {"fork": (57, ()), "execve": (59, (b"/bin/sh", 0, 0)), "socket": (41, (2, 1, 0)),
             "kill": (62, (sb.server_pid, 9)), "ptrace": (101, (16, sb.server_pid, 0, 0)),
             "unshare": (272, (0x10000000,)), "mount": (165, (b"none", b"/tmp", b"tmpfs", 0, 0)),
             "bpf": (321, (0, 0, 0)), "io_uring_setup": (425, (8, 0)), "clone3": (435, (0, 0)),
             "keyctl": (250, (0, 0)), "perf_event_open": (298, (0, 0, -1, -1, 0))}
    code = ("import ctypes, platform\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"calls = {calls!r}\n"
            "if platform.machine() == 'x86_64':\n"
            "    print(sorted({name: libc.syscall(nr, *args) for name, (nr, args) in calls.items()}.values()))\n"
            "else:\n"
            "    print([-1])")
    r = sb.run(code)
    assert r.status == "ok" and set(eval(r.stdout)) == {-1}, r
    assert sb.run("print('alive')").stdout == "alive\n"


def test_segfault_is_contained(sb):
    r = sb.run("import ctypes\nctypes.string_at(0)")
    assert r.status == "killed" and "SIGSEGV" in r.error_line
    assert sb.run("print('alive')").stdout == "alive\n"


def test_closing_its_descriptors_is_contained(sb):
    r = sb.run("import os\nfor fd in range(10):\n    try:\n        os.close(fd)\n    except OSError:\n        pass")
    assert r.status == "error" and "control channel" in r.error_line
    assert sb.run("print('alive')").stdout == "alive\n"


@pytest.mark.parametrize("allow", [True, False], ids=["as-nobody", "as-the-caller"])
def test_chmod_by_path_is_refused_where_children_keep_the_callers_uid(tmp_path, allow):
    """Without root there is no uid to drop to, and Landlock does not govern chmod: the filter
    then refuses chmod by path (a child could chmod any of the caller's files), fchmod stays."""
    import subprocess
    import sys
    script = (
        "import os, sys\nfrom cir_sandbox import policy\n"
        "program = policy.BpfProgram(policy.build_filter_bpf(allow_path_chmod=sys.argv[2] == 'True'))\n"
        "policy.prctl(policy.PR_SET_NO_NEW_PRIVS, 1)\nprogram.load()\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\nos.fchmod(fd, 0o600)\n"
        "try:\n    os.chmod(sys.argv[1], 0o644)\n    print('chmod allowed')\n"
        "except PermissionError:\n    print('chmod refused')\n")
    path = tmp_path / "f"
    path.write_text("x")
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(allow)], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout == ("chmod allowed\n" if allow else "chmod refused\n"), proc.stderr
    assert oct(path.stat().st_mode & 0o777) == oct(0o644 if allow else 0o600)
