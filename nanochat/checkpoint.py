"""Checkpoints: <run_dir>/checkpoints/step_XXXXXX/ written atomically by every rank.

Layout of one checkpoint:
    model.pt               model weights (rank 0; identical on all ranks)
    meta.json              step, loop state, metrics, the run's config and plan (rank 0)
    optim_rank{r}.pt       this rank's optimizer shard (ZeRO-2: each rank owns different state)
    dataloader_rank{r}.json this rank's loader position (exact resume)
    rng_rank{r}.pt         torch / cuda RNG states

All ranks write into `.tmp_step_XXXXXX/`; after a barrier rank 0 renames it to
`step_XXXXXX/`, so a kill at any moment leaves either a whole checkpoint or none.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from nanochat.common import atomic_write_json, atomic_write_text, barrier, read_json
from nanochat.lifecycle import list_checkpoints



def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a kill mid-save
        tmp.mkdir(parents=True)
    barrier()
    if rank == 0:
        state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
        _torch_save_atomic(state, tmp / "model.pt")
        atomic_write_json(tmp / "meta.json", {"step": step, **meta})
    if optimizer is not None:
        _torch_save_atomic(optimizer.state_dict(), tmp / f"optim_rank{rank}.pt")
    if loader_state is not None:
        atomic_write_text(tmp / f"dataloader_rank{rank}.json", json.dumps(loader_state))
    _torch_save_atomic(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        tmp.replace(final)
        if keep_last > 0:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_meta(ckpt: str | Path) -> dict:
    return read_json(Path(ckpt) / "meta.json")


def load_model_state(ckpt: str | Path, device: Any = "cpu") -> dict:
    return torch.load(Path(ckpt) / "model.pt", map_location=device, weights_only=True)


def load_rank_state(ckpt: str | Path, rank: int, device: Any = "cpu") -> dict:
    """This rank's optimizer / loader / RNG state (missing pieces → None)."""
    ckpt = Path(ckpt)
    out: dict[str, Any] = {"optim": None, "loader": None, "rng": None}
    p = ckpt / f"optim_rank{rank}.pt"
    if p.exists():
        out["optim"] = torch.load(p, map_location=device, weights_only=False)
    p = ckpt / f"dataloader_rank{rank}.json"
    if p.exists():
        out["loader"] = json.loads(p.read_text())
    p = ckpt / f"rng_rank{rank}.pt"
    if p.exists():
        out["rng"] = torch.load(p, map_location="cpu", weights_only=False)
    return out


def load_model_from_run(run_dir: str | Path, device: Any, step: Optional[int] = None):
    """Build the GPT of a finished run from its last (or given) checkpoint: (model, meta)."""
    from nanochat.gpt import GPT, GPTConfig
    run_dir = Path(run_dir)
    ckpt = (run_dir / "checkpoints" / step_dir_name(step)) if step is not None else latest_checkpoint(run_dir)
    if ckpt is None or not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints (did the run save one?)")
    meta = load_meta(ckpt)
    gcfg = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(gcfg)
    model.to_empty(device=device)
    model.init_rotary() if hasattr(model, "init_rotary") else None
    model.load_state_dict(load_model_state(ckpt, device), strict=True, assign=True)
    model.eval()
    return model, meta
