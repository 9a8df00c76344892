"""Small shared helpers: distributed setup, logging on rank 0, atomic writes, base dir.

Importing this module does not import torch (the launcher's fast paths rely on that);
the functions that need torch import it inside.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, Callable


def get_base_dir(base_dir: str | None = None) -> Path:
    """Shared artifacts live here: env NANOCHAT_BASE_DIR beats the config value."""
    path = Path(os.environ.get("NANOCHAT_BASE_DIR") or base_dir or "~/.cache/nanochat").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir(configured: str | None = None) -> Path | None:
    """The offline public datasets (../shared/data layout), if present."""
    candidates = (configured, os.environ.get("NANOCHAT_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared/data")
    return next((Path(c).expanduser() for c in candidates if c and Path(c).expanduser().is_dir()), None)


# ----------------------------------------------------------------------------- atomic io

UMASK = os.umask(0o022)   # read once, at import (setting it is process-wide): atomic writes honour it
os.umask(UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Write `data` (bytes, or a function that writes into the open file: torch.save) to a temp file in the
    same dir, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)   # mkstemp makes 0600: give the mode open() would (shared run dirs)
        with os.fdopen(fd, "wb") as f:
            f.write(data) if isinstance(data, bytes) else data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- distributed

def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's env; (0, 0, 1) otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return 0, 0, 1


def is_rank0() -> bool:
    return dist_env()[0] == 0


def print0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def pick_device(device: str) -> str:
    """Resolve 'auto' to cuda > mps > cpu."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def init_distributed(device: str = "cpu", backend: str | None = None, num_threads: int | None = None,
                     timeout_s: int | None = None):
    """Set up torch.distributed if launched by torchrun; returns (rank, local_rank, world, torch.device).

    CPU ranks share the machine's cores, so each gets cores // local_world threads
    unless told otherwise (oversubscription makes gloo runs crawl). `timeout_s` bounds every
    collective: a rank whose peer vanished (a dead node) fails after it instead of hanging.
    """
    import datetime
    import torch
    import torch.distributed as dist
    rank, local_rank, world = dist_env()
    device = pick_device(device)
    if device == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if world > 1 and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend or ("nccl" if device == "cuda" else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None)
    return rank, local_rank, world, torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)


def distributed():
    """torch.distributed when a process group is initialized; None in a single process."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) in a single process."""
    dist = distributed()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def barrier() -> None:
    """dist.barrier() when running distributed; a no-op in a single process."""
    if dist := distributed():
        dist.barrier()
