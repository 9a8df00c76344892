"""Faults a run must survive: a killed launcher, two launchers, bad checkpoints, a full disk.

Every test uses real processes and real signals. The end-to-end ones are marked slow.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO

LINUX = sys.platform.startswith("linux")


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Wait until none of `pids` is alive; returns the survivors (empty on success)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pids):
            return []
        time.sleep(0.1)
    return _alive(pids)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------- 1. process lifetime

# A stand-in launcher: dispatches a child through the real launch.dispatch.run_subprocess; the
# child arms the real worker guard and forks a grandchild the way the launcher forks torchrun.
_LAUNCHER = textwrap.dedent("""
    import sys
    from launch.dispatch import clean_env, run_subprocess
    child = '''
    import subprocess, sys, time, os
    from nanochat.lifecycle import die_with_parent_preexec, guard_parent
    assert guard_parent(poll_s=0.2)
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         preexec_fn=die_with_parent_preexec(os.getpid()))
    print("PIDS", os.getpid(), g.pid, flush=True)
    time.sleep(600)
    '''
    sys.exit(run_subprocess([sys.executable, "-c", child], clean_env()))
""")


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("victim", ["launcher", "child"])
def test_nothing_outlives_a_sigkilled_parent(tmp_path, victim):
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER], cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, text=True)
    try:
        line = launcher.stdout.readline()
        assert line.startswith("PIDS"), line
        child, grandchild = map(int, line.split()[1:])
        target = launcher.pid if victim == "launcher" else child
        os.kill(target, signal.SIGKILL)
        survivors = wait_gone([child, grandchild], timeout=15)
        assert not survivors, f"still alive after SIGKILL of the {victim}: {survivors}"
    finally:
        launcher.kill()
        launcher.wait()


# --------------------------------------------------------------------------- 2. one writer per run dir

_HOLD = textwrap.dedent("""
    import sys, time
    from nanochat.runlock import RunLock, WriterLock
    kind, run_dir = sys.argv[1], sys.argv[2]
    lock = RunLock(run_dir).acquire() if kind == "launcher" else WriterLock(run_dir).__enter__()
    print("HELD", flush=True)
    time.sleep(600)
""")


def _holder(tmp_path: Path, kind: str, run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, kind, str(run_dir)], cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "HELD"
    return p


def test_run_lock_refuses_a_live_holder_and_not_a_dead_one(tmp_path):
    from nanochat.runlock import RunDirBusy, RunLock
    run_dir = tmp_path / "run"
    holder = _holder(tmp_path, "launcher", run_dir)
    try:
        with pytest.raises(RunDirBusy) as e:
            RunLock(run_dir).acquire()
        assert e.value.key == "run.dir" and f"pid {holder.pid}" in str(e.value) and "kill -INT" in e.value.fix
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_dir).acquire() as lock:  # the dead holder's lock died with it
        assert lock.record["pid"] == os.getpid()
    assert not (run_dir / "run.lock.json").exists()


def test_run_lock_waits_for_then_names_live_writers(tmp_path):
    from nanochat.runlock import RunDirBusy, RunLock
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    worker = _holder(tmp_path, "writer", run_dir)  # a worker whose launcher is gone
    try:
        with pytest.raises(RunDirBusy) as e:
            RunLock(run_dir, wait_writers_s=0.5).acquire()
        assert str(worker.pid) in e.value.problem and "still writing" in e.value.problem
    finally:
        worker.kill()
        worker.wait()
    RunLock(run_dir, wait_writers_s=0.5).acquire().release()


def test_run_lock_shared_filesystem_rule(tmp_path):
    """A holder on another host counts while its heartbeat is fresh, and never after it went stale."""
    import json
    from nanochat.runlock import HOLDER_NAME, RunDirBusy, RunLock
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"pid": 4242, "host": "elsewhere-node", "started": time.time() - 50, "argv": ["nanochat-run"]}
    (run_dir / HOLDER_NAME).write_text(json.dumps({**record, "heartbeat": time.time() - 5}))
    with pytest.raises(RunDirBusy) as e:
        RunLock(run_dir, stale_s=60).acquire()
    assert "elsewhere-node" in e.value.problem and "heartbeat" in e.value.problem
    (run_dir / HOLDER_NAME).write_text(json.dumps({**record, "heartbeat": time.time() - 120}))
    RunLock(run_dir, stale_s=60).acquire().release()
