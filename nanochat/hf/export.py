"""A run dir → a transformers model dir (and such a dir back into our config, weights, tokenizer).

    export_run(run_dir, out_dir, dtype="float32", step=None, force=False, remote_code=None)

OUT_DIR gets config.json, generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors
+ model.safetensors.index.json above `max_shard_bytes`), tokenizer.json, tokenizer_config.json,
chat_template.jinja, README.md (the model card) and, for remote code, modeling_nanochat_hydra.py + gpt.py + shapes.py +
attention.py (our own modules, imports made relative). Everything is written into a temporary sibling dir
and renamed into place at the end, so OUT_DIR is either the old one or the complete new one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from nanochat.hf import convert
from nanochat.interop import InteropError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
REMOTE_SOURCES = {"modeling_nanochat_hydra.py": "hf/modeling.py", "gpt.py": "gpt.py", "attention.py": "attention.py",
                  "shapes.py": "shapes.py"}
_OUR_IMPORT = re.compile(r"^(\s*)from nanochat\.(?:hf\.)?(\w+) import", re.M)


class ExportError(InteropError):
    """Bad input to an export or import of a Hugging Face dir; the message names it and the fix."""


# ----------------------------------------------------------------------------- reading a run

def _run_checkpoint(run_dir: Path, step: Optional[int]) -> Path:
    from nanochat.checkpoint import latest_checkpoint, step_dir_name
    from nanochat.lifecycle import list_checkpoints
    ckpt = latest_checkpoint(run_dir) if step is None else run_dir / "checkpoints" / step_dir_name(step)
    if ckpt is not None and (ckpt / "model.pt").is_file():
        return ckpt
    if step is not None:
        have = [p.name for p in list_checkpoints(run_dir)]
        raise ExportError(f"--step {step}: {ckpt} holds no completed checkpoint (have {have or 'none'})")
    raise ExportError(f"{run_dir}: no completed checkpoint in checkpoints/ (train or resume the run first)")


# ----------------------------------------------------------------------------- writing

def remote_code_sources() -> dict[str, str]:
    """File name in OUT_DIR → its text: our own modules with `from nanochat.x import` made `from .x import`."""
    root = Path(__file__).resolve().parents[1]
    out = {}
    for name, rel in REMOTE_SOURCES.items():
        text = _OUR_IMPORT.sub(r"\1from .\2 import", (root / rel).read_text(encoding="utf-8"))
        if re.search(r"^\s*(from|import) nanochat\b", text, re.M):
            raise ExportError(f"{rel} imports a nanochat module the export does not ship; add it to REMOTE_SOURCES")
        out[name] = text
    return out


def write_hf_dir(out: Path, kw: dict, state: dict[str, torch.Tensor], tok, *, dtype: str = "float32",
                 remote_code: Optional[bool] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 card: str = "", extra_record: Optional[dict] = None) -> dict:
    """Write a complete HF dir into `out` (which must exist, empty). Returns the config.json written."""
    from huggingface_hub import save_torch_state_dict

    from nanochat.common import atomic_write_json
    from nanochat.hf.tokenizer import to_hf_tokenizer
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {list(DTYPES)}")
    if remote_code is None:
        remote_code = bool(convert.native_blockers(kw))
    specials = tok.special_tokens
    if tok.get_vocab_size() != kw["vocab_size"]:
        raise ExportError(f"tokenizer has {tok.get_vocab_size()} tokens, the model vocab_size={kw['vocab_size']}")
    config, hf_state = convert.to_hf(kw, state, specials, remote_code)
    config["dtype"] = dtype
    config["nanochat_hydra"] = {"gpt_config": dict(kw), **(extra_record or {})}
    if not remote_code and kw.get("rope_bf16"):
        config["nanochat_hydra"]["note"] = ("trained with bf16-rounded RoPE tables; transformers computes them in "
                                            "fp32 (export with --remote-code for the exact model)")
    hf_state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in hf_state.items()}
    # model.safetensors, or shards + model.safetensors.index.json when larger than max_shard_bytes
    save_torch_state_dict(hf_state, out, max_shard_size=max_shard_bytes)
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "generation_config.json", {**convert.special_ids(specials), "_from_model_config": False})
    if remote_code:
        for name, text in remote_code_sources().items():
            (out / name).write_text(text, encoding="utf-8")
    hf_tok = to_hf_tokenizer(tok)    # tokenizer.json, tokenizer_config.json, the chat template
    hf_tok.model_max_length = int(kw["sequence_len"])
    hf_tok.save_pretrained(str(out))
    if card:
        (out / "README.md").write_text(card, encoding="utf-8")
    return config


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32", step: Optional[int] = None,
               force: bool = False, remote_code: Optional[bool] = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A run dir's checkpoint (latest, or `step`) → a transformers model dir at out_dir."""
    from nanochat.checkpoint import commit_dir, load_meta, load_model_state
    from nanochat.common import get_base_dir
    from nanochat.config import load_config
    from nanochat.hf.card import model_card
    from nanochat.tokenizer import get_tokenizer
    run_dir, out_dir = Path(run_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {list(DTYPES)}")
    if not (run_dir / "resolved_config.yaml").is_file():
        raise ExportError(f"{run_dir}: not a run dir of ours (no resolved_config.yaml)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"OUT_DIR {out_dir} exists and is a file; give a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"OUT_DIR {out_dir} exists and is not empty; pass --force to replace it or pick another")
    cfg = load_config(str(run_dir / "resolved_config.yaml"))
    ckpt = _run_checkpoint(run_dir, step)
    meta = load_meta(ckpt)
    if "model_config" not in meta:
        raise ExportError(f"{ckpt}/meta.json has no model_config: not a model checkpoint")
    kw = dict(meta["model_config"])
    try:
        tok = get_tokenizer(get_base_dir(cfg.paths.base_dir), cfg.data.tokenizer)
    except FileNotFoundError as e:
        raise ExportError(f"{run_dir}: its tokenizer is missing: {e}") from None
    state = load_model_state(ckpt)
    if remote_code is None:
        remote_code = bool(convert.native_blockers(kw))
    card = model_card(run_dir, cfg, meta, kw, remote_code=remote_code, dtype=dtype)
    record = {"source_run": str(run_dir), "step": int(meta.get("step", 0)), "stage": cfg.stage.name}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_hf_dir(tmp, kw, state, tok, dtype=dtype, remote_code=remote_code, max_shard_bytes=max_shard_bytes,
                     card=card, extra_record=record)
        commit_dir(tmp, out_dir)    # the checkpoints' swap: an old out_dir is moved aside first, removed last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------- reading an HF dir

def load_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if missing := [f for f in files if not (hf_dir / f).is_file()]:
            raise ExportError(f"{hf_dir}: shards {missing} named in model.safetensors.index.json are missing")
    else:
        raise ExportError(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json); "
                          f"export with safetensors weights")
    return {k: v for f in files for k, v in load_file(str(hf_dir / f)).items()}


def read_hf_dir(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], Any, dict]:
    """(GPTConfig kwargs, our fp32 state dict, our Tokenizer, config.json) from a transformers dir."""
    from nanochat.hf.tokenizer import from_hf_dir
    hf_dir = Path(hf_dir).expanduser().resolve()
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir}: no config.json (not a transformers model dir)")
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    mtype = config.get("model_type")
    if mtype not in (convert.NATIVE_TYPE, convert.REMOTE_TYPE):
        raise ExportError(f"{hf_dir}/config.json model_type={mtype!r}: only {convert.NATIVE_TYPE!r} "
                          f"(transformers' NanoChat) and {convert.REMOTE_TYPE!r} (our remote code) import")
    try:
        tok = from_hf_dir(hf_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from None
    kw, state = convert.from_hf(config, load_weights(hf_dir))
    if tok.get_vocab_size() != kw["vocab_size"]:
        raise ExportError(f"{hf_dir}: tokenizer.json has {tok.get_vocab_size()} tokens, config vocab_size="
                          f"{kw['vocab_size']}")
    return kw, state, tok, config


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()
