"""Checks that need the machine (devices, cores, packages), before anything runs.

Schema checks (unknown keys, types, choices) live in nanochat/config.py; depth-dial
checks (divisibility, heads) in nanochat/plan.py. All raise ConfigError.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

from nanochat.config import Config, ConfigError


def command_output(cmd: list[str], timeout: float = 10, cwd: Optional[str] = None) -> Optional[str]:
    """stdout of a short outside command (git, scontrol, nvidia-smi); None when it cannot run or hangs."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def visible_gpus() -> Optional[int]:
    """Number of CUDA devices without importing torch (None if unknown)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([v for v in vis.split(",") if v.strip() and v.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    out = command_output(["nvidia-smi", "-L"], timeout=20)
    return None if out is None else len([l for l in out.splitlines() if l.startswith("GPU ")])


def gpu_compute_caps() -> Optional[list[tuple[int, int]]]:
    """Compute capability of each visible GPU from nvidia-smi (no torch import); None if unknown."""
    out = command_output(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], timeout=20)
    try:
        return None if out is None else [tuple(int(x) for x in l.split(".")) for l in out.split()]
    except ValueError:
        return None


def check_fp8(cfg: Config) -> None:
    """model.fp8 needs fp8 matmuls (NVIDIA compute capability >= 8.9) unless it is emulated."""
    m, hw = cfg.model, cfg.hardware
    if not m.fp8 or m.fp8_emulate:
        return
    fix = ("set model.fp8=null, or model.fp8_emulate=true to emulate it on this machine "
           "(slow: for tests and development)")
    if hw.device != "cuda":
        raise ConfigError("model.fp8", m.fp8, fix, f"fp8 training needs an NVIDIA GPU with fp8 matmuls "
                          f"(compute capability >= 8.9: Ada, Hopper, Blackwell); hardware.device={hw.device}")
    if old := [c for c in gpu_compute_caps() or [] if c < (8, 9)]:
        raise ConfigError("model.fp8", m.fp8, fix, f"this GPU (compute capability {old[0][0]}.{old[0][1]}) has "
                          f"no fp8 matmuls; they need 8.9 or newer (Ada, Hopper, Blackwell)")


def check_hardware(cfg: Config) -> None:
    hw = cfg.hardware
    check_fp8(cfg)
    if hw.device == "cuda":
        n = visible_gpus()
        if n == 0:
            raise ConfigError("hardware.device", hw.device, "use hardware=cpu on a machine without GPUs "
                              "(or check CUDA_VISIBLE_DEVICES / the driver)", "no CUDA device present")
        if n is not None and hw.nproc_per_node > n:
            one = " (or experiment=speedrun_1gpu: the same recipe on one GPU)" if cfg.experiment == "speedrun" else ""
            raise ConfigError("hardware.nproc_per_node", hw.nproc_per_node,
                              f"use at most {n} (the GPUs visible on this node){one}", f"only {n} GPUs present")
    elif hw.device == "cpu":
        cores = os.cpu_count() or 1
        if hw.nproc_per_node > cores:
            raise ConfigError("hardware.nproc_per_node", hw.nproc_per_node,
                              f"use at most {cores} CPU processes on this machine", f"only {cores} CPU cores present")
    if hw.dtype == "float16" and hw.nproc_per_node * hw.nnodes > 1:
        raise ConfigError("hardware.dtype", hw.dtype, "use hardware.dtype=bfloat16 for multi-process runs "
                          "(fp16 loss scaling is single-process only: ranks could disagree on skipped steps)",
                          "fp16 with several processes")
    if hw.device == "cpu" and hw.dtype != "float32":
        raise ConfigError("hardware.dtype", hw.dtype, "use hardware.dtype=float32 on CPU "
                          "(bf16/fp16 matmuls are ~100x slower there)", "low precision on CPU")
    import importlib.util  # the machine's packages too: a worker must not find out after the run dir exists
    if cfg.tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracking.tensorboard", True, "pip install tensorboard (or nanochat-hydra[tensorboard]), "
                          "or set tracking.tensorboard=false", "the tensorboard package is not installed")


def resolved_tree(dcfg) -> dict:
    """The composed config as a plain dict, interpolations resolved, without the `hydra` node;
    an interpolation that cannot resolve is a ConfigError naming its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        tree = OmegaConf.to_container(dcfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(str(key), getattr(e, "msg", str(e)), "fix the interpolation or the value it points at",
                          "cannot resolve") from None
    tree.pop("hydra", None)
    return tree
