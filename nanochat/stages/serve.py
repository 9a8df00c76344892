"""Stage `serve`: an HTTP chat server over the checkpoint in `stage.init_from` (see nanochat/serve/).

One model replica per device of `hardware` (one per GPU of the node, one on CPU), each with its
own batching Scheduler thread; uvicorn runs the FastAPI app in the main thread. Prints the URL
once it listens (`stage.port=0` picks a free port).

SIGINT / SIGTERM: stop accepting (new connections are refused, requests on open connections get
503), let in-flight streams finish for `stage.shutdown_grace_s`, then cancel what is left (those
streams end with finish_reason "cancelled"), and return normally: the run is COMPLETED, exit 0.
"""
from __future__ import annotations

import gc
import os
import signal
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

import uvicorn

from nanochat.config import Config, ConfigError, ServeStageConfig
from nanochat.shapes import DTYPE_BYTES
from nanochat.stage_plan import SourceRun, StagePlan, model_plan
from nanochat.stages import Stage


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key(cfg: Config) -> Optional[str]:
    """stage.api_key, else env NANOCHAT_API_KEY, else None (open); warns when others can reach an open server."""
    key = cfg.stage.api_key or os.environ.get("NANOCHAT_API_KEY") or None
    if key is None and cfg.stage.host not in LOOPBACK:
        print(f"[nanochat] WARNING: serving on {cfg.stage.host} without an API key: anyone who can reach this "
              f"port can use the model. Set stage.api_key=... or NANOCHAT_API_KEY.", flush=True)
    return key


SCHEDULER_KEYS = ("max_seqs", "max_queue", "kv_bucket", "decode_tile", "prefill_rows", "prefill_chunk",
                  "prefix_cache_mb")


def _same_names(st: ServeStageConfig, names) -> dict:
    """The stage keys of these names (the Scheduler's, Limits' and Defaults' parameters are named as they are)."""
    return {n: getattr(st, n) for n in names if hasattr(st, n)}


def build_pool(cfg: Config, source: Path, metrics):
    """Load one replica per device and start its scheduler: (pool, tokenizer, meta)."""
    import torch
    from nanochat.chat_cli import load
    from nanochat.serve.scheduler import ReplicaPool, Scheduler
    st, hw = cfg.stage, cfg.hardware
    devices = replica_devices(cfg)
    threads = None
    if devices[0] == "cpu":
        # the model runs in the scheduler's thread with all the cores; this (HTTP) thread stays on one:
        # once an OpenMP pool of several threads has run here, it competes with the scheduler's for the
        # cores and a decode step takes ~2x as long
        threads = hw.num_threads or os.cpu_count() or 1
        torch.set_num_threads(1)
    schedulers, tokenizer, meta = [], None, {}
    for i, dev in enumerate(devices):
        model, tokenizer, meta = load(source, dev)
        if hw.dtype != "float32" and model.lm_head.weight.device.type != "cpu":
            model = model.to(getattr(torch, hw.dtype))
        schedulers.append(Scheduler(model, tokenizer, observer=metrics, name=f"replica{i}", threads=threads,
                                    warmup=True, **_same_names(st, SCHEDULER_KEYS)))
    return ReplicaPool(schedulers).start(), tokenizer, meta


def run(cfg: Config, run_dir: Path) -> dict:
    from nanochat.serve.app import ServeSettings, build_app
    from nanochat.serve.limits import Defaults, Limits
    from nanochat.serve.metrics import ServerMetrics

    st = cfg.stage
    if not st.init_from:
        raise ValueError("stage.init_from is not set: the launcher resolves it to a run dir")
    source = Path(st.init_from)
    metrics = ServerMetrics()
    pool, tokenizer, meta = build_pool(cfg, source, metrics)
    settings = ServeSettings(
        model_name=st.model_name or f"nanochat-{source.parent.name}-{meta.get('stage') or source.parent.parent.name}",
        retry_after_s=st.retry_after_s, stream_interval_ms=st.stream_interval_ms, api_key=api_key(cfg),
        limits=Limits(**_same_names(st, (f.name for f in fields(Limits))), max_n=st.max_seqs),
        defaults=Defaults(**_same_names(st, (f.name for f in fields(Defaults)))))
    app = build_app(pool, tokenizer, settings, metrics)
    server = _Server(uvicorn.Config(app, host=st.host, port=st.port, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=st.shutdown_grace_s + 2.0, lifespan="off"),
                     app, pool, st.shutdown_grace_s, settings.model_name, source)
    # everything alive now (torch, the model, FastAPI) goes to the permanent generation: a full
    # collection then scans only what serving creates, ~0 ms instead of ~90-140 ms during which every
    # stream stalls (measured on the demo model)
    gc.freeze()
    started = time.time()
    try:
        server.run()
    finally:
        pool.stop()
    return {"model": settings.model_name, "source": str(source), "url": server.url,
            "replicas": len(pool.schedulers), "generated_tokens": sum(s.generated for s in pool.schedulers),
            "decode_steps": sum(s.steps for s in pool.schedulers), "uptime_s": round(time.time() - started, 3),
            "stopped_by": server.stopped_by}


