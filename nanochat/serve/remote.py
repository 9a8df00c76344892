"""The model in its own process: the HTTP front talks to the schedulers over a pipe.

In one process the HTTP thread and the model's forward share the GIL, and a forward re-takes it
between ops. While a burst's requests were being read, a 5-prompt prefill took 22-26 ms instead of
about 5, and a request waited 13 ms between reaching the app and being queued (bench/serve.py
--trace). With the schedulers in another process each side has its own interpreter, and the
operating system shares the cores between them.

`RemotePool.spawn(factory, *args)` runs `factory(*args) -> (ReplicaPool, info)` in a spawned child
(the model process) and gives the app what a ReplicaPool gives it: `submit` (awaitable here),
`receiving_request`, `status` (awaitable), `stop_accepting`, `stop`; `info` (picklable, e.g. the
tokenizer) comes back as `RemotePool.info`. The count of requests being read lives in shared
memory (no message per request); everything else is a message on one pipe:

    HTTP → model   ("submit", rid, prompt, params)   ("cancel", rid, choice)   ("status", qid)
                   ("stop_accepting",)   ("stop",)
    model → HTTP   ("ready", info) | ("failed", traceback)   ("accepted", rid, replica)
                   ("refused", rid, exception name, message)   ("events", [(rid, choice, Event, done)])
                   ("status", qid, status)   ("stopped", status)

A scheduler step's events go out as one message (Scheduler.flush), streamed tokens at most every
`interval_s` (a sequence's first and last events at once); a sequence's last event carries its
tokens and timings (`done`). The HTTP side reads the pipe in its event loop, no thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import signal
import threading
import time
import traceback
from typing import Any, Callable, Optional

from nanochat.serve.scheduler import Event, QueueFull, SamplingParams, ShuttingDown

REFUSALS = {e.__name__: e for e in (QueueFull, ShuttingDown, ValueError)}


# --------------------------------------------------------------------------- the model process

def _serve_pipe(conn, reading, interval: float, factory: Callable, args: tuple) -> None:
    """The model process: build the pool, then answer the HTTP process until it says stop or goes away."""
    import gc
    # Ctrl-C reaches the whole process group, and Slurm or systemd signal every process of a job: the HTTP
    # side drains, then stops this one (which also ends when that side goes away: the pipe closes)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        pool, info = factory(*args)
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        return
    lock = threading.Lock()   # the schedulers' threads and this one write to the pipe
    outbox: list = []
    urgent = [False]   # the outbox holds a sequence's first or last event
    last_sent = [0.0]
    requests: dict[int, list] = {}   # rid -> its Sequences
    started: set = set()   # (rid, choice) that sent an event

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    def flush() -> None:
        """Send what the step produced: at once if it holds a first or last event, else at most every
        `interval` (the HTTP side sends streamed tokens no more often: waking it each step would take
        the model's cores for nothing)."""
        with lock:
            now = time.perf_counter()
            if outbox and (urgent[0] or now - last_sent[0] >= interval):
                conn.send(("events", outbox[:]))
                outbox.clear()
                urgent[0], last_sent[0] = False, now

    def sinks(rid: int, seqs: list) -> Callable[[int], Callable[[Event], None]]:
        def sink_for(i: int) -> Callable[[Event], None]:
            def sink(ev: Event) -> None:
                done = None
                if ev.kind == "done" and seqs:
                    s = seqs[i]
                    done = (list(s.tokens), s.first_token_at, s.last_token_at)
                with lock:
                    outbox.append((rid, i, ev, done))
                    first, last = (rid, i) not in started, ev.kind == "done"
                    urgent[0] = urgent[0] or first or last
                    (started.discard if last else started.add)((rid, i))
            return sink
        return sink_for

    for s in pool.schedulers:
        s.flush, s.reading = flush, reading
    pool.start()
    gc.freeze()   # as the serve stage does (nanochat/stages/serve.py): a full collection scans only new objects
    send(("ready", {"context": pool.context, "max_seqs": pool.max_seqs, **info}))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "submit":
                _, rid, prompt, params = msg
                seqs: list = []
                try:
                    seqs += pool.submit(prompt, params, sinks(rid, seqs))
                except tuple(REFUSALS.values()) as e:
                    send(("refused", rid, type(e).__name__, str(e)))
                    continue
                requests[rid] = seqs
                send(("accepted", rid, seqs[0].replica))
            elif msg[0] == "cancel":
                seqs = requests.get(msg[1])
                if seqs:
                    seqs[msg[2]].cancel()
            elif msg[0] == "status":
                send(("status", msg[1], _status(pool)))
            elif msg[0] == "stop_accepting":
                pool.stop_accepting()
            else:   # stop
                break
            for rid in [r for r, seqs in requests.items() if all(s.finished for s in seqs)]:
                del requests[rid]
    except (EOFError, OSError):   # the HTTP process is gone
        pool.stop()
        return
    pool.stop()
    with contextlib.suppress(OSError):
        send(("stopped", _status(pool)))


def _status(pool) -> dict:
    """The pool's status, with the model side's Prometheus text."""
    from prometheus_client import generate_latest
    status = pool.status()
    observer = pool.schedulers[0].observer   # shared by the replicas
    observer.queue.set(sum(r["waiting"] for r in status["replicas"]))
    observer.active.set(sum(r["active"] for r in status["replicas"]))
    return {**status, "metrics": generate_latest(observer.registry)}


# --------------------------------------------------------------------------- the HTTP process

class RemoteSequence:
    """What the app reads of a sequence in the model process: its tokens and timings once it is done."""

    def __init__(self, pool: "RemotePool", rid: int, choice: int):
        self.pool, self.rid, self.choice = pool, rid, choice
        self.tokens: list[int] = []
        self.replica = 0
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.finished = False

    def cancel(self) -> None:
        if not self.finished:
            self.pool._send(("cancel", self.rid, self.choice))


class RemotePool:
    """A ReplicaPool in the model process, seen from the HTTP process (see the module docstring)."""

    def __init__(self, conn, process, reading, info: dict):
        self.conn, self.process, self.reading, self.info = conn, process, reading, info
        self.context, self.max_seqs = info["context"], info["max_seqs"]
        self._lock = threading.Lock()   # sends: the event loop, and a stop from a timer thread
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}      # submits and status queries waiting for a reply
        self._requests: dict[int, tuple[list[RemoteSequence], Callable]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.lost: Optional[str] = None   # why the model process is gone
        self.final: Optional[dict] = None   # its status when it stopped
        self.generated = 0

    @classmethod
    def spawn(cls, factory: Callable, *args: Any, interval_s: float = 0.0) -> "RemotePool":
        """Start the model process and wait until its pool runs; raises RuntimeError if it cannot start.
        `interval_s`: streamed tokens cross the pipe at most this often (a first or last event at once)."""
        ctx = mp.get_context("spawn")   # a fresh interpreter: no threads or CUDA state copied from this one
        conn, child = ctx.Pipe()
        reading = ctx.Value("i", 0, lock=False)   # written by this process only (its event loop)
        process = ctx.Process(target=_serve_pipe, args=(child, reading, interval_s, factory, args), name="nanochat-model",
                              daemon=True)
        process.start()
        child.close()
        try:
            msg = conn.recv()
        except EOFError:
            msg = ("failed", f"the model process exited with code {process.join(5) or process.exitcode}")
        if msg[0] != "ready":
            raise RuntimeError(f"the model process could not start:\n{msg[1]}")
        return cls(conn, process, reading, msg[1])

    # ------------------------------------------------------------------ the app's interface
    async def submit(self, prompt: list[int], params: list[SamplingParams], sink_for) -> list[RemoteSequence]:
        """Queue a request in the model process; raises what Scheduler.submit raises there."""
        self._attach()
        if self.lost:
            raise ShuttingDown(self.lost)
        rid = next(self._ids)
        seqs = [RemoteSequence(self, rid, i) for i in range(len(params))]
        self._requests[rid] = (seqs, [sink_for(i) for i in range(len(params))])
        reply = self._pending[rid] = self._loop.create_future()
        self._send(("submit", rid, list(prompt), params))
        try:
            replica = await reply
        except BaseException:
            self._requests.pop(rid, None)
            raise
        for s in seqs:
            s.replica = replica
        return seqs

    @contextlib.contextmanager
    def receiving_request(self):
        """The HTTP side is reading a request: the model process holds new prompts and leaves a core."""
        self.reading.value += 1
        try:
            yield
        finally:
            self.reading.value -= 1

    async def status(self) -> dict:
        self._attach()
        if self.lost:
            return {"replicas": [], "warming": False, "failed": True, "metrics": b""}
        qid = -1 - next(self._ids)   # negative: never a request's id
        reply = self._pending[qid] = self._loop.create_future()
        self._send(("status", qid))
        return await reply

    def stop_accepting(self) -> None:
        self._send(("stop_accepting",))

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel everything in flight (those streams end 'cancelled') and wait for the process to end."""
        self._send(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
        if self._loop is None or self._loop.is_closed():   # else the loop reads what it sent
            with contextlib.suppress(EOFError, OSError):
                while self.final is None and self.conn.poll():
                    self._handle(self.conn.recv())

    # ------------------------------------------------------------------ the pipe
    def _send(self, msg) -> None:
        with self._lock, contextlib.suppress(OSError):   # gone: _read has said so to every stream
            self.conn.send(msg)

    def _attach(self) -> None:
        """Read the pipe in the running event loop (from the first call on; a new loop takes over)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.conn.fileno())
            self._loop = loop
            loop.add_reader(self.conn.fileno(), self._read)

    def _read(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            self._lose(f"the model process exited (code {self.process.join(1) or self.process.exitcode})")

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "events":
            for rid, i, ev, done in msg[1]:
                seqs, sinks = self._requests.get(rid, (None, None))
                if seqs is None:
                    continue
                if done is not None:
                    s = seqs[i]
                    s.tokens, s.first_token_at, s.last_token_at = done
                    s.finished = True
                    self.generated += len(s.tokens)
                    if all(x.finished for x in seqs):
                        del self._requests[rid]
                sinks[i](ev)
        elif kind in ("accepted", "status"):
            self._resolve(msg[1], result=msg[2])
        elif kind == "refused":
            self._resolve(msg[1], error=REFUSALS[msg[2]](msg[3]))
        elif kind == "stopped":
            self.final = msg[1]

    def _resolve(self, key: int, result=None, error: Optional[BaseException] = None) -> None:
        fut = self._pending.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def _lose(self, why: str) -> None:
        """The model process is gone: every stream ends with an error, every waiting call raises."""
        if self.lost:
            return
        self.lost = why
        for key in list(self._pending):
            self._resolve(key, error=ShuttingDown(why))
        for seqs, sinks in self._requests.values():
            for s, sink in zip(seqs, sinks):
                if not s.finished:
                    s.finished = True
                    sink(Event("done", finish_reason="error", error=why))
        self._requests.clear()
