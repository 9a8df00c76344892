"""Faults a run must survive: a killed launcher, two launchers, bad checkpoints, a full disk.

Every test uses real processes and real signals. The end-to-end ones are marked slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TINY, losses, read_metrics, run_cli

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
    from nanochat.runlock import RunLock, writer_lock
    kind, run_dir = sys.argv[1], sys.argv[2]
    lock = RunLock(run_dir).acquire() if kind == "launcher" else writer_lock(run_dir)
    lock.__enter__()
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


# --------------------------------------------------------------------------- end-to-end chaos
#
# Tiny real runs (experiment=tiny). Losses of a run that was killed / corrupted / starved of disk
# and then resumed must equal an uninterrupted run's: bitwise in one process, to 1e-5 with 2 ranks.

N1 = ["stage.num_iterations=6", "stage.save_every=2", "stage.keep_last=3", "stage.eval_every=-1"]
N2 = ["hardware.nproc_per_node=2", "stage.total_batch_size=2048", "stage.num_iterations=12", "stage.save_every=3",
      "stage.keep_last=2", "stage.eval_every=-1"]


@pytest.fixture(scope="module")
def ref1(base_dir, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted one-process run: (run dir, losses)."""
    d = tmp_path_factory.mktemp("ref1") / "run"
    run_cli([*TINY, *N1, f"run.dir={d}"], base_dir, d.parent, check=True)
    return d, losses(d)


@pytest.fixture(scope="module")
def ref2(base_dir, tmp_path_factory) -> dict:
    """Losses of an uninterrupted 2-rank torchrun run."""
    d = tmp_path_factory.mktemp("ref2") / "run"
    run_cli([*TINY, *N2, f"run.dir={d}"], base_dir, d.parent, check=True)
    return losses(d)


