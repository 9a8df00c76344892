"""What checkpoint checksums cost: torch.save of a state dict vs SHA-256 over the written files.

    python bench/checkpoint_integrity.py [--mb 512]

Prints write MB/s, hash MB/s and the overhead of hashing relative to the write (the save path
reads every file back once to checksum it; resume verifies once more).
"""
from __future__ import annotations

import argparse
import tempfile
import timeit
from pathlib import Path

import torch

from nanochat.checkpoint import _torch_save
from nanochat.integrity import sha256_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512, help="size of the fake model state")
    args = ap.parse_args()
    n = args.mb * 2**20 // 4
    state = {f"w{i}": torch.randn(n // 8) for i in range(8)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.pt"
        write_s = timeit.timeit(lambda: _torch_save(state, path), number=1)  # includes fsync
        size_mb = path.stat().st_size / 2**20
        hash_s = timeit.timeit(lambda: sha256_file(path), number=1)
    print(f"state {size_mb:.0f} MiB | torch.save+fsync {write_s:.2f}s ({size_mb / write_s:.0f} MiB/s) | "
          f"sha256 {hash_s:.2f}s ({size_mb / hash_s:.0f} MiB/s) | hashing adds {100 * hash_s / write_s:.0f}% to a save")


if __name__ == "__main__":
    main()
