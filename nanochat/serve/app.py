"""FastAPI routes: they only translate protocols into scheduler requests and back.

    GET  /                      the web UI (static/index.html)
    POST /v1/chat/completions   OpenAI-compatible, stream (SSE chat.completion.chunk … [DONE]) or not
    GET  /v1/models             the served model
    POST /chat/completions      nanochat's protocol: SSE `data: {"token": ...}` … `data: {"done": true}`
    GET  /health                ready, replicas, free slots
    GET  /metrics               Prometheus text format
    GET  /docs, /openapi.json   the API's schema (request/response bodies: nanochat/serve/schema.py)

With an API key (`stage.api_key` or NANOCHAT_API_KEY), /v1/* and /chat/completions answer 401 unless
the request carries `Authorization: Bearer <key>` (compared in constant time); /, /health, /metrics
and the docs stay open.

Bad input → 400 with an OpenAI-style error body (nanochat/serve/limits.py); every row busy and
the queue full → 429 with Retry-After; shutting down → 503. A client that disconnects cancels
its sequences, which free their KV-cache rows at the scheduler's next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nanochat.serve.limits import ChatRequest, Defaults, Limits, RequestError, parse_chat_request, render_prompt
from nanochat.serve import schema
from nanochat.serve.metrics import ServerMetrics
from nanochat.serve.scheduler import Event, QueueFull, ReplicaPool, SamplingParams, ShuttingDown

STATIC = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServeSettings:
    model_name: str = "nanochat"
    retry_after_s: int = 1
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)
    api_key: Optional[str] = None   # required as `Authorization: Bearer <key>` on /v1/* and /chat/completions
    stream_interval_ms: float = 0.0  # streamed tokens go out at most this often, joined per choice (_Mailbox)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Mailbox:
    """Events from scheduler threads into the event loop, one wake-up per batch (not per token).

    A decode step streams a token to every active sequence; waking the loop for each would cost a
    system call and a loop turn per token. Beyond that, the loop is woken at most once per
    `interval` seconds (stage.stream_interval_ms): the tokens that arrived meanwhile go out as one
    chunk per choice, so the HTTP work (here and in the client) follows the interval, not the token
    rate, and stays off the cores the model runs on. A stream's first event (time to first token) and
    its end (nothing follows it) are never held back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0):
        self.loop, self.interval = loop, interval
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple[int, Event]]] = []
        self.armed = False          # a flush is scheduled
        self.soon = False           # ... for the loop's next turn (the first tokens of a prefill: one wake-up)
        self.last = 0.0             # time.monotonic() of the last flush

    def post(self, queue: asyncio.Queue, item: tuple[int, Event], urgent: bool = False) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.soon or (self.armed and not urgent):
                return                      # a flush is already scheduled, soon enough
            self.armed, self.soon = True, urgent
            delay = 0.0 if urgent else self.interval - (time.monotonic() - self.last)
        with contextlib.suppress(RuntimeError):   # the event loop is gone (server stopped): nobody is listening
            self.loop.call_soon_threadsafe(self._arm, delay)

    def _arm(self, delay: float) -> None:
        if delay > 0:
            self.loop.call_later(delay, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
            self.armed, self.soon, self.last = False, False, time.monotonic()
        for queue, item in items:
            queue.put_nowait(item)


class _EventStream(Response):
    """A text/event-stream answer, written straight to the ASGI server: one write per batch of
    events, no task group per request (Starlette's StreamingResponse spends more CPU per request
    than the model's prefill of a short prompt on a small CPU). A client that goes away cancels
    the request's sequences, which ends the stream at the scheduler's next step."""

    media_type = "text/event-stream"

    def __init__(self, sub: "_Submission", frames: Callable[[list[tuple[int, Event]], bool], str]):
        # no body, so no content-length: the answer is sent in chunks (as StreamingResponse does)
        self.status_code, self.background = 200, None
        self.init_headers(SSE_HEADERS)
        self.sub, self.frames = sub, frames   # frames(batch, last): the text of a batch of events

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        batches = self.sub.batches(receive)
        try:
            async for batch, last in batches:   # the last frames and the end of the body: one write
                await send({"type": "http.response.body", "body": self.frames(batch, last).encode(),
                            "more_body": not last})
        except OSError:         # the connection broke mid-write
            self.sub.cancel()
        finally:
            await batches.aclose()


def _merged(batch: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Consecutive events of one choice and kind joined into one (one chunk for a stretch of tokens)."""
    out: list[tuple[int, Event]] = []
    last: dict[int, int] = {}   # choice -> index in out of its latest event
    for i, ev in batch:
        j = last.get(i)
        if j is not None and ev.kind != "done" and out[j][1].kind == ev.kind:
            out[j] = (i, Event(ev.kind, out[j][1].text + ev.text))
            continue
        last[i] = len(out)
        out.append((i, ev))
    return out


class _Submission:
    """The events of one request's sequences, delivered into the event loop."""

    def __init__(self, pool: ReplicaPool, prompt: list[int], req: ChatRequest, seed_default: int, mailbox: _Mailbox):
        self.mailbox = mailbox
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = len(prompt)
        base = seed_default if req.seed is None else req.seed
        params = [SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                                 top_p=req.top_p, seed=base + i, stop=req.stop) for i in range(req.n)]
        self.seqs = pool.submit(prompt, params, self._sink_for)

    def _sink_for(self, i: int):
        sent = itertools.count()   # a first token goes out at once, and the end (nothing follows it)
        return lambda ev: self.mailbox.post(self.queue, (i, ev), urgent=next(sent) == 0 or ev.kind == "done")

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()

    def usage(self) -> dict:
        completion = sum(len(s.tokens) for s in self.seqs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    async def batches(self, receive: Callable) -> AsyncIterator[tuple[list[tuple[int, Event]], bool]]:
        """(list of (choice index, event), last): as many events as have arrived, until every sequence
        is done (a stream writes each list at once); cancels the sequences if the consumer goes away or
        the client disconnects (the ASGI `receive` says http.disconnect once the body has been read)."""
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.ensure_future(watch())
        left = len(self.seqs)
        try:
            while left:
                batch = [await self.queue.get()]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                left -= sum(ev.kind == "done" for _, ev in batch)
                yield _merged(batch), not left
        finally:
            watcher.cancel()
            self.cancel()   # no-op for finished sequences; frees the rows of a disconnected client


def build_app(pool: ReplicaPool, tokenizer, settings: Optional[ServeSettings] = None,
              metrics: Optional[ServerMetrics] = None) -> FastAPI:
    """The HTTP face of a ReplicaPool (whose schedulers should share `metrics` as their observer)."""
    settings = settings or ServeSettings()
    metrics = metrics or ServerMetrics()
    app = FastAPI(title="nanochat", description="OpenAI-compatible chat completions and nanochat's streaming "
                  "protocol over one model (nanochat-hydra `stage=serve`).", redoc_url=None)
    app.state.draining = False   # set by the serve stage on SIGINT / SIGTERM
    app.state.mailbox = None   # made on the first request, in the server's event loop
    limits, defaults = settings.limits, settings.defaults
    key = settings.api_key.encode() if settings.api_key else None
    openai_req, nanochat_req = schema.request_models(limits, pool.max_seqs)
    ids = itertools.count(int.from_bytes(os.urandom(8), "big") << 32)   # completion ids: unique, no syscall each

    @app.exception_handler(RequestError)
    async def error(request: Request, e: RequestError) -> JSONResponse:
        metrics.request(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        """401 unless the request carries the API key (constant-time comparison)."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key is not None and (scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key)):
            raise RequestError("missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                               None, "invalid_api_key", status=401, headers={"WWW-Authenticate": "Bearer"})

    async def accept(request: Request, one: bool = False) -> tuple[ChatRequest, _Submission]:
        """A chat route's request: key, body and limits checked, its sequences queued (`one`: a single
        answer whatever `n` says); raises RequestError (401, 400, 413, 429, 503)."""
        check_key(request)
        with pool.receiving_request():
            return await read_and_queue(request, one)

    async def read_and_queue(request: Request, one: bool) -> tuple[ChatRequest, _Submission]:
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else 0
        if size <= limits.max_body_bytes:   # a declared size over the limit is refused unread
            raw = await request.body()
            size = len(raw)
        if size > limits.max_body_bytes:
            raise RequestError(f"the request body is {size:,} bytes; the limit is {limits.max_body_bytes:,}",
                               None, "body_too_large", status=413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        req = parse_chat_request(body, limits, defaults)
        req.n = 1 if one else req.n
        try:
            if app.state.draining:
                raise ShuttingDown()
            if req.n > pool.max_seqs:
                raise RequestError(f"'n' is {req.n}; this server decodes at most {pool.max_seqs} sequences "
                                   f"per replica", "n", "out_of_range")
            prompt = render_prompt(tokenizer, req.messages, pool.context)
            if app.state.mailbox is None:
                app.state.mailbox = _Mailbox(asyncio.get_running_loop(), settings.stream_interval_ms / 1000)
            sub = _Submission(pool, prompt, req, defaults.seed, app.state.mailbox)
        except QueueFull as e:
            raise RequestError(str(e), None, "rate_limit_exceeded", status=429, type="rate_limit_error",
                               headers={"Retry-After": str(settings.retry_after_s)}) from None
        except ShuttingDown:
            raise RequestError("the server is shutting down", None, "shutting_down", status=503,
                               type="server_error") from None
        metrics.request(request.url.path, 200)
        return req, sub

    # ------------------------------------------------------------------ OpenAI
    @app.post("/v1/chat/completions", responses=_responses(
        {"application/json": schema.ChatCompletion, "text/event-stream": schema.ChatCompletionChunk},
        "the answer: JSON, or with `stream` an event stream of chat.completion.chunk objects ending in "
        "`data: [DONE]`", key is not None, chat=True), openapi_extra=_body("ChatCompletionRequest"))
    async def chat_completions(request: Request):
        req, sub = await accept(request)
        cid = f"chatcmpl-{next(ids):024x}"
        created = int(time.time())
        if req.stream:
            return _EventStream(sub, _openai_frames(sub, cid, created, req.include_usage))
        texts, reasons = [""] * len(sub.seqs), [None] * len(sub.seqs)
        for i, ev in [item async for batch, _ in sub.batches(request.receive) for item in batch]:
            if ev.kind == "done":
                reasons[i] = ev.finish_reason
            else:
                texts[i] += ev.text   # tool markers included, as nanochat decodes them
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                         "finish_reason": reasons[i], "logprobs": None} for i, t in enumerate(texts)],
            "usage": sub.usage(),
        }

    def _openai_frames(sub: _Submission, cid: str, created: int, include_usage: bool):
        def chunk(**fields) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                         "model": settings.model_name, **fields})

        def choice(i: int, delta: dict, finish: Optional[str] = None) -> str:
            return chunk(choices=[{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}])
        # the role chunk goes out with the first token (one write fewer)
        role = [choice(i, {"role": "assistant", "content": ""}) for i in range(len(sub.seqs))]

        def frames(batch: list[tuple[int, Event]], last: bool) -> str:
            out = role.copy()
            role.clear()   # sent with the first batch only
            for i, ev in batch:
                if ev.kind == "done":
                    if ev.error:
                        out.append(_sse({"error": {"message": ev.error, "type": "server_error", "param": None,
                                                   "code": "generation_failed"}}))
                    out.append(choice(i, {}, ev.finish_reason))
                else:
                    out.append(choice(i, {"content": ev.text}))   # tool markers included
            if last:   # the last events, the usage and [DONE] go out in one write
                out += [chunk(choices=[], usage=sub.usage())] if include_usage else []
                out.append("data: [DONE]\n\n")
            return "".join(out)
        return frames

    @app.get("/v1/models", responses=_responses({"application/json": schema.ModelList}, "the served model",
                                                 key is not None))
    async def models(request: Request):
        check_key(request)
        metrics.request("/v1/models", 200)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "nanochat"}]}

    # ------------------------------------------------------------------ nanochat's protocol
    @app.post("/chat/completions", responses=_responses(
        {"text/event-stream": schema.NanochatEvent}, "an event stream: `data: {\"token\": ...}` events, then "
        "`data: {\"done\": true, ...}`", key is not None, chat=True),
        openapi_extra=_body("NanochatChatRequest"))
    async def nanochat_chat(request: Request):
        _, sub = await accept(request, one=True)
        seq = sub.seqs[0]

        def frame(ev: Event) -> str:
            if ev.kind != "done":
                return _sse({"token": ev.text, "gpu": seq.replica, "kind": ev.kind})
            n = len(seq.tokens)   # each one timed (first_token_at, last_token_at)
            took = seq.last_token_at - seq.first_token_at if n > 1 else 0
            tps = (n - 1) / took if took > 0 else None
            return _sse({"done": True, "finish_reason": ev.finish_reason, "tokens": n,
                         "tokens_per_second": tps, **({"error": ev.error} if ev.error else {})})

        return _EventStream(sub, lambda batch, last: "".join(frame(ev) for _, ev in batch))

    # ------------------------------------------------------------------ ops
    @app.get("/health", responses={200: {"model": schema.Health, "description": "ready"},
                                   503: {"model": schema.Health, "description": "warming up (first start) or shutting down"}})
    async def health():
        reps = [{"name": s.name, "device": str(s.device), "active": s.active(), "free_rows": s.free_rows(),
                 "waiting": len(s.waiting), "max_seqs": s.max_seqs} for s in pool.schedulers]
        # while warming up, requests are served, just not at full speed
        status = "draining" if app.state.draining else "failed" if pool.failed else "warming" if pool.warming else "ok"
        metrics.request("/health", 200 if status == "ok" else 503)
        return JSONResponse({"status": status, "ready": status == "ok", "model": settings.model_name, "replicas": reps,
                             "free_slots": sum(r["free_rows"] for r in reps), "context": pool.context},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prom():
        metrics.queue.set(sum(len(s.waiting) for s in pool.schedulers))
        metrics.active.set(sum(s.active() for s in pool.schedulers))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    def openapi() -> dict:
        """FastAPI's schema plus the request bodies (the routes parse them themselves, for
        nanochat's error messages) and the bearer scheme when a key is set."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            from pydantic.json_schema import models_json_schema
            doc = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
            bodies = [(openai_req, "validation"), (nanochat_req, "validation")]
            bodies += [(m, "serialization") for m in (schema.ChatCompletion, schema.ChatCompletionChunk,
                                                      schema.NanochatEvent, schema.ModelList, schema.ErrorResponse)]
            _, defs = models_json_schema(bodies, ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {})
            components.setdefault("schemas", {}).update(defs["$defs"])
            if key is not None:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path in ("/v1/chat/completions", "/v1/models", "/chat/completions"):
                    for op in doc["paths"][path].values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


def _body(model: str) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}}


def _schema(media: str, model) -> dict:
    """A body's schema; for an event stream, each event's: its `data` is this model as JSON (or [DONE])."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    if media != "text/event-stream":
        return ref
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                            "contentSchema": ref}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _responses(ok: dict, what: str, auth: bool, chat: bool = False) -> dict:
    """OpenAPI responses of a route: 200 in the given media types, and its error statuses (a chat route
    reads a body and queues for the scheduler)."""
    out: dict = {200: {"description": what, "content": {media: {"schema": _schema(media, m)} for media, m in ok.items()}}}
    err = {"model": schema.ErrorResponse}
    if chat:
        out[400] = {**err, "description": "bad input: the message names the field and the limit"}
        out[413] = {**err, "description": "the request body is larger than the limit"}
    if auth:
        out[401] = {**err, "description": "missing or incorrect API key (Authorization: Bearer <key>)"}
    if chat:
        out[429] = {**err, "description": "every row busy and the queue full; retry after Retry-After seconds",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}}
        out[503] = {**err, "description": "the server is shutting down"}
    return out

