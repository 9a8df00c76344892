"""Benchmark the server's batched decoding against a real uvicorn server on this machine.

Prints, for the demo-size model (depth 4, width 256, vocab 4096, context 512 as experiment=cpu_demo):
  - the Engine's own single-stream decode tokens/s (no server, batch 1)
  - single-stream tokens/s through the server (one streaming HTTP client)
  - aggregate tokens/s at 1, 4, 8 and 16 concurrent streaming clients
  - p50 / p95 time to first token over every request of the run
The last line is one JSON object with every figure.

    flock /tmp/nanochat-cpu.lock .venv/bin/python bench/serve.py                    # random-weight demo-size model
    .venv/bin/python bench/serve.py --run runs/sft/d4/20260101-120000              # a trained checkpoint
    .venv/bin/python bench/serve.py --tokens 64 --threads 2

The server runs in a subprocess (its own GIL), with max_seqs=16; clients are httpx/asyncio. On a
shared CPU the absolute figures move with the neighbours; the ratio aggregate@8 / single is the
figure to compare (target >= 5x; nanochat's server, one request per replica at a time, is 1x).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEMO = dict(sequence_len=512, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)


# --------------------------------------------------------------------------- model (both processes)

def prepare_random_model(out: Path) -> None:
    """A demo-size GPT with random weights and a 4096-token tokenizer trained on the demo corpus."""
    import torch

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
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps({**DEMO, "vocab_size": tok.get_vocab_size()}))


def load_model(args):
    import torch
    if args.run:
        from nanochat.chat_cli import load
        model, tok, _ = load(args.run, "cpu")
        return model, tok
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    d = Path(args.model_dir)
    with torch.device("meta"):
        model = GPT(GPTConfig(**json.loads((d / "config.json").read_text())))
    model.to_empty(device="cpu")
    model.init_rotary()
    model.load_state_dict(torch.load(d / "model.pt", weights_only=True), assign=True)
    return model.eval(), Tokenizer.load(d / "tokenizer")


def serve_only(args) -> None:
    """The server process: one replica, max_seqs=16, on --port."""
    import torch
    import uvicorn

    from nanochat.serve.app import ServeSettings, build_app
    from nanochat.serve.metrics import ServerMetrics
    from nanochat.serve.scheduler import ReplicaPool, Scheduler
    torch.set_num_threads(args.threads)
    model, tok = load_model(args)
    metrics = ServerMetrics()
    pool = ReplicaPool([Scheduler(model, tok, max_seqs=16, max_queue=64, observer=metrics)]).start()
    app = build_app(pool, tok, ServeSettings(model_name="bench"), metrics)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")


def engine_tok_s(args, prompt_text: str) -> float:
    import torch

    from nanochat.engine import Engine
    torch.set_num_threads(args.threads)
    model, tok = load_model(args)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": prompt_text},
                                                     {"role": "assistant", "content": ""}]})
    eng = Engine(model, tok)
    best = 0.0
    for _ in range(args.repeats):
        t0, n = time.perf_counter(), 0
        for _ in eng.generate(prompt, max_tokens=args.tokens, temperature=0.0):
            n += 1
        best = max(best, n / (time.perf_counter() - t0))
    return best


# --------------------------------------------------------------------------- clients

async def one_stream(client, url: str, text: str, tokens: int) -> tuple[int, float, float, float]:
    """(generated tokens, ttft s, t_first, t_last) of one streaming request."""
    body = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with client.stream("POST", url + "v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]   # tokens, not text chunks
            for ch in chunk["choices"]:
                if ch["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    return n, (first or t0) - t0, first or t0, last or t0


async def measure(url: str, args, prompt: str) -> dict:
    import httpx
    out: dict = {"aggregate_tok_s": {}, "ttft": []}
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, prompt, 8)   # warm up
        singles = []
        for _ in range(args.repeats):
            n, ttft, t_first, t_last = await one_stream(client, url, prompt, args.tokens)
            out["ttft"].append(ttft)
            singles.append((n - 1) / (t_last - t_first) if n > 1 else 0.0)   # decode rate after the first token
        out["single_stream_tok_s"] = max(singles)
        for k in (1, 4, 8, 16):
            best = 0.0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = await asyncio.gather(*[one_stream(client, url, f"{prompt} ({i})", args.tokens) for i in range(k)])
                wall = time.perf_counter() - t0
                out["ttft"] += [r[1] for r in res]
                best = max(best, sum(r[0] for r in res) / wall)
            out["aggregate_tok_s"][str(k)] = best
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="serve this run dir's checkpoint instead of a random demo-size model")
    ap.add_argument("--tokens", type=int, default=96, help="tokens per request (max_tokens)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each figure")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_only:
        return serve_only(args)
    import httpx
    prompt = "Tell me about the history of the Python programming language"
    with tempfile.TemporaryDirectory(prefix="nanochat_bench_serve_") as tmp:
        if not args.run:
            print("[bench] building a random-weight demo-size model (d4, vocab 4096, context 512) ...", flush=True)
            prepare_random_model(Path(tmp))
            args.model_dir = tmp
        eng = engine_tok_s(args, prompt)
        print(f"engine single stream (batch 1, no server): {eng:8.1f} tok/s", flush=True)
        port = free_port()
        cmd = [sys.executable, __file__, "--serve-only", f"--port={port}", f"--threads={args.threads}"]
        cmd += [f"--run={args.run}"] if args.run else [f"--model-dir={tmp}"]
        server = subprocess.Popen(cmd)
        url = f"http://127.0.0.1:{port}/"
        try:
            t0 = time.time()
            while True:
                try:
                    if httpx.get(url + "health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() - t0 > 300:
                    raise SystemExit("bench/serve.py: the server did not start")
                time.sleep(0.3)
            res = asyncio.run(measure(url, args, prompt))
        finally:
            server.terminate()
            server.wait(30)
    ttft = sorted(res["ttft"])
    p50 = statistics.median(ttft) * 1000
    p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))] * 1000
    single = res["single_stream_tok_s"]
    print(f"server single stream:                      {single:8.1f} tok/s")
    for k, v in res["aggregate_tok_s"].items():
        print(f"server aggregate, {k:>2} concurrent streams:    {v:8.1f} tok/s  ({v / single:4.1f}x single)")
    print(f"time to first token: p50 {p50:.1f} ms, p95 {p95:.1f} ms  ({len(ttft)} requests)")
    print(json.dumps({"engine_tok_s": round(eng, 1), "single_stream_tok_s": round(single, 1),
                      "aggregate_tok_s": {k: round(v, 1) for k, v in res["aggregate_tok_s"].items()},
                      "ttft_ms_p50": round(p50, 1), "ttft_ms_p95": round(p95, 1)}))


if __name__ == "__main__":
    main()
