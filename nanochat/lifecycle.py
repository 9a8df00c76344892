"""Run lifecycle shared by the launcher and the workers: status files, preemption signals.

A run dir ends in one of three states, which the launcher reports and `run.resume` acts on:
  completed  `COMPLETED` exists (written last, after result.json)
  preempted  a SIGINT/SIGTERM/SIGUSR2 arrived; every rank checkpointed at a step boundary
  failed     anything else (the error is in status.json)
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write_json, atomic_write_text, read_json

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

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: cannot install handlers, stay passive
                pass
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


STOP = StopFlag()


def stop_requested_all_ranks(flag: StopFlag = STOP) -> bool:
    """True on every rank if any rank got a stop signal (ranks must agree on the step)."""
    local = flag.requested
    try:
        import torch.distributed as dist
    except ImportError:
        return local
    if not (dist.is_available() and dist.is_initialized()):
        return local
    import torch
    t = torch.tensor([1.0 if local else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
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
    try:
        return read_json(run_dir / "status.json").get("status", "unknown")
    except (FileNotFoundError, ValueError):
        return "unknown"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (the atomic rename guarantees a step_* dir is whole), oldest first."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(p for p in ck.iterdir() if p.is_dir() and p.name.startswith("step_"))
