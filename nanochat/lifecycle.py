"""Run lifecycle shared by the launcher and the workers: status files, preemption signals.

A run dir ends in one of three states, which the launcher reports and `run.resume` acts on:
  completed  `COMPLETED` exists (written last, after result.json)
  preempted  a SIGINT/SIGTERM/SIGUSR2 arrived; every rank checkpointed at a step boundary
  failed     anything else (the error is in status.json)
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write_json, atomic_write_text, distributed, read_json
from nanochat.tracking import Cadence, plain_line

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", what a requeue is for
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Preempted(Exception):
    """Raised by a stage after it checkpointed in response to a stop signal."""

    def __init__(self, step: int, signal_name: str = ""):
        super().__init__(f"preempted at step {step} ({signal_name})")
        self.step, self.signal_name = step, signal_name


class StopFlag:
    """Catches stop signals and remembers them, so a loop can stop at a step boundary.

    A second SIGINT while a stop is pending raises KeyboardInterrupt, so an impatient
    Ctrl-C twice still gets out of a stage that never polls the flag.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            with suppress(ValueError):  # not the main thread: cannot install handlers, stay passive
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


STOP = StopFlag()


# --------------------------------------------------------------------------- long evaluations
#
# A validation pass, CORE, ChatCORE, the chat eval stage or an lm-eval harness run can take
# minutes; Slurm kills 30 s (KillWait) after SIGTERM. So every evaluation loop calls
# `check_stop()` between batches: it raises EvalInterrupted, the training loop around it
# checkpoints at its step boundary and exits 75 (preempted, resumable), a plain eval exits 75.

class EvalInterrupted(Exception):
    """A stop signal arrived during an evaluation; raised between two of its batches."""

    def __init__(self, signal_name: str = ""):
        super().__init__(f"evaluation interrupted by {signal_name or 'a stop signal'}")
        self.signal_name = signal_name


def check_stop() -> None:
    """Call between batches of any long evaluation: raises EvalInterrupted if a stop signal arrived."""
    if STOP.signum is not None:
        raise EvalInterrupted(STOP.name)


class EvalProgress:
    """Between batches: the stop check, and every `every_s` seconds a progress line in the training
    loop's plain format (`  eval <label> 120/2376 | 45.0/s | elapsed 0m03s | eta 0m50s`)."""

    def __init__(self, label: str, total: int, log: Any = print, every_s: float = 10.0):
        self.label, self.total, self.log = label, total, log
        self.t0, self.cadence = time.time(), Cadence(every_s, first=0)

    def step(self, done: int) -> None:
        check_stop()
        if self.log is not None and 0 < done < self.total and self.cadence.due(done, self.total):
            el = time.time() - self.t0
            self.log("  " + plain_line(f"eval {self.label}", done, self.total, [f"{done / el:.1f}/s"], el, el / done))


def stop_requested_all_ranks() -> bool:
    """True on every rank if any rank got a stop signal (ranks must agree on the step)."""
    import torch
    if not (dist := distributed()):
        return STOP.signum is not None
    t = torch.tensor([float(STOP.signum is not None)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------- status files

def write_status(run_dir: str | Path, status: str, **extra: Any) -> None:
    atomic_write_json(Path(run_dir) / "status.json", {"status": status, "time": time.time(), **extra})


def mark_completed(run_dir: str | Path, result: dict) -> None:
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "result.json", result)
    write_status(run_dir, "completed")
    atomic_write_text(run_dir / "COMPLETED", time.strftime("%Y-%m-%d %H:%M:%S\n"))


def read_status(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if (run_dir / "COMPLETED").exists():
        return "completed"
    with suppress(FileNotFoundError, ValueError, AttributeError):  # none yet, torn, or not ours (not a mapping)
        return read_json(run_dir / "status.json").get("status", "unknown")
    return "unknown"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (the atomic rename guarantees a step_* dir is whole), oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())


# --------------------------------------------------------------------------- process lifetime
#
# Nothing of a run may outlive its launcher. The chain is launcher → torchrun → workers (or
# launcher → worker for a single-process subprocess). Each link asks the kernel to SIGKILL it
# when its parent dies (PR_SET_PDEATHSIG, Linux), and each worker also polls its parent: the
# death signal is only armed after fork, so a parent that died in between would go unnoticed.
# SIGKILL, not SIGTERM: a launcher that died uncleanly cannot report a graceful stop anyway, and
# checkpoints are atomic, so the next launcher resumes from the last whole one.

PR_SET_PDEATHSIG = 1
LAUNCHER_PID_ENV = "NANOCHAT_LAUNCHER_PID"   # set by launch/dispatch.py in the child's env


def die_with_parent_preexec(parent_pid: int):
    """A `preexec_fn` for Popen: the child is SIGKILLed when the forking thread's process dies.

    Resolves prctl (libc's, through the running program) before the fork, so the child does no
    loading between fork and exec. The getppid() check closes the race with a parent that died
    before prctl ran.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def guard_parent(poll_s: float = 1.0) -> bool:
    """In a worker started by the launcher (directly or via torchrun): die with the parent.

    Arms PR_SET_PDEATHSIG and starts a daemon thread that SIGKILLs this process once its
    parent changes (it was reparented, so the parent died). Returns False (and does nothing)
    when the process was not started by nanochat-run, e.g. a worker run by hand.
    """
    import threading
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None or not sys.platform.startswith("linux"):
        return False
    ppid, cmd = os.getppid(), b""
    with suppress(OSError):
        cmd = Path(f"/proc/{ppid}/cmdline").read_bytes()
    parent_is_torchrun = any(b"torch.distributed.run" in c or c.endswith(b"torchrun") for c in cmd.split(b"\0"))
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    expected = (ppid if parent_is_torchrun else -1) if under_torchrun else int(launcher)
    die_with_parent_preexec(expected)()  # arms the death signal; an orphan already (parent died before it) dies now

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != ppid:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="nanochat-parent-watchdog", daemon=True).start()
    return True


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL a process and all its descendants (torchrun puts each worker in its own session,
    so a process-group kill would miss them); waits until they are gone."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)
