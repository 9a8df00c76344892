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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.gpt import GPTConfig, build_model  # noqa: E402
from nanochat.precision import Precision  # noqa: E402
from nanochat.optim import build_optimizer  # noqa: E402
from nanochat.plan import OPTIMIZER_RECIPES  # noqa: E402

MODERN = dict(value_embeds=True, window_pattern="SSSL", resid_lambdas=True, x0_lambdas=True,
              smear=True, backout=True, qk_scale=1.2, pad_vocab_to=64, rope_base=100000.0)


def matmul_gflops(n: int = 2048, reps: int = 8, device: str = "cpu") -> float:
    """Best observed fp32 GEMM throughput (GFLOP/s)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def make_config(arch: str, depth: int, vocab: int, seq: int, gqa: bool) -> GPTConfig:
    n_embd = 64 * depth
    n_head = max(1, n_embd // 128)
    n_kv = max(1, n_head // 2) if gqa else n_head
    extra = MODERN if arch == "modern" else {}
    return GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=n_head, n_kv_head=n_kv,
                     n_embd=n_embd, **extra)


def bench(arch: str, args, peak: float) -> dict:
    cfg = make_config(arch, args.depth, args.vocab, args.seq, args.gqa)
    device = args.device
    model = build_model(cfg, device, seed=0)
    d = cfg.n_embd
    lr_scale = (d / 768) ** -0.5
    # the generation's optimizer recipe (modern: nanochat 92d63d4's NorMuon, cautious decay, per-group AdamW)
    settings = {k: v for k, v in OPTIMIZER_RECIPES[arch].items() if not k.startswith("muon_momentum")}
    if args.ns:
        settings["muon_ns"] = args.ns
    opt = build_optimizer(model, embedding_lr=0.3 * lr_scale, unembedding_lr=0.008 * lr_scale,
                          matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28 if arch == "modern" else 0.0,
                          settings=settings)
    fwd_model = torch.compile(model, dynamic=False) if args.compile else model
    tokens_per_micro = args.device_batch * args.seq
    if args.total_batch % tokens_per_micro:
        raise SystemExit(f"total batch {args.total_batch} must be a multiple of device_batch·seq = {tokens_per_micro}")
    accum = args.total_batch // tokens_per_micro
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (accum, args.device_batch, args.seq + 1), generator=g).to(device)
    ctx = Precision.resolve(torch.device(device).type, args.dtype).autocast()

    def train_step():
        t0 = time.perf_counter()
        for a in range(accum):
            with ctx:
                loss = fwd_model(data[a, :, :-1], data[a, :, 1:])
            (loss / accum).backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return t2 - t0, t1 - t0, t2 - t1, loss.item()

    for _ in range(args.warmup):
        train_step()
    times, fb, op = [], [], []
    for _ in range(args.steps):
        dt, tfb, top, loss = train_step()
        times.append(dt); fb.append(tfb); op.append(top)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                train_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    flops = model.estimate_flops()
    med, best = statistics.median(times), min(times)
    tok = args.total_batch
    return dict(arch=arch, depth=args.depth, params=model.num_params(), flops_per_token=flops,
                ms_step=med * 1e3, ms_best=best * 1e3, tok_s=tok / med, tok_s_best=tok / best,
                mfu=flops * tok / med / 1e9 / peak, mfu_best=flops * tok / best / 1e9 / peak,
                ms_fwdbwd=statistics.median(fb) * 1e3, ms_opt=statistics.median(op) * 1e3,
                mfu_fwdbwd=flops * tok / statistics.median(fb) / 1e9 / peak, loss=loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="both", choices=["seed", "modern", "both"])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device-batch", type=int, default=8)
    ap.add_argument("--total-batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--ns", default=None, choices=["newton_schulz", "polar_express"],
                    help="Muon orthogonalization (default: the generation's recipe)")
    ap.add_argument("--gqa", action="store_true", help="n_kv_head = n_head // 2")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = [matmul_gflops(device=args.device)]
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 matmul {peaks[0]:.1f} GFLOP/s")
    archs = ["seed", "modern"] if args.arch == "both" else [args.arch]
    for arch in archs:
        r = bench(arch, args, 1.0)
        # the machine's peak is the best GEMM rate seen: a neighbour can only lower a measurement
        peaks.append(matmul_gflops(device=args.device))
        peak = max(peaks)
        for k in ("mfu", "mfu_best", "mfu_fwdbwd"):
            r[k] /= peak
        print(f"{r['arch']:>6} d{r['depth']} params={r['params']:,} flops/tok={r['flops_per_token']:,} | "
              f"{r['tok_s']:,.0f} tok/s (best {r['tok_s_best']:,.0f}) | {r['ms_step']:.0f} ms/step "
              f"(best {r['ms_best']:.0f}; fwd+bwd {r['ms_fwdbwd']:.0f}, optim {r['ms_opt']:.0f}) | "
              f"MFU {100 * r['mfu']:.1f}% (best {100 * r['mfu_best']:.1f}%, fwd+bwd alone "
              f"{100 * r['mfu_fwdbwd']:.1f}%) | loss {r['loss']:.3f} | peak {peak:.1f} GFLOP/s")
    print("fp32 matmul GFLOP/s measured along the way: " + ", ".join(f"{p:.0f}" for p in peaks)
          + " (a spread means noisy neighbours; MFU uses the max)")


if __name__ == "__main__":
    main()
