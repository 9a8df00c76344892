"""The serving scheduler: one model replica, every active sequence in one forward per decode step.

A replica owns a KV cache with `max_seqs` rows; each decoding sequence holds one row.
A background thread (which runs the model, with `threads` intra-op threads) loops:

    1. drop cancelled sequences (client gone) and free their rows
    2. prefill: up to `prefill_rows` waiting prompts advance together by one chunk of at most
       `prefill_chunk` tokens in one forward (their real tokens as one flat row through the linear
       layers, attention on the chunks right-padded to the longest: nanochat.gpt.Ragged); a long prompt takes
       several loop turns, so decode steps keep running between its chunks. New prompts start once
       requests stop arriving (a burst prefills together: see _hold_s), from the longest prefix the
       prefix cache holds for each (nanochat/serve/prefix_cache.py). When prompts are complete, every
       choice gets a free row and its first token, sent; then their keys/values are copied into the
       rows and their new blocks go into the prefix cache. Prompts that arrived meanwhile are
       started before the next decode step (time to first token)
    3. one decode forward over the rows in use: every active sequence advances by one token
    4. per sequence: sample with its own generator and settings, apply the calculator tool
       (nanochat.engine.Engine.advance), stream the text; a finished sequence frees its row
    5. while idle (warmup=True): run one prefill shape not run yet (see _warm_step)

Cost follows the active rows: rows are handed out lowest first and kept packed (a finishing
sequence's row is refilled by moving the highest one down), and a decode step computes only the
first `ceil(active / tile) * tile` rows. With the model's linear layers prepacked
(nanochat/packed.py, a CPU with oneDNN) the tile is one row.

Per-request determinism (temperature 0: the same text alone or among 15 others; a seed repeats):
a row's numbers must not depend on its neighbours. Three things make that so:
  - matrix products are row-wise the same whatever the number of rows: prepacked oneDNN products
    are at any count, the default CPU GEMM once there are at least 4 rows (it switches to a
    matrix-vector path below). A self-check at start-up compares forwards (a prefill, then a decode
    step) at every width a step can have with tiles of `decode_tile` rows, then of 4; if neither
    holds bitwise (e.g. a GPU whose GEMM picks kernels by shape), the scheduler falls back to
    computing all rows every step, one prompt per prefill, no prefix cache. A decode step's
    attention is plain products (nanochat/attention.py), not SDPA, whose CPU kernel splits a lone
    query's keys across threads when there are few rows;
  - the key length of every forward is set explicitly (KVCache.min_keys, not by an extra row,
    which would cross the GEMM's row blocks): a decode step's is padded to a multiple of
    `kv_bucket` (CPU kernels vectorize the key axis, so with a length that is a multiple of the
    vector width a row's keys land in the same lanes, and the extra masked keys add exact zeros;
    `kv_bucket=0` pads to the context); a prefill's is a multiple of 32 up to 128, else the whole
    prefill cache (see _prefill_step), and its chunks are padded to a multiple of 8 tokens so no
    query block of the attention kernel has fewer than MIN_ROWS rows;
  - a prompt's keys/values are always computed by prefill (never by decode steps), so a prefix
    taken from the cache is bitwise what prefilling it again would give, however the prompt was
    cut into chunks or batched with others.
tests/test_serve_scheduler.py checks all three (logits bitwise, alone / batched / cached / chunked).

Text streams as valid UTF-8: token bytes go through an incremental decoder, so a character split
across tokens is sent once it is complete. Tool tokens are sent as their own events (`kind`
python_start / python / python_end / output_start / output / output_end) so UIs can show them.

Consumers read `Event`s through a sink (a callable run on the scheduler thread): `QueueSink` for
plain threads (bench, tests); the FastAPI app hands them to its event loop.
"""
from __future__ import annotations

import codecs
import contextlib
import itertools
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nanochat.engine import Engine, RowState, sample_next_token
from nanochat.gpt import KVCache, Ragged
from nanochat.packed import pack_for_inference
from nanochat.serve.metrics import ServerMetrics
from nanochat.serve.prefix_cache import PrefixCache

TOOL_KINDS = {"<|python_start|>": "python_start", "<|python_end|>": "python_end",
              "<|output_start|>": "output_start", "<|output_end|>": "output_end"}
# text between the markers has this kind
INSIDE = {"python_start": "python", "output_start": "output", "python_end": "text", "output_end": "text"}


