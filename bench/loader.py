"""Benchmark the pretraining loader: tokens/s for 2 ranks' worth of work on this machine.

    flock /tmp/nanochat-cpu.lock .venv/bin/python bench/loader.py
    .venv/bin/python bench/loader.py --batch 8 --seq 512 --vocab 8192 --batches 200

Setting of the CPU demo (depth 4, seq 512, device batch 8, vocab 8192, data=demo): two
loaders, rank 0 and rank 1 of world 2, run in one process (so they share the GIL and both
cores with each other: a pessimistic setting) and are drained as fast as possible.
Printed per packing mode: cold start (first batch), steady tokens/s over both ranks, and
the median time `next()` costs the training thread when 50 ms of simulated training
separate the calls (what a step actually pays). Compare tokens/s with bench/train_step.py (~2-2.5k tokens/s
for a depth-4 step here): the loader should be at least 10x faster.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.config import DataConfig  # noqa: E402
from nanochat.dataloader import DataLoader  # noqa: E402
from nanochat.dataset import iter_texts  # noqa: E402
from nanochat.tokenizer import train_tokenizer  # noqa: E402


def bench(cfg: DataConfig, tok, base: str, B: int, T: int, n: int, world: int) -> dict:
    t0 = time.perf_counter()
    loaders = [DataLoader(cfg, tok, B, T, "train", rank=r, world_size=world, base_dir=base) for r in range(world)]
    for dl in loaders:
        next(dl)
    t1 = time.perf_counter()
    for dl in loaders * n:   # n rounds over the ranks
        next(dl)
    cold, steady = t1 - t0, time.perf_counter() - t1
    # what next() costs the training thread when a step (simulated by a sleep) separates the calls
    costs = []
    for dl in loaders * 10:
        time.sleep(0.05)
        t = time.perf_counter()
        next(dl)
        costs.append(time.perf_counter() - t)
    for dl in loaders:
        dl.close()
    return {"cold_s": cold, "tok_s": n * world * B * T / steady, "next_us": statistics.median(costs) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in {"--batch": 8, "--seq": 512, "--vocab": 8192, "--world": 2, "--demo-chars": 4_000_000}.items():
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--batches", type=int, default=150, help="batches per rank")
    ap.add_argument("--threads", type=int, default=2, help="data.tokenizer_threads")
    ap.add_argument("--step-tok-s", type=float, default=2250.0,
                    help="depth-4 training step throughput to compare against (bench/train_step.py)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as base:
        demo = DataConfig(demo_chars=a.demo_chars, tokenizer_threads=a.threads)
        t0 = time.time()
        tok = train_tokenizer(iter_texts(demo, base, "train", doc_cap=10_000), a.vocab)
        print(f"setup: demo corpus + vocab-{tok.get_vocab_size()} tokenizer in {time.time() - t0:.1f}s; "
              f"B={a.batch} T={a.seq}, {a.world} ranks x {a.batches} batches")
        print(f"{'packing':>8} {'cold start s':>13} {'tokens/s (all ranks)':>21} {'next() us':>10} "
              f"{'x step':>7}")
        for packing in ("stream", "bestfit"):
            cfg = DataConfig(demo_chars=a.demo_chars, tokenizer_threads=a.threads, packing=packing)
            r = bench(cfg, tok, base, a.batch, a.seq, a.batches, a.world)
            print(f"{packing:>8} {r['cold_s']:>13.3f} {r['tok_s']:>21,.0f} {r['next_us']:>10.1f} "
                  f"{r['tok_s'] / a.step_tok_s:>7.0f}")


if __name__ == "__main__":
    main()
