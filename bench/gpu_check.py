"""Prove the GPU path on this machine: one PASS/FAIL/SKIP line per check, the figures, a JSON line.

    python bench/gpu_check.py                       # a CUDA machine (all GPUs; < 8 min on one GPU)
    python bench/gpu_check.py --device cpu --quick  # the same logic on a CPU (~1 min), as tests do
    python bench/gpu_check.py --only attention,kv_decode --json-out figures.json

Checks
  train_step    pretrain steps of d12/d20 (seed + modern, bf16, compiled + eager): tok/s, MFU against
                the GPU's dense bf16 peak (nanochat/gpus.py), peak memory; d20 seed compiled MFU
                target 45% on H100/H200. CPU: small depths in fp32, eager (MFU vs measured fp32 matmul).
  bf16_vs_fp32  20 steps of a small model on fixed data in fp32 and under bf16 autocast: the loss
                curves agree within BF16_TOL nats.
  kv_decode     prefill + token-by-token decode with the KV cache == the full forward (modern model).
  attention     every attention backend here vs the reference math, forward and backward, sliding
                windows included; on CUDA "auto" must not be the dense-mask SDPA, and the time of a
                window layer by flex vs dense SDPA is printed.
  precision     the policy this device resolves to; fp16 GradScaler skips a step on inf grads.
  auto_batch    hardware.device_batch_size=auto's probe for d20 (a tiny model on CPU).
  torchrun      the torchrun path (NCCL on CUDA with every GPU, gloo on CPU): ranks agree after steps.
  compile_cache compile time cold (empty inductor cache) and warm (second process, same cache), and
                that the warm run hits the FX graph cache. CPU: only with --compile (slow here).
  simulate      the pretrain step's measured peak memory vs nanochat/simulate.py's fake-tensor rehearsal
                (within 10%): the first GPU run checks the simulator.
  fp8           model.fp8 (torchao.float8) on nanochat's layers: 20 steps of a d4 (width 256) in fp8
                tensorwise vs bf16 agree within FP8_TOL nats; on fp8 GPUs (compute capability >= 8.9)
                the d24 speedrun model's compiled step in fp8 vs bf16: tok/s of both and the speedup
                (PASS needs fp8 faster). CPU: the loss check in emulation only (no fp8 speed there).
The last line printed is {"gpu_check": {...}} with every figure, for comparing machines.
Exit code 0 when nothing FAILed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from unittest import SkipTest as Skip   # a check that cannot run here: SKIP with the reason

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nanochat import attention as A  # noqa: E402
from nanochat import simulate, training  # noqa: E402
from nanochat.batch_size import find_device_batch  # noqa: E402
from nanochat.config import ModelConfig, config_from_dict  # noqa: E402
from nanochat.gpt import GPTConfig, KVCache, build_model  # noqa: E402
from nanochat.gpus import bf16_peak_flops  # noqa: E402
from nanochat.optim import build_optimizer  # noqa: E402
from nanochat.plan import OPTIMIZER_RECIPES, make_plan, model_shape, power_of_two_batches  # noqa: E402
from nanochat.precision import Precision, convert_fp8, fp8_supported  # noqa: E402

BF16_TOL = 0.1          # nats: max |loss_bf16 - loss_fp32| over 20 steps of a small model
FP8_TOL = 0.15          # nats: max |loss_fp8 - loss_bf16| over 20 steps of a d4 (CPU emulation: ~0.05)
MFU_TARGET = 0.45       # d20 seed, compiled, one H100/H200


def gpt_config(depth: int, generation: str, seq: int, vocab: int, **model) -> GPTConfig:
    """The architecture a run of this depth and generation trains (nanochat/plan.py's depth dial);
    `model`: more model.* keys."""
    m = ModelConfig(generation=generation, depth=depth, sequence_len=seq, vocab_size=vocab, **model)
    return GPTConfig(**model_shape(m).gpt_config_kwargs())


def optimizer_for(model, world_size: int = 1, rank: int = 0):
    """The generation's optimizer recipe (nanochat 92d63d4's for modern models: NorMuon, per-group AdamW),
    sharded over `world_size` ranks."""
    recipe = OPTIMIZER_RECIPES["modern" if model.config.resid_lambdas else "seed"]
    settings = {k: v for k, v in recipe.items() if not k.startswith("muon_momentum")}
    return build_optimizer(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.2,
                           weight_decay=0.0, settings=settings, world_size=world_size, rank=rank)


def train_step(model, opt, x, precision, scaler=None, world: int = 1) -> float:
    """One optimizer step on the batch x (B, T+1) by the training stages' own step (nanochat/training.py);
    its loss (the mean over `world` ranks). It ends in .item(): the device has finished the step."""
    rt = training.Runtime(0, 0, world, x.device, precision, ROOT)
    one_micro_batch = SimpleNamespace(grad_accum_steps=1)
    return training.train_step(model, opt, iter([(x[:, :-1], x[:, 1:])]), one_micro_batch, rt, scaler)


# ----------------------------------------------------------------------------- checks

def _run(cfg, dev, policy, batch: int, steps: int = 20, warm: int = 0, prepare=None, compiled: bool = False,
         n_data: int = 1) -> SimpleNamespace:
    """A fresh model (`prepare`d, e.g. converted to fp8), `warm` untimed then `steps` timed training steps under
    `policy`, cycling over `n_data` fixed batches; its weights and optimizer states must stay fp32. The median and
    first step seconds, tokens/s, every loss, FLOPs/token, params and (CUDA) the peak memory."""
    if dev.type == "cuda":   # the previous run's cached blocks released: this run's peak alone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    data = torch.randint(0, cfg.vocab_size, (n_data, batch, cfg.sequence_len + 1),
                         generator=torch.Generator().manual_seed(0)).to(dev)
    model = build_model(cfg, dev, 0)
    if prepare is not None:
        prepare(model)
    opt = optimizer_for(model)
    fwd = torch.compile(model, dynamic=False) if compiled else model
    times, losses = [], []
    for step in range(steps + warm):
        t0 = time.perf_counter()
        losses.append(train_step(fwd, opt, data[step % n_data], policy))
        times.append(time.perf_counter() - t0)
    policy.check_master_weights(model)
    policy.check_optimizer_states(opt)
    step_s = sorted(times[warm:])[steps // 2]
    return SimpleNamespace(step_s=step_s, first_s=times[0], tok_per_s=batch * cfg.sequence_len / step_s,
                           losses=losses, flops_per_token=model.estimate_flops(), params=model.num_params(),
                           peak_mem_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None)


def check_train_step(args, dev, precision) -> dict:
    if args.small:
        grid = [(2, "seed", False), (2, "modern", False)] + ([(2, "seed", True)] if args.compile else [])
        seq, vocab, batch, steps = 64, 512, 2, 2
    else:   # d12 eager and compiled, d20 compiled; seed and modern each
        grid = [(d, g, c) for d, g, c in itertools.product((12, 20), ("seed", "modern"), (False, True)) if d == 12 or c]
        seq, vocab, batch, steps = 2048, 65536, args.device_batch, 8
    peak = training.peak_flops(dev, precision.compute_dtype)   # the MFU denominator the training stages log
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    peak_src = ("cpu measured fp32 matmul" if name is None else f"{name} table" if bf16_peak_flops(name)
                else f"{name} (not in table: 312 TFLOPS bf16 assumed)")
    figures, ok = {"peak_flops": peak, "peak_source": peak_src}, True
    for depth, gen, compiled in grid:
        key = f"d{depth}_{gen}_{'compiled' if compiled else 'eager'}"
        r = _run(gpt_config(depth, gen, seq, vocab), dev, precision, batch, steps, 2 if dev.type == "cuda" else 1,
                 compiled=compiled)
        mfu, mem = r.flops_per_token * r.tok_per_s / peak, r.peak_mem_gib
        ok &= all(map(math.isfinite, r.losses))
        figures[key] = {"tok_per_s": round(r.tok_per_s, 1), "mfu": round(mfu, 4), "step_ms": round(r.step_s * 1e3, 2),
                        "peak_mem_gib": round(mem, 2) if mem is not None else None, "batch": batch, "seq": seq,
                        "params": r.params, "loss_first_last": [round(r.losses[0], 4), round(r.losses[-1], 4)]}
        print(f"    {key:22s} {r.tok_per_s:12,.0f} tok/s  MFU {mfu * 100:5.1f}%  step {r.step_s * 1e3:8.1f} ms"
              + (f"  peak {mem:.1f} GiB" if mem is not None else ""))
    if "d20_seed_compiled" in figures and any(k in name for k in ("H100", "H200")):
        met = figures["d20_seed_compiled"]["mfu"] >= MFU_TARGET
        figures.update(mfu_target=MFU_TARGET, mfu_target_met=met)
        ok &= met
    return {"ok": ok, **figures}


def _agree(cfg, dev, batch: int, tol: float, note: str = "", **runs) -> tuple[list[float], list[float], float]:
    """The loss curves of the two `runs` (name=(policy, prepare)), 20 steps each cycling over 4 fixed batches (the
    model can learn them, so the curves must fall), and their max |Δ|, printed against `tol`."""
    (a, ca), (b, cb) = ((name, _run(cfg, dev, policy, batch, prepare=prepare, n_data=4).losses)
                        for name, (policy, prepare) in runs.items())
    diff = max(abs(x - y) for x, y in zip(ca, cb))
    print(f"    loss {a} {ca[0]:.3f}→{ca[-1]:.3f}  {b} {cb[0]:.3f}→{cb[-1]:.3f}  max |Δ| {diff:.4f} (tol {tol}{note})")
    return ca, cb, diff


def check_bf16_vs_fp32(args, dev, precision) -> dict:
    cfg = gpt_config(1 if args.quick else 4, "seed", 32 if args.quick else 512, 256 if args.quick else 8192)

    def plain_loss(model) -> None:               # the same (plain) loss path under both policies
        model.fused_loss = False
    # bf16 on CPU too: the check is about the math, not the speed
    fp32, bf16, diff = _agree(cfg, dev, 2 if args.quick else 16, BF16_TOL, fp32=(Precision(dev.type), plain_loss),
                              bf16=(Precision(dev.type, torch.bfloat16), plain_loss))
    return {"ok": diff <= BF16_TOL and fp32[-1] < fp32[0], "max_abs_diff": round(diff, 5),
            "tolerance": BF16_TOL, "fp32_last": round(fp32[-1], 4), "bf16_last": round(bf16[-1], 4)}


def check_kv_decode(args, dev, precision) -> dict:
    cfg = gpt_config(4, "modern", 64, 256, n_embd=64 if args.quick else 128, n_head=4, n_kv_head=2, short_window=16)
    model = build_model(cfg, dev, 0)
    with torch.no_grad():
        g = torch.Generator(dev).manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, device=dev))
    out, ok = {}, True
    idx = torch.randint(0, 256, (3, 48), device=dev, generator=torch.Generator(dev).manual_seed(2))
    policies = [("fp32", Precision(dev.type), 1e-4)] + ([("bf16", precision, 0.15)] if precision.autocast_enabled else [])
    for name, pol, tol in policies:
        with torch.no_grad(), pol.autocast():
            full = model(idx)
            cache = KVCache.for_model(model, batch_size=3, max_len=48)
            steps = [model(idx[:, :20], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(20, 48)]
        diff = (torch.cat(steps, 1) - full).abs().max().item()
        out[f"{name}_max_abs_diff"] = diff
        ok &= diff <= tol
        print(f"    {name}: decode vs full forward max |Δ| {diff:.2e} (tol {tol})")
    return {"ok": ok, **out}


def check_attention(args, dev, precision) -> dict:
    backends = A.available_backends(dev.type)
    out = {"backends": backends, "auto": A.resolve_backend("auto", dev.type)}
    ok = dev.type != "cuda" or out["auto"] != "sdpa"   # windows must not run as dense masked SDPA on a GPU
    T, D = (128, 32) if args.small else (2048, 128)
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    for backend, dtype, window in itertools.product(backends, dtypes, (1, T // 8, T)):
        g = torch.Generator(dev).manual_seed(window)
        grad = A.supports_backward(backend, dev.type)
        q, k, v = (torch.randn(2, h, T, D, device=dev, generator=g, dtype=dtype, requires_grad=grad) for h in (4, 2, 2))
        y = A.causal_attention(q, k, v, window, D ** -0.5, backend)
        ref = A.reference_attention(q.detach(), k.detach(), v.detach(), window, D ** -0.5).float()
        err = (y.float() - ref).abs().max().item()
        key = f"{backend}_{str(dtype)[6:]}_w{window}"
        out[key + "_fwd_err"] = err
        ok &= err <= (2e-4 if dtype == torch.float32 else 0.3)
        if grad:
            gq = torch.autograd.grad(y.float().square().sum(), q)[0]
            q64 = q.detach().double().requires_grad_(True)
            r = A.reference_attention(q64, k.detach().double(), v.detach().double(), window, D ** -0.5)
            rq = torch.autograd.grad(r.square().sum(), q64)[0]
            # relative to the gradient's size (floored: a window of 1 has zero dq)
            berr = ((gq.double() - rq).abs().max() / rq.abs().max().clamp(min=1.0)).item()
            out[key + "_bwd_rel_err"] = berr
            ok &= berr <= (1e-4 if dtype == torch.float32 else 5e-2)
    if dev.type == "cuda" and "flex" in backends:  # the point of block masks: a window costs ~window/T
        from torch.utils.benchmark import Timer   # warms up first; syncs CUDA around the timed calls
        qkv = [torch.randn(8, 16, 2048, 128, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        for name, be in (("dense_sdpa", "sdpa"), ("flex", "flex")):
            timer = Timer("attend(*qkv, 256, 128 ** -0.5, be)", globals=dict(attend=A.causal_attention, qkv=qkv, be=be))
            out[f"window256_T2048_{name}_ms"] = timer.timeit(10).mean * 1e3
        print(f"    window 256 of T 2048: dense SDPA {out['window256_T2048_dense_sdpa_ms']:.2f} ms, "
              f"flex {out['window256_T2048_flex_ms']:.2f} ms")
    print(f"    backends {backends}, auto → {out['auto']}, worst fwd err "
          f"{max(v for k, v in out.items() if k.endswith('_fwd_err')):.2e}")
    return {"ok": ok, **out}


def check_precision(args, dev, precision) -> dict:
    out = {"policy": precision.describe()}
    if dev.type == "cuda":
        out["bf16_supported"] = torch.cuda.is_bf16_supported(including_emulation=False)
    fp16 = Precision(dev.type, torch.float16)
    model = build_model(gpt_config(1, "seed", 32, 256), dev, 0)
    model.fused_loss = False
    opt = optimizer_for(model)
    scaler = fp16.grad_scaler(init_scale=2.0 ** 30)   # far past fp16's range: the first steps overflow
    x = torch.randint(0, 256, (2, 33), device=dev)
    skipped = 0
    for _ in range(40):
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        train_step(model, opt, x, fp16, scaler)
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        if scaler.get_scale() >= scale:   # no overflow: this step must have moved the weights
            break
        if moved:
            return {"ok": False, "error": "a step with inf grads changed the weights", **out}
        skipped += 1
    out.update(skipped_steps=skipped, final_scale=scaler.get_scale())
    print(f"    {out['policy']}; fp16 scaler skipped {skipped} overflowing steps, then stepped")
    return {"ok": skipped >= 1 and moved, **out}   # 40 overflows: the last one did not move them either


def check_auto_batch(args, dev, precision) -> dict:
    if args.small:
        kw = dict(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
        res = find_device_batch(kw, 64, [1024, 256, 64], dev.type, "float32", memory_gb=0.1)
    else:   # the whole architecture, as the launcher's probe passes it (launch/probe.py)
        res = find_device_batch(vars(gpt_config(20, "seed", 2048, 65536)), 2048,
                                power_of_two_batches(2 ** 19, 2048, 1), "cuda", "bfloat16")
    trials = ", ".join(f"{t['batch']}:{'fits' if t['fits'] else t['reason']}" for t in res["trials"])
    print(f"    device_batch_size auto → {res['device_batch_size']} ({trials})")
    return {"ok": res["device_batch_size"] is not None, "device_batch_size": res["device_batch_size"],
            "trials": [{k: t[k] for k in ("batch", "fits", "peak_gib", "seconds")} for t in res["trials"]]}


def _spawn(args, dev, worker: str, out: str, *launcher: str, **env: str) -> tuple[list[dict], str, float]:
    """This script as `worker` in a fresh process (under `launcher`, e.g. torchrun): the reports it wrote into
    `out` (one per rank; none when it failed), the tail of its output and its wall-clock seconds."""
    cmd = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", worker, "--device", dev.type,
           "--out", out] + ["--quick"] * args.quick
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env),
                       capture_output=True, text=True, timeout=900)
    reports = [json.loads(f.read_text()) for f in sorted(Path(out).glob("*.json"))] if p.returncode == 0 else []
    return reports, (p.stdout + p.stderr)[-1500:], time.perf_counter() - t0


def check_torchrun(args, dev, precision) -> dict:
    n = torch.cuda.device_count() if dev.type == "cuda" else (1 if args.quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        reports, tail, wall = _spawn(args, dev, "ddp", tmp, "-m", "torch.distributed.run", "--standalone",
                                     f"--nproc_per_node={n}")
    if len(reports) != n:
        return {"ok": False, "world_size": n, "error": tail}
    agree = all(r["param_checksum"] == reports[0]["param_checksum"] for r in reports)
    backend = reports[0]["backend"]
    print(f"    torchrun world {n} ({backend}): {len(reports)} ranks, params agree {agree}, {wall:.1f} s")
    return {"ok": agree and all(r["finite"] for r in reports), "world_size": n, "backend": backend,
            "wall_s": round(wall, 2), "losses_rank0": reports[0]["losses"]}


def ddp_worker(args) -> None:
    """Under torchrun: init the process group, a few steps of the sharded optimizer, report."""
    import torch.distributed as dist
    from nanochat.common import init_distributed
    rank, local_rank, world, dev = init_distributed(args.device)
    if not dist.is_initialized():  # world 1 too: prove the backend (NCCL on a GPU) initializes
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    t = torch.ones((), device=dev) * (rank + 1)
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2, "all_reduce gave the wrong sum"
    model = build_model(gpt_config(1 if args.quick else 2, "modern", 64, 256), dev, 0)
    opt = optimizer_for(model, world, rank)
    policy = Precision.resolve(dev.type, "bfloat16")
    xs = torch.randint(0, 256, (3, 2, 65), generator=torch.Generator().manual_seed(rank)).to(dev)
    # the sharded optimizer reduce-scatters grads and all-gathers params itself; the loss is the ranks' mean
    losses = [train_step(model, opt, x, policy, world=world) for x in xs]
    checksum = sum(p.double().sum().item() for p in model.parameters())
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "backend": dist.get_backend(), "losses": losses,
         "param_checksum": round(checksum, 6), "finite": all(map(math.isfinite, losses))}))
    dist.destroy_process_group()


def check_compile_cache(args, dev, precision) -> dict:
    if dev.type != "cuda" and not args.compile:
        raise Skip("torch.compile on CPU is slow here; pass --compile to include it")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in ("cold", "warm"):   # the second process finds the first one's inductor cache
            reports, tail, _ = _spawn(args, dev, "compile", tmp, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor")
            if not reports:
                return {"ok": False, "error": tail}
            runs += reports
    cold, warm = runs
    print(f"    first compiled step: cold {cold['first_step_s']:.1f} s, warm {warm['first_step_s']:.1f} s; "
          f"warm FX-graph cache hits {warm['fxgraph_cache_hit']}, misses {warm['fxgraph_cache_miss']}")
    return {"ok": warm["fxgraph_cache_hit"] > 0 and cold["matches_eager"] and warm["matches_eager"],
            "cold_first_step_s": cold["first_step_s"], "warm_first_step_s": warm["first_step_s"],
            "warm_cache_hits": warm["fxgraph_cache_hit"], "warm_cache_misses": warm["fxgraph_cache_miss"]}


def compile_worker(args) -> None:
    """A fresh process: the first training step of a compiled model (compile included) and its loss vs eager's."""
    from torch._dynamo.utils import counters
    dev = torch.device(args.device)
    depth, seq, vocab, batch = (1, 64, 256, 2) if args.small else (12, 2048, 65536, 8)
    cfg, precision = gpt_config(depth, "seed", seq, vocab), Precision.resolve(dev.type, "bfloat16")
    eager, compiled = (_run(cfg, dev, precision, batch, 1, compiled=c) for c in (False, True))
    ref, value = eager.losses[0], compiled.losses[0]
    tol = 1e-4 if not precision.autocast_enabled else 2e-2
    Path(args.out, "compile.json").write_text(json.dumps(
        {"first_step_s": round(compiled.first_s, 2), "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
         "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
         "matches_eager": abs(value - ref) <= tol * max(1.0, abs(ref))}))


