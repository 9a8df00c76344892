"""Benchmark the hub download path: shard throughput against the local hub server, and import times.

    .venv/bin/python bench/download.py                    # 8 shards of ~16 MB, 4 workers
    .venv/bin/python bench/download.py --shards 4 --mb 32 --workers 1

Serves real parquet shards from tests/hub_server.py on 127.0.0.1 (HF_ENDPOINT points
huggingface_hub at it) and fetches them into an empty hub cache through nanochat.dataset
(the same call a pretraining run makes: pinned listing, parallel hf_hub_download, footer check).
Loopback has no network cost, so this measures the client side: library overhead, hashing,
disk writes. Also prints the cold import time (fresh interpreter) of the modules that a
dry run, a task load and a download pull in, since `datasets` is heavy and must stay lazy.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def python_seconds(code: str) -> float:
    """Best-of-3 wall time of `python -c code` in a fresh interpreter."""
    cmd = [sys.executable, "-c", code]
    return min(timeit.repeat(lambda: subprocess.run(cmd, check=True, cwd=ROOT), number=1, repeat=3))


def shard_bytes(i: int, mb: float) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    doc = f"shard {i} " + os.urandom(2048).hex()  # incompressible text, 4 KB per doc
    n = max(1, int(mb * 1e6 / len(doc)))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [doc] * n}), buf, compression="none", use_dictionary=False)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--mb", type=float, default=16.0, help="size of each shard")
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()

    bare = python_seconds("pass")   # each import's time is net of a bare interpreter start
    for module in ("launch.run", "nanochat.hub", "nanochat.dataset", "nanochat.tasks", "datasets"):
        print(f"import {module:18s} {python_seconds(f'import {module}') - bare:6.2f} s")

    from hub_server import HubServer
    files = {f"shard_{i:05d}.parquet": shard_bytes(i, a.mb) for i in range(a.shards + 1)}  # +1: val
    total_mb = sum(len(b) for b in files.values()) / 1e6
    with HubServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.add_repo("bench/shards", files)
        os.environ.update(HF_ENDPOINT=server.endpoint, HF_HUB_CACHE=f"{tmp}/hub", HF_HUB_DISABLE_PROGRESS_BARS="1")
        from nanochat.config import DataConfig
        from nanochat.dataset import download_shards
        cfg = DataConfig(name="bench", source="hub", repo="bench/shards", download_workers=a.workers)
        t0 = time.perf_counter()
        paths = download_shards(cfg, f"{tmp}/base", a.shards)
        dt = time.perf_counter() - t0
        assert [p.read_bytes() for p in paths] == list(files.values())
        warm = timeit.timeit(lambda: download_shards(cfg, f"{tmp}/base", a.shards), number=1)
    print(f"download {len(paths)} shards, {total_mb:.0f} MB, {a.workers} workers: {dt:.2f} s "
          f"= {total_mb / dt:.0f} MB/s over loopback; again from the cache: {warm * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
