"""nanochat checkpoints in and out: the only module that knows nanochat's layout.

Pure conversion, both ways, with no Hydra and no run-dir knowledge (launch/interop_cli.py does
the files). nanochat's `base_train` writes, per stage, under its base dir (NANOCHAT_BASE_DIR):

    base_checkpoints/<tag>/model_NNNNNN.pt   state dict, nanochat's parameter names
    base_checkpoints/<tag>/meta_NNNNNN.json  {"step", "model_config": {...}, "user_config": {...}, ...}
    (mid_checkpoints, chatsft_checkpoints, chatrl_checkpoints likewise)
    tokenizer/tokenizer.pkl                  pickled tiktoken.Encoding (ranks + 9 special tokens)
    tokenizer/token_bytes.pt                 bytes per token id (0 for specials)

What maps to what:
- parameter names are the same (transformer.wte, transformer.h.i.attn.c_q …, lm_head, value_embeds.i,
  resid_lambdas, x0_lambdas, smear_gate, smear_lambda, backout_lambda); `_orig_mod.` (torch.compile)
  prefixes are dropped; bf16/fp16 tensors become fp32 on import.
- RoPE: nanochat rotates the two halves of each head, y1 = x1·cos + x2·sin, y2 = −x1·sin + x2·cos
  (x1 = first half, x2 = second half); we rotate interleaved pairs (a, b) → (a·cos − b·sin,
  a·sin + b·cos). With a = x1 and b = −x2 ours gives (y1, −y2): the same q·k, the same RMS. So the
  rows of c_q and c_k are reordered per head (row 2i ← row i, row 2i+1 ← −row D/2+i) and back.
- generation: a checkpoint with resid_lambdas / value_embeds / smear / backout is nanochat's modern
  model (Jan–Jul 2026, e.g. 92d63d4); one without is the seed model (Dec 2025, e.g. d575940).
  The vocab is padded to 64 in the modern model (the rows' count tells).
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from nanochat.integrity import sha256_file as file_sha256  # noqa: F401  (launch/interop_cli.py)
from nanochat.plan import GENERATION_KEYS, GENERATIONS
from nanochat.shapes import default_short_window

STAGE_DIRS = {"pretrain": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}
STAGE_ORDER = ["pretrain", "mid", "sft", "rl"]          # later stages win when SRC is a base dir
MODERN_MARKERS = ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda")
ORIG_MOD = "_orig_mod."
TOKENIZER_PKL, TOKEN_BYTES = "tokenizer.pkl", "token_bytes.pt"   # in <base_dir>/tokenizer/


class InteropError(ValueError):
    """A nanochat checkpoint (or ours) that cannot be converted; the message names what and why."""


# ----------------------------------------------------------------------------- RoPE row order

def rope_rows(w: torch.Tensor, n_heads: int, to_interleaved: bool) -> torch.Tensor:
    """Rows of a c_q/c_k weight, per head: nanochat's half-split RoPE → ours (interleaved pairs, second of each
    negated), or back (exact both ways: a reorder and a sign flip)."""
    rows, cols = w.shape
    if rows % n_heads or (rows // n_heads) % 2:
        raise InteropError(f"cannot split {rows} rows into {n_heads} heads of even size")
    if to_interleaved:
        h = w.reshape(n_heads, 2, -1, cols)                   # (head, half, i, in)
    else:
        h = w.reshape(n_heads, -1, 2, cols).transpose(1, 2)   # (head, i, pair, in) → (head, pair, i, in)
    return torch.stack([h[:, 0], -h[:, 1]], dim=2 if to_interleaved else 1).reshape(rows, cols)


# ----------------------------------------------------------------------------- state dicts

def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drop torch.compile's `_orig_mod.` wherever it sits in a key (nanochat saves compiled models)."""
    out = {}
    for k, v in state.items():
        nk = k.replace(ORIG_MOD, "")
        if nk in out:
            raise InteropError(f"key {k!r} collides with another key after removing {ORIG_MOD!r}")
        out[nk] = v
    return out


NANOCHAT_SHAPE = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # meta's model_config


def gpt_config_kwargs(generation: str, mc: dict, padded_vocab_size: int, window_pattern: str = "L") -> dict:
    """Our GPTConfig for a nanochat model_config (`mc`: the ints of NANOCHAT_SHAPE) of this generation (seed |
    modern): the checkpoint's shape under its generation's rules (plan.model_shape: every toggle explicit, as a
    run of that generation builds it). The vocab padding must give the checkpoint's `padded_vocab_size` rows."""
    from nanochat.config import ConfigError, ModelConfig
    from nanochat.plan import model_shape
    m = ModelConfig(generation=generation, depth=mc["n_layer"], n_embd=mc["n_embd"], n_head=mc["n_head"],
                    n_kv_head=mc["n_kv_head"], vocab_size=mc["vocab_size"], sequence_len=mc["sequence_len"],
                    window_pattern=window_pattern if generation == "modern" else None)
    try:
        shape = model_shape(m)
    except ConfigError as e:
        raise InteropError(f"nanochat model_config has no valid shape here: {e}") from None
    if shape.padded_vocab_size != padded_vocab_size:
        raise InteropError(f"transformer.wte.weight has {padded_vocab_size} rows; vocab_size="
                           f"{mc['vocab_size']} padded to {shape.pad_vocab_to} gives {shape.padded_vocab_size}")
    return shape.gpt_config_kwargs()


