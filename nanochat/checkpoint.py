"""Checkpoints: <run_dir>/checkpoints/step_XXXXXX/ written atomically by every rank.

Layout of one checkpoint:
    model.pt               model weights (rank 0; identical on all ranks)
    meta.json              step, loop state, metrics, the run's config and plan (rank 0)
    optim_rank{r}.pt       this rank's optimizer shard (ZeRO-2: each rank owns different state)
    dataloader_rank{r}.json this rank's loader position (exact resume)
    rng_rank{r}.pt         torch / cuda RNG states
    manifest_rank{r}.json  SHA-256 and size of every file rank r wrote
    MANIFEST.json          all ranks' records, written last (nanochat/integrity.py verifies it)

All-or-nothing: every rank writes into `.tmp_step_XXXXXX/`; the ranks then agree that all of
them succeeded, rank 0 writes MANIFEST.json and renames the dir to `step_XXXXXX/`, so a kill at
any moment leaves either a whole checkpoint or none. A failed write on any rank (a full disk)
discards the temp dir on every rank and raises CheckpointWriteError; earlier checkpoints are
never touched before the new one is committed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Optional

import torch

from nanochat.common import (atomic_write_bytes, atomic_write_json, atomic_write_text, barrier, distributed,
                             rank_world, read_json)
from nanochat.integrity import write_manifest, write_rank_manifest
from nanochat.lifecycle import list_checkpoints


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (on some rank); it was discarded, older ones are intact."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    try:
        atomic_write_bytes(path, lambda f: torch.save(obj, f))
    except RuntimeError as e:
        # torch turns a failed write into a RuntimeError without errno; the OSError (ENOSPC, EIO, ...)
        # it raised in is its context: re-raise that, so the caller can say what went wrong
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def _test_pause(point: str, step: int, ckpt_root: Path, rank: int) -> None:
    """Test-only: NANOCHAT_TEST_CKPT_PAUSE=<point>@<step> parks this rank at `point` of the save of
    `step` (after touching checkpoints/.paused_<point>_rank<r>) until it is killed, so a chaos
    test can SIGKILL the run at exactly that moment."""
    if os.environ.get("NANOCHAT_TEST_CKPT_PAUSE") == f"{point}@{step}":
        (ckpt_root / f".paused_{point}_rank{rank}").touch()
        while True:
            time.sleep(1)


def _describe_write_error(e: OSError, step: int, ckpt_root: Path) -> str:
    prev = list_checkpoints(ckpt_root.parent)
    keep = f"the previous checkpoint {prev[-1].name} is intact" if prev else "no earlier checkpoint exists"
    what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
    free = ""
    with suppress(OSError):
        free = f", {shutil.disk_usage(ckpt_root).free / 2**20:.1f} MiB free"
    return (f"checkpoint step {step} could not be written: {what} ({e.filename or ckpt_root}{free}); it was "
            f"discarded and {keep}. Free space under {ckpt_root} (or lower stage.keep_last), then resume "
            f"with run.resume=auto")


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, optimizer: Any,
                    loader_state: Optional[dict], meta: dict, rank: int = 0, keep_last: int = -1) -> Path:
    """Collective: every rank calls it at the same step. Returns the final checkpoint dir."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp_{step_dir_name(step)}"

    @contextmanager
    def all_ranks():
        """One phase of the save: if it fails on any rank (an OSError), every rank discards the temp dir."""
        error = None
        try:
            yield
        except OSError as e:
            error = _describe_write_error(e, step, ckpt_root)
        errors = [error] if error else []
        if dist := distributed():  # every rank's error, on every rank: the ranks commit or discard together
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, error)
            errors = [f"rank {r}: {e}" for r, e in enumerate(gathered) if e]
        if errors:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back; nothing points at it
            raise CheckpointWriteError("; ".join(errors))

    with all_ranks():
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from a kill mid-save
            tmp.mkdir(parents=True)
    with all_ranks():
        if rank == rank_world()[1] - 1:
            _test_pause("rank_files", step, ckpt_root, rank)  # lower ranks are done (or writing)
        names = []
        if rank == 0:
            state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
            _torch_save(state, tmp / "model.pt")
            atomic_write_json(tmp / "meta.json", {"step": step, **meta})
            names += ["model.pt", "meta.json"]
        if optimizer is not None:
            _torch_save(optimizer.state_dict(), tmp / f"optim_rank{rank}.pt")
            names.append(f"optim_rank{rank}.pt")
        if loader_state is not None:
            atomic_write_text(tmp / f"dataloader_rank{rank}.json", json.dumps(loader_state))
            names.append(f"dataloader_rank{rank}.json")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _torch_save(rng, tmp / f"rng_rank{rank}.pt")
        names.append(f"rng_rank{rank}.pt")
        write_rank_manifest(tmp, rank, names)
    with all_ranks():
        if rank == 0:
            write_manifest(tmp, step, rank_world()[1])
            _fsync_dir(tmp)
            _test_pause("commit", step, ckpt_root, rank)
            commit_dir(tmp, final)
    if rank == 0 and keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place. Re-saving a step (preempted right after a periodic
    save) moves the old one aside first, so a kill in between still leaves a whole checkpoint."""
    old = final.with_name(f".old_{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    return (list_checkpoints(run_dir) or [None])[-1]


def load_meta(ckpt: str | Path) -> dict:
    return read_json(Path(ckpt) / "meta.json")


def load_model_state(ckpt: str | Path, device: Any = "cpu") -> dict:
    return torch.load(Path(ckpt) / "model.pt", map_location=device, weights_only=True)


def load_rank_state(ckpt: str | Path, rank: int, device: Any = "cpu") -> dict:
    """This rank's optimizer / loader / RNG state (missing pieces → None)."""
    files = {"optim": (f"optim_rank{rank}.pt", lambda p: torch.load(p, map_location=device, weights_only=False)),
             "loader": (f"dataloader_rank{rank}.json", read_json),
             "rng": (f"rng_rank{rank}.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False))}
    return {k: load(p) if (p := Path(ckpt) / name).exists() else None for k, (name, load) in files.items()}


def load_model_from_run(run_dir: str | Path, device: Any):
    """Build the GPT of a finished run from its last checkpoint: (model, meta)."""
    from nanochat.gpt import GPT, GPTConfig
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints (did the run save one?)")
    meta = load_meta(ckpt)
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device=device)
    model.init_rotary()
    # a run with hardware.embedding_dtype=bfloat16 saved bf16 tables: an inference model is all fp32
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_model_state(ckpt, device).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model, meta
