"""Benchmark one training step (forward + backward + optimizer) of the GPT on this machine.

Prints tokens/s, ms/step and MFU, where MFU = estimate_flops() · tokens/s divided by this
machine's fp32 matmul throughput, measured in the same run (square 2048 GEMMs, before and
after each architecture; the max is used, since neighbours can only lower a measurement).

    flock /tmp/nanochat-cpu.lock .venv/bin/python bench/train_step.py             # reference d4, seed + modern
    flock /tmp/nanochat-cpu.lock .venv/bin/python bench/train_step.py --depth 8
    .venv/bin/python bench/train_step.py --arch seed --profile                     # where the time goes

Reference (issue 4): depth 4 (width 256, 2 heads of 128), vocab 8192, seq 512, device batch 8,
total batch 4096, full attention for seed, fp32, 2 threads. On a shared machine, the figures
are as noisy as the neighbours: the best-of (min) step time is the more stable number.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nanochat import training as T  # noqa: E402
from nanochat.config import ConfigError, config_from_dict  # noqa: E402
from nanochat.gpt import GPTConfig, build_model  # noqa: E402
from nanochat.plan import make_plan  # noqa: E402
from nanochat.precision import Precision  # noqa: E402


def matmul_gflops(n: int = 2048, device: str = "cpu") -> float:
    """Best observed fp32 GEMM throughput (GFLOP/s) over 9 GEMMs (the first warms up: the min discounts it)."""
    a, b, c = (torch.randn(n, n, device=device) for _ in range(3))
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    return 2 * n ** 3 / min(timeit.repeat(lambda: (torch.mm(a, b, out=c), sync()), number=1, repeat=9)) / 1e9


def bench(arch: str, args) -> dict:
    """The pretrain stage's own step (its plan, model, optimizer and nanochat.training.train_step) on fixed batches."""
    stage = {"name": "pretrain", "total_batch_size": args.total_batch, **({"muon_ns": args.ns} if args.ns else {})}
    cfg = config_from_dict({"model": {"generation": arch, "depth": args.depth, "vocab_size": args.vocab,
                                      "sequence_len": args.seq},
                            "stage": stage, "hardware": {"device_batch_size": args.device_batch}})
    try:
        plan = make_plan(cfg)
    except ConfigError as e:   # the stage's own check of the batch split (the flags set those keys)
        sys.exit(f"--total-batch {args.total_batch}, --device-batch {args.device_batch}, --seq {args.seq}: {e}")
    shape = replace(plan.model, n_kv_head=max(1, plan.model.n_head // 2)) if args.gqa else plan.model
    dev = torch.device(args.device)
    rt = T.Runtime(0, 0, 1, dev, Precision.resolve(dev.type, args.dtype), ROOT)
    model = build_model(GPTConfig(**shape.gpt_config_kwargs()), rt.device, seed=0)
    opt = T.make_optimizer(model, plan, cfg, rt)
    fwd_model = torch.compile(model, dynamic=False) if args.compile else model
    data = torch.randint(0, shape.vocab_size, (plan.grad_accum_steps, plan.device_batch_size, args.seq + 1),
                         generator=torch.Generator().manual_seed(0)).to(rt.device)
    batches = [(x[:, :-1], x[:, 1:]) for x in data]
    opt_start = []   # the optimizer's pre-step hook splits a step into fwd+bwd and optimizer
    opt.register_step_pre_hook(lambda *_: opt_start.append(time.perf_counter()))

    def train_step():
        t0 = time.perf_counter()
        loss = T.train_step(fwd_model, opt, iter(batches), plan, rt)   # ends in .item(): the device is done
        t2 = time.perf_counter()
        return t2 - t0, opt_start[-1] - t0, t2 - opt_start[-1], loss

    # (step, fwd+bwd, optimizer) seconds, loss; the warm-up steps' dropped
    runs = [train_step() for _ in range(args.warmup + args.steps)][args.warmup:]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                train_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    step_s, fwdbwd_s, opt_s = (statistics.median(col) for col in list(zip(*runs))[:3])
    return dict(params=model.num_params(), flops_per_token=model.estimate_flops(), step_s=step_s,
                best_s=min(r[0] for r in runs), fwdbwd_s=fwdbwd_s, opt_s=opt_s, loss=runs[-1][3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="both", choices=["seed", "modern", "both"])
    for flag, default in {"--depth": 4, "--vocab": 8192, "--seq": 512, "--device-batch": 8, "--total-batch": 4096,
                          "--steps": 8, "--warmup": 2, "--threads": 2, "--profile-rows": 25}.items():
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--ns", default=None, choices=["newton_schulz", "polar_express"],
                    help="Muon orthogonalization (default: the generation's recipe)")
    ap.add_argument("--gqa", action="store_true", help="n_kv_head = n_head // 2")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = [matmul_gflops(device=args.device)]
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 matmul {peaks[0]:.1f} GFLOP/s")
    for arch in (["seed", "modern"] if args.arch == "both" else [args.arch]):
        r = bench(arch, args)
        # the machine's peak is the best GEMM rate seen: a neighbour can only lower a measurement
        peaks.append(matmul_gflops(device=args.device))
        peak, tok = max(peaks), args.total_batch

        def mfu(seconds: float) -> float:   # percent of the peak at `seconds` per step
            return 100 * r["flops_per_token"] * tok / seconds / 1e9 / peak
        print(f"{arch:>6} d{args.depth} params={r['params']:,} flops/tok={r['flops_per_token']:,} | "
              f"{tok / r['step_s']:,.0f} tok/s (best {tok / r['best_s']:,.0f}) | {r['step_s'] * 1e3:.0f} ms/step "
              f"(best {r['best_s'] * 1e3:.0f}; fwd+bwd {r['fwdbwd_s'] * 1e3:.0f}, optim {r['opt_s'] * 1e3:.0f}) | "
              f"MFU {mfu(r['step_s']):.1f}% (best {mfu(r['best_s']):.1f}%, fwd+bwd alone "
              f"{mfu(r['fwdbwd_s']):.1f}%) | loss {r['loss']:.3f} | peak {peak:.1f} GFLOP/s")
    print("fp32 matmul GFLOP/s measured along the way: " + ", ".join(f"{p:.0f}" for p in peaks)
          + " (a spread means noisy neighbours; MFU uses the max)")


if __name__ == "__main__":
    main()
