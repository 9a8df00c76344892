"""One writer per run dir: the launcher's exclusive lock, and the workers' shared one.

Two lock files live in the run dir (never replaced or deleted, because a lock belongs to the
file's inode, and renaming a new file over it would hand out a second lock):

  run.lock                exclusive flock held by the launcher (nanochat-run, nanochat-reproduce,
                          a sweep job) for as long as it runs the stage; `run.lock.json` next to it
                          says who holds it (pid, host, start time, argv) and carries a heartbeat.
  writers.<host>.lock     shared flock held by every process that runs a stage (each rank). A new
                          launcher takes it exclusively for a moment before it dispatches: if the
                          workers of an earlier launch are still alive, it waits a little for them
                          to die (they are being SIGKILLed with their launcher) and else refuses.

flock dies with its holder, so a lock left by a killed process never blocks anyone.

Shared filesystems: flock over NFS/Lustre may be emulated, local-only, or lie. The rule is that a
lock held on *this* host is trusted (flock is reliable locally), and a holder on *another* host is
trusted only while its heartbeat is fresh (younger than `stale_s`). A requeued Slurm job may land
on another node; a record carrying the same SLURM_JOB_ID is its own earlier attempt and is ignored.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional

from nanochat.common import atomic_write_json, read_json
from nanochat.config import ConfigError

LOCK_NAME = "run.lock"
HOLDER_NAME = "run.lock.json"
HEARTBEAT_S = 30.0
STALE_S = 120.0          # a foreign holder's heartbeat older than this is a dead holder
WAIT_WRITERS_S = 20.0    # how long a new launcher waits for an earlier launch's workers to die


class RunDirBusy(ConfigError):
    """Another live process owns the run dir. A ConfigError so every CLI reports it the same way."""


def writers_lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / f"writers.{socket.gethostname()}.lock"


def _flock(path: Path, mode: int, wait_s: float = 0.0, poll_s: float = 0.1) -> Optional[int]:
    """Open `path` and flock it, trying every `poll_s` for up to `wait_s`; the fd on success, None if held."""
    deadline = time.time() + wait_s
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return fd
        except (BlockingIOError, PermissionError):  # EWOULDBLOCK / EAGAIN / EACCES: held by another
            if time.time() >= deadline:
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            raise
        time.sleep(poll_s)


def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on `path`, from /proc/locks (Linux; [] where unknown)."""
    try:
        ino = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = set()
    for f in map(str.split, lines):
        with suppress(IndexError, ValueError):  # "->" marks a waiter, not a holder
            if f[1] == "FLOCK" and "->" not in f and int(f[5].split(":")[-1]) == ino:
                pids.add(int(f[4]))
    return sorted(pids)


def read_holder(run_dir: Path) -> dict:
    with suppress(OSError, ValueError):
        return read_json(Path(run_dir) / HOLDER_NAME)
    return {}


def describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (no run.lock.json yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    argv = " ".join(holder.get("argv", []))[:200]
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({argv})"


class RunLock:
    """The launcher's exclusive hold on a run dir; use as `with RunLock(d).acquire(): ...`."""

    def __init__(self, run_dir: str | Path, stale_s: float = STALE_S, wait_writers_s: float = WAIT_WRITERS_S):
        self.run_dir = Path(run_dir)
        self.stale_s, self.wait_writers_s = stale_s, wait_writers_s
        self._fd: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.record: dict = {}

    def _busy(self, problem: str, fix: str) -> RunDirBusy:
        return RunDirBusy("run.dir", str(self.run_dir), fix, problem)

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if (fd := _flock(self.run_dir / LOCK_NAME, fcntl.LOCK_EX)) is None:
            for _ in range(10):  # the holder writes its record right after taking the lock
                if holder := read_holder(self.run_dir):
                    break
                time.sleep(0.1)
            raise self._busy(f"the run dir is in use by {describe(holder)}", f"wait for that run to finish, stop it "
                             f"(kill -INT {holder.get('pid', '<pid>')}), or use another run.dir")
        try:
            self._check_foreign_holder()
            self._check_no_writers()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "heartbeat": time.time(), "argv": list(sys.argv), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        atomic_write_json(self.run_dir / HOLDER_NAME, self.record)
        self._thread = threading.Thread(target=self._beat, name="nanochat-runlock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _check_foreign_holder(self) -> None:
        old = read_holder(self.run_dir)
        if not old or old.get("host") == socket.gethostname():
            return  # none, or ours: flock on this host is authoritative, so that holder is dead
        job = os.environ.get("SLURM_JOB_ID")
        if job and old.get("slurm_job_id") == job:
            return  # an earlier attempt of this same (requeued) Slurm job
        age = time.time() - float(old.get("heartbeat", 0))
        if age < self.stale_s:
            raise self._busy(f"the run dir is held by {describe(old)}, whose heartbeat is {age:.0f}s old; a lock on "
                             f"a shared filesystem may not be visible across hosts, so a fresh heartbeat counts as live",
                             f"wait for that run to finish; if it is dead, retry once its heartbeat is older than "
                             f"{self.stale_s:.0f}s (or delete {self.run_dir / HOLDER_NAME})")

    def _check_no_writers(self) -> None:
        path = writers_lock_path(self.run_dir)
        if (fd := _flock(path, fcntl.LOCK_EX, self.wait_writers_s, poll_s=0.2)) is not None:
            os.close(fd)  # nobody writes: the workers we start take it shared
            return
        pids = lock_holders(path) or ["<unknown>"]
        raise self._busy(f"processes of an earlier launch are still writing to it (pids {', '.join(map(str, pids))})",
                         f"stop them (kill {' '.join(map(str, pids))}) and launch again")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with suppress(OSError):  # a full disk must not kill the run; the flock still holds
                atomic_write_json(self.run_dir / HOLDER_NAME, {**self.record, "heartbeat": time.time()})

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            with suppress(OSError):
                (self.run_dir / HOLDER_NAME).unlink()
            os.close(self._fd)  # closing the last fd drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def writer_lock(run_dir: str | Path, wait_s: float = 30.0) -> Iterator[None]:
    """A stage process's shared hold on writers.<host>.lock, for as long as it runs."""
    path = writers_lock_path(Path(run_dir))
    if (fd := _flock(path, fcntl.LOCK_SH, wait_s)) is None:  # a launcher checks for a moment
        raise RuntimeError(f"{path}: held exclusively for {wait_s:.0f}s by pids {lock_holders(path)}; another "
                           f"launcher is checking this run dir")
    try:
        yield
    finally:
        os.close(fd)


def lock_run_dir(run_dir: str | Path, nnodes: int = 1) -> Optional[RunLock]:
    """The launcher's lock on `run_dir`, or None on the non-first nodes of a multi-node job
    (the job's first node owns the dir; the others must not be refused by it)."""
    if nnodes > 1 and int(os.environ.get("SLURM_NODEID", "0") or 0) > 0:
        return None
    return RunLock(run_dir).acquire()
