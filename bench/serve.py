"""Benchmark our server side by side with `transformers serve --continuous-batching` on the same weights.

For the demo-size model (depth 4, width 256, vocab 4096, context 512, as experiment=cpu_demo; random
weights unless --run) it prints, for each server (both running side by side on this machine):
  - single-stream decode tokens/s (one streaming client; by difference of a long and a short request)
  - at 1, 4, 8 and 16 concurrent streaming clients, two arrival patterns taking turns: a burst (all at
    once; its tokens/s is the aggregate figure) and staggered arrivals (one every --stagger-ms)
  - time to first token, p50 / p95 per pattern and concurrency, per pattern, and over every request
and, for ours only, the Engine's own single-stream rate (no server, batch 1, the model packed as the
server's is: nanochat/packed.py) and a multi-turn figure:
TTFT of turn 10 of a conversation over turn 1's, with the prefix cache on and off.
Then the ratios ours / peer. The last line is one JSON object with every figure (`peer`, `ratio_*`).

    .venv/bin/python bench/serve.py --peer transformers                # side by side (needs the bench extra)
    .venv/bin/python bench/serve.py                                    # ours only
    .venv/bin/python bench/serve.py --run runs/sft/d4/20260101-120000  # a trained checkpoint
    .venv/bin/python bench/serve.py --peer transformers --short        # a quick pass (the test's)

Both servers get the same client (httpx, streaming OpenAI chat completions, temperature 0), the same
prompts and max_tokens, the same threads and the same KV capacity (max_seqs × context tokens: our
rows, the peer's --cb-num-blocks × --cb-block-size). Prompts are picked so that ours runs each to
max_tokens; tokens are counted from `usage`, and requests that ended short on either server are
reported (`short_requests`). The peer's model is written by our Hugging Face export (nanochat/hf).
The servers take turns request by request (each repeat of each figure goes to ours, then to the
peer), so a machine whose load changes from second to second favours neither; --rounds starts both
afresh that many times (best rate per figure, every TTFT kept). On a shared CPU the absolute figures
move with the neighbours: compare the ratios of one run, over several runs.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import gc
import json
import operator
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.config import ServeStageConfig  # noqa: E402

DEMO = dict(sequence_len=512, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)
MAX_SEQS = 16     # our rows per replica; the peer gets the same KV capacity (MAX_SEQS × context tokens)
CB_BLOCK = 32     # the peer's KV block size (tokens)
CLIENT_LOG: list = []   # (pattern, k, prompt, sent, first token) of every request, for --trace


# --------------------------------------------------------------------------- model (both processes)

def prepare_random_model(out: Path) -> None:
    """A demo-size GPT with random weights and a 4096-token tokenizer trained on the demo corpus, as a
    checkpoint (checkpoints/step_*/ as a run's) and the tokenizer beside it."""
    import torch

    from nanochat.checkpoint import step_dir_name
    from nanochat.dataset import build_demo_docs
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import train_tokenizer
    tok = train_tokenizer(build_demo_docs(1_500_000), DEMO["vocab_size"])
    tok.save(out / "tokenizer")
    model = build_model(GPTConfig(**{**DEMO, "vocab_size": tok.get_vocab_size()}), "cpu", seed=0)
    with torch.no_grad():  # zero-init output projections make every position alike: perturb them
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = out / "checkpoints" / step_dir_name(0)
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    (ckpt / "meta.json").write_text(json.dumps({"model_config": dataclasses.asdict(model.config)}))


def load_model(args):
    """(model, tokenizer) of --run, or of the random model in --model-dir."""
    from nanochat.chat_cli import load
    if args.run:
        return load(args.run, "cpu")[:2]
    from nanochat.checkpoint import load_model_from_run
    from nanochat.tokenizer import Tokenizer
    return load_model_from_run(args.model_dir, "cpu")[0], Tokenizer.load(Path(args.model_dir) / "tokenizer")


def serve_only(args) -> None:
    """Our server process: one replica, max_seqs=16, on --port."""
    import torch
    import uvicorn

    from nanochat.serve.app import ServeSettings, build_app
    from nanochat.serve.metrics import ServerMetrics
    from nanochat.serve.scheduler import ReplicaPool, Scheduler
    torch.set_num_threads(1)   # as the serve stage: the scheduler's thread runs the model (nanochat/stages/serve.py)
    model, tok = load_model(args)
    metrics = ServerMetrics()
    pool = ReplicaPool([Scheduler(model, tok, max_seqs=MAX_SEQS, max_queue=64, observer=metrics,
                                  prefix_cache_mb=args.prefix_cache_mb, threads=args.threads, warmup=True)]).start()
    app = build_app(pool, tok, ServeSettings(model_name="bench", stream_interval_ms=args.stream_interval_ms), metrics)
    log = trace(pool.schedulers[0]) if args.trace else None
    if log:   # uvicorn re-raises SIGTERM once it has stopped: then write the trace instead of dying
        signal.signal(signal.SIGTERM, signal.default_int_handler)

        async def app_(scope, receive, send, inner=app):   # when the request reached our app
            ARRIVED.set(time.perf_counter())
            await inner(scope, receive, send)
    gc.freeze()   # as the serve stage does before serving (nanochat/stages/serve.py)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app_ if log else app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")
    if log:
        Path(args.trace).write_text(json.dumps({"steps": log["steps"], "seqs": [
            {"text": tok.decode(s.prompt[-16:]), "arrived": s.arrived, "submitted": s.submitted, "started": s.started,
             "first": s.first_token_at} for s in log["seqs"]]}))


ARRIVED = contextvars.ContextVar("arrived", default=None)


def trace(sched) -> dict:
    """Bench-only (--trace): when every scheduler step ran, and when each request was submitted, began
    prefilling and got its first token (perf_counter: the clients' clock too, on one machine); per
    step also its intra-op threads and the CPU time of its thread and of the whole process (a step
    whose process time is twice its wall time had both cores, spinning or computing)."""
    import torch
    log: dict = {"steps": [], "seqs": []}

    def timed(f, kind):
        def step(*a, **kw):
            t0, c0, p0, waiting = time.perf_counter(), time.thread_time(), time.process_time(), len(sched.waiting)
            threads.clear()
            f(*a, **kw)
            log["steps"].append((kind, t0, time.perf_counter(), sched.active(), waiting, min(threads, default=0),
                                 time.thread_time() - c0, time.process_time() - p0))
        return step

    threads, forward = [], sched.model.forward

    def counted(*a, **kw):   # the intra-op threads each forward ran with
        threads.append(torch.get_num_threads())
        return forward(*a, **kw)
    sched.model.forward = counted

    def submit(*a):
        seqs = submit_(*a)
        for s in seqs:
            s.arrived, s.started = ARRIVED.get(), None
        log["seqs"].extend(seqs)
        return seqs

    def start(group, slot):
        group.seqs[0].started = time.perf_counter()
        start_(group, slot)
    submit_, start_ = sched.submit, sched._start_prefill
    sched._prefill_step, sched._decode_step = timed(sched._prefill_step, "prefill"), timed(sched._decode_step, "decode")
    sched.submit, sched._start_prefill = submit, start
    return log


def engine_tok_s(eng, args, prompt: list[int]) -> float:
    """The Engine alone: batch 1, no server, decode tokens/s."""
    best: dict[int, float] = {}
    short = max(2, args.tokens // 4)
    for _ in range(args.repeats):
        for k in (short, args.tokens):
            t0 = time.perf_counter()
            list(eng.generate(prompt, max_tokens=k, temperature=0.0))   # run it to the end
            best[k] = min(best.get(k, float("inf")), time.perf_counter() - t0)
    return (args.tokens - short) / (best[args.tokens] - best[short])   # as the clients measure: by difference


def pick_prompts(eng, args, count: int) -> tuple[list[str], list[int]]:
    """User messages that our model answers greedily for the full max_tokens (no early end), and the
    first one's prompt (its tokens)."""
    topics = ["the history of the Python programming language", "how a compiler works", "the rules of chess",
              "why the sky is blue", "how to bake bread", "the life of a star", "what a hash table is",
              "the French revolution", "how vaccines work", "the game of go", "how rain forms",
              "what recursion means", "the printing press", "how a bicycle stays up", "the moon landing",
              "what an operating system does", "how bees make honey", "the Roman empire", "what DNA is",
              "how trains brake", "the theory of evolution", "what a neural network is", "how tides work",
              "the invention of paper"]
    out = []
    for i in range(200):
        text = f"Tell me about {topics[i % len(topics)]}" + (f" (part {i // len(topics)})" if i >= len(topics) else "")
        prompt = eng.tokenizer.render_for_completion({"messages": [{"role": "user", "content": text},
                                                                   {"role": "assistant", "content": ""}]})
        if len(eng.generate_batch(prompt, max_tokens=args.tokens, temperature=0.0)[0][0]) - len(prompt) == args.tokens:
            out.append((text, prompt))
            if len(out) == count:
                return [t for t, _ in out], out[0][1]
    raise SystemExit(f"bench/serve.py: only {len(out)} of 200 prompts run to max_tokens={args.tokens} on this model")


# --------------------------------------------------------------------------- clients

async def one_stream(client, url: str, model: str, messages: list[dict], tokens: int) -> dict:
    """One streaming request: generated tokens (from usage), ttft, first token time, text."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, n, text = None, 0, []
    async with client.stream("POST", url + "v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]   # tokens, not text chunks
            for ch in chunk.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    text.append(ch["delta"]["content"])
    return {"n": n, "ttft": (first or t0) - t0, "t0": t0, "first": first or t0, "text": "".join(text),
            "total": time.perf_counter() - t0}


async def measure(targets: dict[str, tuple[str, str]], args, prompts: list[str], outs: dict[str, dict]) -> None:
    """Add to `outs` ({server: figures}) the figures of servers {name: (url, model name)} running side by
    side, measured in turns (every repeat of every figure: each server once, one after the other), so
    that a machine whose load changes from second to second favours none. Per server: the single-stream
    rate, then at each concurrency k both arrival patterns: a burst (k requests at once; its tokens/s is
    the aggregate figure) and staggered (one every --stagger-ms). Over rounds, the better rate per
    figure is kept, every time to first token, and the counts added up."""
    import httpx

    def user(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    def count(out: dict, results) -> None:
        out["requests"] += len(results)
        out["short_requests"] += sum(r["n"] < args.tokens for r in results)

    async def arrivals(client, name: str, k: int, gap_s: float) -> tuple[list[dict], float]:
        async def one(i: int) -> dict:
            await asyncio.sleep(i * gap_s)
            return await one_stream(client, *targets[name], user(prompts[i]), args.tokens)
        t0 = time.perf_counter()
        res = await asyncio.gather(*[one(i) for i in range(k)])
        return res, time.perf_counter() - t0

    async with httpx.AsyncClient(timeout=900) as client:
        for name in targets:
            await one_stream(client, *targets[name], user(prompts[0]), 8)   # warm up
        # single-stream decode rate by difference: (n_long - n_short) / (t_long - t_short) over whole
        # requests, so neither the prefill nor how a server groups tokens into chunks counts
        short = max(2, args.tokens // 4)
        best: dict = {}
        for _ in range(args.repeats):
            for k in (short, args.tokens):
                for name, out in outs.items():
                    r = await one_stream(client, *targets[name], user(prompts[0]), k)
                    if k == args.tokens:
                        count(out, [r])
                    if (name, k) not in best or r["total"] < best[name, k][1]:
                        best[name, k] = (r["n"], r["total"])
        for name, out in outs.items():
            (n1, t1), (n2, t2) = best[name, short], best[name, args.tokens]
            # a machine busy with other work can make the long request no slower than the short one: then
            # the difference means nothing and the long request's rate (prefill included) stands in for it
            rate = (n2 - n1) / (t2 - t1) if t2 > t1 and n2 > n1 else n2 / t2
            out["single_stream_tok_s"] = max(rate, out.get("single_stream_tok_s", 0.0))
        for k in args.streams:
            for _ in range(args.repeats):
                for pattern, gap in (("burst", 0.0), ("staggered", args.stagger_ms / 1000)):
                    for name, out in outs.items():
                        res, wall = await arrivals(client, name, k, gap)
                        count(out, res)
                        out["ttft_s"].setdefault(pattern, {}).setdefault(str(k), []).extend(r["ttft"] for r in res)
                        if name == "ours":
                            CLIENT_LOG.extend((pattern, k, prompts[i], r["t0"], r["first"]) for i, r in enumerate(res))
                        if pattern == "burst":
                            rate = sum(r["n"] for r in res) / wall
                            out["aggregate_tok_s"][str(k)] = max(rate, out["aggregate_tok_s"].get(str(k), 0.0))


async def multi_turn(url: str, model: str, args) -> dict:
    """TTFT of each turn of a conversation that re-sends its history (as chat clients do)."""
    import httpx
    turns = []
    async with httpx.AsyncClient(timeout=900) as client:
        for conv in range(args.repeats):
            messages, ttfts = [], []
            for t in range(args.turns):
                messages.append({"role": "user", "content": f"Conversation {conv}, question {t}: and then?"})
                r = await one_stream(client, url, model, messages, args.turn_tokens)
                ttfts.append(r["ttft"])
                messages.append({"role": "assistant", "content": r["text"] or "ok"})
            turns.append(ttfts)
    best = [min(ts) for ts in zip(*turns)]   # per turn, the best over the conversations
    return {"ttft_ms_turn1": best[0] * 1000, "ttft_ms_last_turn": best[-1] * 1000,
            "last_over_first": best[-1] / best[0]}


# --------------------------------------------------------------------------- servers

def run_servers(servers: dict[str, list[str]], env: dict, work):
    """Start the servers {name: command} side by side, wait until each is ready (/health answers 200),
    return `work({name: url})` and stop them."""
    import httpx
    procs, urls = {}, {}
    try:
        for name, cmd in servers.items():
            with socket.socket() as sock:   # a free port
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            procs[name] = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], env=env,
                                           stdout=None if name == "ours" else subprocess.DEVNULL)
            urls[name] = f"http://127.0.0.1:{port}/"
        for name, proc in procs.items():
            t0 = time.time()
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(urls[name] + "health", timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.time() - t0 > 600:
                    raise SystemExit(f"bench/serve.py: {name} did not start")
                time.sleep(0.3)
        return work(urls)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def export_hf(args, out: Path) -> Path:
    """The same weights in transformers' format (our Hugging Face export's writer)."""
    from nanochat.hf.export import write_hf_dir
    model, tok = load_model(args)
    out.mkdir(parents=True)
    write_hf_dir(out, dataclasses.asdict(model.config), model.state_dict(), tok)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="serve this run dir's checkpoint instead of a random demo-size model")
    ap.add_argument("--peer", choices=["none", "transformers"], default="none",
                    help="also measure `transformers serve --continuous-batching` on the same weights")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request (max_tokens)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each figure within a round")
    ap.add_argument("--rounds", type=int, default=2, help="server starts (both servers afresh each round)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--turns", type=int, default=10, help="multi-turn figure: turns per conversation")
    ap.add_argument("--turn-tokens", type=int, default=16, help="multi-turn figure: max_tokens per answer")
    ap.add_argument("--stagger-ms", type=float, default=20.0, help="staggered arrivals: one request every this many ms")
    ap.add_argument("--short", action="store_true", help="a quick pass: 8 tokens, 1 repeat, 1 and 4 streams, 3 turns")
    ap.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--trace", metavar="DIR", help="write our server's step and request timestamps (and the "
                    "client's) to DIR, a file per round")
    ap.add_argument("--prefix-cache-mb", type=float, default=256.0, help=argparse.SUPPRESS)
    ap.add_argument("--stream-interval-ms", type=float, default=ServeStageConfig.stream_interval_ms,
                    help="our server's stage.stream_interval_ms (default: the stage's)")
    args = ap.parse_args()
    args.streams = (1, 4, 8, 16)
    if args.short:
        args.tokens, args.repeats, args.rounds, args.streams, args.turns, args.turn_tokens = 8, 1, 1, (1, 4), 3, 4
    if args.serve_only:
        return serve_only(args)
    import torch

    from nanochat.engine import Engine
    from nanochat.packed import pack_for_inference
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="nanochat_bench_serve_") as tmp:
        if not args.run:
            print("[bench] building a random-weight demo-size model (d4, vocab 4096, context 512) ...", flush=True)
            prepare_random_model(Path(tmp))
            args.model_dir = tmp
        torch.set_num_threads(args.threads)
        model, tok = load_model(args)
        pack_for_inference(model)   # as the server's model (nanochat/packed.py)
        engine = Engine(model, tok)
        prompts, first = pick_prompts(engine, args, max(args.streams))
        eng = engine_tok_s(engine, args, first)
        print(f"engine single stream (batch 1, no server): {eng:8.1f} tok/s", flush=True)
        ours_cmd = [sys.executable, __file__, "--serve-only", "--port={port}", f"--threads={args.threads}",
                    f"--stream-interval-ms={args.stream_interval_ms}"]
        ours_cmd += [f"--run={args.run}"] if args.run else [f"--model-dir={tmp}"]
        peer_cmd = None
        if args.peer == "transformers":
            hf = export_hf(args, Path(tmp) / "hf")
            exe = Path(sys.executable).with_name("transformers")
            capacity = MAX_SEQS * model.config.sequence_len
            peer_cmd = [str(exe), "serve", str(hf), "--host", "127.0.0.1", "--port", "{port}", "--device", "cpu",
                        "--dtype", "float32", "--continuous-batching", "--cb-block-size", str(CB_BLOCK),
                        "--cb-num-blocks", str(-(-capacity // CB_BLOCK))]
            print("[bench] peer: " + " ".join(peer_cmd).replace("{port}", "<port>"), flush=True)
        figures = {name: {"aggregate_tok_s": {}, "ttft_s": {}, "short_requests": 0, "requests": 0}
                   for name in (["ours", "peer"] if peer_cmd else ["ours"])}
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
        for r in range(args.rounds):
            CLIENT_LOG.clear()
            servers = {"ours": ours_cmd + ([f"--trace={args.trace}/ours{r}.json"] if args.trace else [])}
            models = {"ours": "bench"}
            if peer_cmd:
                servers["peer"], models["peer"] = peer_cmd, str(hf)
            gc.collect()
            gc.freeze()   # the client's own full collections (this process holds torch and the model) stall its requests
            run_servers(servers, env, lambda urls: asyncio.run(
                measure({k: (u, models[k]) for k, u in urls.items()}, args, prompts, figures)))
            if args.trace:
                Path(args.trace, f"client{r}.json").write_text(json.dumps(CLIENT_LOG))
        turns = {}
        for label, mb in (("cache_on", 256.0), ("cache_off", 0.0)):
            turns[label] = run_servers({"ours": ours_cmd + [f"--prefix-cache-mb={mb}"]}, env,
                                       lambda urls: asyncio.run(multi_turn(urls["ours"], "bench", args)))
    report(eng, figures["ours"], turns, figures.get("peer"), args)


def summarize(res: dict) -> dict:
    """The figures of one server: rates, and TTFT p50/p95 (ms) per arrival pattern and concurrency, per
    pattern over all its requests, and over every request."""
    def pct(xs: list[float]) -> dict:
        xs = sorted(xs)
        at = lambda q: round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000, 1)   # noqa: E731
        return {"p50": at(0.5), "p95": at(0.95)}
    ttft = {pattern: {**{k: pct(xs) for k, xs in by_k.items()}, "all": pct([x for xs in by_k.values() for x in xs])}
            for pattern, by_k in res["ttft_s"].items()}
    every = pct([x for by_k in res["ttft_s"].values() for xs in by_k.values() for x in xs])
    return {"single_stream_tok_s": round(res["single_stream_tok_s"], 1),
            "aggregate_tok_s": {k: round(v, 1) for k, v in res["aggregate_tok_s"].items()},
            "ttft_ms": ttft, "ttft_ms_p50": every["p50"], "ttft_ms_p95": every["p95"],
            "short_requests": res["short_requests"], "requests": res["requests"]}


def report(eng: float, ours: dict, turns: dict, peer, args) -> None:
    ours, peer = summarize(ours), peer and summarize(peer)
    rows = [("single-stream decode tok/s", "single_stream_tok_s", ("single_stream_tok_s",))]
    rows += [(f"aggregate tok/s, {k:>2} streams", f"agg{k}", ("aggregate_tok_s", str(k))) for k in args.streams]
    rows += [(f"TTFT {q} ms, {pattern} {k + ' streams' if k != 'all' else '(all)'}", f"ttft_{q}_{pattern}_{k}",
              ("ttft_ms", pattern, k, q))
             for pattern in ("burst", "staggered") for k in [*map(str, args.streams), "all"] for q in ("p50", "p95")]
    rows += [("TTFT p50 ms, every request", "ttft_ms_p50", ("ttft_ms_p50",)),
             ("TTFT p95 ms, every request", "ttft_ms_p95", ("ttft_ms_p95",)),
             ("requests ended short", "short_requests", ("short_requests",))]

    print(f"\n{'figure':<36} {'ours':>10} {'peer':>10} {'ours/peer':>10}")
    ratios = {}
    for label, key, path in rows:
        a = functools.reduce(operator.getitem, path, ours)
        b = functools.reduce(operator.getitem, path, peer) if peer else None
        r = a / b if b else None
        if r is not None and key != "short_requests":
            ratios[f"ratio_{key}"] = round(r, 3)
        print(f"{label:<36} {a:>10.1f} {b if b is not None else float('nan'):>10.1f} "
              f"{r if r is not None else float('nan'):>10.2f}")
    print(f"{'engine alone tok/s':<36} {eng:>10.1f}   (ours single / engine = {ours['single_stream_tok_s'] / eng:.2f})")
    for label, t in turns.items():
        print(f"multi-turn TTFT, prefix cache {label[6:]:<3}: turn 1 {t['ttft_ms_turn1']:.1f} ms, turn {args.turns} "
              f"{t['ttft_ms_last_turn']:.1f} ms ({t['last_over_first']:.2f}x)")
    ratios["ratio_single_vs_engine"] = round(ours["single_stream_tok_s"] / eng, 3)
    print(json.dumps({"engine_tok_s": round(eng, 1), "tokens": args.tokens, "threads": args.threads,
                      "stagger_ms": args.stagger_ms, **ours,
                      "multi_turn": {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in turns.items()},
                      "peer": peer and {"name": "transformers serve --continuous-batching", **peer}, **ratios}))


if __name__ == "__main__":
    main()
