"""Our GPT ↔ Hugging Face transformers: configs and weight names, both ways (pure, no files).

Two targets:
- `nanochat` (transformers' own NanoChatForCausalLM, since 5.0): nanochat's Dec-2025 architecture,
  so only a seed-generation model fits (no value embeddings, windows, lambdas, smear, backout,
  qk_scale 1). Weights are renamed (below); c_q/c_k rows go from our interleaved RoPE pairs to the
  half-split layout (nanochat/interop.py's permutation: transformers' NanoChat rotate_half is nanochat's);
  padded vocab rows are dropped; rms_norm_eps is fp32's machine epsilon (what our parameter-free
  RMSNorm uses) and final_logit_softcapping our softcap. One thing is not expressible: the seed
  generation rounds its RoPE tables to bf16, transformers computes them in fp32 (README, "Hugging Face
  ecosystem", gives the size of the difference); `remote_code=True` exports such a model exactly.
- `nanochat_hydra` (remote code, `trust_remote_code=True`): any of our configurations, run by our own
  nanochat/gpt.py shipped in the export (nanochat/hf/modeling.py wraps it); weights keep our names
  under `model.` and our layout.

Both config.json files carry `nanochat_hydra: {"gpt_config": {...}}`, our full GPTConfig, so an import
restores every toggle; a `nanochat` dir from elsewhere gets the seed generation's.
"""
from __future__ import annotations

from typing import Any

import torch

from nanochat.interop import InteropError, reorder_rope

NATIVE_TYPE = "nanochat"
REMOTE_TYPE = "nanochat_hydra"
REMOTE_ARCH = "NanochatHydraForCausalLM"
REMOTE_MODULE = "modeling_nanochat_hydra"
FP32_EPS = float(torch.finfo(torch.float32).eps)

# our name (per layer, after "transformer.h.{i}.") → transformers' (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}


def native_blockers(kw: dict) -> list[str]:
    """Why transformers' NanoChat cannot run this GPTConfig (field=value (needs ...)); [] if it can."""
    from nanochat.gpt import GPTConfig
    c = GPTConfig(**kw)
    out = [f"{f}={getattr(c, f)!r} (needs False)" for f in ("value_embeds", "resid_lambdas", "x0_lambdas",
                                                             "smear", "backout") if getattr(c, f)]
    if c.qk_scale != 1.0:
        out.append(f"qk_scale={c.qk_scale!r} (needs 1.0)")
    if any(w is not None for w in c.left_windows()):
        out.append(f"window_pattern={c.window_pattern!r} / long_window={c.long_window!r} (needs full-context "
                   f"layers: window_pattern=L, long_window=null)")
    return out


def special_ids(tok_special: dict[str, int]) -> dict[str, Any]:
    bos, end = tok_special["<|bos|>"], tok_special["<|assistant_end|>"]
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos}


