"""nanochat-run on a REAL Slurm cluster (localhost, started by .ci/slurm_up.sh): a depth sweep
through the submitit launcher, and a job that is preempted/requeued and resumes in the same dir."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, preemption_checkpoint_step
from slurm_cluster import ensure_slurm, requeue, signal_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm():
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)


def _env(base_dir: Path) -> dict:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _launch(args: list[str], base_dir: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.run", "-m", "hydra/launcher=slurm", *args], cwd=cwd,
                            env=_env(base_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_depth_sweep_on_slurm(slurm, base_dir, workdir):
    sweep = workdir / "sweep"
    p = _launch([*TINY, "model.depth=2,3", "stage.num_iterations=4", f"hydra.sweep.dir={sweep}"], base_dir, workdir)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["cfg.model.depth"] for r in rows) == ["2", "3"]
    for r in rows:
        assert r["status"] == "completed" and float(r["result.final_val_bpb"]) > 0
        meta = json.loads((sweep / r["job"] / "meta.json").read_text())
        assert meta["slurm"].get("SLURM_JOB_ID"), "meta.json must record the Slurm job id"
    assert list((sweep / ".submitit").glob("*/*_submission.sh"))


def _job_id(sweep: Path, timeout: float = 120) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        subs = list((sweep / ".submitit").glob("*/*_submitted.pkl")) if (sweep / ".submitit").exists() else []
        if subs:
            return subs[0].name.split("_")[0]
        time.sleep(0.5)
    raise AssertionError("no job submitted")


def _wait_steps(run_glob, n: int, proc, timeout: float = 300) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for m in run_glob():
            lines = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
            if sum("train/loss" in l for l in lines) >= n:
                return m.parent
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0][-4000:])
        time.sleep(0.5)
    raise AssertionError("training did not start in time")


def test_preempted_job_requeues_and_resumes_twice(slurm, base_dir, workdir):
    """USR2 (what Slurm sends before a time limit / preemption), then, once the requeued job has
    resumed and trained on, `scontrol requeue` (an admin or the scheduler): one clean curve."""
    sweep = workdir / "sweep"
    n = 40
    p = _launch([*TINY, "model.depth=2", f"stage.num_iterations={n}", "stage.eval_every=-1",
                 "stage.save_every=-1", f"hydra.sweep.dir={sweep}"], base_dir, workdir)
    job = _job_id(sweep)
    run_dir = _wait_steps(lambda: list(sweep.glob("*/metrics.jsonl")), 3, p)
    signal_job(job, "USR2")
    first = preemption_checkpoint_step(run_dir, p)
    assert first < n - 5, f"USR2 came too late to test a second preemption (step {first} of {n})"
    _wait_steps(lambda: [run_dir / "metrics.jsonl"], first + 2, p)  # the second attempt resumed and trains
    requeue(job)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
    assert (run_dir / "COMPLETED").exists()
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in l]
    assert steps == list(range(1, n + 1))  # one clean curve across the three attempts
    logs = "".join(f.read_text() for f in (sweep / ".submitit").glob("*/*_log.out"))
    assert "resumed from step" in logs
    assert len(list(run_dir.parent.glob("*/resolved_config.yaml"))) == 1  # same dir, not a new one
