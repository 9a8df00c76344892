"""The serving scheduler on a real (random-weight) GPT and a freshly trained tokenizer, no HTTP.

- a request's temperature-0 output is the same alone or among 15 others of other lengths
  (fixed-shape decode, key length padded to kv_bucket; also with kv_bucket=0)
- greedy decoding equals the Engine's; seeded sampling repeats; stop strings cut the text
- streamed text is valid UTF-8 piece by piece, multi-byte characters whole
- a cancelled sequence frees its row at the next step; a full queue raises QueueFull
"""
from __future__ import annotations

import collections
import json
import os
import textwrap
import time

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model
from nanochat.serve.scheduler import QueueFull, QueueSink, SamplingParams, Scheduler, Sequence, _chunk_shape
from nanochat.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    texts = [collections.__doc__, textwrap.__doc__, json.__doc__, "héllo wörld ✓ naïve café — ok"] * 3
    return train_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def model(tok):
    cfg = GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    m = build_model(cfg, "cpu", 0)
    with torch.no_grad():  # zero-init projections would make every position alike: perturb them
        g = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def _submit(sched, prompt, params):
    sinks = []

    def sink_for(i):
        sinks.append(QueueSink())
        return sinks[-1]
    seqs = sched.submit(prompt, params, sink_for)
    return seqs, sinks


def _collect(sink):
    text, reason = [], None
    for ev in sink:
        if ev.kind == "done":
            reason = ev.finish_reason
        else:
            text.append(ev.text)
    return "".join(text), reason


