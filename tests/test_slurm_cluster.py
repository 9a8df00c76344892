"""The local Slurm cluster (.ci/slurm_up.sh) works for what the launcher needs: sbatch, submitit
jobs that return values, job state via scontrol, and preemption → requeue → resume.

Skips (with the reason) when no cluster can be brought up: not root, or no Debian packages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import (
    PARTITION, REPO, cancel, ensure_slurm, job_info, requeue, sbatch, signal_job, wait_job,
    wait_state, wait_submitit,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

# The job side unpickles the submitted callables. This module is imported by pytest as a
# top-level module from tests/, which is not on sys.path in the job, so pickle it by value.
cloudpickle = pytest.importorskip("cloudpickle")
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)


def _executor(folder: Path, **params):
    submitit = pytest.importorskip("submitit")
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"timeout_min": 10, **params}
    ex.update_parameters(slurm_partition=PARTITION, cpus_per_task=1, tasks_per_node=1, nodes=1, **params)
    return ex


def test_sbatch_wrap_runs_and_completes(tmp_path):
    out = tmp_path / "%j.out"
    job_id = sbatch("-p", PARTITION, "-o", str(out), "--wrap",
                    "echo job=$SLURM_JOB_ID restarts=${SLURM_RESTART_COUNT:-0} cpus=$SLURM_CPUS_ON_NODE")
    assert wait_job(job_id, timeout=60) == "COMPLETED"
    text = (tmp_path / f"{job_id}.out").read_text()
    assert f"job={job_id} restarts=0" in text
    info = job_info(job_id)
    assert info["ExitCode"] == "0:0" and info["Partition"] == PARTITION


def test_sbatch_failure_is_reported(tmp_path):
    job_id = sbatch("-p", PARTITION, "-o", str(tmp_path / "%j.out"), "--wrap", "exit 3")
    assert wait_job(job_id, timeout=60) == "FAILED"
    assert job_info(job_id)["ExitCode"] == "3:0"


def _square_on_node(x: int) -> dict:
    import socket
    import submitit
    env = submitit.JobEnvironment()
    return {"value": x * x, "job_id": env.job_id, "python": sys.executable,
            "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID")}


def test_submitit_function_returns_value(tmp_path):
    ex = _executor(tmp_path / "submitit")
    job = ex.submit(_square_on_node, 7)
    res = wait_submitit(job, timeout=120)
    assert res["value"] == 49
    assert res["slurm_job"] == job.job_id == res["job_id"]
    # submitit runs the job with the submitting interpreter (the venv's python), via srun
    assert res["python"] == sys.executable
    # the result pickle lands just before the process exits: Slurm may still say RUNNING/COMPLETING
    assert wait_job(job.job_id, timeout=60) == "COMPLETED"


def test_submitit_job_array_runs_every_task(tmp_path):
    """hydra-submitit submits a sweep as one job array (`map_array`), one task per sweep job."""
    ex = _executor(tmp_path / "submitit")
    jobs = ex.map_array(_square_on_node, [2, 3])
    assert [wait_submitit(j, timeout=180)["value"] for j in jobs] == [4, 9]
    assert all("_" in j.job_id for j in jobs)  # "<array>_<task>"


def _sleep_on_node(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def _accounting_works() -> bool:
    out = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0


def test_submitit_sees_a_cancelled_job_through_sacct(tmp_path):
    """With accounting, submitit's own wait (what the Hydra launcher calls) ends with an error
    for a job killed before it wrote a result, instead of waiting forever."""
    if not _accounting_works():
        pytest.skip("no accounting (SLURM_UP_ACCOUNTING=0): submitit cannot see job states")
    import concurrent.futures
    import submitit
    ex = _executor(tmp_path / "submitit")
    job = ex.submit(_sleep_on_node, 300)
    wait_state(job.job_id, {"RUNNING"}, timeout=60)
    cancel(job.job_id)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(job.result)
        with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
            fut.result(timeout=120)
    assert job.state.startswith("CANCELLED")


class CountToN:
    """A Checkpointable job that counts to `n`, one step per `step_s`, saving its progress
    to a file after every step (as a training loop saves checkpoints). Records every start."""

    def __init__(self, n: int, state_file: str, step_s: float = 0.5):
        self.n, self.state_file, self.step_s = n, state_file, step_s

    def __call__(self) -> dict:
        import json
        path = Path(self.state_file)
        state = json.loads(path.read_text()) if path.exists() else {"i": 0, "starts": []}
        state["starts"].append({"i": state["i"], "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
                                "t": time.time()})
        path.write_text(json.dumps(state))
        while state["i"] < self.n:
            time.sleep(self.step_s)
            state["i"] += 1
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(path)  # atomic, so a SIGKILL never leaves a half-written state
        return state

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _checkpointable(n, state_file, step_s):
    submitit = pytest.importorskip("submitit")

    class Job(CountToN, submitit.helpers.Checkpointable):
        pass
    return Job(n, state_file, step_s)


def _wait_progress(state_file: Path, at_least: int, timeout: float = 90) -> None:
    import json
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(state_file.read_text())["i"] >= at_least:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{state_file} did not reach i={at_least} in {timeout}s")


@pytest.mark.slow
def test_submitit_usr2_preemption_checkpoints_and_requeues(tmp_path):
    """SIGUSR2 (what `--signal=USR2@T` sends before the time limit, and what preemption tools
    send) makes submitit call `checkpoint()` and `scontrol requeue` itself; the job restarts in
    the same job id and finishes from its saved progress."""
    state_file = tmp_path / "count.json"
    # timeout_min=30: submitit calls a USR2 "timed-out" (and spends one of max_num_timeout
    # requeues) once the job ran min(0.8*timeout, timeout-10min); with timeout_min<=10 that is
    # always, so a short timeout would turn every preemption into a timeout.
    ex = _executor(tmp_path / "submitit", slurm_signal_delay_s=60, timeout_min=30)
    job = ex.submit(_checkpointable(30, str(state_file), 0.3))
    _wait_progress(state_file, 4)
    t0 = time.monotonic()
    signal_job(job.job_id, "USR2")
    res = wait_submitit(job, timeout=180)
    elapsed = time.monotonic() - t0
    assert res["i"] == 30
    starts = res["starts"]
    assert len(starts) == 2, starts                # ran twice: before and after the requeue
    assert starts[1]["i"] >= 4                     # resumed from saved progress, not from 0
    assert starts[1]["restart"] == "1"
    assert int(job_info(job.job_id)["Restarts"]) == 1
    log = job.stderr() or ""
    assert "Caught signal SIGUSR2" in log and "preempted" in log, log[-2000:]
    print(f"USR2 -> requeued -> completed in {elapsed:.1f}s")


@pytest.mark.slow
def test_scontrol_requeue_restarts_submitit_job(tmp_path):
    """`scontrol requeue` (what preemption with PreemptMode=REQUEUE does): SIGTERM (which
    submitit logs and ignores) then SIGKILL after KillWait; the job restarts from the pickle
    as submitted and resumes from the progress it saved itself."""
    state_file = tmp_path / "count.json"
    ex = _executor(tmp_path / "submitit")
    # 60 steps × 0.3 s outlast KillWait (10 s): the first run must die by SIGKILL, not finish
    job = ex.submit(_checkpointable(60, str(state_file), 0.3))
    _wait_progress(state_file, 4)
    t0 = time.monotonic()
    requeue(job.job_id)
    wait_state(job.job_id, {"PENDING", "REQUEUED"}, timeout=60)
    res = wait_submitit(job, timeout=180)
    elapsed = time.monotonic() - t0
    assert res["i"] == 60
    assert len(res["starts"]) == 2 and res["starts"][1]["i"] >= 4
    assert int(job_info(job.job_id)["Restarts"]) == 1
    assert "Bypassing signal SIGTERM" in (job.stderr() or "")
    print(f"scontrol requeue -> completed in {elapsed:.1f}s")


# ----------------------------------------------------------------------------------------------
# conf/hydra/launcher/slurm.yaml through hydra-submitit-launcher, with a throwaway Hydra app
# (the real launch/run.py sweep is tested by the launch tests).

_APP = '''
import json, os, sys, time
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    state_p = out / "state.json"
    state = json.loads(state_p.read_text()) if state_p.exists() else {"i": 0, "starts": []}
    state["starts"].append({"i": state["i"], "restart": os.environ.get("SLURM_RESTART_COUNT", "0")})
    state_p.write_text(json.dumps(state))
    while state["i"] < cfg.steps:
        time.sleep(cfg.step_s)
        state["i"] += 1
        tmp = state_p.with_suffix(".tmp"); tmp.write_text(json.dumps(state)); tmp.replace(state_p)
    res = {"x": cfg.x, "sq": cfg.x ** 2, "python": sys.executable, "hydra_job_id": HydraConfig.get().job.id,
           "slurm_job": os.environ.get("SLURM_JOB_ID"), "rdzv": os.environ.get("NANOCHAT_RDZV_HOST"),
           "starts": state["starts"]}
    (out / "result.json").write_text(json.dumps(res))
    return res

if __name__ == "__main__":
    main()
'''

_APP_CONF = '''
defaults:
  - _self_
hardware: {{nproc_per_node: 1, nnodes: 1, gpus_per_node: null, device: cpu}}
stage: {{name: slurmtest}}
x: 1
steps: 0
step_s: 0.3
hydra:
  searchpath: [file://{conf}]
  job: {{chdir: false}}
  sweep: {{dir: {sweep}, subdir: "x${{x}}"}}
'''


def _hydra_app(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "conf").mkdir()
    (tmp_path / "app.py").write_text(_APP)
    sweep = tmp_path / "sweep"
    (tmp_path / "conf" / "config.yaml").write_text(_APP_CONF.format(conf=REPO / "conf", sweep=sweep))
    return tmp_path / "app.py", sweep


def _run_app(app: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_SLURM_PARTITION": PARTITION}
    return subprocess.run([sys.executable, str(app), "-m", "hydra/launcher=slurm", *overrides],
                          capture_output=True, text=True, timeout=timeout, cwd=app.parent, env=env)


def test_launcher_yaml_composes_and_submits(tmp_path):
    app, sweep = _hydra_app(tmp_path)
    cfg = subprocess.run([sys.executable, str(app), "hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert cfg.returncode == 0, cfg.stderr
    assert "submitit_launcher.SlurmLauncher" in cfg.stdout and "tasks_per_node: 1" in cfg.stdout


def test_launcher_yaml_two_job_sweep_runs_on_slurm(tmp_path):
    app, sweep = _hydra_app(tmp_path)
    out = _run_app(app, "x=2,3")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = {d.name: json.loads((d / "result.json").read_text()) for d in sorted(sweep.glob("x*"))}
    assert sorted(results) == ["x2", "x3"]
    assert [r["sq"] for r in results.values()] == [4, 9]
    for r in results.values():
        assert r["python"] == sys.executable             # the submitting interpreter ran the job
        assert r["hydra_job_id"].split("_")[0].isdigit()  # "<array>_<index>": one job array
        assert r["rdzv"]                                 # the setup lines ran in the sbatch script
    # submitit's files (script, pickles, logs) live in the sweep dir
    scripts = list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert scripts, list(sweep.rglob("*"))
    script = scripts[0].read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "gpus-per-node" not in script
    assert f"#SBATCH --partition={PARTITION}" in script and "#SBATCH --requeue" in script


@pytest.mark.slow
def test_launcher_usr2_requeues_into_the_same_sweep_dir(tmp_path):
    app, sweep = _hydra_app(tmp_path)
    proc = subprocess.Popen([sys.executable, str(app), "-m", "hydra/launcher=slurm", "x=5", "steps=60",
                             "hydra.launcher.timeout_min=30"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_progress(sweep / "x5" / "state.json", 5)
        # .submitit/<id>/ (a 1-job sweep is a plain job, not an array)
        job_id = next(d.name for d in (sweep / ".submitit").iterdir() if d.name.isdigit())
        signal_job(job_id, "USR2")
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
        for d in (sweep / ".submitit").glob("[0-9]*"):
            cancel(d.name)  # no-op when finished; never leave a job behind on failure
    assert proc.returncode == 0, out[-3000:]
    res = json.loads((sweep / "x5" / "result.json").read_text())
    assert len(res["starts"]) == 2 and res["starts"][1]["i"] >= 5 and res["starts"][1]["restart"] == "1"
