"""Dispatch a frozen run: in-process, or a torchrun subprocess with signals forwarded.

The child gets a cleaned environment: inherited RANK/MASTER_*/TORCHELASTIC_*/SLURM_*
variables from an outer launcher would otherwise make torchrun or torch.distributed
join the wrong job.

Process lifetime: nothing outlives the launcher. The child is SIGKILLed by the kernel when the
launcher dies by any signal (PR_SET_PDEATHSIG, armed between fork and exec), its workers arm
the same against torchrun and poll their parent (nanochat.lifecycle.guard_parent), and a
launcher that leaves run_subprocess with the child still alive kills the whole tree.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from nanochat.config import Config
from nanochat.lifecycle import EXIT_PREEMPTED, LAUNCHER_PID_ENV, STOP_SIGNALS, die_with_parent_preexec, kill_tree

_DROP_EXACT = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ROLE_NAME"}
_DROP_PREFIX = ("TORCHELASTIC_", "SLURM_", "SBATCH_", "SRUN_", "PMI_", "OMPI_")


def clean_env(env: Optional[dict] = None) -> dict:
    env = dict(os.environ if env is None else env)
    for k in list(env):
        if k in _DROP_EXACT or k.startswith(_DROP_PREFIX) or k.startswith("MASTER_"):
            del env[k]
    # make `python -m nanochat...` resolve to this checkout even without an install
    root = str(Path(__file__).resolve().parents[1])
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # workers die when this process does
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def torchrun_command(cfg: Config, config_path: Path, run_dir: Path) -> list[str]:
    hw = cfg.hardware
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc_per_node={hw.nproc_per_node}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2",
           f"--log-dir={run_dir / 'torchrun'}", "--tee=3"]
    if hw.nnodes > 1:
        # one launcher task per node (Slurm), c10d rendezvous on the first node of the allocation
        head = os.environ.get("NANOCHAT_RDZV_HOST") or _slurm_head_node() or "localhost"
        cmd += [f"--nnodes={hw.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:29500",
                f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'nanochat')}"]
        if "SLURM_NODEID" in os.environ:
            cmd.append(f"--node-rank={os.environ['SLURM_NODEID']}")
    else:
        cmd.append("--standalone")
    cmd += ["-m", "nanochat.stages._entry", "--config", str(config_path)]
    return cmd


def _slurm_head_node() -> Optional[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_subprocess(cmd: list[str], env: dict) -> int:
    """Run the child in its own session and forward stop signals to it; returns its exit code.

    After the child has checkpointed and exited, a SIGUSR2 is passed on to the handler that
    was installed before ours: under Slurm that is submitit's, which resubmits this job and
    requeues it, so the run continues from its checkpoint in the same dir.
    """
    # own session: a terminal's Ctrl-C reaches only us, and we forward it (the workers checkpoint)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent_preexec(os.getpid()))
    previous: dict = {}
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread
            pass
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # keep waiting: the child checkpoints and exits
                continue
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        if proc.poll() is None:  # leaving by an exception: take the tree down with us
            kill_tree(proc.pid)
    if rc == EXIT_PREEMPTED and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        outer = previous.get(signal.SIGUSR2)
        if signal.SIGUSR2 in received and callable(outer):
            outer(signal.SIGUSR2, None)  # submitit: checkpoint + `scontrol requeue`, then exits
        if signal.SIGTERM in received:
            # `scontrol requeue` / scancel: Slurm restarts (or ends) the job itself. Returning would
            # make submitit report this interrupted attempt as the job's result, so leave without one.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)
    return rc


def dispatch(cfg: Config, run_dir: Path, in_process: bool) -> int:
    config_path = run_dir / "resolved_config.yaml"
    world = cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    if cfg.stage.name == "serve":
        world = 1  # one process; its replicas (one per GPU) are threads, not torchrun ranks
    if in_process and world == 1:
        # an inherited RANK/WORLD_SIZE (e.g. inside someone else's torchrun) must not make
        # this single process believe it is part of a distributed job
        for k in [k for k in os.environ if k in _DROP_EXACT or k.startswith("TORCHELASTIC_")]:
            del os.environ[k]
        from nanochat.stages._entry import execute
        return execute(cfg, run_dir)
    env = clean_env()
    if world == 1:
        cmd = [sys.executable, "-m", "nanochat.stages._entry", "--config", str(config_path)]
    else:
        cmd = torchrun_command(cfg, config_path, run_dir)
    return run_subprocess(cmd, env)