def check_fp8(args, dev, precision) -> dict:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise Skip("torchao is not installed (pip install '.[fp8]')")
    hw = fp8_supported(dev)
    if dev.type == "cuda" and not hw:
        raise Skip(f"{torch.cuda.get_device_name(dev)} has no fp8 matmuls (compute capability < 8.9)")
    cfg = gpt_config(2 if args.small else 4, "modern", 64 if args.small else 512, 512 if args.small else 8192)
    bf16 = Precision(dev.type, torch.bfloat16) if dev.type == "cuda" else Precision(dev.type)

    def to_fp8(model) -> None:   # emulated where the device has no fp8 matmuls (the CPU)
        convert_fp8(model, "tensorwise", emulate=not hw)
    ref, got, diff = _agree(cfg, dev, 2 if args.small else 16, FP8_TOL, ", emulated" if not hw else "",
                            **{bf16.name: (bf16, None), "fp8": (bf16, to_fp8)})
    out = {"emulated": not hw, "max_abs_diff": round(diff, 5), "tolerance": FP8_TOL,
           "ref_first_last": [round(ref[0], 4), round(ref[-1], 4)], "fp8_first_last": [round(got[0], 4), round(got[-1], 4)]}
    ok = diff <= FP8_TOL and got[-1] < got[0] and all(map(math.isfinite, got))
    if hw and not args.quick:   # the d24 speedrun model, compiled; 3 warm-up steps compile and autotune first
        cfg = gpt_config(24, "modern", 2048, 32768)
        ref, fp8 = (_run(cfg, dev, precision, args.device_batch, 5, 3, f, compiled=True) for f in (None, to_fp8))
        base, fast, last = ref.tok_per_s, fp8.tok_per_s, fp8.losses[-1]
        out.update(d24_bf16_tok_per_s=round(base, 1), d24_fp8_tok_per_s=round(fast, 1),
                   d24_fp8_speedup=round(fast / base, 3), d24_fp8_loss=round(last, 4))
        ok &= fast > base and math.isfinite(last)
        print(f"    d24 compiled: bf16 {base:,.0f} tok/s  fp8 {fast:,.0f} tok/s  ({fast / base:.2f}×)")
    return {"ok": ok, **out}