class _Server(uvicorn.Server):
    """uvicorn.Server with the drain-then-cancel shutdown described in the module docstring."""

    def __init__(self, config: uvicorn.Config, app, pool, grace: float, name: str, source: Path):
        super().__init__(config)
        self.app, self.pool, self.grace, self.name, self.source = app, pool, grace, name, source
        self.url = self.stopped_by = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}/"
        print(f"[nanochat] serving {self.name} ({self.source}) at {self.url}  (OpenAI API: {self.url}v1, "
              f"{len(self.pool.schedulers)} replica(s) x {self.pool.max_seqs} sequences; Ctrl-C stops)", flush=True)

    def handle_exit(self, sig, frame) -> None:
        if self.stopped_by is None:
            self.stopped_by = signal.Signals(sig).name
            self.app.state.draining = True
            self.pool.stop_accepting()
            # after the grace period, cancel what is still running: those streams end cleanly
            timer = threading.Timer(self.grace, self.pool.stop)
            timer.daemon = True
            timer.start()
            print(f"[nanochat] {self.stopped_by}: draining (up to {self.grace:g}s), then stopping", flush=True)
        super().handle_exit(sig, frame)


# --------------------------------------------------------------------------- the declaration

def replica_devices(cfg: Config) -> list[str]:
    """One replica per GPU of the node (data parallel), a single one on CPU / MPS."""
    hw = cfg.hardware
    return [f"cuda:{i}" for i in range(hw.nproc_per_node)] if hw.device == "cuda" else [hw.device]


def serve_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    """The model's rows, then the server's: replicas, devices, KV-cache memory (pure Python, no torch)."""
    sp, st, m = model_plan(cfg, source), cfg.stage, cfg.model
    devs = replica_devices(cfg)
    # keys + values of one replica: n_layer × rows × positions × kv heads × head_dim, for the decode cache
    # (max(max_seqs, decode_tile) rows × context) and the prefill cache (prefill_rows rows × context + 32);
    # the prefix cache comes on top (stage.prefix_cache_mb)
    rows = max(st.max_seqs, st.decode_tile) * m.sequence_len + st.prefill_rows * (m.sequence_len + 32)
    kv = 2 * m.depth * rows * sp.plan.model.n_kv_head * sp.plan.model.head_dim * DTYPE_BYTES[cfg.hardware.dtype]
    kv_text = f"{kv / 2 ** 30:.2f} GiB" if kv >= 2 ** 30 else f"{kv / 2 ** 20:.1f} MiB"
    return StagePlan(sp.plan, sp.rows + [
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
        ("context", f"{m.sequence_len} tokens; KV cache {kv_text} per replica"),
        ("defaults", f"temperature {st.temperature}, top_k {st.top_k}, max_tokens {st.max_tokens}"),
        ("limits", f"{st.max_messages} messages, {st.max_message_chars:,} chars each, {st.max_total_chars:,} total; "
                   f"temperature ≤ {st.max_temperature}, top_k ≤ {st.max_top_k}, max_tokens ≤ {st.max_max_tokens}"),
    ])


def check_serve(cfg: Config) -> None:
    """The server runs on one node: one replica per local GPU, threads of one process."""
    st, hw = cfg.stage, cfg.hardware
    if hw.nnodes != 1:
        raise ConfigError("hardware.nnodes", hw.nnodes, "serve on one node (hardware=1gpu or 8gpu); run one "
                          "server per node behind a load balancer for more", "serve is single-node")
    if not 0 <= st.port < 65536:
        raise ConfigError("stage.port", st.port, "use a TCP port in 1..65535 (e.g. 8000; 0 picks a free one)",
                          "invalid port")
    for key, lo in (("max_seqs", 1), ("max_queue", 0), ("max_messages", 1), ("max_message_chars", 1),
                    ("max_total_chars", 1), ("max_top_k", 1), ("max_max_tokens", 1), ("max_tokens", 1),
                    ("top_k", 1), ("decode_tile", 1), ("prefill_rows", 1), ("prefill_chunk", 1),
                    ("prefix_cache_mb", 0), ("stream_interval_ms", 0)):
        if getattr(st, key) < lo:
            raise ConfigError(f"stage.{key}", getattr(st, key), f"use a value >= {lo}", "out of range")
    if st.kv_bucket < 0 or st.kv_bucket % 16:
        raise ConfigError("stage.kv_bucket", st.kv_bucket, "use a multiple of 16 (e.g. 64), or 0 to pad every "
                          "decode step to the whole context", "not a multiple of the vector width")
    if not 0 <= st.temperature <= st.max_temperature:
        raise ConfigError("stage.temperature", st.temperature, f"use 0..{st.max_temperature}", "out of range")
    if st.max_tokens > st.max_max_tokens:
        raise ConfigError("stage.max_tokens", st.max_tokens, f"use at most stage.max_max_tokens={st.max_max_tokens}",
                          "default above the limit")


# latest: the newest run of the first of these that has one, of any tag
STAGE = Stage("serve", schema=ServeStageConfig, planner=serve_plan, worker=run,
              sources=("rl", "sft", "mid", "pretrain"), source_tag="any", one_process=True, check=check_serve)
