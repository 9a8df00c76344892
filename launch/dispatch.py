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

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from launch.validate import command_output
from nanochat.config import Config, ConfigError
from nanochat.lifecycle import (EXIT_PREEMPTED, LAUNCHER_PID_ENV, STOP_SIGNALS, die_with_parent_preexec,
                                kill_tree, read_status)
from nanochat.stages import stage

_DROP_EXACT = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ROLE_NAME"}
_DROP_PREFIX = ("TORCHELASTIC_", "SLURM_", "SBATCH_", "SRUN_", "PMI_", "OMPI_", "MASTER_")


def clean_env(env: Optional[dict] = None) -> dict:
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in _DROP_EXACT and not k.startswith(_DROP_PREFIX)}
    # make `python -m nanochat...` resolve to this checkout even without an install
    root = str(Path(__file__).resolve().parents[1])
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # workers die when this process does
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def node_rank(cfg: Config) -> int:
    """This launcher's node in a multi-node job: hardware.node_rank, else $SLURM_NODEID, else 0 on one node."""
    hw = cfg.hardware
    if hw.nnodes == 1:
        return 0
    if hw.node_rank is not None:
        return hw.node_rank
    if os.environ.get("SLURM_NODEID", "").isdigit():
        return int(os.environ["SLURM_NODEID"])
    raise ConfigError("hardware.node_rank", None,
                      f"start one launcher per node with hardware.node_rank=0..{hw.nnodes - 1} and the same "
                      "hardware.rdzv_endpoint=<node 0 address>:<port>, or submit with hydra/launcher=slurm",
                      f"hardware.nnodes={hw.nnodes} outside Slurm needs a node rank")


def rdzv_endpoint(cfg: Config) -> tuple[str, int]:
    """(host, port) where node 0 hosts the rendezvous store.

    host: hardware.rdzv_endpoint, else the first node of the Slurm allocation. port: the one
    given, else 29500 + job id % 1000 under Slurm (two jobs sharing a head node do not collide;
    every node of a job derives the same one), else 29500.
    """
    ep = cfg.hardware.rdzv_endpoint
    host, port = (ep or ""), None
    if ep and ":" in ep:
        host, _, p = ep.rpartition(":")
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise ConfigError("hardware.rdzv_endpoint", ep, "write host:port with a port in 1..65535, or just host",
                              "bad port")
        port = int(p)
    host = host or os.environ.get("NANOCHAT_RDZV_HOST") or _slurm_head_node()
    if not host:
        raise ConfigError("hardware.rdzv_endpoint", ep, "set hardware.rdzv_endpoint=<node 0 address>[:port] "
                          "on every node", f"hardware.nnodes={cfg.hardware.nnodes} without Slurm needs node 0's address")
    if port is None:
        job = os.environ.get("SLURM_JOB_ID", "")
        port = 29500 + (int(job) % 1000 if job.isdigit() else 0)
    return host, port


def torchrun_command(cfg: Config, config_path: Path, run_dir: Path) -> list[str]:
    hw = cfg.hardware
    node = node_rank(cfg)
    # one log dir per node: every node has a local rank 0, and the other nodes' logs must survive
    log_dir = run_dir / "torchrun" if hw.nnodes == 1 else run_dir / "torchrun" / f"node{node}"
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc_per_node={hw.nproc_per_node}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2",
           f"--log-dir={log_dir}", "--tee=3"]
    if hw.nnodes > 1:
        # static rendezvous: the node rank is known (Slurm or hardware.node_rank), so global rank
        # 0 (the one that writes) is always on node 0, which hosts the store at the endpoint
        host, port = rdzv_endpoint(cfg)
        cmd += [f"--nnodes={hw.nnodes}", f"--node-rank={node}", "--rdzv-backend=static",
                f"--master-addr={host}", f"--master-port={port}"]
        if hw.dist_timeout_s is not None:  # how long node 0 waits for the others to join
            cmd.append(f"--rdzv-conf=timeout={hw.dist_timeout_s}")
    else:
        cmd.append("--standalone")
    cmd += ["-m", "nanochat.stages._entry", "--config", str(config_path)]
    if config_path.parent != run_dir:
        cmd += ["--run-dir", str(run_dir)]
    return cmd


def _slurm_head_node() -> str:
    """The first node of the Slurm allocation ("" outside Slurm, or when scontrol cannot say)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    hosts = (command_output(["scontrol", "show", "hostnames", nodelist]) or "").split() if nodelist else []
    return hosts[0] if hosts else ""


def run_subprocess(cmd: list[str], env: dict, preempted: Optional[Callable[[], bool]] = None) -> int:
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
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, forward)
    rc = None
    try:
        while rc is None:
            with contextlib.suppress(KeyboardInterrupt):  # keep waiting: the child checkpoints and exits
                rc = proc.wait()
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        if proc.poll() is None:  # leaving by an exception: take the tree down with us
            kill_tree(proc.pid)
    if rc != EXIT_PREEMPTED and received and preempted is not None and preempted():
        rc = EXIT_PREEMPTED  # torchrun exits 1 on any signal it handles, whatever its ranks returned
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
    # The frozen config this node's workers read. Node 0 froze the run dir; a node > 0 writes nothing there
    # but its own copy, torchrun/node<k>/frozen_config.yaml (no race with node 0's freeze; not
    # resolved_config.yaml: that name marks a run dir for sweep summaries and `latest`).
    node = node_rank(cfg)
    config_path = run_dir / "resolved_config.yaml"
    if node > 0:
        from launch.rundir import resolved_yaml
        from nanochat.common import atomic_write_text
        config_path = run_dir / "torchrun" / f"node{node}" / "frozen_config.yaml"
        atomic_write_text(config_path, resolved_yaml(cfg))
    # one_process, e.g. serve: its replicas (one per GPU) are threads, not torchrun ranks
    world = 1 if stage(cfg.stage.name).one_process else cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    if in_process and world == 1:
        # an inherited RANK/WORLD_SIZE (e.g. inside someone else's torchrun) must not make
        # this single process believe it is part of a distributed job
        for k in [k for k in os.environ if k in _DROP_EXACT or k.startswith("TORCHELASTIC_")]:
            del os.environ[k]
        from nanochat.stages._entry import execute
        return execute(cfg, run_dir)
    cmd = torchrun_command(cfg, config_path, run_dir) if world > 1 else \
        [sys.executable, "-m", "nanochat.stages._entry", "--config", str(config_path)]
    # preempted: rank 0's status says so; a node > 0 cannot see it reliably yet (rank 0 may still be
    # writing it) and was told to stop like every node, so its ranks count as preempted
    return run_subprocess(cmd, clean_env(), preempted=(lambda: node > 0 or read_status(run_dir) == "preempted")
                          if world > 1 else None)
