"""Running model-written code: a sandbox for HumanEval and a safe calculator for tool use.

`execute_code` runs a program in a *fresh* Python interpreter (not a fork of this
process: forking a process that holds torch threads can deadlock, and a fork would
inherit our environment and memory). Inside, before the program runs, a small guard
applies the limits:

- wall clock: an interval timer in the child plus a hard kill of its process group
  from the parent; CPU seconds via RLIMIT_CPU as a backstop
- memory: RLIMIT_AS (address space), so a memory bomb hits MemoryError
- files: a scratch directory as cwd, RLIMIT_FSIZE on anything written, destructive
  os / shutil functions replaced by stubs that raise, /proc and /sys unreadable
- processes: fork / exec / spawn / subprocess disabled, RLIMIT_NPROC where it binds
- network: a new network namespace when the kernel lets us (then only an unconfigured
  loopback exists), and the socket constructors replaced by stubs either way
- environment: the child starts with an empty environment

This is the human-eval "reliability guard" idea: it stops accidents and sloppy code
that a small model writes, it is not a security boundary against a determined
adversary (ctypes tricks, etc.). Run untrusted code in a container or VM.

`use_calculator` evaluates the expressions a model writes between
<|python_start|> and <|python_end|>: arithmetic and `'str'.count('x')` only, by walking
the AST (nothing is ever passed to `eval`), with a time budget and a cap on number size.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import operator
import os
import signal
import subprocess
import sys
import tempfile
import time

# ----------------------------------------------------------------------------- sandbox

_REPORT_MARK = "\x00NANOCHAT_SANDBOX_REPORT\x00"
_MAX_CAPTURE = 64 * 1024          # characters of stdout / stderr kept from the program
_MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program (or its output) may write


@dataclasses.dataclass
class ExecutionResult:
    success: bool                 # the program ran to the end without raising
    stdout: str = ""
    stderr: str = ""
    error: str | None = None      # "ExcType: message" of what stopped it, if anything
    timeout: bool = False         # killed for running past `timeout`
    memory_exceeded: bool = False  # hit the address-space limit

    def __repr__(self) -> str:   # success, then only what is set, output cut to 200 characters
        parts = {"timeout": self.timeout, "memory_exceeded": self.memory_exceeded, "error": self.error,
                 "stdout": self.stdout[:200], "stderr": self.stderr[:200]}
        return f"ExecutionResult(success={self.success}" + "".join(f", {k}={v!r}" for k, v in parts.items() if v) + ")"


# The child's program. It reads {"code", "timeout", "max_memory_bytes", ...} as JSON on
# stdin, locks itself down, runs the code with captured output and prints one report
# line (after a marker) on its real stdout, which the parent reads from a capped file.
_RUNNER = r'''
import sys, os, io, json, signal, builtins
cfg = json.loads(sys.stdin.read())
scratch = os.getcwd()

import resource
def _limit(kind, value):  # an unlimited hard limit drops to `value` too: the program cannot raise it back
    hard = resource.getrlimit(kind)[1]
    hard = value if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(kind, (min(value, hard), hard))
    except (ValueError, OSError):
        pass
if cfg["max_memory_bytes"] and sys.platform != "darwin":  # macOS does not honour RLIMIT_AS
    _limit(resource.RLIMIT_AS, cfg["max_memory_bytes"])
    _limit(resource.RLIMIT_DATA, cfg["max_memory_bytes"])
_limit(resource.RLIMIT_CPU, int(cfg["timeout"]) + 2)
_limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
_limit(resource.RLIMIT_CORE, 0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing us

# a private network namespace (only a down loopback in it); needs privileges, best effort
if sys.platform.startswith("linux"):
    try:
        import ctypes  # blocked for the program below
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
    except Exception:
        pass

class TimeoutException(BaseException):
    pass
def _on_alarm(signum, frame):
    raise TimeoutException("timed out")
signal.signal(signal.SIGALRM, _on_alarm)

def _disabled(name):
    def stub(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    stub.__name__ = name.rsplit(".", 1)[-1]
    return stub

os.environ.clear()  # the parent passed an empty env; drop what the interpreter added
import shutil, subprocess, socket
for mod, names in ((os, ["kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir",
                         "unlink", "rename", "renames", "replace", "truncate", "fchdir", "chdir", "chroot",
                         "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "fchmod", "fchown",
                         "chmod", "chown", "lchown", "lchmod", "lchflags", "chflags", "link", "symlink",
                         "fork", "forkpty", "vfork", "execv", "execve", "execvp", "execvpe", "execl", "execle",
                         "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
                         "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "popen",
                         "setsid", "setpgid", "nice", "plock", "mkfifo", "mknod"]),
                   (shutil, ["rmtree", "move", "chown", "copyfile", "copy", "copy2", "copytree"]),
                   (subprocess, ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"]),
                   (socket, ["socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"])):
    for name in names:
        if hasattr(mod, name):
            setattr(mod, name, _disabled(f"{mod.__name__}.{name}"))
builtins.help = _disabled("help")
for mod in ["ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "resource", "psutil",
            "ipdb", "joblib", "tkinter", "pty", "_socket", "ssl", "urllib.request", "http.client"]:
    sys.modules[mod] = None  # `import x` now raises ImportError

_real_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, int):
        return _real_open(file, mode, *args, **kwargs)
    path = os.path.realpath(os.fspath(file))
    if path.startswith(("/proc", "/sys")):
        raise PermissionError(f"reading {path} is disabled in the sandbox")
    if any(c in mode for c in "wax+") and not (path == scratch or path.startswith(scratch + os.sep)):
        raise PermissionError(f"writing outside the scratch dir ({path}) is disabled in the sandbox")
    return _real_open(file, mode, *args, **kwargs)
builtins.open = _guarded_open
io.open = _guarded_open

class _Capped(io.StringIO):
    def write(self, s):
        super().write(s[:max(0, cfg["max_capture"] - self.tell())])
        return len(s)

out, err = _Capped(), _Capped()
real_stdout = sys.stdout
report = {"success": False, "error": None, "timeout": False, "memory_exceeded": False}
sys.stdout, sys.stderr = out, err
signal.setitimer(signal.ITIMER_REAL, cfg["timeout"])
try:
    try:
        exec(compile(cfg["code"], "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr = real_stdout, sys.__stderr__
    report["success"] = True
except TimeoutException:
    report.update(timeout=True, error="TimeoutException: timed out")
except MemoryError as e:
    report.update(memory_exceeded=True, error="MemoryError: " + str(e))
except BaseException as e:
    report["error"] = f"{type(e).__name__}: {e}"
report.update(stdout=out.getvalue(), stderr=err.getvalue())
real_stdout.write(cfg["mark"] + json.dumps(report) + "\n")
real_stdout.flush()
os._exit(0)
'''


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int | None = 256 * 1024 * 1024) -> ExecutionResult:
    """Run `code` in a sandboxed, fresh Python process; never raises for anything the code does.

    timeout: wall-clock seconds for the program itself (interpreter start-up not counted).
    max_memory_bytes: address-space limit of the child (None = no limit).
    """
    if timeout <= 0:
        raise ValueError(f"execute_code(timeout={timeout}): the timeout must be positive seconds")
    payload = json.dumps({"code": code, "timeout": float(timeout), "max_memory_bytes": max_memory_bytes,
                          "mark": _REPORT_MARK, "max_capture": _MAX_CAPTURE, "max_file_bytes": _MAX_FILE_BYTES})
    timed_out = False
    # the program's cwd is a scratch dir; its output goes to unnamed files outside it (read back capped)
    with tempfile.TemporaryDirectory(prefix="nanochat_sandbox_", ignore_cleanup_errors=True) as scratch, \
            tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        # -I: isolated mode (no user site, PYTHON* env vars ignored, cwd not on sys.path)
        with subprocess.Popen([sys.executable, "-I", "-c", _RUNNER], stdin=subprocess.PIPE, stdout=fout, stderr=ferr,
                              cwd=scratch, env={}, start_new_session=True, close_fds=True) as proc:
            # the child's own timer fires at `timeout`; the slack covers interpreter start-up
            # and code stuck in C (where Python signal handlers cannot run)
            try:
                proc.communicate(payload.encode("utf-8"), timeout=timeout + 5.0)  # a child gone early: no error
            except subprocess.TimeoutExpired:
                timed_out = True
            with contextlib.suppress(OSError):  # the group: also reaps anything the program left behind
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                proc.kill()
        raw_out, raw_err = (os.pread(f.fileno(), _MAX_FILE_BYTES, 0).decode("utf-8", "replace") for f in (fout, ferr))

    if timed_out:
        return ExecutionResult(False, error="TimeoutException: killed after the time limit", timeout=True)
    if (idx := raw_out.rfind(_REPORT_MARK)) < 0:
        # died without a report: killed by a signal (RLIMIT_CPU → SIGXCPU/SIGKILL, OOM) or os._exit
        sig = -proc.returncode if proc.returncode < 0 else None
        timeout_hit = sig in (signal.SIGXCPU, signal.SIGKILL)
        mem = "MemoryError" in raw_err or "Cannot allocate memory" in raw_err
        error = f"process exited with code {proc.returncode}" + (f" (signal {signal.Signals(sig).name})" if sig else "")
        return ExecutionResult(False, stdout=raw_out[:_MAX_CAPTURE], stderr=raw_err[-_MAX_CAPTURE:],
                               error=error, timeout=timeout_hit and not mem, memory_exceeded=mem)
    try:
        report = json.loads(raw_out[idx + len(_REPORT_MARK):].splitlines()[0])
    except (ValueError, IndexError):
        return ExecutionResult(False, stderr=raw_err[-_MAX_CAPTURE:], error="unreadable sandbox report")
    return ExecutionResult(**{f.name: report[f.name] for f in dataclasses.fields(ExecutionResult)})


# ----------------------------------------------------------------------------- calculator

_ARITH_CHARS = set("0123456789*+-/.() ")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPR_CHARS = 256
_MAX_ABS = 10 ** 30  # bigger intermediate numbers mean nonsense, refuse them


def _eval_node(node: ast.AST, deadline: float):
    """The value of an arithmetic / str.count expression; ValueError for anything else."""
    if time.monotonic() > deadline:
        raise ValueError("timeout")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, (ast.BinOp, ast.UnaryOp)) and type(node.op) in _OPS:
        operands = (node.left, node.right) if isinstance(node, ast.BinOp) else (node.operand,)
        args = [_eval_node(n, deadline) for n in operands]
        if not all(isinstance(v, (int, float)) for v in args):
            raise ValueError("arithmetic on non-numbers")
        value = _OPS[type(node.op)](*args)
        if isinstance(value, float) and not math.isfinite(value) or abs(value) > _MAX_ABS:
            raise ValueError("number too large")
        return value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        s, sub = _eval_node(node.func.value, deadline), _eval_node(node.args[0], deadline)
        if isinstance(s, str) and isinstance(sub, str):
            return s.count(sub)
    raise ValueError(f"not allowed: {type(node).__name__}")


def use_calculator(expr: str, timeout: float = 1.0) -> str | None:
    """Evaluate a tool call: plain arithmetic (+ - * / // %, parentheses) or `'text'.count('x')`.

    Returns the result as text, or None for anything else (names, calls, powers, errors).
    """
    expr = expr.strip()
    if not expr or len(expr) > _MAX_EXPR_CHARS:
        return None
    if set(expr.replace(",", "")) <= _ARITH_CHARS:
        expr = expr.replace(",", "")  # thousands separators as in "1,200*3"
    try:
        value = _eval_node(ast.parse(expr, mode="eval").body, time.monotonic() + timeout)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):  # ValueError: refused
        return None
    if isinstance(value, float):  # like the annotated data: 4 not 4.0, and no float noise (0.1+0.2 → 0.3)
        return str(int(value)) if value.is_integer() else repr(round(value, 10))
    return None if isinstance(value, str) else str(value)  # a bare string is not a computation
