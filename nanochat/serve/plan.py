"""The serve plan: replicas, devices, KV-cache memory. Pure Python (no torch), for dry runs."""
from __future__ import annotations

import os

from nanochat.config import Config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def replica_devices(cfg: Config) -> list[str]:
    """One replica per GPU of the node (data parallel), a single one on CPU / MPS."""
    hw = cfg.hardware
    if hw.device == "cuda":
        return [f"cuda:{i}" for i in range(hw.nproc_per_node)]
    return [hw.device]


def kv_cache_bytes(cfg: Config, n_kv_head: int, head_dim: int) -> int:
    """Keys + values of one replica: n_layer × rows × positions × kv heads × head_dim, for the decode
    cache (max(max_seqs, decode_tile) rows × context) and the prefill cache (prefill_rows rows ×
    context + 32); the prefix cache comes on top (stage.prefix_cache_mb)."""
    m, st = cfg.model, cfg.stage
    rows = max(st.max_seqs, st.decode_tile) * m.sequence_len + st.prefill_rows * (m.sequence_len + 32)
    return 2 * m.depth * rows * n_kv_head * head_dim * DTYPE_BYTES.get(cfg.hardware.dtype, 4)


def serve_rows(cfg: Config, n_kv_head: int, head_dim: int) -> list[tuple[str, str]]:
    st = cfg.stage
    devs = replica_devices(cfg)
    kv = kv_cache_bytes(cfg, n_kv_head, head_dim)
    kv_text = f"{kv / 2 ** 30:.2f} GiB" if kv >= 2 ** 30 else f"{kv / 2 ** 20:.1f} MiB"
    return [
        ("serve", f"http://{st.host}:{st.port if st.port else '<free port>'}/  (OpenAI API at /v1, "
                  f"nanochat SSE at /chat/completions)"),
        ("replicas", f"{len(devs)} × ({', '.join(devs)}), {cfg.hardware.dtype}"),
        ("batching", f"{st.max_seqs} sequences per replica, a step computes the rows in use (at least "
                     f"{st.decode_tile}), queue {st.max_queue} (then 429); prefill {st.prefill_rows} prompts × "
                     f"{st.prefill_chunk} tokens per forward"),
        ("prefix cache", f"{st.prefix_cache_mb:g} MiB per replica (16-token blocks, LRU)" if st.prefix_cache_mb
                         else "off"),
        ("streaming", f"tokens sent at most every {st.stream_interval_ms:g} ms, several per chunk"
                      if st.stream_interval_ms else "a chunk per token"),
        ("api key", "required (Authorization: Bearer) on /v1/* and /chat/completions"
                    if (st.api_key or os.environ.get("NANOCHAT_API_KEY")) else "none (open)"),
        ("context", f"{cfg.model.sequence_len} tokens; KV cache {kv_text} per replica"),
        ("defaults", f"temperature {st.temperature}, top_k {st.top_k}, max_tokens {st.max_tokens}"),
        ("limits", f"{st.max_messages} messages, {st.max_message_chars:,} chars each, {st.max_total_chars:,} total; "
                   f"temperature ≤ {st.max_temperature}, top_k ≤ {st.max_top_k}, max_tokens ≤ {st.max_max_tokens}"),
    ]
