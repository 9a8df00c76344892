"""Checkpoint integrity: checksums written with every checkpoint, verified before resuming.

Each rank records the SHA-256 and size of every file it wrote into `manifest_rank{r}.json`; rank 0
merges them into `MANIFEST.json` as the last file before the checkpoint is committed (renamed into
place). A checkpoint is good when MANIFEST.json is there and every file in it has its size and
checksum. Resume (launch/rundir.check_resume_policy) walks the checkpoints newest first: a bad one
is reported and moved aside to `checkpoints/corrupt_step_XXXXXX` (kept for inspection, never loaded)
and the previous good one is used, or, under run.resume=must, the launch is refused with the reason.

No torch here: the launcher verifies without importing it.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

from nanochat.common import atomic_write_json, read_json
from nanochat.config import ConfigError
from nanochat.lifecycle import list_checkpoints

MANIFEST = "MANIFEST.json"
_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_rank_manifest(ckpt_dir: Path, rank: int, names: list[str]) -> None:
    """This rank's files and their checksums (read back from disk, i.e. what a resume will read)."""
    atomic_write_json(ckpt_dir / f"manifest_rank{rank}.json",
                      {n: {"sha256": sha256_file(ckpt_dir / n), "bytes": (ckpt_dir / n).stat().st_size} for n in names})


def write_manifest(ckpt_dir: Path, step: int, world_size: int) -> None:
    """Merge every rank's manifest into MANIFEST.json (rank 0, after all ranks wrote theirs)."""
    files: dict = {}
    for r in range(world_size):
        path = ckpt_dir / f"manifest_rank{r}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: rank {r} did not record its checkpoint files")
        files.update(read_json(path))
    atomic_write_json(ckpt_dir / MANIFEST, {"step": step, "world_size": world_size, "files": files})


def verify(ckpt_dir: str | Path) -> list[str]:
    """Problems with a committed checkpoint ([] means good): missing, truncated or altered files.

    A checkpoint without MANIFEST.json was made by code that predates checksums (or by an
    importer); it cannot be verified, which is reported but not held against it.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_json(ckpt_dir / MANIFEST)
    except FileNotFoundError:
        _warn(f"{ckpt_dir}: no {MANIFEST} (written before checkpoints had checksums); loading it unverified")
        return []
    except (OSError, ValueError) as e:
        return [f"{MANIFEST} is unreadable ({e})"]
    problems = []
    for name, rec in manifest.get("files", {}).items():
        path = ckpt_dir / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != rec["bytes"]:
            problems.append(f"{name} has {size} bytes, {rec['bytes']} were written (truncated or replaced)")
        elif sha256_file(path) != rec["sha256"]:
            problems.append(f"{name} does not match its SHA-256 checksum (altered on disk)")
    return problems


def _warn(msg: str) -> None:
    print(f"[nanochat] warning: {msg}", file=sys.stderr, flush=True)


def select_resume_checkpoint(run_dir: Path, policy: str) -> Optional[Path]:
    """The newest good checkpoint to resume from; bad ones are reported and moved aside.

    Under `must` a bad newest checkpoint refuses the launch (the user asked for exactly that state);
    under `auto` the run falls back to the previous good one. All bad is an error either way:
    starting over would silently throw the run away.
    """
    # a kill while re-saving a step can leave the old copy as `.old_step_X` with no `step_X`
    # (checkpoint.commit_dir moves it aside first): put it back
    for old in (Path(run_dir) / "checkpoints").glob(".old_step_*"):
        final = old.with_name(old.name.removeprefix(".old_"))
        if not final.exists():
            old.rename(final)
    ckpts = list_checkpoints(run_dir)
    for i, ck in enumerate(reversed(ckpts)):
        if not (problems := verify(ck)):
            return ck
        reason = "; ".join(problems)
        older = ckpts[:len(ckpts) - i - 1]
        if policy == "must":
            fix = (f"use run.resume=auto to fall back to the previous checkpoint ({older[-1].name})" if older
                   else "no earlier checkpoint exists; move checkpoints/ away and start the run over")
            raise ConfigError("run.resume", policy, fix, f"checkpoint {ck} failed verification: {reason}")
        n = 1   # moved aside: nothing loads it, it can be inspected (corrupt_step_X, then -2, -3 ...)
        while (moved := ck.with_name(f"corrupt_{ck.name}" + (f"-{n}" if n > 1 else ""))).exists():
            n += 1
        ck.rename(moved)
        _warn(f"checkpoint {ck.name} failed verification ({reason}); moved to {moved.name}, "
              f"{'trying ' + older[-1].name if older else 'no earlier checkpoint'}")
    if ckpts:
        raise ConfigError("run.resume", policy, f"inspect {run_dir}/checkpoints/corrupt_*; to start over, move "
                          "them away or use a fresh run.dir", f"all {len(ckpts)} checkpoints failed verification")
    return None