def launch(args: list[str], base_dir: Path, cwd: Path, log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    """nanochat-run as a user starts it, output to a file (a full pipe would stall it)."""
    env = {**_env(), "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "launch.run", *args], cwd=cwd, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def kill_launcher(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher only, then check that its whole tree (torchrun, workers) is gone."""
    pids = tree(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivors = wait_gone(pids, timeout=30)
    assert not survivors, f"processes outlived their SIGKILLed launcher: {survivors}"


def wait_until(cond, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def last_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir) if "train/loss" in r), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def assert_same_losses(got: dict, want: dict, tol: float) -> None:
    assert list(got) == list(want), f"steps in metrics.jsonl: {list(got)} != {list(want)}"
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=tol, abs=tol) if tol else got[s] == want[s], (s, got[s], want[s])


@pytest.mark.slow
def test_sigkill_launcher_at_random_moments_then_resume(base_dir, tmp_path, ref2):
    """(a) SIGKILL the launcher of a 2-rank torchrun run at random moments, restart with run.resume=auto
    each time: nothing survives a kill, and the finished run is the uninterrupted one."""
    import random
    seed = int(os.environ.get("NANOCHAT_CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (NANOCHAT_CHAOS_SEED to replay)")
    run_dir = tmp_path / "run"
    args = [*TINY, *N2, f"run.dir={run_dir}", "run.resume=auto"]
    n_kills = int(os.environ.get("NANOCHAT_CHAOS_KILLS", 3))  # more for a soak: NANOCHAT_CHAOS_KILLS=20
    kills = 0
    while kills < n_kills:
        log = tmp_path / f"attempt{kills}.log"
        proc = launch(args, base_dir, tmp_path, log)
        if kills in (0, n_kills - 1):  # during start-up: before or while torchrun spawns the workers
            time.sleep(rng.uniform(0.5, 6.0))
        else:  # during training, at some point after the next step (which may be a checkpoint)
            target = last_step(run_dir) + 1
            wait_until(lambda: last_step(run_dir) >= target or proc.poll() is not None, proc, log)
            time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break  # it finished before the kill
        kill_launcher(proc)
        kills += 1
    p = run_cli(args, base_dir, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (run_dir / "COMPLETED").exists()
    assert_same_losses(losses(run_dir), ref2, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["rank_files", "commit"])
def test_sigkill_inside_checkpoint_write_leaves_all_or_nothing(base_dir, tmp_path, ref2, point):
    """(b) Kill the launcher while the step-6 checkpoint is half written (one rank's files on disk, the
    other's not; or all files written but not renamed into place): step 6 is absent, step 3 whole."""
    from nanochat.integrity import verify
    run_dir = tmp_path / "run"
    args = [*TINY, *N2, f"run.dir={run_dir}"]
    log = tmp_path / "paused.log"
    proc = launch(args, base_dir, tmp_path, log, env_extra={"NANOCHAT_TEST_CKPT_PAUSE": f"{point}@6"})
    wait_until(lambda: bool(list((run_dir / "checkpoints").glob(f".paused_{point}_rank*"))), proc, log)
    kill_launcher(proc)
    ck = run_dir / "checkpoints"
    assert [p.name for p in sorted(ck.glob("step_*"))] == ["step_000003"] and verify(ck / "step_000003") == []
    p = run_cli([*args, "run.resume=must"], base_dir, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from step 3" in p.stdout
    assert_same_losses(losses(run_dir), ref2, 1e-5)
    assert not list(ck.glob(".tmp_*")) and verify(ck / "step_000012") == []


def _cut_to_unfinished(run_dir: Path) -> None:
    for name in ("COMPLETED", "result.json", "status.json"):
        (run_dir / name).unlink(missing_ok=True)


@pytest.mark.slow
def test_corrupted_newest_checkpoint_falls_back_to_previous(base_dir, tmp_path, ref1):
    """(d) A truncated newest checkpoint is reported and moved aside, the previous good one resumes
    (bitwise the same run); run.resume=must refuses instead, with the reason."""
    import shutil
    src, want = ref1
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    _cut_to_unfinished(run_dir)
    newest = run_dir / "checkpoints" / "step_000006"
    with open(newest / "model.pt", "r+b") as f:
        f.truncate(1000)
    p = run_cli([*TINY, *N1, f"run.dir={run_dir}", "run.resume=must"], base_dir, tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "run.resume" in out and "model.pt has 1000 bytes" in out, out[-3000:]
    assert newest.is_dir() and "Traceback" not in out  # refused before anything changed
    p = run_cli([*TINY, *N1, f"run.dir={run_dir}", "run.resume=auto"], base_dir, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "step_000006 failed verification" in p.stderr and "resumed from step 4" in p.stdout
    assert (run_dir / "checkpoints" / "corrupt_step_000006").is_dir()
    assert_same_losses(losses(run_dir), want, 0)


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(path)], check=True)
    return ok


@pytest.mark.slow
def test_full_disk_during_checkpoint_keeps_previous_and_resumes(base_dir, tmp_path, ref1):
    """(c) A real full disk (a small tmpfs): a clear error, the previous checkpoint intact, no temp dir
    left, and after space is freed the run resumes to the same result."""
    from nanochat.integrity import verify
    mnt = tmp_path / "disk"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root and mount(2) to make a small tmpfs (a real full disk)")
    src, want = ref1
    ckpt_bytes = sum(f.stat().st_size for f in (src / "checkpoints" / "step_000002").iterdir())
    size_kb = int(ckpt_bytes * 1.5) // 1024  # room for one checkpoint, not for the next one
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], check=True)
    try:
        run_dir = mnt / "run"
        args = [*TINY, *N1, "stage.keep_last=1", f"run.dir={run_dir}"]
        p = run_cli(args, base_dir, tmp_path)
        assert p.returncode != 0
        status = json.loads((run_dir / "status.json").read_text())
        assert "CheckpointWriteError" in status["error"] and "disk is full" in status["error"], status
        assert "step_000002 is intact" in status["error"] and "run.resume=auto" in status["error"]
        ck = run_dir / "checkpoints"
        assert [c.name for c in ck.iterdir()] == ["step_000002"] and verify(ck / "step_000002") == []
        subprocess.run(["mount", "-o", f"remount,size={size_kb * 4}k", str(mnt)], check=True)
        p = run_cli([*args, "run.resume=auto"], base_dir, tmp_path)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "resumed from step 2" in p.stdout
        assert_same_losses(losses(run_dir), want, 0)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_two_launchers_on_one_run_dir_only_one_trains(base_dir, tmp_path, ref1):
    """(e) Two nanochat-run started at once on the same run.dir: one trains, the other is refused
    naming the holder, and the run is exactly the uninterrupted one."""
    _, want = ref1
    run_dir = tmp_path / "run"
    args = [*TINY, *N1, f"run.dir={run_dir}"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [launch(args, base_dir, tmp_path, log) for log in logs]
    rcs = [p.wait(timeout=900) for p in procs]
    outs = [log.read_text() for log in logs]
    refused = [i for i, o in enumerate(outs) if "the run dir is in use by pid" in o]
    assert len(refused) == 1, outs
    winner = 1 - refused[0]
    assert rcs[winner] == 0 and rcs[refused[0]] != 0, (rcs, outs)
    assert f"pid {procs[winner].pid}" in outs[refused[0]] and "run.dir" in outs[refused[0]]
    assert_same_losses(losses(run_dir), want, 0)


# --------------------------------------------------------------------------- 3. checkpoint integrity (unit)

def test_manifest_catches_truncated_altered_and_missing_files(tmp_path):
    import torch
    from nanochat.checkpoint import save_checkpoint
    from nanochat.integrity import verify
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, loader_state={"pos": 3}, meta={})
    assert verify(ck) == [] and not list((tmp_path / "checkpoints").glob(".tmp_*"))
    manifest = json.loads((ck / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "meta.json", "optim_rank0.pt", "dataloader_rank0.json",
                                      "rng_rank0.pt"}
    data = bytearray((ck / "optim_rank0.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ck / "optim_rank0.pt").write_bytes(bytes(data))
    (ck / "model.pt").write_bytes((ck / "model.pt").read_bytes()[:100])
    (ck / "rng_rank0.pt").unlink()
    problems = " | ".join(verify(ck))
    assert "optim_rank0.pt does not match" in problems and "model.pt has 100 bytes" in problems
    assert "rng_rank0.pt is missing" in problems


def test_atomic_writes_get_the_mode_open_gives(tmp_path):
    """A checkpoint or run file written atomically (temp file, fsync, rename) is as readable as one
    open() would make under the process's umask: the temp file's 0600 must not reach a shared run dir."""
    from nanochat.common import UMASK, atomic_write_bytes, atomic_write_json
    import torch
    atomic_write_json(tmp_path / "result.json", {"a": 1})
    atomic_write_bytes(tmp_path / "model.pt", lambda f: torch.save({"w": torch.zeros(2)}, f))
    (tmp_path / "plain.txt").write_text("x")
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~UMASK
    for name in ("result.json", "model.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
