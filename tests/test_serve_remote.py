"""nanochat/serve/remote.py: the schedulers in a model process of their own, driven over a pipe.

On a real (random-weight) GPT and a freshly trained tokenizer, in a spawned process:
- temperature-0 answers are bitwise the in-process scheduler's; each sequence's tokens and timings
  come back with its last event; status and the model side's metrics cross the pipe
- a request being read in this process holds the model process's prefill (shared counter)
- cancel frees the row; a full queue raises QueueFull here; SIGTERM to the model process alone is
  ignored (the HTTP side stops it)
- the model process dying ends every stream with an error and refuses new work; a factory that
  fails makes spawn raise with its traceback
"""
from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import signal
import textwrap
import time

import pytest
import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat.serve.remote import RemotePool
from nanochat.serve.scheduler import QueueFull, QueueSink, ReplicaPool, SamplingParams, Scheduler, ShuttingDown
from nanochat.tokenizer import train_tokenizer


def _tiny(**sched) -> tuple[ReplicaPool, dict]:
    """The pool (not started) of a model process: a factory for RemotePool.spawn (or for this process)."""
    torch.set_num_threads(1)
    tok = train_tokenizer([collections.__doc__, textwrap.__doc__, json.__doc__] * 3, 400)
    cfg = GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = build_model(cfg, "cpu", 0)
    with torch.no_grad():   # zero-init projections would make every position alike
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    settle_max_s = sched.pop("settle_max_s", None)
    s = Scheduler(model.eval(), tok, **sched)
    if settle_max_s is not None:
        s.settle_max_s = settle_max_s
    return ReplicaPool([s]), {"tokenizer": tok}


def _broken() -> None:
    raise RuntimeError("no such checkpoint")


@pytest.fixture(scope="module")
def remote():
    pool = RemotePool.spawn(functools.partial(_tiny, max_seqs=4, max_queue=8, settle_max_s=5.0))
    yield pool
    pool.stop()


class _Collect:
    """A request's sinks: (choice, Event) in arrival order."""

    def __init__(self):
        self.events: list = []

    def __call__(self, i: int):
        return lambda ev: self.events.append((i, ev))

    def text(self, i: int = 0) -> str:
        return "".join(ev.text for j, ev in self.events if j == i and ev.kind != "done")

    def reasons(self) -> list:
        return [ev.finish_reason for _, ev in self.events if ev.kind == "done"]


async def _run(pool, prompt, params) -> tuple[list, _Collect]:
    got = _Collect()
    seqs = await pool.submit(prompt, params, got)
    while not all(s.finished for s in seqs):
        await asyncio.sleep(0.005)
    return seqs, got


def test_answers_are_the_in_process_schedulers(remote):
    tok = remote.info["tokenizer"]
    prompt = [tok.get_bos_token_id()] + tok.encode("The remote model says")
    params = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, temperature=1.0, seed=7)]
    seqs, got = asyncio.run(_run(remote, prompt, params))
    here, _ = _tiny(max_seqs=4)
    here.start()
    try:
        sinks = []
        local = here.submit(prompt, params, lambda i: sinks.append(QueueSink()) or sinks[-1])
        texts = ["".join(ev.text for ev in sink if ev.kind != "done") for sink in sinks]
    finally:
        here.stop()
    assert [s.tokens for s in seqs] == [s.tokens for s in local] and len(seqs[0].tokens) == 12
    assert [got.text(0), got.text(1)] == texts and got.reasons() == ["length", "length"]
    assert all(s.first_token_at <= s.last_token_at for s in seqs) and seqs[0].replica == 0
    status = asyncio.run(remote.status())
    assert status["replicas"][0]["max_seqs"] == 4 and status["replicas"][0]["active"] == 0
    assert not status["failed"] and b"nanochat_generated_tokens_total" in status["metrics"]
    # SIGTERM to the whole process group (Slurm, systemd) reaches the model process too: it keeps serving
    os.kill(remote.process.pid, signal.SIGTERM)
    seqs, got = asyncio.run(_run(remote, prompt, params[:1]))
    assert got.text() == texts[0] and remote.process.is_alive()


def test_a_request_being_read_here_holds_the_prefill_there(remote):
    tok = remote.info["tokenizer"]
    greedy = [SamplingParams(max_tokens=3, temperature=0)]

    async def go():
        got = _Collect()
        with remote.receiving_request():
            seqs = await remote.submit([tok.get_bos_token_id()] + tok.encode("wait for it"), greedy, got)
            await asyncio.sleep(0.3)   # far longer than any settle; the hold lasts up to settle_max_s (5 s here)
            assert got.events == [] and seqs[0].first_token_at is None
        while not seqs[0].finished:
            await asyncio.sleep(0.005)
        return got
    assert asyncio.run(go()).reasons() == ["length"]


def test_cancel_frees_the_row_and_a_full_queue_raises_here(remote):
    tok = remote.info["tokenizer"]
    long = [SamplingParams(max_tokens=200, temperature=1.0, seed=s) for s in range(4)]
    prompt = [tok.get_bos_token_id()] + tok.encode("Go on and on")

    async def go():
        got = _Collect()
        seqs = await remote.submit(prompt, long, got)                      # all 4 rows
        queued = [await remote.submit(prompt, long, _Collect()) for _ in range(2)]   # 8 waiting: the limit
        with pytest.raises(QueueFull):
            await remote.submit(prompt, long[:1], _Collect())
        for s in seqs + [s for q in queued for s in q]:
            s.cancel()
        while not all(s.finished for s in seqs):
            await asyncio.sleep(0.005)
        t0 = time.time()
        while (await remote.status())["replicas"][0]["active"] and time.time() - t0 < 30:
            await asyncio.sleep(0.02)
        return got, await remote.status()
    got, status = asyncio.run(go())
    assert got.reasons() == ["cancelled"] * 4 and status["replicas"][0]["active"] == 0
    assert b'nanochat_sequences_finished_total{reason="cancelled"}' in status["metrics"]


def test_a_dead_model_process_ends_every_stream_with_an_error():
    pool = RemotePool.spawn(functools.partial(_tiny, max_seqs=2))
    tok = pool.info["tokenizer"]

    async def go():
        got = _Collect()
        seqs = await pool.submit([tok.get_bos_token_id()] + tok.encode("Go on"),
                                 [SamplingParams(max_tokens=200, temperature=1.0)], got)
        pool.process.kill()
        while not seqs[0].finished:
            await asyncio.sleep(0.01)
        with pytest.raises(ShuttingDown, match="model process exited"):
            await pool.submit([tok.get_bos_token_id()], [SamplingParams(max_tokens=2)], _Collect())
        return got, await pool.status()
    try:
        got, status = asyncio.run(go())
    finally:
        pool.stop()
    done = [ev for _, ev in got.events if ev.kind == "done"]
    assert [ev.finish_reason for ev in done] == ["error"] and "model process exited" in done[0].error
    assert status["failed"]


def test_a_factory_that_fails_makes_spawn_raise_with_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)could not start.*no such checkpoint"):
        RemotePool.spawn(_broken)
