"""hardware.device_batch_size=auto at launch: run the batch-size probe and hand its result to the plan.

The probe (nanochat/batch_size.py) needs torch and the device, and the launcher must stay
torch-free (fast --help / dry runs), so it runs as its own short process on the machine that will
train (under Slurm that is the allocated node: the launcher task runs there). A dry run never
probes; its plan shows a placeholder and says so.
"""
from __future__ import annotations

import json
import subprocess
import sys

from nanochat.config import Config, ConfigError
from nanochat.plan import Plan, auto_batch_candidates


def probe_device_batch(cfg: Config, plan: Plan) -> dict:
    """Run `python -m nanochat.batch_size` for this run's model and batch; returns the probe result."""
    from launch.dispatch import clean_env
    hw = cfg.hardware
    request = {
        "gpt_kwargs": plan.model.gpt_config_kwargs(),
        "seq_len": plan.sequence_len,
        "candidates": auto_batch_candidates(cfg, plan.total_batch_size, plan.sequence_len, plan.world_size),
        "device": hw.device,
        "dtype": hw.dtype,
        "memory_gb": hw.auto_batch_memory_gb,
    }
    print(f"[nanochat] hardware.device_batch_size=auto: probing {request['candidates']} on {hw.device}", flush=True)
    p = subprocess.run([sys.executable, "-m", "nanochat.batch_size", json.dumps(request)], env=clean_env(),
                       capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": f"the probe exited {p.returncode}: {p.stderr[-2000:]}"}
    if "error" in result:
        raise ConfigError("hardware.device_batch_size", "auto",
                          "set hardware.device_batch_size to an integer that fits, or fix the probe's error",
                          result["error"])
    return result