def check_simulate(args, dev, precision) -> dict:
    """The simulator (nanochat/simulate.py) against the device: the same pretrain step (d12 modern, eager,
    accumulation 2) run for real, its measured peak (CUDA: max_memory_allocated; CPU: the tracker on real
    tensors) vs the peak simulated on fake tensors. The first GPU run checks the simulator this way."""
    cuda = dev.type == "cuda"
    seq, B = (64, 4) if args.small else (2048, args.device_batch)
    model_cfg = {"generation": "modern", "depth": 2 if args.small else 12, "sequence_len": seq,
                 "vocab_size": 32768 if cuda else 512}
    cfg = config_from_dict({"model": model_cfg, "stage": {"name": "pretrain", "total_batch_size": 2 * B * seq},
                            "hardware": {"device": dev.type, "dtype": "bfloat16" if cuda else "float32",
                                         "device_batch_size": B, "gpu_memory_gb": 80, "compile": False}})
    plan = make_plan(cfg)
    sim = simulate.rehearse(cfg, plan)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        model = build_model(training.gpt_config(plan), dev, 0)
        opt = training.make_optimizer(model, plan, cfg, training.Runtime(0, 0, 1, dev, precision, ROOT))
        for step in range(2):
            xs = torch.randint(0, plan.model.vocab_size, (2, B, seq + 1), device=dev)
            # the pretrain step with its schedules; it ends in .item(), so the peak below is the step's
            simulate.train_step(model, opt, [(x[:, :-1], x[:, 1:]) for x in xs], precision, plan, step)
        measured = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 30
    else:
        measured = simulate.rehearse(cfg, plan, fake=False)["peak_memory_gib"]
    err = sim["peak_memory_gib"] / measured - 1
    print(f"    d{plan.model.depth} {B}×{seq}, accum 2: measured peak {measured:.3f} GiB, simulated "
          f"{sim['peak_memory_gib']:.3f} GiB ({err * 100:+.1f}%); FLOPs/token counted "
          f"{sim['flops_per_token_counted']:,.0f} vs plan {plan.flops_per_token:,}")
    return {"ok": abs(err) <= 0.10, "measured_peak_gib": round(measured, 4),
            "simulated_peak_gib": round(sim["peak_memory_gib"], 4), "relative_error": round(err, 4),
            "simulated_split_gib": {k: round(v, 4) for k, v in sim["memory_gib"].items()}}