class LogitsRecorder(Scheduler):
    """The real scheduler, also keeping every logits row it samples from (bitwise checks)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: dict[int, list[torch.Tensor]] = {}

    def _sample(self, seq, logits_row, greedy):
        self.seen.setdefault(seq.id, []).append(logits_row.clone())
        return super()._sample(seq, logits_row, greedy)


@pytest.mark.parametrize("kv_bucket", [16, 64, 0])
def test_batched_equals_solo_and_engine(tok, model, kv_bucket):
    sched = LogitsRecorder(model, tok, max_seqs=16, max_queue=16, kv_bucket=kv_bucket).start()
    try:
        bos = tok.get_bos_token_id()
        # lengths from ~5 to ~150 tokens: batched, the key length is the longest row's, in other buckets
        prompts = [[bos] + tok.encode(f"request number {i}: " + "abc def " * (i * 2)) for i in range(16)]
        assert max(map(len, prompts)) > 2 * 64 and min(map(len, prompts)) < 64
        greedy = SamplingParams(max_tokens=24, temperature=0)
        solo = []
        for p in prompts:
            seqs, sinks = _submit(sched, p, [greedy])
            solo.append((_collect(sinks[0]), list(seqs[0].tokens)))
        subs = [_submit(sched, p, [greedy]) for p in prompts]   # all 16 at once: batched decode
        together = [(_collect(sinks[0]), list(seqs[0].tokens)) for seqs, sinks in subs]
        assert together == solo
        # not just the same argmax: bitwise the same logits at every step, alone or batched
        ids = sorted(sched.seen)
        for a, b in zip(ids[:16], ids[16:32]):
            assert all(torch.equal(x, y) for x, y in zip(sched.seen[a], sched.seen[b]))
        assert sched.steps > 0 and max(len(t) for _, t in solo) == 24
        # the scheduler's greedy tokens are the Engine's (same tool logic, same model)
        ref = next(Engine(model, tok).generate(prompts[3], max_tokens=1, temperature=0))[0][0]
        if kv_bucket:
            return  # the rest does not depend on the padding
        assert solo[3][1][0] == ref
        # seeded sampling: same seed → same text, whatever runs beside it
        params = [SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=s) for s in (7, 8, 7)]
        _, sinks = _submit(sched, prompts[0], params)
        a, b, c = (_collect(s)[0] for s in sinks)
        assert a == c and a != b
        # a stop string ends the answer before it and reports "stop"
        full = solo[5][0][0]
        cut = full[6:9]
        _, sinks = _submit(sched, prompts[5], [SamplingParams(max_tokens=24, temperature=0, stop=(cut,))])
        text, reason = _collect(sinks[0])
        assert reason == "stop" and text == full[:full.index(cut)]
    finally:
        sched.stop()


def test_cancel_frees_row_and_queue_limit(tok, model):
    sched = Scheduler(model, tok, max_seqs=1, max_queue=1)   # not started yet: nothing is admitted
    bos = tok.get_bos_token_id()
    p = [bos] + tok.encode("hello")
    long = SamplingParams(max_tokens=90, temperature=0)
    (s1,), (k1,) = _submit(sched, p, [long])
    (s2,), (k2,) = _submit(sched, p, [long])       # one row + one waiting: allowed
    with pytest.raises(QueueFull):
        _submit(sched, p, [long])
    sched.start()
    try:
        first = next(iter(k1))                      # s1 runs; cancel it mid-answer
        assert first.kind != "done"
        s1.cancel()
        reasons = [ev.finish_reason for ev in k1 if ev.kind == "done"]
        assert reasons == ["cancelled"] and len(s1.tokens) < 90
        assert _collect(k2)[1] == "length"          # the freed row went to the waiting request
        assert sched.idle() and sched.free_rows() == 1
    finally:
        sched.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the bug we plant
def test_extreme_sampling_settings_and_a_dead_scheduler_refuse_cleanly(tok, model):
    """Found by schemathesis: temperature 1e-300 (logits / t overflow) or top_p 1e-46 (0 in float32)
    once made torch.multinomial raise on the scheduler thread, and new requests then queued forever."""
    from nanochat.serve.scheduler import ReplicaPool, ShuttingDown
    sched = Scheduler(model, tok, max_seqs=2, max_queue=4)
    pool = ReplicaPool([sched]).start()
    try:
        p = [tok.get_bos_token_id()] + tok.encode("hello")
        (g,), (kg,) = _submit(sched, p, [SamplingParams(max_tokens=6, temperature=0)])
        greedy = _collect(kg)
        for t, top_p in ((1e-300, None), (1.0, 1e-46), (5e-324, 1e-300)):
            _, (k,) = _submit(sched, p, [SamplingParams(max_tokens=6, temperature=t, top_p=top_p)])
            assert _collect(k) == greedy, (t, top_p)    # both mean greedy
        assert not pool.failed
        sched._decode_step = None                       # a bug on the scheduler thread ...
        _, (k,) = _submit(sched, p, [SamplingParams(max_tokens=6, temperature=0)])
        assert _collect(k)[1] == "error"                # ... ends the streams in flight,
        sched._thread.join(10)
        assert pool.failed                              # /health turns 503 "failed"
        with pytest.raises(ShuttingDown):               # and new requests are refused (503), not queued
            _submit(sched, p, [SamplingParams(max_tokens=6, temperature=0)])
    finally:
        pool.stop()


def test_utf8_streams_whole_characters(tok):
    text = "héllo wörld ✓ naïve café — ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())            # byte-level pieces: characters span tokens
    pieces = []
    seq = Sequence([0], SamplingParams(), lambda ev: pieces.append(ev), "cpu")
    names = {tok.encode_special(n): n for n in tok.get_special_tokens()}
    for t in ids:
        seq.emit_token(t, tok, names)
    seq.finish("stop")
    texts = [e.text for e in pieces if e.kind == "text"]
    assert "".join(texts) == text
    assert all("\ufffd" not in t for t in texts)


def test_tool_tokens_stream_as_their_own_kinds(tok):
    sp = tok.encode_special
    ids = ([*tok.encode("Let me see "), sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>"),
            sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>"), *tok.encode(" so 84")])
    events = []
    seq = Sequence([0], SamplingParams(), events.append, "cpu")
    names = {sp(n): n for n in tok.get_special_tokens()}
    for t in ids:
        seq.emit_token(t, tok, names)
    seq.finish("stop")
    by_kind: dict[str, str] = {}
    for e in events:
        by_kind[e.kind] = by_kind.get(e.kind, "") + e.text
    assert by_kind["python"] == "12*7" and by_kind["output"] == "84"
    assert by_kind["text"] == "Let me see  so 84" and by_kind["python_start"] == "<|python_start|>"
    assert [e.kind for e in events][-1] == "done"


def _logits_of(sched, prompts, params):
    """Run the prompts one after the other; the text and every sampled-from logits row of each."""
    out = []
    for p in prompts:
        seqs, sinks = _submit(sched, p, [params])
        text = _collect(sinks[0])
        out.append((text, [x for x in sched.seen[seqs[0].id]]))
    return out


def test_prefix_cache_and_chunked_prefill_give_identical_outputs(tok, model):
    """A multi-turn conversation reuses its history's keys/values; the logits stay bitwise the same
    as with no cache, as with 32-token prefill chunks, and as with prompts prefilled one at a time."""
    bos = tok.get_bos_token_id()
    greedy = SamplingParams(max_tokens=12, temperature=0)
    plain = LogitsRecorder(model, tok, max_seqs=4, prefix_cache_mb=0, prefill_rows=1).start()
    cached = LogitsRecorder(model, tok, max_seqs=4, prefix_cache_mb=64, prefill_chunk=32).start()
    try:
        assert plain.tiled and cached.tiled     # this CPU: row-independent products (else: fallback, no cache)
        turns, prompt = [], [bos]
        for i in range(5):                       # each turn re-sends the history plus its answer
            prompt = prompt + tok.encode(f" user turn {i}: tell me about abc def number {i * 7}")
            seqs, sinks = _submit(plain, prompt, [greedy])
            _collect(sinks[0])
            turns.append(list(prompt))
            prompt = prompt + list(seqs[0].tokens)
        assert len(turns[-1]) > 3 * 32
        a = _logits_of(plain, turns, greedy)
        b = _logits_of(cached, turns, greedy)
        assert [t for t, _ in a] == [t for t, _ in b]
        assert all(torch.equal(x, y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))
        st = cached.prefix.stats()
        assert st["hits"] >= 4 and st["reused_tokens"] >= sum(len(t) for t in turns[:-1]) - 16 * 4
        # several prompts prefilled together (right-padded into one forward) give the same numbers
        subs = [_submit(cached, p, [greedy]) for p in turns]
        together = [(_collect(sinks[0]), [x for x in cached.seen[seqs[0].id]]) for seqs, sinks in subs]
        assert all(torch.equal(x, y) for (_, la), (_, lb) in zip(a, together) for x, y in zip(la, lb))
        assert cached.prefill_steps < plain.prefill_steps + len(turns) * 4
    finally:
        plain.stop()
        cached.stop()


def test_prefix_cache_evicts_least_recently_used_within_budget(tok, model):
    from nanochat.serve.prefix_cache import PrefixCache
    kv = lambda n: torch.randn(2, 1, n, 32)     # noqa: E731  (layers, kv heads, tokens, head dim)
    per_block = 2 * 2 * 16 * 32 * 4             # k and v of 16 tokens, float32
    cache = PrefixCache(budget_bytes=5 * per_block, block=16)   # a pool of 5 blocks
    a, b, c = list(range(40)), list(range(100, 140)), list(range(200, 240))
    ka, va = kv(40), kv(40)
    assert cache.insert(a, ka, va) == 2 and cache.insert(b, kv(40), kv(40)) == 2    # whole blocks only
    assert len(cache.lookup(a + [7, 8], limit=41)) == 2          # block-aligned, a use: `a` is now newest
    # what comes back is bitwise what went in
    blocks = cache.lookup(a, limit=39)
    k_out, v_out = torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    cache.read(blocks, k_out, v_out)
    assert torch.equal(k_out, ka[:, :, :32]) and torch.equal(v_out, va[:, :, :32])
    # a longer prompt with the same beginning stores only its new blocks (shared prefix)
    assert cache.insert(a + list(range(900, 908)), kv(48), kv(48)) == 1 and cache.stats()["blocks"] == 5
    assert cache.insert(c, kv(40), kv(40)) == 2                  # full: evicts b's blocks (least recently used)
    assert cache.used <= cache.budget and cache.evictions == 2
    assert cache.lookup(b + [1], limit=41) == []
    assert len(cache.lookup(a[:20] + [9] * 20, limit=40)) == 1   # a shared beginning is reused too
    assert len(cache.lookup(c, limit=39)) == 2 and cache.lookup([5] * 40, limit=39) == []
    assert cache.insert(list(range(500, 600)), kv(100), kv(100)) <= 5   # larger than the pool: what fits
    assert cache.used <= cache.budget
    assert PrefixCache(0).insert(a, kv(40), kv(40)) == 0          # budget 0: off
    assert PrefixCache(per_block - 1).insert(a, kv(40), kv(40)) == 0   # not even one block: off
    # in the scheduler: a budget of one conversation keeps the newest and evicts the rest
    bos = tok.get_bos_token_id()
    sched = Scheduler(model, tok, max_seqs=2, prefix_cache_mb=0.05)
    sched.start()
    try:
        for i in range(4):
            p = [bos] + tok.encode(f"conversation {i}: " + "abc def " * 8)
            _collect(_submit(sched, p, [SamplingParams(max_tokens=2, temperature=0)])[1][0])
        st = sched.prefix.stats()
        assert st["evictions"] >= 2 and st["bytes"] <= st["budget_bytes"] and st["blocks"] >= 1
    finally:
        sched.stop()


def test_idle_warm_up_runs_every_prefill_shape_once(tok, model):
    """warmup=True: while idle the scheduler runs each prefill shape once (CPU kernels are built on
    the first product of a shape); requests are served meanwhile and their outputs do not change."""
    bos = tok.get_bos_token_id()
    p = [bos] + tok.encode("warm me up " * 3)
    cold = Scheduler(model, tok, max_seqs=4, warmup=False).start()
    warm = Scheduler(model, tok, max_seqs=4, warmup=True, prefill_chunk=4096)   # chunks are capped by the context
    try:
        assert not cold.warming and warm.warming and len(warm._warm) == len(warm._warm_shapes())
        shapes = warm._warm_shapes()
        assert (1, 8, 8) in shapes and all(T % 8 == 0 for _, T, _ in shapes)
        assert max(n for n, _, _ in shapes) == warm.prefill_rows and max(T for _, T, _ in shapes) <= model.config.sequence_len
        # every flat row a burst of short prompts can make (see _prefill_forward) is warmed too
        flat = {f for *_, f in shapes}
        assert all(min(_chunk_shape(t), n * T) in flat for n in range(1, warm.prefill_rows + 1)
                   for T in (8, 16, 24, 32) for t in range(T - 7, n * T + 1))
        warm.start()
        greedy = SamplingParams(max_tokens=16, temperature=0)
        got = _collect(_submit(warm, p, [greedy])[1][0])          # served while (or after) warming
        assert got == _collect(_submit(cold, p, [greedy])[1][0])
        t0 = time.time()
        while warm.warming and time.time() - t0 < 60:
            time.sleep(0.05)
        assert not warm.warming and warm.idle()
        assert _collect(_submit(warm, p, [greedy])[1][0]) == got
    finally:
        cold.stop()
        warm.stop()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run the model on 2 threads")
def test_prefill_with_a_core_fewer_while_requests_arrive_changes_nothing(tok, model):
    """While requests are arriving, prefills and decode steps run with one intra-op thread fewer (the
    HTTP thread gets a core): a start-up check on the scheduler thread verifies that this changes no
    bit, and the logits are the same whichever thread count ran the prompt and its answer."""
    sched = LogitsRecorder(model, tok, max_seqs=8, threads=2).start()
    try:
        bos = tok.get_bos_token_id()
        prompts = [[bos] + tok.encode(f"prompt {i}: " + "abc def " * (3 * i + 1)) for i in range(8)]
        greedy = SamplingParams(max_tokens=8, temperature=0)
        sched.arriving_s = 0.0                          # never: every step on 2 threads
        sched.settle_s = sched.burst_settle_s = sched.settle_max_s = 0.0   # (new prompts start at once)
        solo = []
        for p in prompts:                               # one at a time
            solo.append(_submit(sched, p, [greedy]))
            _collect(solo[-1][1][0])
        assert sched.yield_core                         # this CPU: prefill bitwise the same on 1 thread
        sched.arriving_s = 3600.0                       # always: every step on 1 thread
        together = [_submit(sched, p, [greedy]) for p in prompts]
        for seqs, sinks in together:
            _collect(sinks[0])
        for (a, _), (b, _) in zip(solo, together):
            la, lb = sched.seen[a[0].id], sched.seen[b[0].id]
            assert len(la) == len(lb) == 8 and all(torch.equal(x, y) for x, y in zip(la, lb))
    finally:
        sched.stop()


def _settling(tok, model, settle_s: float) -> Scheduler:
    """A started scheduler whose new prompts wait for arrivals to pause `settle_s` (up to 5 s)."""
    sched = Scheduler(model, tok, max_seqs=8)
    sched.settle_s = sched.burst_settle_s = settle_s
    sched.settle_max_s = 5.0
    return sched.start()


def test_a_burst_arriving_one_by_one_prefills_together(tok, model):
    """Requests of a burst reach the scheduler one at a time (the HTTP thread parses each): a new
    prefill waits for arrivals to pause (settle_s), so the whole burst is one prefill forward, and
    each request's first token comes from it. Gaps here are 5 ms, the pause it waits for 0.3 s."""
    bos = tok.get_bos_token_id()
    sched = _settling(tok, model, 0.3)
    try:
        greedy = SamplingParams(max_tokens=2, temperature=0)
        burst = []
        for i in range(6):
            burst.append(_submit(sched, [bos] + tok.encode(f"burst {i}"), [greedy]))
            time.sleep(0.005)
        assert all(_collect(sinks[0])[1] == "length" for _, sinks in burst)
        assert sched.prefill_steps == 1
    finally:
        sched.stop()


