"""CORE evaluation throughput on this machine: examples/s per task for a small random GPT.

    python bench/core_eval.py [--depth 4] [--max-per-task 20] [--seq-len 512] [--vocab 8192]

Trains a tokenizer on the shared C4 sample (a few seconds), builds a seed-architecture GPT of the
given depth, and times `evaluate_task` on every available task of ../shared/data/eval_bundle.
Prints figures only; the accuracies of a random model mean nothing.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.common import shared_data_dir  # noqa: E402
from nanochat.core_eval import (evaluate_task, load_core_tasks, load_task_examples,  # noqa: E402
                                num_evaluated)


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag, default in {"--depth": 4, "--max-per-task": 20, "--seq-len": 512, "--vocab": 8192}.items():
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    if shared is None:
        sys.exit("needs ../shared/data (the offline CORE bundle and C4 sample)")
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import train_tokenizer

    docs, n = [], 0
    with gzip.open(shared / "pretrain" / "c4-sample.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            n += len(docs[-1])
            if n > 2_000_000:
                break
    t0 = time.time()
    tok = train_tokenizer(iter(docs), args.vocab)
    print(f"tokenizer: vocab {tok.get_vocab_size()} trained on {n:,} chars in {time.time() - t0:.1f}s")
    d = 64 * args.depth
    cfg = GPTConfig(sequence_len=args.seq_len, vocab_size=tok.get_vocab_size(), n_layer=args.depth,
                    n_head=max(1, d // 128), n_kv_head=max(1, d // 128), n_embd=d)
    model = build_model(cfg, "cpu", seed=0).eval()
    print(f"model: depth {args.depth}, n_embd {d}, seq {args.seq_len}, {model.num_params():,} "
          f"params, {torch.get_num_threads()} threads, max_per_task {args.max_per_task}")
    total_n, total_s = 0, 0.0
    print(f"{'task':36s} {'type':18s} {'n':>4s} {'s':>7s} {'ex/s':>7s}")
    for spec in load_core_tasks(shared / "eval_bundle"):
        if not spec.available:
            print(f"{spec.label:36s} skipped (data missing)")
            continue
        ex = load_task_examples(spec)
        t0 = time.time()
        evaluate_task(model, tok, spec, ex, "cpu", max_per_task=args.max_per_task)
        dt = time.time() - t0
        k = num_evaluated(len(ex), args.max_per_task)
        total_n, total_s = total_n + k, total_s + dt
        print(f"{spec.label:36s} {spec.task_type:18s} {k:4d} {dt:7.2f} {k / dt:7.1f}")
    print(f"all: {total_n} examples in {total_s:.1f}s = {total_n / total_s:.1f} ex/s")


if __name__ == "__main__":
    main()
