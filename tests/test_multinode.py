"""Multi-node training proven on one machine.

Without Slurm: two launcher processes on loopback as node 0 and node 1 (hardware.nnodes=2,
hardware.node_rank, hardware.rdzv_endpoint). Through Slurm: the two-node cluster of
`.ci/slurm_2node.sh`, whose slurmds live in their own network namespaces, so the rendezvous and
gloo traffic cross a (virtual) network. Every 2-node × 1-process curve must equal the same global
batch run on one node with 2 processes.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, losses, preemption_checkpoint_step, run_cli

# depth 2, 2 ranks × 8 rows × 128 tokens = one 2048-token global batch per step
COMMON = [*TINY, "model.depth=2", "stage.total_batch_size=2048", "stage.eval_every=-1", "hardware.num_threads=1"]
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(base_dir: Path, extra: dict | None = None) -> dict:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return {**env, **(extra or {})}


def _assert_same_curve(got: dict, want: dict, n: int) -> None:
    assert sorted(got) == list(range(1, n + 1)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), f"step {step}: {got[step]} vs {want[step]}"


@pytest.fixture(scope="module")
def reference(base_dir, tmp_path_factory) -> dict[int, float]:
    """The loss curve of one node with 2 processes: what every 2-node run must reproduce."""
    d = tmp_path_factory.mktemp("one_node")
    run_cli([*COMMON, "hardware.nproc_per_node=2", f"stage.num_iterations={STEPS}", f"run.dir={d / 'run'}"],
            base_dir, d, check=True)
    return losses(d / "run")


def test_node_rank_and_endpoint(monkeypatch):
    """The rank/endpoint arithmetic every launcher does before it starts torchrun."""
    from launch.dispatch import node_rank, rdzv_endpoint, torchrun_command
    from nanochat.config import Config, ConfigError, HardwareConfig
    for k in ("SLURM_NODEID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "NANOCHAT_RDZV_HOST"):
        monkeypatch.delenv(k, raising=False)
    cfg = Config(hardware=HardwareConfig(nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:1234"))
    assert node_rank(cfg) == 1 and rdzv_endpoint(cfg) == ("10.0.0.1", 1234)
    cmd = torchrun_command(cfg, Path("/r/torchrun/node1/frozen_config.yaml"), Path("/r"))
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--master-addr=10.0.0.1",
            "--master-port=1234", "--log-dir=/r/torchrun/node1"} <= set(cmd)
    assert cmd[-2:] == ["--run-dir", "/r"]
    # under Slurm: node rank from SLURM_NODEID, head node from the launcher's setup line, a per-job port
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4321")
    monkeypatch.setenv("NANOCHAT_RDZV_HOST", "nc2n0")
    cfg = Config(hardware=HardwareConfig(nnodes=2))
    assert node_rank(cfg) == 1 and rdzv_endpoint(cfg) == ("nc2n0", 29500 + 321)
    with pytest.raises(ConfigError, match="port"):
        rdzv_endpoint(Config(hardware=HardwareConfig(nnodes=2, rdzv_endpoint="h:99999")))
    assert node_rank(Config(hardware=HardwareConfig(nnodes=1, node_rank=None))) == 0
    monkeypatch.delenv("NANOCHAT_RDZV_HOST")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "nc2n[0-1]")  # the head node then comes from the nodelist
    if shutil.which("scontrol"):
        assert rdzv_endpoint(cfg)[0] == "nc2n0"


@pytest.mark.slow
def test_two_launchers_on_loopback(base_dir, workdir, reference):
    run_dir = workdir / "run"
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "launch.run", *COMMON, f"stage.num_iterations={STEPS}", "hardware.nnodes=2",
         f"hardware.node_rank={k}", f"hardware.rdzv_endpoint=127.0.0.1:{port}", "hardware.dist_timeout_s=120",
         f"run.dir={run_dir}"], cwd=workdir, env=_env(base_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for k in (1, 0)]  # node 1 first: it must wait for node 0's store, not fail
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-4000:]
    assert "node 1: ranks exited 0 (completed)" in outs[0]
    assert (run_dir / "COMPLETED").exists()
    _assert_same_curve(losses(run_dir), reference, STEPS)
    # one writer: node 0 froze the run dir; node 1 kept only its config copy and its logs
    meta = json.loads((run_dir / "meta.json").read_text())
    assert "hardware.node_rank=0" in meta["argv"]
    assert (run_dir / "torchrun" / "node1" / "frozen_config.yaml").exists()
    for k in (0, 1):
        logs = list((run_dir / "torchrun" / f"node{k}").glob("*/attempt_0/0/stdout.log"))
        assert logs, f"node {k} kept no torchrun log"
    assert "step 00004" in "".join(l.read_text() for l in (run_dir / "torchrun" / "node0").rglob("stdout.log"))


@pytest.mark.slow
def test_multinode_without_slurm_needs_node_rank(base_dir, workdir):
    p = run_cli([*COMMON, "stage.num_iterations=1", "hardware.nnodes=2", f"run.dir={workdir / 'r'}"], base_dir, workdir)
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert "hardware.node_rank" in text and "rdzv_endpoint" in text
    p = run_cli([*COMMON, "stage.num_iterations=1", "hardware.nnodes=2", "hardware.node_rank=2"], base_dir, workdir)
    assert p.returncode != 0 and "hardware.node_rank" in p.stdout + p.stderr and "0..1" in p.stdout + p.stderr


# --------------------------------------------------------------------------- the two-node Slurm cluster

@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster; torn down after the module when this fixture built it."""
    from slurm_2node import SCRIPT, ensure_2node, nodes_ready
    was_up = nodes_ready()
    reason = ensure_2node()
    if reason:
        pytest.skip(reason)
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "--down"], capture_output=True, timeout=120)


