"""Model-shape rules in one torch-free place: what nanochat/gpt.py builds is what nanochat/plan.py counts.

The functions read attributes that both `nanochat.gpt.GPTConfig` and `nanochat.plan.ModelShape` carry
(n_layer, n_embd, n_head, n_kv_head, head_dim, padded_vocab_size, sequence_len, window_pattern,
short_window, long_window and the toggles), so the model, the plan and nanochat checkpoint import
(interop.py) share one formula. tests/test_shapes.py builds models of both generations with every
toggle and checks each optimizer role's numel against `param_counts`.
"""
from __future__ import annotations

from typing import Any, Optional

VE_GATE_CHANNELS = 12     # nanochat 92d63d4: the value-embedding gate reads this many leading channels
SMEAR_GATE_CHANNELS = 24  # ... and the smear gate this many of the embedding
# GPT.param_groups' keys: who optimizes what (matrix → Muon, the rest → AdamW groups)
ROLES = ("matrix", "embedding", "value_embed", "lm_head", "resid_scalar", "x0_scalar", "gate_scalar")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}   # hardware.dtype's choices, per element


def default_short_window(sequence_len: int) -> int:
    """nanochat's short window (tokens left of the query): a quarter of the context, rounded up to
    FlashAttention's 128 tile."""
    return -(-sequence_len // 4 // 128) * 128


def has_value_embed(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings go on every other layer, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def left_windows(s: Any) -> list[Optional[int]]:
    """Tokens to the left of the query each layer sees (None = unlimited), nanochat's window_size[0].

    The pattern tiles over layers; the last layer is always L. short_window None → default_short_window.
    """
    short = s.short_window if s.short_window is not None else default_short_window(s.sequence_len)
    pat = s.window_pattern.upper()
    return [short if pat[i % len(pat)] == "S" and i < s.n_layer - 1 else s.long_window for i in range(s.n_layer)]


def attention_spans(s: Any) -> list[int]:
    """Keys per query for the FLOP count: nanochat's min(left window, sequence_len) per layer."""
    return [s.sequence_len if w is None else min(w, s.sequence_len) for w in left_windows(s)]


def param_counts(s: Any) -> dict[str, int]:
    """Parameters per optimizer role (ROLES, as GPT.param_groups splits them), plus three sums:
    total; lookup = the tables a token indexes (embedding + value_embed: no matmul FLOPs); scaling =
    matrix + lm_head (nanochat's "scaling params": block weights, value-embedding gates included).

    Layout (V = padded vocab, d = n_embd, kvd = n_kv_head·head_dim): per layer c_q d·(n_head·head_dim),
    c_k and c_v d·kvd, c_proj (n_head·head_dim)·d, mlp 8·d²; a gate 12·n_kv_head on each VE layer.
    """
    d, V, L = s.n_embd, s.padded_vocab_size, s.n_layer
    qd, kvd = s.n_head * s.head_dim, s.n_kv_head * s.head_dim
    n_ve = sum(has_value_embed(i, L) for i in range(L)) if s.value_embeds else 0
    c = dict(matrix=L * (2 * d * qd + 2 * d * kvd + 8 * d * d) + n_ve * VE_GATE_CHANNELS * s.n_kv_head,
             embedding=V * d, value_embed=n_ve * V * kvd, lm_head=d * V,
             resid_scalar=L * bool(s.resid_lambdas), x0_scalar=L * bool(s.x0_lambdas),
             gate_scalar=(SMEAR_GATE_CHANNELS + 1) * bool(s.smear) + bool(s.backout))
    c.update(total=sum(c[r] for r in ROLES), lookup=c["embedding"] + c["value_embed"],
             scaling=c["matrix"] + c["lm_head"])
    return c


def flops_per_token(s: Any) -> int:
    """6 × every Linear weight + attention 12·n_head·head_dim·span per layer, as nanochat 92d63d4 counts.

    Lookup tables and the resid/x0/smear/backout lambdas do no matmul; the smear gate (a 24→1 Linear) does.
    """
    c = param_counts(s)
    dense = c["scaling"] + SMEAR_GATE_CHANNELS * bool(s.smear)
    return 6 * dense + sum(12 * s.n_head * s.head_dim * w for w in attention_spans(s))


def memory_floor(s: Any, device_batch_size: int, grad_accum: int, world_size: int,
                 embedding_bytes: int = 4, activation_bytes: int = 4, checkpointing: bool = False) -> dict[str, int]:
    """Bytes per rank that a training step must hold at least: a batch whose floor exceeds the GPU
    cannot fit (one under it still may not: the simulator measures the rest). Torch-free and instant,
    so every GPU plan checks it.

    weights and gradients: fp32 but for the lookup tables at `embedding_bytes`; optimizer: AdamW's
    two moments and Muon's momentum, sharded over the world (ZeRO-2); logits: one micro-batch's fp32
    logits (B·T·vocab), which the loss reads whole on the GPU; activations: what backward must find
    saved, per token and layer, in the compute dtype (`activation_bytes`): the attention's q, k, v and
    output and the MLP's 4·d hidden (any backend, compiled or not, keeps these), or with
    `checkpointing` only each block's input. At the end of the forward the logits and activations
    are all held; the gradients are freed after each step, so they meet them only with accumulation.
    """
    c = param_counts(s)
    weights = 4 * (c["total"] - c["lookup"]) + embedding_bytes * c["lookup"]
    optimizer = (2 * (weights - 4 * c["matrix"]) + 4 * c["matrix"]) // world_size
    tokens = device_batch_size * s.sequence_len
    logits = 4 * tokens * s.vocab_size
    per_layer = s.n_embd if checkpointing else 2 * (s.n_head + s.n_kv_head) * s.head_dim + 4 * s.n_embd
    activations = activation_bytes * tokens * s.n_layer * per_layer
    live = weights + logits + activations if grad_accum > 1 else max(weights, logits + activations)
    return dict(weights=weights, grads=weights, optimizer=optimizer, logits=logits, activations=activations,
                total=weights + optimizer + live)