def test_a_burst_of_mixed_lengths_pays_for_its_tokens_not_for_the_longest(tok, model):
    """One long prompt and five short ones prefill in one forward whose linear layers run over their
    real tokens as one flat row (about the sum of their lengths, not 6 × the longest); each answer is
    bitwise the one it gets alone."""
    bos = tok.get_bos_token_id()
    sched = _settling(tok, model, 0.3)
    shapes = []
    hook = model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    try:
        greedy = SamplingParams(max_tokens=4, temperature=0)
        prompts = [[bos] + tok.encode("a long one " * 20)] + [[bos] + tok.encode(f"short {i}") for i in range(5)]
        burst = [_submit(sched, p, [greedy]) for p in prompts]
        together = [_collect(sinks[0]) for _, sinks in burst]
        assert sched.prefill_steps == 1
        total, longest = sum(map(len, prompts)), max(map(len, prompts))
        prefill = [s for s in shapes if s[1] > 1]
        assert prefill == [(1, prefill[0][1])] and total <= prefill[0][1] < total + total // 8 + 8 < 6 * longest
        assert together == [_collect(_submit(sched, p, [greedy])[1][0]) for p in prompts]
    finally:
        hook.remove()
        sched.stop()


def test_a_request_being_received_holds_new_prompts(tok, model):
    """While the HTTP side is still reading a request (receiving_request), prompts already queued do
    not start: the request read next joins their prefill forward instead of waiting for it."""
    bos = tok.get_bos_token_id()
    sched = _settling(tok, model, 0.001)
    try:
        greedy = SamplingParams(max_tokens=2, temperature=0)
        with sched.receiving_request():                 # the second request is being read ...
            with sched.receiving_request():
                first = _submit(sched, [bos] + tok.encode("first"), [greedy])
            time.sleep(0.2)                             # ... far longer than any settle
            assert sched.prefill_steps == 0 and first[0][0].first_token_at is None
            second = _submit(sched, [bos] + tok.encode("second"), [greedy])
        assert _collect(first[1][0])[1] == _collect(second[1][0])[1] == "length"
        assert sched.prefill_steps == 1
    finally:
        sched.stop()


