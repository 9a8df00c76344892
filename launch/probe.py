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
from typing import Optional

from nanochat.config import Config, ConfigError
from nanochat.plan import Plan, auto_batch_candidates


def _json_process(module: str, request: dict, show: bool = False) -> tuple[subprocess.CompletedProcess, Optional[dict]]:
    """`python -m <module> <request as JSON>` in a clean environment (the launcher stays torch-free): the process
    and the last JSON line it printed (None without one). show: its stderr goes to this terminal."""
    from launch.dispatch import clean_env
    p = subprocess.run([sys.executable, "-m", module, json.dumps(request, default=str)], env=clean_env(),
                       stdout=subprocess.PIPE, stderr=None if show else subprocess.PIPE, text=True)
    results = [l for l in p.stdout.splitlines() if l.startswith("{")]
    return p, (json.loads(results[-1]) if results else None)


def probe_device_batch(cfg: Config, plan: Plan) -> dict:
    """Run `python -m nanochat.batch_size` for this run's model and batch; returns the probe result."""
    hw = cfg.hardware
    request = {"gpt_kwargs": plan.model.gpt_config_kwargs(), "seq_len": plan.sequence_len,
               "candidates": auto_batch_candidates(plan.total_batch_size, plan.sequence_len, plan.world_size),
               "device": hw.device, "dtype": hw.dtype, "embedding_dtype": hw.embedding_dtype,
               "activation_checkpointing": cfg.model.activation_checkpointing,
               "memory_gb": hw.auto_batch_memory_gb}
    print(f"[nanochat] hardware.device_batch_size=auto: probing {request['candidates']} on {hw.device}", flush=True)
    p, result = _json_process("nanochat.batch_size", request)
    result = result or {"error": f"the probe exited {p.returncode}: {p.stderr[-2000:]}"}
    if "error" in result:
        raise ConfigError("hardware.device_batch_size", "auto",
                          "set hardware.device_batch_size to an integer that fits, or fix the probe's error",
                          result["error"])
    return result


def run_simulation(cfg: Config, plan: dict, mode: str = "step", candidates: Optional[list] = None,
                   show: bool = False) -> dict:
    """`python -m nanochat.simulate` on this plan (its own process: the launcher stays torch-free).

    show: stream its memory table to this terminal (run.simulate). Results of the planning modes are
    cached under <base_dir>/simulate/<hash of config + plan + request>.json: a config's fit is
    computed once, so repeated dry runs and launches stay fast.
    """
    import hashlib
    from dataclasses import replace
    from nanochat.common import atomic_write_json, get_base_dir, read_json
    from nanochat.config import config_to_dict
    tree = config_to_dict(replace(cfg, run=replace(cfg.run, dry_run=False, simulate=False, dir=None)))
    request = {"config": tree, "plan": plan, "mode": mode, "candidates": candidates, "print": show}
    key = hashlib.sha256(json.dumps({**request, "print": False}, sort_keys=True, default=str).encode()).hexdigest()
    cache = get_base_dir(cfg.paths.base_dir) / "simulate" / f"{key[:24]}.json"
    if not show and cache.exists():
        return read_json(cache)
    p, out = _json_process("nanochat.simulate", request, show)
    if show:   # the table goes to the terminal (its errors too); the result is its last line
        print("\n".join(l for l in p.stdout.splitlines() if not l.startswith("{")), flush=True)
    if p.returncode != 0 or out is None:
        raise RuntimeError(f"the simulator exited {p.returncode}: {(p.stderr or '')[-3000:]}")
    if show:
        print(json.dumps(out), flush=True)   # the last line printed is the JSON result
    atomic_write_json(cache, out)
    return out