def _native_names(n_layer: int) -> dict[str, str]:
    """Our weight names → transformers' NanoChat names (every weight a native model has)."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    names.update({f"transformer.h.{i}.{ours}": f"model.layers.{i}.{theirs}" for i in range(n_layer)
                  for ours, theirs in _LAYER_NAMES.items()})
    return names


# ----------------------------------------------------------------------------- out

def to_hf(kw: dict, state: dict[str, torch.Tensor], specials: dict[str, int], remote_code: bool) -> tuple[dict, dict]:
    """(config.json dict, state dict) for our remote-code model (any GPTConfig), or for transformers'
    NanoChatForCausalLM."""
    if not remote_code and (blockers := native_blockers(kw)):
        raise InteropError("transformers' nanochat model type cannot express " + "; ".join(blockers)
                           + "; export with --remote-code (ships our model code, trust_remote_code=True)")
    from nanochat.gpt import GPTConfig
    c = GPTConfig(**kw)
    ids = special_ids(specials)
    # the keys both model types share (the usual names: tools and serving engines read them)
    shared = {"vocab_size": c.vocab_size, "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
              "tie_word_embeddings": False, "use_cache": True, "bos_token_id": ids["bos_token_id"],
              "eos_token_id": ids["eos_token_id"][0], "pad_token_id": ids["pad_token_id"]}
    if remote_code:
        # no "architectures": `transformers serve` looks those up as transformers attributes, and falls back
        # to AutoModelForCausalLM (auto_map, trust_remote_code) only without them
        auto_map = {"AutoConfig": f"{REMOTE_MODULE}.NanochatHydraConfig",
                    "AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_ARCH}"}
        config = {"model_type": REMOTE_TYPE, "auto_map": auto_map, **shared,
                  "max_position_embeddings": c.max_positions}
        return config, {f"model.{k}": v for k, v in state.items()}
    config = {"architectures": ["NanoChatForCausalLM"], "model_type": NATIVE_TYPE, **shared,
              "intermediate_size": 4 * c.n_embd, "max_position_embeddings": c.sequence_len,
              "hidden_act": "relu2", "rms_norm_eps": FP32_EPS,
              "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_base)},
              "final_logit_softcapping": float(c.softcap) if c.softcap > 0 else None,
              "attention_bias": False, "attention_dropout": 0.0}
    names = _native_names(c.n_layer)
    if unused := set(state) - set(names):
        raise InteropError(f"weights {sorted(unused)} have no place in transformers' nanochat model")
    state = reorder_rope(state, c.n_layer, c.n_head, c.n_kv_head, to_interleaved=False)
    out = {theirs: state[ours] for ours, theirs in names.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):   # padded vocab rows dropped
        out[k] = out[k][:c.vocab_size]
    return config, out


# ----------------------------------------------------------------------------- in

def seed_kwargs_from_native(config: dict) -> dict:
    """GPTConfig kwargs for a `nanochat` config.json without our record (e.g. a checkpoint converted by
    hand): nanochat's seed model (interop.gpt_config_kwargs) with the config's soft cap and RoPE base."""
    from nanochat.interop import gpt_config_kwargs
    try:
        vocab = int(config["vocab_size"])
        mc = {"sequence_len": int(config.get("max_position_embeddings", 2048)), "vocab_size": vocab,
              "n_layer": int(config["num_hidden_layers"]), "n_head": int(config["num_attention_heads"]),
              "n_kv_head": int(config.get("num_key_value_heads") or config["num_attention_heads"]),
              "n_embd": int(config["hidden_size"])}
    except KeyError as e:
        raise InteropError(f"config.json lacks {e.args[0]!r}, which a nanochat model config has") from None
    kw = gpt_config_kwargs("seed", mc, vocab)
    cap = config.get("final_logit_softcapping")
    rope = config.get("rope_parameters") or {}
    kw.update(softcap=float(cap) if cap else 0.0, rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    return kw


def from_hf(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(GPTConfig kwargs, our fp32 state dict) from the config.json + weights of a nanochat or nanochat_hydra
    dir (export.read_hf_dir refuses other model types)."""
    from nanochat.gpt import GPTConfig
    record = (config.get("nanochat_hydra") or {}).get("gpt_config")
    if config.get("model_type") == REMOTE_TYPE:
        if record is None:
            raise InteropError("config.json has model_type nanochat_hydra but no nanochat_hydra.gpt_config")
        if (stray := next((k for k in state if not k.startswith("model.")), None)) is not None:
            raise InteropError(f"weight {stray!r} is not under 'model.' (expected our remote-code layout)")
        return dict(record), {k[len("model."):]: v.to(torch.float32).contiguous() for k, v in state.items()}
    kw = dict(record) if record is not None else seed_kwargs_from_native(config)
    c = GPTConfig(**kw)
    if native_blockers(kw):
        raise InteropError(f"config.json nanochat_hydra.gpt_config is not a native model: {native_blockers(kw)}")
    inverse = {theirs: ours for ours, theirs in _native_names(c.n_layer).items()}
    if (unknown := next((k for k in state if k not in inverse), None)) is not None:
        raise InteropError(f"weight {unknown!r} has no counterpart in our model")
    out = reorder_rope({inverse[k]: v for k, v in state.items()}, c.n_layer, c.n_head, c.n_kv_head,
                       True, torch.float32)
    pad = c.padded_vocab_size - c.vocab_size
    for k in ("transformer.wte.weight", "lm_head.weight"):   # the export dropped padded rows: restore zeros
        if pad and k in out:
            out[k] = torch.cat([out[k], out[k].new_zeros(pad, out[k].size(1))])
    return kw, out
