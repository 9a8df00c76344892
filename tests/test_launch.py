"""The launch layer as a user drives it: compose, validate, dry-run, run dirs, dispatch, resume policy."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, TINY, losses, only_run_dir, read_metrics, run_cli
from launch.dispatch import clean_env
from nanochat.config import ConfigError, config_from_dict
from nanochat.plan import make_plan

CONF = str(REPO / "conf")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml") if p.stem != "base")


# --------------------------------------------------------------------------- composition

@pytest.mark.parametrize("group", ["model", "stage", "hardware", "data", "experiment", "sweep"])
def test_every_option_composes_and_validates(group):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for opt in _options(group):
            overrides = [f"{group}={opt}"]
            if group == "stage" and opt in ("mid", "sft", "rl", "eval"):
                overrides.append("stage.init_from=null")
            if group == "data" and opt == "mixture":  # the sources come from the user (null in the YAML)
                overrides.append("data.mixture={web: {name: demo, weight: 1}}")
            cfg = compose(config_name="config", overrides=overrides)
            tree = OmegaConf.to_container(cfg, resolve=True)
            tree.pop("hydra", None)
            c = config_from_dict(tree)
            if c.stage.name in ("pretrain", "mid", "sft", "rl"):
                make_plan(c)


def test_experiment_glob_multirun_dry_run(base_dir, workdir):
    p = run_cli(["-m", "experiment=glob(*)", "run.dry_run=true", f"hydra.sweep.dir={workdir}/sweep"], base_dir, workdir)
    assert p.returncode == 0, p.stdout + p.stderr
    n = len(_options("experiment"))
    assert p.stdout.count("nanochat plan") >= n


def test_sweep_job_dirs_stay_flat_with_path_overrides(base_dir, workdir):
    """A path value in an override (paths.base_dir=/a/b) must not nest the job dir under /a/b."""
    sweep = workdir / "sweep_paths"
    p = run_cli(["-m", "experiment=tiny", "run.dry_run=true", f"paths.base_dir={base_dir}", "model.depth=1,2",
                 f"hydra.sweep.dir={sweep}"], base_dir, workdir)
    assert p.returncode == 0, p.stdout + p.stderr
    jobs = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert len(jobs) == 2 and all("/" not in j and f"paths.base_dir={str(base_dir).replace('/', '_')}" in j
                                  for j in jobs), jobs


def test_model_group_names_each_depth():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for d in (4, 6, 8, 12, 16, 20, 26, 32):
            cfg = compose(config_name="config", overrides=[f"model=d{d}"])
            assert cfg.model.depth == d


def test_experiment_overrides_config_defaults():
    """_self_ comes before experiment: the recipe wins over config.yaml."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=cpu_demo"])
        assert cfg.model.depth == 4 and cfg.run.pipeline[0] == "tokenizer"


# --------------------------------------------------------------------------- dry run + CLI

def test_dry_run_prints_plan_without_torch_or_run_dir(base_dir, workdir):
    code = ("import sys\nimport launch.run as r\nsys.argv=['nanochat-run','model=d12','run.dry_run=true',"
            f"'run.root={workdir}/runs']\ntry:\n    r.main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('TORCH_LOADED', 'torch' in sys.modules, 'RC', rc)")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert "TORCH_LOADED False RC 0" in p.stdout, p.stdout + p.stderr
    assert "nanochat plan" in p.stdout and "iterations" in p.stdout
    assert "generation: seed" in p.stdout  # the resolved config follows the table
    assert not (workdir / "runs").exists()
    assert not list(workdir.iterdir())  # nothing written in the cwd either


@pytest.mark.parametrize("flag,expect", [(["--cfg", "job"], "model:"), (["--help"], "Configuration groups"),
                                         (["--info"], "Config search path")])
def test_hydra_flags(base_dir, workdir, flag, expect):
    p = run_cli(flag, base_dir, workdir)
    assert p.returncode == 0 and expect in p.stdout, p.stdout + p.stderr


def test_shell_completion(base_dir, workdir):
    p = run_cli(["-sc", "query=bash"], base_dir, workdir, env_extra={"COMP_LINE": "nanochat-run mod"})
    assert "model=" in p.stdout
    p = run_cli(["-sc", "install=bash"], base_dir, workdir)
    assert p.returncode == 0 and "complete" in p.stdout


# --------------------------------------------------------------------------- validation errors

