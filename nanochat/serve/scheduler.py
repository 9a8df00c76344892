"""The serving scheduler: one model replica, every active sequence in one forward per decode step.

A replica owns a KV cache with `max_seqs` rows; each active sequence holds one row. A background
thread loops:

    1. drop cancelled sequences (client gone) and free their rows
    2. admit waiting requests while rows are free: prefill the prompt alone (batch 1), sample the
       first token, copy the prompt's keys/values into a free row (one prefill for all `n` choices)
    3. one decode forward over ALL rows: every active sequence advances by one token
    4. per sequence: sample with its own generator and settings, apply the calculator tool
       (nanochat.engine.Engine.advance), stream the text; a finished sequence frees its row

Per-request determinism: the decode forward always has the same shape, so a row's numbers never
depend on how many other requests are running or how long they are: all `max_seqs` rows (idle
ones fed a dummy token and reset to position 0) plus one sentinel row that pads the key length
to a multiple of `kv_bucket` (CPU attention kernels vectorize the key axis: with a length that
is a multiple of the vector width, a row's keys always land in the same lanes, and the extra
masked keys add exact zeros; bench/serve.py and tests/test_serve_scheduler.py check it).
`kv_bucket=0` pads to the whole context instead (slower, independent of the kernel).
Prompts are prefilled one by one (batch 1). At temperature 0
a request's text is the same alone or among 15 others; at temperature > 0 the same seed gives the
same text (each sequence samples from its own torch.Generator).

Text streams as valid UTF-8: token bytes go through an incremental decoder, so a character split
across tokens is sent once it is complete. Tool tokens are sent as their own events (`kind`
python_start / python / python_end / output_start / output / output_end) so UIs can show them.

Consumers read `Event`s through a sink (a callable run on the scheduler thread): `QueueSink` for
plain threads (bench, tests); the FastAPI app hands them to its event loop.
"""
from __future__ import annotations

import codecs
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from nanochat.engine import Engine, RowState, sample_next_token
from nanochat.gpt import KVCache

TOOL_KINDS = {"<|python_start|>": "python_start", "<|python_end|>": "python_end",
              "<|output_start|>": "output_start", "<|output_end|>": "output_end"}
# text between the markers has this kind
INSIDE = {"python_start": "python", "output_start": "output", "python_end": "text", "output_end": "text"}


