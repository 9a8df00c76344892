"""Helpers for tests against the two-node Slurm cluster of `.ci/slurm_2node.sh` (two slurmd in
their own network namespaces, 10.77.0.10 / .11 on a private bridge).

    reason = ensure_2node()
    if reason: pytest.skip(reason)
    env = cluster_env(os.environ)          # SLURM_CONF → this cluster, not the single-node one
    subprocess.run(["sbatch", "-N2", ...], env=env)

Everything here passes SLURM_CONF explicitly: the single-node cluster's tests run in the same
pytest process and must keep talking to theirs.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Optional

from slurm_cluster import TERMINAL_STATES, ensure_slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "slurm_2node.sh"
CONF = "/etc/slurm-2node/slurm.conf"
NODES = ("nc2n0", "nc2n1")
IFNAME = "ncnet0"  # the interface inside each namespace (what GLOO/NCCL_SOCKET_IFNAME would name)
EXIT_NO_NAMESPACES = 3


def cluster_env(base: Optional[Mapping[str, str]] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = CONF
    return env


def _run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=cluster_env())


def nodes_ready() -> bool:
    if not Path(CONF).exists():
        return False
    try:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
    except subprocess.TimeoutExpired:
        return False
    states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
    return all(states.get(n, "").rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for n in NODES)


def build() -> subprocess.CompletedProcess:
    """Run the (idempotent) cluster script: rebuilds a missing namespace, restarts a dead slurmd."""
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300)


@functools.lru_cache(maxsize=None)
def ensure_2node() -> Optional[str]:
    """None when both nodes take jobs; else the reason to skip (cached per process)."""
    reason = ensure_slurm()  # packages, munge and slurmdbd come from the single-node setup
    if reason:
        return f"two-node cluster needs the single-node setup first: {reason}"
    if os.geteuid() != 0:
        return "the two-node cluster needs root (network namespaces): run `sudo .ci/slurm_2node.sh`"
    for tool in ("ip", "unshare", "nsenter", "taskset"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install iproute2 util-linux)"
    out = build()
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
    if out.returncode == EXIT_NO_NAMESPACES:
        return f"the kernel refuses network namespaces / veth here: {tail}"
    if out.returncode != 0 or not nodes_ready():
        return f"{SCRIPT} failed (rc={out.returncode}):\n{tail}"
    return None


def job_state(job_id: str) -> Optional[str]:
    out = _run(["scontrol", "-o", "show", "job", str(job_id)])
    for token in out.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return None


def scontrol(*args: str) -> None:
    out = _run(["scontrol", *args])
    if out.returncode != 0:
        raise RuntimeError(f"scontrol {' '.join(args)}: {out.stderr.strip()}")


def scancel(*args: str) -> None:
    out = _run(["scancel", *args])
    if out.returncode != 0:
        raise RuntimeError(f"scancel {' '.join(args)}: {out.stderr.strip()}")


def netns_pids(node: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=10)
    return [int(p) for p in out.stdout.split()]


def kill_node(node: str) -> None:
    """The node dies: its link goes down first (peers get no RST, as with a machine that lost
    power), then every process in it is SIGKILLed: slurmd, slurmstepd, the job's ranks."""
    subprocess.run(["ip", "-n", node, "link", "set", IFNAME, "down"], check=True, timeout=10)
    for pid in netns_pids(node):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def revive_node(node: str) -> None:
    """Link up and slurmd restarted (the script's idempotent path); wait until the node is back."""
    subprocess.run(["ip", "-n", node, "link", "set", IFNAME, "up"], check=True, timeout=10)
    out = build()
    if out.returncode != 0:
        raise RuntimeError(f"{SCRIPT} could not bring {node} back:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


__all__ = ["CONF", "NODES", "IFNAME", "TERMINAL_STATES", "cluster_env", "ensure_2node", "job_state",
           "scontrol", "scancel", "kill_node", "revive_node", "netns_pids", "nodes_ready"]