def _launch(args: list[str], base_dir: Path, cwd: Path) -> subprocess.Popen:
    from slurm_2node import cluster_env
    return subprocess.Popen([sys.executable, "-m", "launch.run", "-m", "hydra/launcher=slurm", "hardware=2node_cpu",
                             *args], cwd=cwd, env=cluster_env(_env(base_dir)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _job_id(sweep: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        subs = list((sweep / ".submitit").glob("*/*_submitted.pkl")) if (sweep / ".submitit").exists() else []
        if subs:
            return subs[0].name.split("_")[0]
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0][-4000:])
        time.sleep(0.5)
    raise AssertionError("no job submitted")


def _wait_steps(sweep: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in sweep.glob("*/metrics.jsonl"):
            if sum('"train/loss"' in l for l in m.read_text().splitlines()) >= n:
                return m.parent
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0][-4000:])
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} steps after {timeout:.0f}s")


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in l]


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_sweep_on_slurm(cluster, base_dir, workdir, reference):
    """A 2-job depth sweep, each job spanning both namespaced nodes; depth 2 equals the 1-node curve."""
    sweep = workdir / "sweep"
    p = _launch([*COMMON, "model.depth=2,3", f"stage.num_iterations={STEPS}", f"hydra.sweep.dir={sweep}"],
                base_dir, workdir)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    with open(sweep / "summary.csv") as f:
        rows = {r["cfg.model.depth"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["2", "3"] and all(r["status"] == "completed" for r in rows.values())
    run_dir = sweep / rows["2"]["job"]
    _assert_same_curve(losses(run_dir), reference, STEPS)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["hostname"] == "nc2n0" and meta["slurm"]["SLURM_JOB_NODELIST"] == "nc2n[0-1]"
    assert len(list(sweep.glob("*/resolved_config.yaml"))) == 2  # one run dir per job, none per node
    # each node kept its own torchrun logs; node 1's rank ran in the other namespace
    for k in (0, 1):
        assert list((run_dir / "torchrun" / f"node{k}").glob("*/attempt_0/0/stdout.log")), f"no logs of node {k}"
    logs = "".join(f.read_text() for f in (sweep / ".submitit").glob("*/*_1_log.out"))
    assert "hostname=nc2n1" in logs  # task 1 ran in the other namespace: its rank reached node 0 over the veth
    assert "node 1: ranks exited 0 (completed)" in logs


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_preempted_twice_resumes(cluster, base_dir, workdir):
    """USR2 (what Slurm sends signal_delay_s before the time limit), then, once the requeued job has
    resumed and trained on, `scontrol requeue` (an admin / the scheduler): one job, three attempts,
    one clean curve in the same run dir."""
    from slurm_2node import scancel, scontrol
    sweep = workdir / "sweep"
    n = 20
    p = _launch([*COMMON, f"stage.num_iterations={n}", "stage.save_every=-1", f"hydra.sweep.dir={sweep}"],
                base_dir, workdir)
    job = _job_id(sweep, p)
    run_dir = _wait_steps(sweep, 3, p)
    scancel("--signal=USR2", job)
    first = preemption_checkpoint_step(run_dir, p)
    assert first < n - 3, f"USR2 came too late to test a second preemption (step {first} of {n})"
    _wait_steps(sweep, first + 2, p)  # the second attempt resumed and trains
    scontrol("requeue", job)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    assert (run_dir / "COMPLETED").exists()
    assert _steps(run_dir) == list(range(1, n + 1))  # one clean curve across the three attempts
    logs = "".join(f.read_text() for f in (sweep / ".submitit").glob("*/*_log.out"))
    assert "resumed from step" in logs
    assert len(list(sweep.glob("*/resolved_config.yaml"))) == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_node_death_fails_resumable(cluster, base_dir, workdir):
    """Node 1 dies mid-job (link down, then every process in it killed). Bounds: rank 0, stuck in a
    collective with a peer that sends nothing, fails after hardware.dist_timeout_s=15 and marks the
    run failed; Slurm marks the node DOWN after SlurmdTimeout=30 s (+ a 10 s ping interval) and
    ends the job NODE_FAIL. The run dir keeps its checkpoint; the same command resumes it."""
    from nanochat.lifecycle import read_status
    from slurm_2node import NODES, job_state, kill_node, netns_pids, revive_node, scancel
    sweep = workdir / "sweep"
    n = 16
    args = [*COMMON, f"stage.num_iterations={n}", "stage.save_every=5", "hardware.dist_timeout_s=15",
            f"hydra.sweep.dir={sweep}"]
    p = _launch(args, base_dir, workdir)
    job = _job_id(sweep, p)
    run_dir = _wait_steps(sweep, 7, p)  # past the step-5 checkpoint
    slurmd_pids = set(netns_pids(NODES[0]))
    kill_node(NODES[1])
    t0 = time.monotonic()
    try:
        bound = 120  # SlurmdTimeout 30 + ping interval 10 + KillWait 5, with slack for a loaded machine
        while time.monotonic() - t0 < bound:
            if job_state(job) != "RUNNING" and read_status(run_dir) == "failed":
                break
            time.sleep(1)
        took = time.monotonic() - t0
        state = job_state(job)
        status = read_status(run_dir)
        assert state != "RUNNING" and status == "failed", (state, status, took)
        print(f"node death → job {state}, run failed after {took:.0f}s")
        # nothing of the job is left hanging on the surviving node (only its slurmd)
        deadline = time.monotonic() + 30
        while set(netns_pids(NODES[0])) - slurmd_pids and time.monotonic() < deadline:
            time.sleep(1)
        assert not set(netns_pids(NODES[0])) - slurmd_pids, "job processes still alive on node 0"
        assert list((run_dir / "checkpoints").glob("step_*")), "no checkpoint to resume from"
    finally:
        scancel(job)  # Slurm requeued it (NODE_FAIL + --requeue); the resume below is ours
        p.kill()
        p.communicate()
        revive_node(NODES[1])
    p = _launch(args, base_dir, workdir)  # the same command, the same sweep dir: resumes
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    assert (run_dir / "COMPLETED").exists()
    assert _steps(run_dir) == list(range(1, n + 1))