class QueueFull(Exception):
    """More than `max_queue` choices would wait for a KV-cache row (HTTP 429)."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"server busy: {waiting} requests waiting (limit {limit}); retry shortly")
        self.waiting, self.limit = waiting, limit


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


class QueueSink:
    """Collect events in a thread-safe queue; iterate to block until `done`."""

    def __init__(self) -> None:
        self.q: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.q.put(event)

    def __iter__(self):
        while True:
            ev = self.q.get()
            yield ev
            if ev.kind == "done":
                return


class Sequence:
    """One generated answer: its row, sampling state, streamed text and timings."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None], device):
        self.id = next(Sequence._ids)
        self.prompt, self.params, self.sink = prompt, params, sink
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(int(params.seed))
        self.tokens: list[int] = []          # generated (sampled and forced)
        self.row: Optional[int] = None
        self.replica = 0                     # index of the replica (GPU) serving it
        self.state: Optional[RowState] = None
        self.cancelled = False
        self.finished = False
        self.finish_reason: Optional[str] = None
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.kind = "text"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._run = ""       # current stretch of plain text (stop strings are searched in it)
        self._run_sent = 0   # how much of it has been sent
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._stop_hit = False  # a stop string ended the answer: nothing after it is sent

    def cancel(self) -> None:
        """Stop this sequence at the next step (e.g. the client disconnected). Thread-safe."""
        self.cancelled = True

    # -------------------------------------------------------------- text streaming
    def _send(self, kind: str, text: str) -> None:
        if text:
            self.sink(Event(kind, text))

    def _flush_run(self) -> None:
        self._send("text", self._run[self._run_sent:])
        self._run, self._run_sent = "", 0

    def _text(self, piece: str) -> bool:
        """Add plain text; returns True when a stop string ended the answer."""
        if not self.params.stop:
            self._send("text", piece)
            return False
        start = max(0, self._run_sent - self._hold)
        self._run += piece
        hits = [i for i in (self._run.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self._send("text", self._run[self._run_sent:min(hits)])
            self._run, self._run_sent = "", 0
            self._stop_hit = True
            return True
        safe = max(self._run_sent, len(self._run) - self._hold)
        self._send("text", self._run[self._run_sent:safe])
        self._run_sent = safe
        return False

    def emit_token(self, token: int, tokenizer, special_names: dict[int, str]) -> bool:
        """Stream one generated token; returns True when a stop string was hit."""
        name = special_names.get(token)
        if name is not None:
            tail = self._decoder.decode(b"", final=True)   # a special token ends any partial character
            self._decoder.reset()
            if tail and self._out(tail):
                return True
            kind = TOOL_KINDS.get(name)
            if kind is None:
                return False                                # bos / assistant_end end the sequence elsewhere
            if self.kind == "text":
                self._flush_run()
            self._send(kind, name)
            self.kind = INSIDE[kind]
            return False
        return self._out(self._decoder.decode(tokenizer.enc.decode_single_token_bytes(token)))

    def _out(self, piece: str) -> bool:
        if not piece:
            return False
        if self.kind == "text":
            return self._text(piece)
        self._send(self.kind, piece)
        return False

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        if self.finished:
            return
        if not self._stop_hit:
            tail = self._decoder.decode(b"", final=True)
            if not (tail and self._out(tail)) and self.kind == "text":
                self._flush_run()
        self.finished, self.finish_reason = True, reason
        self.sink(Event("done", finish_reason=reason, error=error))


@dataclass
class _Group:
    """One request: a prompt and its `n` sequences (prefilled once)."""
    prompt: list[int]
    seqs: list[Sequence] = field(default_factory=list)


class Observer:
    """Hooks the scheduler calls (the app counts them for /metrics); all no-ops here."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, n: int) -> None: ...
    def queue_depth(self, n: int) -> None: ...
    def finished(self, reason: str) -> None: ...


class Scheduler:
    """Continuous batching over one model replica (see the module docstring)."""

    def __init__(self, model, tokenizer, max_seqs: int = 16, max_queue: int = 64,
                 observer: Optional[Observer] = None, name: str = "replica0", kv_bucket: int = 64):
        if max_seqs < 1:
            raise ValueError(f"Scheduler(max_seqs={max_seqs}): must be >= 1")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.engine = Engine(model, tokenizer)
        self.device = model.lm_head.weight.device
        self.context = model.config.sequence_len
        self.max_seqs, self.max_queue = max_seqs, max_queue
        if kv_bucket < 0:
            raise ValueError(f"Scheduler(kv_bucket={kv_bucket}): use a multiple of 16 (or 0 = whole context)")
        self.kv_bucket = kv_bucket
        self.observer = observer or Observer()
        # one extra sentinel row pads the key length of every decode step (see the module docstring)
        self.cache = KVCache.for_model(model, batch_size=max_seqs + 1, max_len=self.context)
        self.rows: list[Optional[Sequence]] = [None] * max_seqs
        self.waiting: deque[_Group] = deque()
        self.special_names = {tokenizer.encode_special(n): n for n in tokenizer.get_special_tokens()}
        self.end_tokens = {self.engine.assistant_end, self.engine.bos}
        self._cv = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.generated = 0

    # -------------------------------------------------------------- public API (any thread)
    def start(self) -> "Scheduler":
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
            queued = sum(len(g.seqs) for g in self.waiting) + len(params) - self.free_rows()
            if queued > self.max_queue:
                raise QueueFull(len(self.waiting), self.max_queue)
            group = _Group(list(prompt))
            for i, p in enumerate(params):
                group.seqs.append(Sequence(group.prompt, p, sink_for(i), self.device))
            self.waiting.append(group)
            self.observer.queue_depth(len(self.waiting))
            self._cv.notify()
        return group.seqs

    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    def active(self) -> int:
        return self.max_seqs - self.free_rows()

    def load(self) -> int:
        """Rows in use plus choices waiting: the router sends new work to the least loaded replica."""
        return self.active() + sum(len(g.seqs) for g in self.waiting)

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight (their streams end with finish_reason 'cancelled') and join."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        return self.active() == 0 and not self.waiting

    # -------------------------------------------------------------- the loop (scheduler thread)
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not self._stopping and not self.waiting and self.active() == 0:
                            self._cv.wait(0.5)
                        if self._stopping:
                            break
                    self._drop_cancelled()
                    self._admit()
                    if self.active():
                        self._decode_step()
        except Exception as e:  # a bug must not hang every client: end their streams with the error
            self._fail_all(f"{type(e).__name__}: {e}")
            raise
        self._fail_all(None)

    def _fail_all(self, error: Optional[str]) -> None:
        with self._cv:
            groups, self.waiting = list(self.waiting), deque()
        for g in groups:
            for s in g.seqs:
                self._end(s, "error" if error else "cancelled", error)
        for r, s in enumerate(self.rows):
            if s is not None:
                self._end(s, "error" if error else "cancelled", error)
                self.rows[r] = None

    def _end(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        if not seq.finished:
            self.observer.finished(reason)
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
        with self._cv:
            keep = deque()
            for g in self.waiting:
                if all(s.cancelled for s in g.seqs):
                    for s in g.seqs:
                        self._end(s, "cancelled")
                else:
                    keep.append(g)
            self.waiting = keep

    def _admit(self) -> None:
        """Prefill waiting prompts into free rows, oldest first, while whole groups fit."""
        while True:
            with self._cv:
                if not self.waiting or self.free_rows() < len(self.waiting[0].seqs):
                    self.observer.queue_depth(len(self.waiting))
                    return
                group = self.waiting.popleft()
                self.observer.queue_depth(len(self.waiting))
            self._prefill(group)

    def _prefill(self, group: _Group) -> None:
        prompt = group.prompt
        pre = KVCache.for_model(self.model, batch_size=1, max_len=len(prompt))
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=pre)[:, -1, :]
        greedy = int(logits.argmax(dim=-1))
        for seq in group.seqs:
            if seq.cancelled:
                self._end(seq, "cancelled")
                continue
            row = self.rows.index(None)
            self.cache.copy_rows_from(pre, src_row=0, dst_rows=[row])
            self.rows[row], seq.row = seq, row
            seq.state = self.engine.new_row(prompt)
            self._accept(seq, self._sample(seq, logits, greedy))

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
            seq.first_token_at = now
            self.observer.first_token(now - seq.submitted)
        else:
            self.observer.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.tokens.append(token)
        self.generated += 1
        self.observer.tokens(1)
        if token in self.end_tokens:
            self._free(seq, "stop")
            return
        if seq.emit_token(token, self.tokenizer, self.special_names):
            self._free(seq, "stop")
            return
        limit = min(seq.params.max_tokens, self.context - len(seq.prompt))
        if len(seq.tokens) >= limit:
            self._free(seq, "length")

    def _padded_keys(self, keys: int) -> int:
        """The key length of a decode step whose longest row needs `keys`: rounded up to kv_bucket."""
        if self.kv_bucket == 0:
            return self.context
        return min(self.context, -(-keys // self.kv_bucket) * self.kv_bucket)

    def _decode_step(self) -> None:
        """One forward over every row (fixed shape), then one token for each active sequence."""
        B = self.max_seqs
        active = [(r, s) for r, s in enumerate(self.rows) if s is not None]
        column = [0] * (B + 1)
        idle = [True] * (B + 1)
        for r, s in active:
            column[r], idle[r] = s.tokens[-1], False
        ids = torch.tensor(column, dtype=torch.long, device=self.device).unsqueeze(1)
        self.cache.pos[B] = self._padded_keys(int(self.cache.pos[:B].max()) + 1) - 1   # the sentinel
        logits = self.model(ids, kv_cache=self.cache)[:, -1, :]
        # idle rows (and the sentinel) go back to empty
        self.cache.pos.masked_fill_(torch.tensor(idle, device=self.device), 0)
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
        if not schedulers:
            raise ValueError("ReplicaPool needs at least one Scheduler")
        self.schedulers = schedulers
        self.context = schedulers[0].context
        self.max_seqs = schedulers[0].max_seqs

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

    def free_rows(self) -> int:
        return sum(s.free_rows() for s in self.schedulers)

    def waiting(self) -> int:
        return sum(len(s.waiting) for s in self.schedulers)

    def idle(self) -> bool:
        return all(s.idle() for s in self.schedulers)

    def stop_accepting(self) -> None:
        for s in self.schedulers:
            s.stop_accepting()

    def stop(self) -> None:
        for s in self.schedulers:
            s.stop()