@pytest.mark.parametrize("args,key,words", [
    (["+model.typo=1"], "model.typo", ["unknown key"]),
    (["+stage.num_iteration=3"], "stage.num_iteration", ["did you mean stage.num_iterations"]),
    (["model.depth=abc"], "model.depth", ["expected an int"]),
    (["model.depth=null"], "model.depth", ["missing value"]),
    (["hardware.dtype=int8"], "hardware.dtype", ["use one of"]),
    (["model.sequence_len=512", "hardware.device_batch_size=8", "stage.total_batch_size=6144"],
     "stage.total_batch_size", ["device_batch_size=8", "sequence_len=512", "world_size=1", "6144"]),
    (["stage=sft", "stage.init_from=/nonexistent/run"], "stage.init_from", ["no such directory"]),
    (["stage=eval"], "stage.init_from", ["no completed"]),
    (["stage=sft", "model=d4"], "stage.init_from", ["no completed mid / pretrain run found for tag d4",
                                                    "stage.init_stage=", "model.generation", "stage.init_from at"]),
])
def test_config_errors_are_clear(base_dir, workdir, args, key, words):
    p = run_cli([*args, "run.dry_run=true"], base_dir, workdir)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "ConfigError" in out and key in out and "fix:" in out, out
    assert "Traceback" not in out, out
    for w in words:
        assert w in out, out


def test_device_checks(base_dir, workdir):
    p = run_cli([*TINY, "hardware.nproc_per_node=512", f"run.root={workdir}/runs"], base_dir, workdir)
    assert p.returncode != 0 and "hardware.nproc_per_node" in p.stdout and "Traceback" not in p.stdout + p.stderr
    p = run_cli([*TINY, "hardware.device=cuda", f"run.root={workdir}/runs"], base_dir, workdir,
                env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode != 0 and "no CUDA device" in p.stdout
    assert not (workdir / "runs").exists()


def test_slurm_hardware_sweep_refused():
    from launch.run import check_before_submitting, sweep_jobs
    with pytest.raises(ConfigError, match="hardware"):
        sweep_jobs(["-m", "hydra/launcher=slurm", "hardware.nproc_per_node=1,2"])
    with pytest.raises(ConfigError):
        sweep_jobs(["-m", "hydra/launcher=slurm", "hardware=cpu,1gpu"])
    sweep_jobs(["-m", "hydra/launcher=slurm", "model.depth=4,6", "hardware=cpu"])  # fine
    check_before_submitting(["hardware.nproc_per_node=1,2"])  # not a multirun: Hydra itself complains


def test_slurm_sweep_is_planned_before_anything_is_submitted(base_dir, workdir):
    """Under the Slurm launcher every job of the sweep (command-line sweeps and sweep=depths' params) is
    planned before submission, its GPU step rehearsed (hardware.memory_check null): one whose device
    batch is over the GPU's memory stops the whole sweep with the planner's ConfigError (no sbatch, no
    sweep dir), over the instant floor (d32) or only over the rehearsed peak (d4 at batch 128: its fp32
    logits and their softmax). The submitting host needs no GPU."""
    from launch.run import sweep_jobs
    name, jobs = sweep_jobs(["-m", "hydra/launcher=slurm", "sweep=depths", "stage.num_iterations=5,6",
                             "hydra.launcher.timeout_min=5"])
    assert name == "config" and len(jobs) == 6
    assert ["model.depth=8", "sweep=depths", "stage.num_iterations=6"] in jobs
    sweep = workdir / "slurm_sweep"
    gpu = ["-m", "hydra/launcher=slurm", "stage=pretrain", "hardware=1gpu", "data=climbmix", f"hydra.sweep.dir={sweep}"]
    rehearsed = set((base_dir / "simulate").glob("*.json"))
    p = run_cli([*gpu, "hardware.device_batch_size=32", "model.depth=4,32"], base_dir, workdir,
                env_extra={"CUDA_VISIBLE_DEVICES": ""})
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "nothing submitted: job 2 of 2" in out and "model.depth=32" in out and "memory floor" in out, out
    assert "hardware.device_batch_size=4 (grad accumulation 64" in out and "Traceback" not in out, out
    assert set((base_dir / "simulate").glob("*.json")) - rehearsed   # job 1 (d4) was rehearsed, and fits
    p = run_cli([*gpu, "hardware.device_batch_size=128", "model.depth=4"], base_dir, workdir,
                env_extra={"CUDA_VISIBLE_DEVICES": ""})
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "nothing submitted: job 1 of 1" in out and "the simulated peak" in out, out
    assert not sweep.exists()


def test_clean_env_drops_inherited_distributed_vars():
    env = clean_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "x", "MASTER_PORT": "1",
                     "TORCHELASTIC_RUN_ID": "r", "SLURM_JOB_ID": "9", "SLURM_PROCID": "2", "PATH": "/bin", "HOME": "/h"})
    assert env["PATH"] == "/bin" and env["HOME"] == "/h"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
              "SLURM_JOB_ID", "SLURM_PROCID"):
        assert k not in env


# --------------------------------------------------------------------------- real runs

