"""Benchmark tokenizer training (rustbpe) and encoding (tiktoken): chars/s on real text.

    flock /tmp/nanochat-cpu.lock .venv/bin/python bench/tokenizer_train.py
    .venv/bin/python bench/tokenizer_train.py --vocab 8192 65536 --demo-chars 4000000

Corpora: the demo corpus (Python stdlib docstrings + sources, built offline) and, when
../shared/data is present, the public C4 + Common Crawl + Shakespeare samples (~5.8M chars).
Texts are read into memory first, so the figure is the trainer's speed, not parquet I/O.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from nanochat.common import shared_data_dir  # noqa: E402
from nanochat.config import DataConfig  # noqa: E402
from nanochat.dataset import iter_texts  # noqa: E402
from nanochat.tokenizer import train_tokenizer  # noqa: E402


def corpora(demo_chars: int, base: Path) -> dict[str, list[str]]:
    t0 = time.time()
    out = {"demo": list(iter_texts(DataConfig(demo_chars=demo_chars), base, "train"))}
    print(f"demo corpus: {sum(map(len, out['demo'])):,} chars, {len(out['demo'])} docs "
          f"(built + read in {time.time() - t0:.2f}s)")
    shared = shared_data_dir()
    if shared is not None:
        pre = shared / "pretrain"
        texts = [t for p in sorted((pre / "parquet").glob("*.parquet"))
                 for t in pq.read_table(p, columns=["text"]).column(0).to_pylist() if t]
        sh = (pre / "tinyshakespeare.txt").read_text(encoding="utf-8")
        texts += [sh[i:i + 10_000] for i in range(0, len(sh), 10_000)]
        out["shared_web+shakespeare"] = texts
    else:
        print("shared data absent: benchmarking the demo corpus only")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 8192, 32768])
    ap.add_argument("--demo-chars", type=int, default=4_000_000)
    ap.add_argument("--doc-cap", type=int, default=10_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = corpora(a.demo_chars, Path(tmp))
    print(f"\n{'corpus':>24} {'vocab':>7} {'chars':>11} {'train s':>8} {'train chars/s':>14} "
          f"{'encode chars/s':>15} {'bytes/token':>11}")
    for name, texts in data.items():
        texts = [t[: a.doc_cap] for t in texts]
        n_chars, n_bytes = sum(map(len, texts)), sum(len(t.encode()) for t in texts)
        for v in a.vocab:
            t0 = time.time()
            tok = train_tokenizer(iter(texts), v)
            t1 = time.time()
            ids = tok.encode(texts, num_threads=2)
            dt, enc_dt = t1 - t0, time.time() - t1
            print(f"{name:>24} {tok.get_vocab_size():>7} {n_chars:>11,} {dt:>8.2f} {n_chars / dt:>14,.0f} "
                  f"{n_chars / enc_dt:>15,.0f} {n_bytes / sum(map(len, ids)):>11.3f}")


if __name__ == "__main__":
    main()