def reorder_rope(state: dict[str, torch.Tensor], n_layer: int, n_head: int, n_kv_head: int, to_interleaved: bool,
                 dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Every tensor on the CPU (in `dtype`, when given), the rows of each c_q / c_k (our names) reordered per head
    (`rope_rows`)."""
    heads = {f"transformer.h.{i}.attn.{name}.weight": n for i in range(n_layer)
             for name, n in (("c_q", n_head), ("c_k", n_kv_head))}
    out = {}
    for k, v in state.items():
        t = v.detach().to("cpu", dtype)
        out[k] = (rope_rows(t, heads[k], to_interleaved) if k in heads else t).contiguous()
    return out


def check_against(state: dict[str, torch.Tensor], expected: dict[str, tuple], what: str) -> None:
    """Every expected key present with its shape, nothing else: an error names each offender."""
    problems = {"missing keys": sorted(set(expected) - set(state)), "unknown keys": sorted(set(state) - set(expected)),
                "misshapen tensors": [f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[k])})"
                                      for k in sorted(set(expected) & set(state))
                                      if tuple(state[k].shape) != tuple(expected[k])],
                "non-tensor values at": [k for k in state if not isinstance(state[k], torch.Tensor)]}
    problems = [f"{kind} {found}" for kind, found in problems.items() if found]
    if problems:
        raise InteropError(f"{what}: " + "; ".join(problems))


def expected_shapes(cfg_kwargs: dict) -> dict[str, tuple]:
    """Parameter names and shapes of our GPT for these kwargs (built on the meta device: no memory)."""
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(**cfg_kwargs))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def from_nanochat(state: dict[str, Any], model_config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """nanochat state dict + meta model_config → (our GPTConfig kwargs, our fp32 state dict).

    The generation is read off the weights (see the module docstring), the shape off model_config."""
    state = strip_prefixes(state)
    if missing := [k for k in NANOCHAT_SHAPE if k not in model_config]:
        raise InteropError(f"meta model_config lacks {missing}; a nanochat meta_NNNNNN.json has "
                           f"model_config with {list(NANOCHAT_SHAPE)}")
    mc = {k: int(model_config[k]) for k in NANOCHAT_SHAPE}
    if "transformer.wte.weight" not in state:
        raise InteropError("state dict has no 'transformer.wte.weight': not a nanochat GPT checkpoint")
    modern = any(k in state for k in MODERN_MARKERS) or any(k.startswith("value_embeds.") for k in state)
    padded = int(state["transformer.wte.weight"].shape[0])
    if padded < mc["vocab_size"]:
        raise InteropError(f"transformer.wte.weight has {padded} rows < model_config.vocab_size="
                           f"{mc['vocab_size']}")
    gen = "modern" if modern else "seed"
    kwargs = gpt_config_kwargs(gen, mc, padded, str(model_config.get("window_pattern", "SSSL" if modern else "L")))
    check_against(state, expected_shapes(kwargs), f"nanochat checkpoint ({gen} layout)")
    return kwargs, reorder_rope(state, mc["n_layer"], mc["n_head"], mc["n_kv_head"], True, torch.float32)


def to_nanochat(state: dict[str, torch.Tensor], cfg_kwargs: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our state dict + GPTConfig kwargs → (nanochat model_config, nanochat state dict).

    Only architectures nanochat can express convert: its seed or modern model exactly.
    """
    state = strip_prefixes(state)
    c = dict(cfg_kwargs)
    modern = bool(c.get("resid_lambdas"))
    seq = c.get("sequence_len")
    gen = "modern" if modern else "seed"
    # field → the values nanochat's model of this generation can take (None: the field's default)
    g = GENERATIONS[gen]
    allowed = {k: (g[k],) for k in GENERATION_KEYS}
    allowed.update(softcap=(15.0,), short_window=(None, default_short_window(seq)) if seq else (None,),
                   # L layers bounded at sequence_len (nanochat modern) differ from unbounded only past it
                   long_window=(None, seq) if modern else (None,))
    if not modern:
        allowed["window_pattern"] = (g["window_pattern"],)
    off = [f"{k}={c[k]!r} (nanochat's {gen} model has {' or '.join(repr(v) for v in vals)})"
           for k, vals in allowed.items() if k in c and c[k] not in vals]
    if off:
        raise InteropError("this model has no nanochat equivalent: " + "; ".join(off))
    check_against(state, expected_shapes(c), "our checkpoint")
    mc = {k: int(c[k]) for k in NANOCHAT_SHAPE}
    if modern:
        mc["window_pattern"] = str(c.get("window_pattern", "SSSL"))
    return mc, reorder_rope(state, mc["n_layer"], mc["n_head"], mc["n_kv_head"], False)


# ----------------------------------------------------------------------------- nanochat's files

_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
_DEPTH_RE = re.compile(r"^d(\d+)$")


def step_files(ckpt_dir: Path, step: int) -> tuple[Path, Path]:
    """(model_NNNNNN.pt, meta_NNNNNN.json) of one step in a nanochat checkpoint dir."""
    return ckpt_dir / f"model_{step:06d}.pt", ckpt_dir / f"meta_{step:06d}.json"


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps with both model_NNNNNN.pt and meta_NNNNNN.json in a nanochat checkpoint dir, ascending."""
    return sorted(int(m.group(1)) for p in ckpt_dir.glob("model_*.pt")
                  if (m := _MODEL_RE.match(p.name)) and (ckpt_dir / f"meta_{m.group(1)}.json").is_file())


@dataclass
class NanochatSource:
    """One nanochat checkpoint, located: where its files are and what stage/tag/step it is."""
    base_dir: Path             # nanochat's base dir (holds tokenizer/)
    ckpt_dir: Path             # <base>/<stage>_checkpoints/<tag>
    stage: str                 # ours: pretrain | mid | sft | rl
    tag: str
    step: int
    model_path: Path           # <ckpt_dir>/model_NNNNNN.pt and meta_NNNNNN.json of `step` (step_files)
    meta_path: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.base_dir / "tokenizer"

    def files(self) -> dict[str, Path]:
        """Every file this checkpoint is read from (model, meta, tokenizer, token_bytes if present)."""
        out = {"model": self.model_path, "meta": self.meta_path, "tokenizer": self.tokenizer_dir / TOKENIZER_PKL}
        if (self.tokenizer_dir / TOKEN_BYTES).is_file():
            out["token_bytes"] = self.tokenizer_dir / TOKEN_BYTES
        return out


def _pick_tag(stage_dir: Path, tag: Optional[str]) -> Optional[Path]:
    """The tag dir to use: the one asked for, else nanochat's choice (largest dN, else newest)."""
    if tag is not None:
        return stage_dir / tag if checkpoint_steps(stage_dir / tag) else None
    tags = [p for p in stage_dir.iterdir() if p.is_dir() and checkpoint_steps(p)] if stage_dir.is_dir() else []
    depth = [p for p in tags if _DEPTH_RE.match(p.name)]
    if depth:
        return max(depth, key=lambda p: int(p.name[1:]))
    return max(tags, key=lambda p: p.stat().st_mtime, default=None)


def locate(src: str | Path, stage: str = "auto", step: Optional[int] = None,
           tag: Optional[str] = None) -> NanochatSource:
    """SRC = a checkpoint dir (<stage>_checkpoints/<tag>) or a base dir (its latest stage's newest)."""
    src = Path(src).expanduser().resolve()     # `stage`: auto or a STAGE_DIRS key (interop_cli checks it)
    if not src.is_dir():
        raise InteropError(f"{src}: no such directory; give a nanochat base dir or a checkpoint dir "
                           f"such as <base>/base_checkpoints/d20")
    if checkpoint_steps(src):                      # a checkpoint dir
        ckpt_dir, base = src, src.parent.parent
        if stage == "auto":
            stage = next((st for st, folder in STAGE_DIRS.items() if folder == src.parent.name), None)
            if stage is None:
                raise InteropError(f"{src}: its parent {src.parent.name!r} is none of {list(STAGE_DIRS.values())}; "
                                   f"say which stage it is with --stage")
    else:                                          # a base dir
        base = src
        order = [stage] if stage != "auto" else list(reversed(STAGE_ORDER))
        picked = next(((st, d) for st in order if (d := _pick_tag(base / STAGE_DIRS[st], tag)) is not None), None)
        if picked is None:
            where = ", ".join(f"{STAGE_DIRS[s]}/{tag or '<tag>'}" for s in order)
            raise InteropError(f"{src}: no nanochat checkpoint (model_NNNNNN.pt + meta_NNNNNN.json) in {where}")
        stage, ckpt_dir = picked
    steps = checkpoint_steps(ckpt_dir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise InteropError(f"--step={step}: {ckpt_dir} holds steps {steps}")
    return NanochatSource(base, ckpt_dir, stage, ckpt_dir.name, step, *step_files(ckpt_dir, step))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A nanochat model_NNNNNN.pt (weights only, never arbitrary pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated / not a torch file / pickled objects
        raise InteropError(f"{path}: cannot read it as a torch state dict ({type(e).__name__}: {e}); "
                           f"is the file complete?") from None
    if not isinstance(state, dict) or not state:
        raise InteropError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InteropError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise InteropError(f"{path}: no 'model_config' object; is it a nanochat meta_NNNNNN.json?")
    return meta


class _EncodingOnly(pickle.Unpickler):
    """tokenizer.pkl is a pickled tiktoken.Encoding: allow that class and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return super().find_class(module, name)
        raise InteropError(f"tokenizer.pkl wants to load {module}.{name}; only tiktoken.core.Encoding is allowed")


def load_tokenizer(tok_dir: Path, vocab_size: int):
    """nanochat's tokenizer/ → our Tokenizer, checked against the model's vocab and our specials."""
    from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
    pkl = tok_dir / TOKENIZER_PKL
    if not pkl.is_file():
        raise InteropError(f"{pkl}: missing; nanochat keeps its tokenizer in <base_dir>/tokenizer/")
    try:
        with open(pkl, "rb") as f:
            enc = _EncodingOnly(f).load()
    except InteropError:
        raise
    except Exception as e:
        raise InteropError(f"{pkl}: cannot unpickle a tiktoken Encoding ({type(e).__name__}: {e})") from None
    ranks, specials = dict(enc._mergeable_ranks), dict(enc._special_tokens)
    want = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    if specials != want:
        raise InteropError(f"{pkl}: special tokens {specials} differ from nanochat's {want}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InteropError(f"{pkl}: mergeable ranks are not 0..{len(ranks) - 1}")
    if enc.n_vocab != vocab_size:
        raise InteropError(f"{pkl}: the tokenizer has {enc.n_vocab} tokens but the model's vocab_size is "
                           f"{vocab_size}; use the tokenizer this checkpoint was trained with")
    tok = Tokenizer(ranks, pattern=enc._pat_str, name="nanochat")
    tb = tok_dir / TOKEN_BYTES
    if tb.is_file():
        try:
            lengths = torch.load(tb, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InteropError(f"{tb}: cannot read it ({type(e).__name__}: {e})") from None
        # nanochat counts the UTF-8 of each token's decoded text (a lone byte of a multi-byte char
        # counts 3, for U+FFFD), so only its shape and its zeros at the special tokens must agree
        if (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (enc.n_vocab,)
                or bool(lengths[list(want.values())].any())):
            raise InteropError(f"{tb}: expected {enc.n_vocab} byte lengths with 0 at the special tokens; "
                               f"it does not belong to tokenizer.pkl")
    return tok


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_tokenizer(tok, base_dir: Path) -> None:
    """Our Tokenizer → <base_dir>/tokenizer/ (tokenizer.pkl + token_bytes.pt), refusing to clobber another."""
    tok_dir = base_dir / "tokenizer"
    import tiktoken
    from nanochat.common import atomic_write_bytes
    enc = tiktoken.Encoding(name="rustbpe", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                            special_tokens=tok.special_tokens)
    pkl = tok_dir / TOKENIZER_PKL
    if pkl.exists():
        existing = load_tokenizer(tok_dir, tok.get_vocab_size())
        if existing.mergeable_ranks != tok.mergeable_ranks or existing.pattern != tok.pattern:
            raise InteropError(f"{pkl} exists and holds a different tokenizer; export into another base dir")
        return
    tok_dir.mkdir(parents=True, exist_ok=True)
    _save_atomic(torch.tensor(tok.token_byte_lengths(), dtype=torch.int32), tok_dir / TOKEN_BYTES)
    atomic_write_bytes(pkl, pickle.dumps(enc))    # last: its presence means the folder is complete


def check_free(out_base: Path, stage: str, tag: str, step: int) -> Path:
    """The checkpoint dir for (stage, tag), refusing when this step is already there."""
    d = out_base / STAGE_DIRS[stage] / tag
    for p in step_files(d, step):
        if p.exists():
            raise InteropError(f"{p} exists; export into another base dir or pass another --tag")
    return d


def write_checkpoint(out_base: Path, stage: str, tag: str, step: int, state: dict[str, torch.Tensor],
                     meta: dict) -> Path:
    """model_NNNNNN.pt + meta_NNNNNN.json into <out_base>/<stage>_checkpoints/<tag>/ (never overwrites)."""
    from nanochat.common import atomic_write_json
    d = check_free(out_base, stage, tag, step)
    d.mkdir(parents=True, exist_ok=True)
    model_path, meta_path = step_files(d, step)
    _save_atomic(state, model_path)
    atomic_write_json(meta_path, meta)
    return d