CHECKS = {name[6:]: check for name, check in globals().items() if name.startswith("check_")}   # --only names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small models and few steps (CPU: about a minute)")
    ap.add_argument("--compile", action="store_true", help="on CPU, include the torch.compile checks")
    ap.add_argument("--device-batch", type=int, default=16, help="sequences per step in the d12/d20 train steps")
    ap.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    ap.add_argument("--json-out", default="", help="also write the final JSON to this file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.small = args.quick or args.device != "cuda"   # small models, few steps: --quick, and every CPU run
    sys.stdout.reconfigure(line_buffering=True)        # each line out as it is printed (a log, a pipe)
    if args.worker:
        {"ddp": ddp_worker, "compile": compile_worker}[args.worker](args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick to check the logic on this CPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = Precision.resolve(dev.type, "bfloat16")
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    if unknown := [n for n in names if n not in CHECKS]:
        print(f"--only: unknown check(s) {unknown}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"gpu_check on {device_name} (torch {torch.__version__}, {precision.describe()})")
    results, t_all = {}, time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            res = CHECKS[name](args, dev, precision)
            status = "PASS" if res.pop("ok") else "FAIL"
        except Skip as e:
            res, status = {"reason": str(e)}, "SKIP"
        except Exception as e:  # a crash is a FAIL of that check, the others still run
            res, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}, "FAIL"
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = {"status": status, **res}
        detail = f" ({res.get('reason') or res.get('error', '')})" if status != "PASS" else ""
        print(f"{status} {name} [{res['seconds']:.1f} s]{detail}")
    summary = {"device": device_name, "torch": torch.__version__, "quick": args.quick,
               "seconds": round(time.perf_counter() - t_all, 1),
               "passed": sum(r["status"] == "PASS" for r in results.values()),
               "failed": [n for n, r in results.items() if r["status"] == "FAIL"],
               "skipped": [n for n, r in results.items() if r["status"] == "SKIP"], "checks": results}
    line = json.dumps({"gpu_check": summary}, default=str)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