def test_first_tokens_of_a_prefill_go_out_before_its_rows_are_copied(tok, model):
    """Prompts that finish prefilling in one forward send every first token before any of their
    keys/values are copied into decode rows (the last prompt of a burst would wait for every copy)."""
    bos = tok.get_bos_token_id()
    sched = Scheduler(model, tok, max_seqs=8)
    sched.settle_s = sched.burst_settle_s = 0.2
    seqs, sent_at_copy = [], []
    copy = sched.cache.copy_rows_from

    def spy(src, src_row=0, dst_rows=None):
        if src is sched.pre:
            sent_at_copy.append(sum(s.first_token_at is not None for s in seqs))
        copy(src, src_row, dst_rows)
    sched.cache.copy_rows_from = spy
    sched.start()
    try:
        greedy = SamplingParams(max_tokens=3, temperature=0)
        burst = [_submit(sched, [bos] + tok.encode(f"prompt {i}"), [greedy]) for i in range(5)]
        seqs.extend(s for ss, _ in burst for s in ss)
        assert all(_collect(sinks[0])[1] == "length" for _, sinks in burst)
        assert sched.prefill_steps == 1 and sent_at_copy == [5] * 5
    finally:
        sched.stop()


def _threads_per_forward(sched: Scheduler, model, tok) -> list[tuple[str, int]]:
    """Start `sched`, then run one 3-token request: (prefill or decode, intra-op threads) per forward."""
    forward, ran = model.forward, []

    def counted(ids, *a, **kw):
        ran.append(("prefill" if ids.shape[1] > 1 else "decode", torch.get_num_threads()))
        return forward(ids, *a, **kw)
    model.forward = counted
    try:
        sched.start()
        t0 = time.time()
        while not sched.yield_core and time.time() - t0 < 30:   # the start-up checks ran
            time.sleep(0.01)
        del ran[:]
        bos = tok.get_bos_token_id()
        _collect(_submit(sched, [bos] + tok.encode("hello"), [SamplingParams(max_tokens=3, temperature=0)])[1][0])
        return ran
    finally:
        model.forward = forward
        sched.stop()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run the model on 2 threads")