def plan_memory(cfg: Config, source, sp, st):
    """Memory-aware planning of a GPU run before it holds a GPU; returns the StagePlan to use.

    hardware.device_batch_size=auto: on a machine with the GPU (a real run) the device probe above;
    without one, the largest power of two whose simulated peak fits 90% of hardware.gpu_memory_gb.
    Every GPU training plan checks the instant, torch-free memory floor (nanochat/shapes.py: weights,
    gradients, optimizer state, one micro-batch's logits and activations); then hardware.memory_check
    =true (set for a Slurm submission's check when null, launch/run.py) or an auto batch that was
    simulated rehearses the whole step and adds its memory table to the plan's rows. A batch that does not fit is a ConfigError naming the largest
    hardware.device_batch_size that does (simulated: only then does a plain dry run simulate).
    st: the stage's declaration (nanochat/stages), whose planner plans again with the chosen batch.
    """
    import os
    from nanochat.plan import grad_accum
    from nanochat.shapes import DTYPE_BYTES, memory_floor
    from nanochat.simulate import GIB, HEADROOM, check_request, memory_rows, rehearsable
    hw = cfg.hardware
    gpu = hw.device == "cuda"
    # memory_floor's dtype arguments: the lookup tables are bf16 only where the precision policy stores
    # them so (bf16 compute); activations are in the compute dtype (autocast)
    floor_bytes = dict(embedding_bytes=2 if hw.embedding_dtype == "bfloat16" and hw.dtype == "bfloat16" else 4,
                       activation_bytes=DTYPE_BYTES[hw.dtype],
                       checkpointing=cfg.model.activation_checkpointing != "none")
    simulated = False
    # no NVIDIA GPU on this machine (torch-free: the driver's device node): simulate the fit
    if sp.wants_probe and gpu and hw.gpu_memory_gb and not os.path.exists("/dev/nvidiactl"):
        check_request(cfg, "hardware.device_batch_size")
        cands = auto_batch_candidates(sp.plan.total_batch_size, sp.plan.sequence_len, sp.plan.world_size)
        res = run_simulation(cfg, sp.plan.to_dict(), "fit", cands)
        if res["device_batch_size"] is None:
            raise ConfigError("hardware.device_batch_size", "auto", "use model.activation_checkpointing=full,"
                              " a shorter model.sequence_len, a smaller model or more GPU memory",
                              f"even device batch {min(cands)} does not fit ({res['trials'][-1]['reason']})")
        sp = st.planner(cfg, source, probe=res)
        simulated = True
    elif sp.wants_probe and not cfg.run.dry_run:   # on the device: the real probe
        sp = st.planner(cfg, source, probe=probe_device_batch(cfg, sp.plan))
    p = sp.plan
    if p is None or not (gpu and rehearsable(cfg) and hw.gpu_memory_gb) or (sp.wants_probe and not simulated):
        return sp
    budget = HEADROOM * hw.gpu_memory_gb
    floor = memory_floor(p.model, p.device_batch_size, p.grad_accum_steps, p.world_size, **floor_bytes)
    gib = {k: v / GIB for k, v in floor.items()}
    split = (f"weights {gib['weights']:.1f}, grads {gib['grads']:.1f}, optimizer {gib['optimizer']:.1f}, "
             f"one micro-batch's fp32 logits {gib['logits']:.1f}, activations {gib['activations']:.1f}")
    if gib["total"] > budget:   # the instant floor first; the whole step only when asked
        problem = f"its memory floor {gib['total']:.1f} GiB per rank ({split} GiB)"
    elif not (simulated or hw.memory_check):
        sp.rows.append(("memory floor / rank", f"{gib['total']:.1f} GiB of {hw.gpu_memory_gb:g} ({split}); "
                                               "hardware.memory_check=true rehearses the whole step"))
        return sp
    else:
        check_request(cfg, "hardware.memory_check")
        res = run_simulation(cfg, p.to_dict())
        if res["fits"]:
            sp.rows.extend(memory_rows(res))
            return sp
        problem = f"the simulated peak {res['peak_memory_gib']:.1f} GiB per rank"
    check_request(cfg, "hardware.device_batch_size")
    # a smaller device batch at the same total batch always accumulates (accum >= 2 in the floor)
    cands = [b for b in auto_batch_candidates(p.total_batch_size, p.sequence_len, p.world_size)
             if b < p.device_batch_size and memory_floor(p.model, b, 2, p.world_size, **floor_bytes)["total"]
             <= budget * GIB]
    best = run_simulation(cfg, p.to_dict(), "fit", cands)["device_batch_size"] if cands else None
    fix = (f"hardware.device_batch_size={best} (grad accumulation "
           f"{grad_accum(p.total_batch_size, best, p.sequence_len, p.world_size)}, same total batch), or "
           "hardware.device_batch_size=auto" if best else
           "model.activation_checkpointing=full, hardware.embedding_dtype=bfloat16, a smaller model or shorter "
           "sequences, or more GPUs")
    raise ConfigError("hardware.device_batch_size", p.device_batch_size, fix,
                      f"{problem} does not fit {HEADROOM:.0%} of hardware.gpu_memory_gb={hw.gpu_memory_gb:g}")
