"""The HumanEval sandbox holds each of its limits, and the calculator only does arithmetic."""
import os
import socket
import time

import pytest

from nanochat.execution import execute_code, use_calculator


def test_runs_code_and_captures_output():
    r = execute_code("import math\nprint(math.factorial(5))\nimport sys\nprint('warn', file=sys.stderr)")
    assert r.success, r
    assert r.stdout == "120\n"
    assert r.stderr == "warn\n"
    assert not r.timeout and not r.memory_exceeded and r.error is None


def test_exceptions_and_failed_asserts_are_failures():
    r = execute_code("def f(x):\n    return x + 1\nassert f(1) == 3, 'wrong'")
    assert not r.success and r.error == "AssertionError: wrong"
    r = execute_code("def broken(:\n  pass")
    assert not r.success and r.error.startswith("SyntaxError")
    r = execute_code("import sys\nsys.exit(0)")  # bailing out before the tests is not a pass
    assert not r.success


def test_infinite_loop_times_out():
    t0 = time.time()
    r = execute_code("while True:\n    pass", timeout=1.0)
    assert r.timeout and not r.success
    assert time.time() - t0 < 8


def test_sleep_times_out():
    r = execute_code("import time\ntime.sleep(30)\nprint('woke')", timeout=0.5)
    assert r.timeout and not r.success and "woke" not in r.stdout


@pytest.mark.slow
def test_stuck_in_c_code_is_killed():
    # a huge power runs in C, where Python's alarm handler cannot interrupt it; the
    # CPU rlimit or the parent's kill must end it
    t0 = time.time()
    r = execute_code("x = sum(range(10**13))\nprint('done')", timeout=1.0)
    assert not r.success and r.timeout
    assert time.time() - t0 < 15


def test_memory_bomb_is_stopped():
    r = execute_code("x = bytearray(2 * 1024**3)", max_memory_bytes=256 * 1024**2)
    assert r.memory_exceeded and not r.success
    r = execute_code("a = []\nwhile True:\n    a.append(' ' * 10**6)", timeout=10, max_memory_bytes=128 * 1024**2)
    assert r.memory_exceeded and not r.success and not r.timeout
    # the same allocation is fine under a larger limit: the limit, not the code, failed it
    r = execute_code("x = bytearray(64 * 1024**2)\nprint(len(x))", max_memory_bytes=512 * 1024**2)
    assert r.success, r


def test_file_deletion_is_blocked(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for code in [f"import os\nos.remove({str(victim)!r})",
                 f"import os\nos.unlink({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"import os\nos.rename({str(victim)!r}, {str(victim)!r} + '.bak')",
                 f"open({str(victim)!r}, 'w').write('overwritten')"]:
        r = execute_code(code)
        assert not r.success and "PermissionError" in r.error, (code, r)
    assert victim.read_text() == "keep me"


def test_scratch_dir_is_writable_and_private():
    code = ("import os\nopen('note.txt', 'w').write('x' * 10)\nprint(os.listdir('.'))\nprint(os.getcwd())")
    r = execute_code(code)
    assert r.success, r
    assert r.stdout.splitlines()[0] == "['note.txt']"
    scratch = r.stdout.splitlines()[1]
    assert not os.path.exists(scratch)  # cleaned up afterwards


def test_fork_and_subprocess_are_blocked():
    for code in ["import os\nos.fork()", "import os\nos.system('echo pwned')",
                 "import subprocess\nsubprocess.run(['echo', 'pwned'])",
                 "import os\nos.execv('/bin/echo', ['echo', 'pwned'])",
                 "import multiprocessing"]:
        r = execute_code(code)
        assert not r.success, (code, r)
        assert "pwned" not in r.stdout
        assert "PermissionError" in r.error or "ImportError" in r.error or "ModuleNotFoundError" in r.error


def test_environment_is_not_readable(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    r = execute_code("import os\nprint(dict(os.environ))\nprint(os.getenv('NANOCHAT_TEST_SECRET'))")
    assert r.success and "hunter2" not in r.stdout
    assert r.stdout.splitlines() == ["{}", "None"]
    for path in ["/proc/self/environ", "/proc/' + str(os.getppid()) + '/environ"]:
        r = execute_code(f"import os\nprint(open('{path}', 'rb').read())")
        assert not r.success and "hunter2" not in r.stdout, r


def test_network_is_blocked():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    try:
        r = execute_code(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                         "s.sendall(b'hello')")
        r2 = execute_code(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))")
        # a connection that got through would sit completed in the listen backlog
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert not r.success and not r2.success
    assert "PermissionError" in r.error and "PermissionError" in r2.error


def test_output_is_capped():
    r = execute_code("for i in range(10**6):\n    print('spam spam spam')")
    assert r.success
    assert 0 < len(r.stdout) <= 64 * 1024


@pytest.mark.parametrize("expr,expected", [
    ("1+2", "3"), ("16-3-4", "9"), ("9*2", "18"), ("8/2", "4"), ("7/2", "3.5"), ("1/3", "0.3333333333"),
    ("0.1+0.2", "0.3"), ("1,200*3", "3600"), ("(2+3)*-4", "-20"), ("17//5", "3"), ("17%5", "2"),
    ("'strawberry'.count('r')", "3"), ('"banana".count("an")', "2"),
])
def test_calculator_evaluates(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "2**10", "__import__('os').system('ls')", "abc", "1/0", "'x'", "open('f')", "x.count('a')",
    "'a'.upper()", "[1,2].count(1)", "", "9" * 40 + "*" + "9" * 40, "lambda: 1", "1 if 1 else 2",
    "'aaa'.count('a', 1)", "'a' * 3",
])
def test_calculator_refuses(expr):
    assert use_calculator(expr) is None
