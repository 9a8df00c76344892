"""End-to-end pretrain stage throughput on CPU, next to the bare train-step benchmark.

Runs the real stage (`nanochat-run stage=pretrain`, loader, logging, eval included) at the
reference configuration of issue 4/5 — depth 4 (width 256, 2 heads of 128), vocab 8192,
seq 512, device batch 8, total batch 4096 tokens, fp32, 2 threads — for the seed
architecture and the modern preset, and prints tokens/s and MFU from the run's metrics.

    flock /tmp/nanochat-cpu.lock .venv/bin/python bench/pretrain_stage.py [--steps 40]

The tokenizer (vocab 8192 on the demo corpus) is trained once into the base dir
(NANOCHAT_BASE_DIR or ~/.cache/nanochat) under the name `bench8k`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def nanochat_run(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "launch.run", *args], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--arch", choices=["seed", "modern", "both"], default="both")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = Path(env.get("NANOCHAT_BASE_DIR", "~/.cache/nanochat")).expanduser()
    if not (base / "tokenizer" / "bench8k" / "meta.json").exists():
        nanochat_run(["stage=tokenizer", "data=demo", "data.tokenizer=bench8k", "stage.vocab_size=8192",
                      "stage.max_chars=20000000", f"run.root={tempfile.mkdtemp()}"], env)
    for arch in (["seed", "modern"] if args.arch == "both" else [args.arch]):
        run_dir = Path(tempfile.mkdtemp()) / arch
        model = ["model=d4", "model.vocab_size=8192"] if arch == "seed" else \
            ["model=modern", "model.depth=4", "model.vocab_size=8192", "model.n_kv_head=2"]
        nanochat_run([*model, "model.sequence_len=512", "hardware=cpu", "hardware.device_batch_size=8",
                      "hardware.num_threads=2", "data.tokenizer=bench8k", "stage=pretrain",
                      "stage.total_batch_size=4096", f"stage.num_iterations={args.steps}",
                      f"stage.eval_every={args.steps}", "stage.eval_tokens=32768", "stage.sample_every=-1",
                      f"run.dir={run_dir}"], env)
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "train/loss" in r][5:]  # skip warm-up steps
        wall = max(r["elapsed_s"] for r in rows)  # tracker clock: from the first step to the end
        tps = [r["tok_per_sec"] for r in train]
        print(f"{arch:7s} pretrain stage: median {statistics.median(tps):7,.0f} tok/s (best {max(tps):,.0f}) | "
              f"median ms/step {statistics.median(r['dt_ms'] for r in train):7.1f} | "
              f"MFU {statistics.median(r['mfu'] for r in train) * 100:4.1f}% | wall clock incl. loader, logging, "
              f"eval, checkpoint: {args.steps * 4096 / wall:,.0f} tok/s")


if __name__ == "__main__":
    main()