def test_decode_steps_leave_a_core_while_first_tokens_go_out(tok, model):
    """A prefill once arrivals have paused runs on both threads; the decode steps right after it run
    with one fewer, so the HTTP thread sending the first tokens it produced has a core."""
    sched = Scheduler(model, tok, max_seqs=4, threads=2)
    sched.settle_s, sched.settle_max_s, sched.arriving_s = 0.3, 1.0, 0.2   # the prefill starts after the arrival window
    assert _threads_per_forward(sched, model, tok) == [("prefill", 2), ("decode", 1), ("decode", 1)]


def test_decode_steps_wait_while_new_prompts_are_held(tok, model):
    """While a new prompt waits for a burst's arrivals to pause, running sequences do not take a decode
    step: one begun just before the last arrival would delay the whole burst's prefill by a step."""
    bos = tok.get_bos_token_id()
    sched = Scheduler(model, tok, max_seqs=4)
    sched.settle_s = sched.burst_settle_s = 0.0
    sched.start()
    try:
        running, sinks = _submit(sched, [bos] + tok.encode("a long answer"), [SamplingParams(max_tokens=400, temperature=0)])
        while len(running[0].tokens) < 3:
            time.sleep(0.001)
        sched.settle_s = sched.burst_settle_s = sched.settle_max_s = 0.3   # the next prompt is held 0.3 s
        new, new_sinks = _submit(sched, [bos] + tok.encode("a new one"), [SamplingParams(max_tokens=2, temperature=0)])
        steps = sched.steps
        time.sleep(0.15)
        assert sched.steps - steps <= 1 and new[0].first_token_at is None   # (at most the step under way)
        assert _collect(new_sinks[0])[1] == "length"
        assert sched.steps > steps + 1   # decoding resumed once the prompt started
        running[0].cancel()
    finally:
        sched.stop()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run the model on 2 threads")
@pytest.mark.parametrize("lost", [False, True])
def test_forwards_leave_a_core_after_one_lost_it(tok, model, lost):
    """A forward on every thread whose own thread ran less than `shared_below` of its time (another
    process had its core) makes the forwards of the next `shared_s` leave a core; one that kept its
    core does not. (The share is set above 1 to stand for a lost core, and to 0 for a kept one.)"""
    sched = Scheduler(model, tok, max_seqs=4, threads=2)
    sched.settle_s, sched.arriving_s, sched.shared_s = 0.0, 0.0, 30.0
    sched.shared_below = 1.01 if lost else 0.0
    assert _threads_per_forward(sched, model, tok) == [("prefill", 2)] + [("decode", 1 if lost else 2)] * 2
