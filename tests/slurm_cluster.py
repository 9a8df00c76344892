"""Helpers for tests that run against the real single-node Slurm cluster of `.ci/slurm_up.sh`.

    reason = ensure_slurm()
    if reason: pytest.skip(reason)
    job_id = sbatch("--wrap", "echo hi", "-o", str(tmp_path / "%j.out"))
    assert wait_job(job_id) == "COMPLETED"

Job state: `.ci/slurm_up.sh` sets up accounting (slurmdbd + MariaDB) by default, so `sacct`
works and submitit sees real states. With SLURM_UP_ACCOUNTING=0 there is no `sacct`; these
helpers never use it: they read `scontrol show job`, which keeps finished jobs for
MinJobAge=3600 s. (Without sacct submitit logs "Bypassing sacct error", sees every job as
UNKNOWN and only knows a job is done from its result pickle, so a job killed before writing it
would make `job.result()` wait forever; `wait_submitit` also watches Slurm's state.)
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
SLURM_UP = REPO / ".ci" / "slurm_up.sh"
PARTITION = os.environ.get("NANOCHAT_SLURM_PARTITION", "debug")

# JobState values after which a job will not run again by itself
# (REQUEUED / PENDING / RUNNING / COMPLETING / SUSPENDED are not terminal).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT",
})
READY_NODE_STATES = ("idle", "mixed", "allocated", "completing")


def _run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def cluster_ready() -> bool:
    """True when `sinfo` answers and at least one node of our partition can take jobs."""
    if shutil.which("sinfo") is None:
        return False
    try:
        out = _run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], timeout=15)
    except subprocess.TimeoutExpired:
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s.rstrip("*~#") in READY_NODE_STATES for s in states)


@functools.lru_cache(maxsize=None)
def ensure_slurm() -> Optional[str]:
    """None when a Slurm cluster is ready for jobs; else the reason to skip, for `pytest.skip`.

    When the cluster is not ready and we are root, runs `.ci/slurm_up.sh` once (installs
    Debian's slurm-wlm pieces and munge if missing, starts the daemons). Cached per process.
    Set NANOCHAT_SLURM_UP=0 to never start a cluster from the tests.
    """
    if cluster_ready():
        return None
    if os.environ.get("NANOCHAT_SLURM_UP", "1") == "0":
        return "no ready Slurm cluster and NANOCHAT_SLURM_UP=0 (run `sudo .ci/slurm_up.sh`)"
    if os.geteuid() != 0:
        return "no ready Slurm cluster (sinfo missing or no idle node) and not root: run `sudo .ci/slurm_up.sh`"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "no Slurm installed and no apt-get to install it (.ci/slurm_up.sh needs Debian/Ubuntu)"
    try:
        out = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"{SLURM_UP} timed out after 600 s"
    if out.returncode != 0 or not cluster_ready():
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-25:])
        return f"{SLURM_UP} failed (rc={out.returncode}):\n{tail}"
    return None


def sbatch(*args: str, cwd: Optional[os.PathLike] = None) -> str:
    """Submit with `sbatch --parsable ARGS...` and return the job id (e.g. "12" or "12_0")."""
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]  # "<id>[;cluster]"


def job_info(job_id: str) -> Optional[dict[str, str]]:
    """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, StdOut, ...).

    None when Slurm does not know the job (never existed, or purged after MinJobAge).
    For a job array id ("12"), returns the first element; ask for "12_1" for a specific task.
    """
    out = _run(["scontrol", "-o", "show", "job", str(job_id)])
    if out.returncode != 0 or not out.stdout.strip():
        return None
    info: dict[str, str] = {}
    # one line per job; values never contain spaces except Command/WorkDir-like paths (rare in tests)
    for token in out.stdout.splitlines()[0].split():
        key, sep, value = token.partition("=")
        if sep:
            info[key] = value
    return info


def job_state(job_id: str) -> Optional[str]:
    """Slurm's JobState of a job (PENDING, RUNNING, COMPLETED, ...), None if unknown."""
    info = job_info(job_id)
    return None if info is None else info.get("JobState")


def wait_state(job_id: str, states: Iterable[str], timeout: float = 120, poll: float = 0.5) -> str:
    """Poll until the job's state is one of `states`; return it. TimeoutError with the job info otherwise."""
    wanted = set(states)
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in wanted:
            return state
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout:.0f}s: {job_info(job_id)}")


def wait_job(job_id: str, timeout: float = 120, poll: float = 0.5) -> str:
    """Wait until the job reaches a terminal state (COMPLETED, FAILED, ...) and return it."""
    return wait_state(job_id, TERMINAL_STATES, timeout=timeout, poll=poll)


def requeue(job_id: str) -> None:
    """`scontrol requeue ID`: SIGCONT+SIGTERM to every process of the job, SIGKILL after
    KillWait (10 s), then PENDING until cred_expire (10 s) passes; same job id, Restarts+1."""
    out = _run(["scontrol", "requeue", str(job_id)])
    if out.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {out.stderr.strip()}")


def signal_job(job_id: str, sig: str = "USR2") -> None:
    """`scancel --signal=SIG ID`: delivers SIG to every process of every step (proctrack follows
    children, also ones in a new session), not to the batch shell itself."""
    out = _run(["scancel", f"--signal={sig}", str(job_id)])
    if out.returncode != 0:
        raise RuntimeError(f"scancel --signal={sig} {job_id} failed: {out.stderr.strip()}")


def cancel(job_id: str) -> None:
    """Cancel a job, ignoring jobs that already finished."""
    _run(["scancel", str(job_id)])


def wait_submitit(job: Any, timeout: float = 180, poll: float = 0.5) -> Any:
    """`job.result()` for a submitit job, but never hangs on a job that died without a result.

    Done when the result pickle exists (then returns `job.result()`, which re-raises a job's
    exception), or when Slurm says the job reached a terminal state without one (RuntimeError
    with the job's stderr tail). TimeoutError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.paths.result_pickle.exists():
            return job.result()
        state = job_state(job.job_id)
        if state in TERMINAL_STATES:
            time.sleep(1)  # the pickle is written just before the process exits; let it land
            if job.paths.result_pickle.exists():
                return job.result()
            err = job.stderr() or ""
            raise RuntimeError(f"submitit job {job.job_id} ended {state} without a result:\n{err[-3000:]}")
        time.sleep(poll)
    raise TimeoutError(f"submitit job {job.job_id} not done after {timeout:.0f}s: {job_info(job.job_id)}")