class QueueFull(Exception):
    """More than `max_queue` choices would wait for a KV-cache row (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and accepts no new requests (HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.6
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    seed: int = 42
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    kind: str                            # text | python_start | python | python_end | output_start | output | output_end | done
    text: str = ""
    finish_reason: Optional[str] = None  # on done: stop | length | cancelled | error
    error: Optional[str] = None


class QueueSink(queue.Queue):
    """A sink that collects events in a thread-safe queue; iterate to block until `done`."""

    __call__ = queue.Queue.put

    def __iter__(self):
        while (ev := self.get()).kind != "done":
            yield ev
        yield ev


class Sequence:
    """One generated answer: its row, sampling state, streamed text and timings."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None], device):
        self.id = next(Sequence._ids)
        self.prompt, self.params, self.sink = prompt, params, sink
        self.rng = torch.Generator(device=device).manual_seed(int(params.seed))
        self.tokens: list[int] = []          # generated (sampled and forced)
        self.row: Optional[int] = None
        self.replica = 0                     # index of the replica (GPU) serving it
        self.state: Optional[RowState] = None
        self.cancelled = self.finished = False
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.kind = "text"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # plain text held back: its last characters may begin a stop string (any that ends later
        # begins in them)
        self._held = ""
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._stop_hit = False  # a stop string ended the answer: nothing after it is sent

    def cancel(self) -> None:
        """Stop this sequence at the next step (e.g. the client disconnected). Thread-safe."""
        self.cancelled = True

    # -------------------------------------------------------------- text streaming
    def _send(self, kind: str, text: str) -> None:
        if text:
            self.sink(Event(kind, text))

    def _flush_held(self) -> None:
        self._send("text", self._held)
        self._held = ""

    def _out(self, piece: str) -> bool:
        """Stream decoded text; returns True when a stop string (searched in plain text) ended the answer."""
        if self.kind != "text":
            self._send(self.kind, piece)
            return False
        run = self._held + piece
        hits = [i for i in (run.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self._send("text", run[:min(hits)])
            self._held, self._stop_hit = "", True
            return True
        safe = max(0, len(run) - self._hold)
        self._send("text", run[:safe])
        self._held = run[safe:]
        return False

    def emit_token(self, token: int, tokenizer, special_names: dict[int, str]) -> bool:
        """Stream one generated token; returns True when a stop string was hit."""
        name = special_names.get(token)
        if name is not None:
            # a special token ends any partial character (a final decode also empties the decoder)
            if self._out(self._decoder.decode(b"", final=True)):
                return True
            kind = TOOL_KINDS.get(name)
            if kind is None:
                return False                                # bos / assistant_end end the sequence elsewhere
            self._flush_held()   # (nothing is held inside a tool call)
            self._send(kind, name)
            self.kind = INSIDE[kind]
            return False
        return self._out(self._decoder.decode(tokenizer.enc.decode_single_token_bytes(token)))

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        if self.finished:
            return
        if not self._stop_hit and not self._out(self._decoder.decode(b"", final=True)):
            self._flush_held()
        self.finished = True
        self.sink(Event("done", finish_reason=reason, error=error))


@dataclass
class _Group:
    """One request: a prompt and its `n` sequences (prefilled once)."""
    prompt: list[int]
    seqs: list[Sequence]
    done: int = 0          # prompt tokens whose keys/values are in its prefill row


# CPU attention (flash, for CPU) splits the queries of a forward into blocks of 32 (64, 256 for long
# inputs); a block of fewer than MIN_ROWS queries takes a matrix-vector path with other rounding.
Q_BLOCK, MIN_ROWS = 32, 4
CHUNK_STEP = 8   # prefill chunks are padded to a multiple of this many tokens (>= MIN_ROWS)
SHORT_KEYS = 128   # key length of a prefill forward whose chunks all end within it (see _prefill_step)
SWITCH_S = 1e-3    # the GIL's switch interval while a scheduler runs (Python's default: 5 ms; see start)


@contextlib.contextmanager
def _threads(n: Optional[int]):
    """Run the block with `n` intra-op threads on this thread (None: as set), then set them back."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunk_shape(tokens: int) -> int:
    """The query length a prefill chunk of `tokens` runs at: right-padded to a multiple of CHUNK_STEP.
    The attention kernel's query blocks (32 rows, 64 from 192) then never have fewer than MIN_ROWS
    rows, so a token's keys/values are bitwise the same however the prompt was cut into chunks or
    batched with others; and the few distinct shapes are quick to warm up (see _warm_step)."""
    return -(-max(tokens, 1) // CHUNK_STEP) * CHUNK_STEP


class Scheduler:
    """Continuous batching over one model replica (see the module docstring)."""

    settle_s, burst_settle_s, settle_max_s = 1e-3, 2e-3, 8e-3   # new prompts wait for arrivals to pause (_hold_s)
    shared_below, shared_s = 0.6, 1.0   # a forward on this thread less of its time: forwards leave a core (_cores)
    arriving_s = 15e-3   # a forward this soon after a submit or a first token (or while a request is read) leaves a core

    def __init__(self, model, tokenizer, max_seqs: int = 16, max_queue: int = 64,
                 observer: Optional[ServerMetrics] = None, name: str = "replica0", kv_bucket: int = 16,
                 decode_tile: int = 1, prefill_rows: int = 16, prefill_chunk: int = 256,
                 prefix_cache_mb: float = 256.0, threads: Optional[int] = None, warmup: bool = False):
        """The sizes are checked where a user sets them (stage.* in nanochat/stages/serve.py)."""
        self.model, self.tokenizer, self.name, self.threads = model, tokenizer, name, threads
        self.engine = Engine(model, tokenizer)
        self.device = model.lm_head.weight.device
        self.context = model.config.sequence_len
        self.max_seqs, self.max_queue = max_seqs, max_queue
        self.kv_bucket = kv_bucket
        self.observer = observer or ServerMetrics()   # the app shares one between its replicas (/metrics)
        self.prefill_chunk = prefill_chunk
        # prepacked products are row-invariant at any number of rows (nanochat/packed.py); tiles need
        # row invariance, without it every step computes every row (see the docstring)
        pack_for_inference(model)
        tile = self._pick_tile(decode_tile)
        self.tiled, self.tile = tile is not None, tile or decode_tile
        self.prefill_rows = prefill_rows if self.tiled else 1
        self.prefix = PrefixCache(int(prefix_cache_mb * 2 ** 20) if self.tiled else 0)
        # at least a tile of rows: a decode step never runs fewer (see _rows_are_independent)
        self.cache = KVCache.for_model(model, batch_size=max(max_seqs, self.tile), max_len=self.context)
        # the prefill cache has room for a last chunk padded to its shape (see _chunk_shape)
        self.pre = KVCache.for_model(model, batch_size=self.prefill_rows, max_len=self.context + Q_BLOCK)
        self.rows: list[Optional[Sequence]] = [None] * max_seqs
        self.prefilling: list[Optional[_Group]] = [None] * self.prefill_rows
        self.waiting: deque[_Group] = deque()
        self.special_names = {tokenizer.encode_special(n): n for n in tokenizer.get_special_tokens()}
        self._cv = threading.Condition()
        self._stopping, self._accepting = False, True
        self._thread: Optional[threading.Thread] = None
        # idle-time warm-up (warmup=True): shapes left to run, smallest first (popped from the end)
        self._warm = (list(reversed(self._warm_shapes()))
                      if warmup and getattr(model, "packed_for_inference", False) else [])
        self._last_submit = self._last_first = 0.0   # when a request came in / a first token went out
        self.receiving = 0   # requests the HTTP side is reading (receiving_request)
        self._shared_until = 0.0   # forwards leave a core until then (_cores)
        self.yield_core = False   # set on the scheduler thread (see _loop)
        self.steps = self.prefill_steps = self.generated = 0

    def _pick_tile(self, wanted: int) -> Optional[int]:
        """The smallest row tile, from `wanted` (then 4), whose rows are row-invariant; None if none is."""
        return next((t for t in dict.fromkeys((wanted, max(wanted, MIN_ROWS))) if self._rows_are_independent(t)), None)

    @torch.inference_mode()
    def _rows_are_independent(self, tile: int) -> bool:
        """Is a row's forward (a prefill, then a decode step over a padded key length) bitwise the same
        at every width a step can have with tiles of `tile` rows?"""
        wide = max(self.max_seqs + 1, 2 * tile)
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, self.model.config.vocab_size, (wide, 9), generator=g).to(self.device)
        keys = self._padded_keys(9)
        out = []
        for b in sorted({*range(tile, wide, tile), wide}):   # every width a step can have
            cache = KVCache.for_model(self.model, batch_size=b, max_len=max(16, keys))
            pre = self.model(ids[:b, :8], kv_cache=cache)[0]
            cache.min_keys = keys
            out.append((pre, self.model(ids[:b, 8:], kv_cache=cache)[0]))
        return all(torch.equal(a, b) for first in out[:1] for o in out[1:] for a, b in zip(first, o))

    @torch.inference_mode()
    def _threads_are_interchangeable(self) -> bool:
        """Are a prefill and a decode step bitwise the same with one intra-op thread fewer? (Run on the
        scheduler thread: a pool of several threads started on the HTTP thread would compete with this one's.)"""
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, self.model.config.vocab_size, (3, 25), generator=g).to(self.device)
        out = []
        for n in (self.threads, self.threads - 1):
            cache = KVCache.for_model(self.model, batch_size=3, max_len=32)
            cache.min_keys = 32
            with _threads(n):
                pre = self.model(ids[:, :24], kv_cache=cache)
                out.append((pre, self.model(ids[:, 24:], kv_cache=cache), cache.k.clone(), cache.v.clone()))
        return all(torch.equal(a, b) for a, b in zip(*out))

    # -------------------------------------------------------------- public API (any thread)
    def start(self) -> "Scheduler":
        # The HTTP thread and this one share the GIL. A thread waiting for it gets it once the holder has
        # run a switch interval (5 ms by default), and the model's forward re-takes it between ops: so
        # each socket call of the HTTP thread during a forward could wait 5 ms, and the forward each time
        # the HTTP thread held it. That spread a burst's arrivals over hundreds of ms, the tail of its
        # time to first token (measured with bench/serve.py --trace; 0.2 ms roughly halved it). Below 1 ms,
        # on a CPU shared with other work, each forced switch waits for the other thread to be scheduled:
        # side by side under load, 1 ms gave a burst TTFT p95 of 56-68 ms where 0.2 ms gave 88-134.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_S))
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{self.name}", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt: list[int], params: list[SamplingParams], sink_for: Callable[[int], Callable]) -> list[Sequence]:
        """Queue one prompt with one SamplingParams per choice; `sink_for(i)` gives choice i's sink.

        Raises QueueFull when the waiting queue is at its limit, ShuttingDown when stopping."""
        if not prompt or not params:
            raise ValueError("Scheduler.submit: give a non-empty prompt and at least one SamplingParams")
        if len(params) > self.max_seqs:
            raise ValueError(f"Scheduler.submit: {len(params)} choices > max_seqs={self.max_seqs} rows")
        if len(prompt) >= self.context:
            raise ValueError(f"Scheduler.submit: prompt of {len(prompt)} tokens leaves no room in the "
                             f"context of {self.context}")
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("server is shutting down")
            # choices that will wait for a row, counting this request: at most max_queue
            queued = sum(len(g.seqs) for g in self.waiting) + len(params) - self._unreserved_rows()
            if queued > self.max_queue:
                raise QueueFull(f"server busy: {len(self.waiting)} requests waiting (limit {self.max_queue}); "
                                f"retry shortly")
            prompt = list(prompt)
            group = _Group(prompt, [Sequence(prompt, p, sink_for(i), self.device) for i, p in enumerate(params)])
            self.waiting.append(group)
            self._last_submit = time.perf_counter()
            self.observer.queue.set(len(self.waiting))
            self._cv.notify()
        return group.seqs

    def _can_start(self) -> bool:
        """Can the oldest waiting prompt start prefilling (a prefill slot and its rows free)?"""
        with self._cv:   # re-entrant: _prefill_step calls this holding it
            return (bool(self.waiting) and None in self.prefilling
                    and self._unreserved_rows() >= len(self.waiting[0].seqs))

    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    def _unreserved_rows(self) -> int:
        """Free rows not promised to a prompt being prefilled."""
        return self.free_rows() - sum(len(g.seqs) for g in self.prefilling if g is not None)

    def active(self) -> int:
        return self.max_seqs - self.free_rows()

    def load(self) -> int:
        """Rows in use or promised plus choices waiting: the router sends new work to the least loaded replica."""
        return self.max_seqs - self._unreserved_rows() + sum(len(g.seqs) for g in self.waiting)

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight (their streams end with finish_reason 'cancelled') and join."""
        with self._cv:
            self._accepting, self._stopping = False, True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def warming(self) -> bool:
        """Idle-time warm-up shapes are still to run (/health reports not ready until they have)."""
        return bool(self._warm)

    def idle(self) -> bool:
        return self.active() == 0 and not self.waiting and not any(self.prefilling)

    # -------------------------------------------------------------- the loop (scheduler thread)
    def _loop(self) -> None:
        try:
            if self.threads:   # intra-op threads are set per OS thread: this one runs the model
                # forwards get `threads` (_cores), the small ops around them (copies, sampling) one: with two, each
                # op's barrier waited for a thread the HTTP side displaced (15 ms per prefix-cache read in a burst)
                torch.set_num_threads(1)
                self.yield_core = self.threads > 1 and self._threads_are_interchangeable()
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not self._stopping and self.idle() and not self._warm:
                            self._cv.wait(0.5)
                        if self._stopping:
                            break
                    if self.idle():
                        self._warm_step()
                        continue
                    self._drop_cancelled()
                    hold = self._hold_s()   # > 0: new prompts wait for a burst's arrivals to pause
                    if hold and not any(self.prefilling):   # decode steps wait too (see _hold_s)
                        with self._cv:
                            self._cv.wait(hold)
                        continue
                    self._prefill_step(start=not hold)
                    if not hold and self._can_start():   # prompts arrived during that prefill: start them first (TTFT)
                        continue
                    if self.active():
                        self._decode_step()
        except Exception as e:  # a bug must not hang every client: end their streams with the error
            self.stop_accepting()   # and refuse new ones (503; /health says "failed")
            self._fail_all(f"{type(e).__name__}: {e}")
            raise
        self._fail_all(None)

    @contextlib.contextmanager
    def _cores(self, decode: bool = False):
        """The intra-op threads of the next forward: one fewer (when that changes no bit: yield_core)
        while requests arrive (one is being read, or came in the last `arriving_s`) and, for a decode
        step, while first tokens go out (one was sent in the last `arriving_s`). Two threads computing
        beside the HTTP thread take its core, and each op's barrier then spins for the thread it
        displaced: a 5-prompt prefill took 40 ms instead of 9, the requests being read waited for it,
        and first tokens waited 7-8 ms for the decode step after their prefill (bench/serve.py --trace).
        (`arriving_s` is 15 ms: a client sending a burst can pause 5-10 ms between requests, and at 5 ms a
        2-prompt prefill on both threads began in such a pause and took 40 ms.) Also for `shared_s` after
        a forward on every thread that ran on this one less than `shared_below` of its time: another
        process (or the HTTP thread) has a core, and a 10-prompt prefill on both took 80-120 ms, its
        threads taking turns at each barrier (one thread: 20-30 ms)."""
        recent = max(self._last_submit, self._last_first) if decode else self._last_submit
        now = time.perf_counter()
        fewer = self.yield_core and (self.receiving > 0 or now - recent < self.arriving_s or now < self._shared_until)
        n = self.threads and self.threads - fewer
        cpu = time.thread_time()
        with _threads(n):
            yield
        cpu, end = time.thread_time() - cpu, time.perf_counter()
        if self.yield_core and not fewer and cpu < self.shared_below * (end - now):   # this thread lost its core a while
            self._shared_until = end + self.shared_s

    def _hold_s(self) -> float:
        """How much longer new prompts wait before they start prefilling (0: start now).

        A burst reaches the scheduler one request at a time as the HTTP thread reads each, over 20-40 ms
        when the client opens new connections (bench/serve.py --trace). A prefill started meanwhile
        competes with that thread for the cores and the GIL (the forward re-takes it between ops), so
        both slow down and the rest of the burst waits a whole prefill before its own. So new prompts
        wait while a request is being read (receiving_request), and until none has come in for
        `settle_s`, or `burst_settle_s` once several wait (a burst's requests can come a few ms apart);
        at most `settle_max_s` after the oldest came in: about what a prefill of a few prompts takes, since
        waiting longer than a prefill would take cannot pay (a client that sends a burst over 40 ms, a
        request every 3 ms, made a 30 ms cap fire as the rest arrived). A lone request pays `settle_s`.
        Decode steps wait meanwhile: one started just before the last arrival (3-7 ms) delayed the whole
        burst's prefill by a step."""
        with self._cv:
            if not self._can_start():
                return 0.0
            now = time.perf_counter()
            settle = self.burst_settle_s if len(self.waiting) > 1 else self.settle_s
            until = max(self._last_submit + settle, now + self.settle_s if self.receiving else 0.0)
            return max(0.0, min(until, self.waiting[0].seqs[0].submitted + self.settle_max_s) - now)

    @contextlib.contextmanager
    def receiving_request(self):
        """Around the HTTP side's reading of a request that may submit work (see _hold_s)."""
        with self._cv:
            self.receiving += 1
        try:
            yield
        finally:
            with self._cv:
                self.receiving -= 1
                self._cv.notify()

    def _warm_shapes(self) -> list[tuple[int, int, int]]:
        """Prefill shapes (rows, query length, flat length: _prefill_forward) to run once while idle: every
        chunk shape of one prompt, short prompts prefilled together, then every other flat length a burst
        of short prompts can have (the start-up self-check already ran every decode width)."""
        one = sorted({_chunk_shape(t) for t in range(1, min(self.prefill_chunk, self.context - 1) + 1)})
        short = [T for T in one if T <= Q_BLOCK]
        shapes = [(1, T, T) for T in one] + [(n, T, n * T) for n in range(2, self.prefill_rows + 1) for T in short]
        if not self.tiled:
            return shapes
        flat = set(range(CHUNK_STEP, self.prefill_rows * Q_BLOCK, CHUNK_STEP)) - {f for *_, f in shapes}
        return shapes + [(self.prefill_rows, Q_BLOCK, f) for f in sorted(flat)]   # f tokens in rows of 32

    def _warm_step(self) -> None:
        """One idle-time prefill forward of a shape not run yet (on the free prefill rows): CPU matrix
        products build their kernels on the first product of each shape (~3 ms per forward shape on
        the demo model), which would otherwise land on some request's time to first token."""
        n, T, flat = self._warm.pop()
        # `flat` real tokens in rows of T: a flat row of that length where it is shorter than the rows
        chunks = {i: [0] * min(T, flat - i * T) for i in range(-(-flat // T))}
        with _threads(self.threads):
            self._prefill_forward(chunks, len(chunks), T, self._prefill_keys(T))
        self.pre.pos[:n] = 0

    def _fail_all(self, error: Optional[str]) -> None:
        with self._cv:
            groups, self.waiting = list(self.waiting), deque()
        seqs = [s for g in groups + self.prefilling if g is not None for s in g.seqs] + self.rows
        self.prefilling, self.rows = [None] * self.prefill_rows, [None] * self.max_seqs
        for s in seqs:
            if s is not None:
                self._end(s, "error" if error else "cancelled", error)

    def _end(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        if not seq.finished:
            self.observer.finished_seqs.labels(reason=reason).inc()
        seq.finish(reason, error)

    def _free(self, seq: Sequence, reason: str) -> None:
        self._end(seq, reason)
        if seq.row is not None:
            self.rows[seq.row] = None
            seq.row = None

    def _drop_cancelled(self) -> None:
        for s in self.rows:
            if s is not None and s.cancelled:
                self._free(s, "cancelled")
        self.prefilling = [None if g and self._end_if_cancelled(g) else g for g in self.prefilling]
        with self._cv:
            self.waiting = deque(g for g in self.waiting if not self._end_if_cancelled(g))

    def _end_if_cancelled(self, group: _Group) -> bool:
        """End a request whose sequences were all cancelled (True), else leave it (False)."""
        if not all(s.cancelled for s in group.seqs):
            return False
        for s in group.seqs:
            self._end(s, "cancelled")
        return True

    # -------------------------------------------------------------- prefill
    def _prefill_step(self, start: bool = True) -> None:
        """Start waiting prompts (oldest first, while their rows are free; not if `start` is False), then
        advance every prompt being prefilled by one chunk in one forward over the prefill cache."""
        with self._cv:
            while start and self._can_start():
                slot = self.prefilling.index(None)
                self.prefilling[slot] = group = self.waiting.popleft()
                self._start_prefill(group, slot)
            self.observer.queue.set(len(self.waiting))
        busy = [(i, g) for i, g in enumerate(self.prefilling) if g is not None]
        if not busy:
            return
        T = _chunk_shape(min(self.prefill_chunk, max(len(g.prompt) - g.done for _, g in busy)))
        chunks = {i: g.prompt[g.done:g.done + min(T, self.prefill_chunk)] for i, g in busy}
        keys = self._prefill_keys(max(g.done for _, g in busy) + T)
        with self._cores():
            logits = self._prefill_forward(chunks, busy[-1][0] + 1, T, keys)
        self.prefill_steps += 1
        self.pre.pos[:busy[-1][0] + 1] = 0   # free rows go back to empty; busy rows are set below
        for i, g in busy:
            g.done += len(chunks[i])
        slots = [i for i, _ in busy]
        self.pre.pos[slots] = torch.tensor([g.done for _, g in busy], device=self.device)
        # right padding ran past the last real token: its embedding is what smear reads next
        self.pre.last_x[slots] = self.model.embed(torch.tensor([g.prompt[g.done - 1] for _, g in busy], device=self.device))
        self._finish_prefill([(i, g) for i, g in busy if g.done == len(g.prompt)], logits)

    def _prefill_forward(self, chunks: dict[int, list[int]], n: int, T: int, keys: int) -> torch.Tensor:
        """One prefill forward over rows [0, n) of the prefill cache, chunk i into row i: the logits (n,
        MIN_ROWS, V) at each row's last MIN_ROWS tokens (free rows' mean nothing); T (>= MIN_ROWS: every
        product has at least MIN_ROWS rows) is the attention's padded width. With row-invariant products
        (self.tiled) the real tokens run as one flat row (their count by _chunk_shape) when shorter than
        n·T (gpt.Ragged): a burst pays for its tokens, not n × the longest."""
        lengths = torch.tensor([len(chunks.get(i, ())) for i in range(n)])
        at = (lengths.unsqueeze(1) - torch.arange(MIN_ROWS, 0, -1)).clamp(min=0)   # (n, MIN_ROWS), last one last
        flat = [t for chunk in chunks.values() for t in chunk]
        flat_len = _chunk_shape(len(flat))
        if not self.tiled or flat_len >= n * T:   # the padded batch (as cheap, and no scatter/gather)
            ids = torch.zeros(n, T, dtype=torch.long)
            for i, chunk in chunks.items():
                ids[i, :len(chunk)] = torch.tensor(chunk)
            return self.model(ids.to(self.device), kv_cache=self.pre.rows(n, keys), logits_at=at.to(self.device))
        ids = torch.zeros(1, flat_len, dtype=torch.long)
        ids[0, :len(flat)] = torch.tensor(flat)
        ragged = Ragged(torch.repeat_interleave(torch.arange(n), lengths).to(self.device),
                        torch.cat([torch.arange(len(c)) for c in chunks.values()]).to(self.device), T)
        at += (lengths.cumsum(0) - lengths).unsqueeze(1)   # each row's first token in the flat row
        return self.model(ids.to(self.device), kv_cache=self.pre.rows(n, keys), logits_at=at.to(self.device),
                          ragged=ragged)

    def _prefill_keys(self, end: int) -> int:
        """The key length of a prefill forward whose chunks end by `end`: a multiple of 32 up to
        SHORT_KEYS, else the whole prefill cache. The CPU attention kernel's key blocks then line up:
        queries past 128 round differently for key lengths of about 224-352 than for 512, while
        queries below 128 agree for every multiple of 32 up to 128 and for the whole cache (measured,
        and tested)."""
        return -(-end // Q_BLOCK) * Q_BLOCK if end <= SHORT_KEYS else self.pre.max_len

    def _start_prefill(self, group: _Group, slot: int) -> None:
        """Put the longest cached prefix of the prompt (at least one token left to compute) in `slot`."""
        blocks = self.prefix.lookup(group.prompt, limit=len(group.prompt) - 1)
        n = len(blocks) * self.prefix.block
        if blocks:
            self.prefix.read(blocks, self.pre.k[:, slot, :, :n], self.pre.v[:, slot, :, :n])
            self.pre.last_x[slot] = self.model.embed(self.pre.pos.new_tensor(group.prompt[n - 1]))
        self.pre.pos[slot] = n
        group.done = n

    def _finish_prefill(self, done: list[tuple[int, _Group]], logits: torch.Tensor) -> None:
        """Prompts now whole in their prefill rows ((slot, group)): every choice gets a decode row and its
        first token, sent; then the rows' keys/values are copied in and the prompts go into the prefix
        cache. First tokens first: the last prompt of a burst would otherwise wait for every copy."""
        if not done:
            return
        greedy = logits[[slot for slot, _ in done], -1].argmax(dim=-1).tolist()
        for (slot, group), best in zip(done, greedy):
            for seq in group.seqs:
                if seq.cancelled:
                    self._end(seq, "cancelled")
                    continue
                row = self.rows.index(None)
                self.rows[row], seq.row = seq, row
                seq.state = self.engine.new_row(group.prompt)
                self._accept(seq, self._sample(seq, logits[slot, -1:], best))
        for slot, group in done:
            for seq in group.seqs:
                if seq.row is not None:   # (a choice that ended at its first token gave its row back)
                    self.cache.copy_rows_from(self.pre, src_row=slot, dst_rows=[seq.row])
            L = len(group.prompt)   # only the prompt's new blocks are copied
            self.prefix.insert(group.prompt, self.pre.k[:, slot, :, :L], self.pre.v[:, slot, :, :L])
            self.prefilling[slot] = None
            self.pre.pos[slot] = 0

    def _sample(self, seq: Sequence, logits_row: torch.Tensor, greedy: int) -> int:
        p = seq.params
        if p.temperature == 0:
            return greedy
        return int(sample_next_token(logits_row, seq.rng, p.temperature, p.top_k, p.top_p)[0])

    def _accept(self, seq: Sequence, sampled: int) -> None:
        """Apply the tool logic to a sampled token, stream it, and finish the sequence if it ended."""
        token, _ = self.engine.advance(seq.state, sampled)
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = self._last_first = now
            self.observer.ttft.observe(now - seq.submitted)
        else:
            self.observer.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.tokens.append(token)
        self.generated += 1
        self.observer.generated.inc()
        if seq.state.done or seq.emit_token(token, self.tokenizer, self.special_names):
            self._free(seq, "stop")   # the model ended the answer, or a stop string did
        elif len(seq.tokens) >= min(seq.params.max_tokens, self.context - len(seq.prompt)):
            self._free(seq, "length")

    # -------------------------------------------------------------- decode
    def _padded_keys(self, keys: int) -> int:
        """The key length of a decode step whose longest row needs `keys`: rounded up to kv_bucket."""
        bucket = self.kv_bucket or self.context   # 0: every step at the whole context
        return min(self.context, -(-keys // bucket) * bucket)

    def _compact(self) -> None:
        """Move the highest busy row into the lowest free one while that saves a tile."""
        tiles = lambda rows: -(-rows // self.tile)   # noqa: E731
        while True:
            busy = [r for r, s in enumerate(self.rows) if s is not None]
            if not busy or tiles(busy[-1] + 1) == tiles(len(busy)):
                return
            hi, lo = busy[-1], self.rows.index(None)
            self.cache.copy_rows_from(self.cache, src_row=hi, dst_rows=[lo])
            self.cache.pos[hi] = 0
            seq = self.rows[hi]
            self.rows[lo], self.rows[hi], seq.row = seq, None, lo

    def _decode_step(self) -> None:
        """One forward over the tiles in use (all rows when not tiled), then one token per active sequence."""
        if self.tiled:
            self._compact()
            busy = max(r for r, s in enumerate(self.rows) if s is not None) + 1
            n = max(self.tile, min(self.max_seqs, -(-busy // self.tile) * self.tile))   # never fewer than a tile
        else:   # one fixed shape: every row
            n = self.cache.batch_size
        active = [(r, s) for r, s in enumerate(self.rows[:n]) if s is not None]
        column = [0] * n
        for r, s in active:
            column[r] = s.tokens[-1]
        ids = torch.tensor(column, dtype=torch.long).unsqueeze(1).to(self.device)
        # a row holds its prompt and all but its last token (read on the host: no tensor reads per row)
        keys = self._padded_keys(max(len(s.prompt) + len(s.tokens) for _, s in active))
        with self._cores(decode=True):
            logits = self.model(ids, kv_cache=self.cache.rows(n, keys))[:, -1, :]
        if len(active) < n:   # idle rows (untiled, or a tile's spare rows) go back to empty
            keep = torch.zeros(n, dtype=torch.bool)
            keep[[r for r, _ in active]] = True
            self.cache.pos[:n].masked_fill_(~keep.to(self.device), 0)
        greedy = logits.argmax(dim=-1).tolist()
        self.steps += 1
        for r, s in active:
            if s.cancelled:
                self._free(s, "cancelled")
                continue
            self._accept(s, self._sample(s, logits[r:r + 1], greedy[r]))


class ReplicaPool:
    """Data parallel serving: one Scheduler per device; new requests go to the least loaded one."""

    def __init__(self, schedulers: list[Scheduler]):
        self.schedulers = schedulers
        self.context, self.max_seqs = schedulers[0].context, schedulers[0].max_seqs

    def start(self) -> "ReplicaPool":
        for s in self.schedulers:
            s.start()
        return self

    def submit(self, prompt: list[int], params: list[SamplingParams], sink_for) -> list[Sequence]:
        k = min(range(len(self.schedulers)), key=lambda i: self.schedulers[i].load())
        seqs = self.schedulers[k].submit(prompt, params, sink_for)
        for s in seqs:
            s.replica = k
        return seqs

    @contextlib.contextmanager
    def receiving_request(self):
        """The HTTP side is reading a request that may submit work: every replica holds new prompts and
        leaves a core meanwhile (Scheduler._hold_s)."""
        with contextlib.ExitStack() as stack:
            for s in self.schedulers:
                stack.enter_context(s.receiving_request())
            yield

    @property
    def warming(self) -> bool:
        """A replica's idle-time warm-up is still running (/health reports not ready until it is done)."""
        return any(s.warming for s in self.schedulers)

    @property
    def failed(self) -> bool:
        """A replica's scheduler thread ended on an error (a bug): the server can no longer serve."""
        return any(s._thread is not None and not s._thread.is_alive() and not s._stopping for s in self.schedulers)

    def stop_accepting(self) -> None:
        for s in self.schedulers:
            s.stop_accepting()

    def stop(self) -> None:
        for s in self.schedulers:
            s.stop()