def test_run_dir_contract_in_process(base_dir, workdir):
    root = workdir / "runs"
    p = run_cli([*TINY, "model=d4", "model.depth=3", "stage.num_iterations=4", f"run.root={root}"], base_dir, workdir,
                env_extra={"RANK": "1", "WORLD_SIZE": "4", "MASTER_PORT": "1"})  # polluted shell must not matter
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = only_run_dir(root)
    assert run_dir.parent.name == "d3"  # tag from values, not from the group choice name
    text = (run_dir / "resolved_config.yaml").read_text()
    assert "${" not in text
    cfg = config_from_dict(OmegaConf.to_container(OmegaConf.load(run_dir / "resolved_config.yaml")))
    assert cfg.model.depth == 3 and cfg.run.dir == str(run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    for k in ("git", "argv", "overrides", "packages", "slurm", "hostname", "choices"):
        assert k in meta
    assert {"sha", "dirty"} <= set(meta["git"]) and meta["packages"]["torch"]
    assert "model.depth=3" in meta["overrides"]
    if meta["git"]["dirty"]:
        assert (run_dir / "git.diff").exists()
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["num_iterations"] == 4
    assert (run_dir / "COMPLETED").exists() and json.loads((run_dir / "result.json").read_text())["step"] == 4
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4]
    assert not (run_dir / "torchrun").exists()


def test_resume_policy(base_dir, workdir):
    run_dir = workdir / "pinned"
    p = run_cli([*TINY, "stage.num_iterations=2", f"run.dir={run_dir}", "run.resume=must"], base_dir, workdir)
    assert p.returncode != 0 and "nothing to resume" in p.stdout
    run_cli([*TINY, "stage.num_iterations=2", f"run.dir={run_dir}"], base_dir, workdir, check=True)
    p = run_cli([*TINY, "stage.num_iterations=2", f"run.dir={run_dir}", "run.resume=never"], base_dir, workdir)
    assert p.returncode != 0 and "already has checkpoints" in p.stdout
    # auto on a finished run: resumes at the end, nothing to do, still completed with the same result
    p = run_cli([*TINY, "stage.num_iterations=2", f"run.dir={run_dir}", "run.resume=auto"], base_dir, workdir)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((run_dir / "result.json").read_text())["step"] == 2


@pytest.mark.slow
def test_torchrun_two_ranks_one_run_dir(base_dir, workdir):
    root = workdir / "runs"
    p = run_cli([*TINY, "hardware.nproc_per_node=2", "stage.num_iterations=3", "stage.total_batch_size=2048",
                 f"run.root={root}"], base_dir, workdir,
                env_extra={"RANK": "5", "MASTER_ADDR": "10.255.255.1", "MASTER_PORT": "1", "SLURM_PROCID": "3",
                           "TORCHELASTIC_RUN_ID": "stale"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run_dir = only_run_dir(root)  # exactly one run dir although two ranks ran
    assert (run_dir / "COMPLETED").exists()
    assert (run_dir / "torchrun").is_dir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_000003").glob("optim_rank*.pt")) == \
        ["optim_rank0.pt", "optim_rank1.pt"]


def _wait_for_step(run_dir_glob, step: int, proc, timeout: float = 240) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for p in run_dir_glob():
            m = p / "metrics.jsonl"
            if m.exists() and any(json.loads(l).get("step", 0) >= step for l in m.read_text().splitlines() if l.strip()):
                return p
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for training steps")


@pytest.mark.slow
@pytest.mark.parametrize("sig,nproc", [(signal.SIGUSR2, 1), (signal.SIGTERM, 2)])
def test_signal_preempts_then_resume_continues(base_dir, workdir, sig, nproc):
    """A stop signal to the launcher reaches the workers, which checkpoint and exit as 'preempted'."""
    run_dir = workdir / "run"
    args = [*TINY, f"hardware.nproc_per_node={nproc}", "stage.num_iterations=30", "stage.total_batch_size=2048",
            "stage.eval_every=-1", f"run.dir={run_dir}"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.run", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(lambda: [run_dir], 2, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted", status
    stopped = status["step"]
    assert 2 <= stopped < 30
    assert (run_dir / "checkpoints" / f"step_{stopped:06d}").is_dir()
    assert not (run_dir / "COMPLETED").exists()
    before = json.loads((run_dir / "checkpoints" / f"step_{stopped:06d}" / "meta.json").read_text())
    first_wall = before["loop_state"]["wall_time_s"]
    assert first_wall > 0
    t0 = time.time()
    p = run_cli([*args[:-1], f"run.dir={run_dir}", "run.resume=auto"], base_dir, workdir)
    second = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from step" in p.stdout
    assert sorted(losses(run_dir)) == list(range(1, 31))
    # result.json's wall time covers both attempts (the first up to its checkpoint), not the last one only
    wall = json.loads((run_dir / "result.json").read_text())["wall_time_s"]
    assert first_wall < wall < first_wall + second
