"""Request validation: nanochat's abuse limits, as OpenAI-style 400 errors naming the field.

`parse_chat_request(body, limits)` turns a decoded JSON body (either protocol: OpenAI's
/v1/chat/completions or nanochat's /chat/completions) into a `ChatRequest`, or raises
`RequestError`, which the app returns as

    {"error": {"message": "...", "type": "invalid_request_error", "param": "<field>", "code": "<code>"}}

Nothing here touches the model; `render_prompt` tokenizes and checks the context length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A bad request: HTTP status, the offending field and a message that says the limit."""

    def __init__(self, message: str, param: Optional[str] = None, code: str = "invalid_value",
                 status: int = 400, type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    min_temperature: float = 0.0
    max_temperature: float = 2.0
    min_top_k: int = 1
    max_top_k: int = 200
    min_max_tokens: int = 1
    max_max_tokens: int = 4096
    max_n: int = 16
    max_stop: int = 4
    max_body_bytes: int = 1_000_000


@dataclass
class Defaults:
    temperature: float = 0.6
    top_k: Optional[int] = 50
    max_tokens: int = 512
    seed: int = 42


@dataclass
class ChatRequest:
    messages: list[dict]
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    max_tokens: int
    n: int = 1
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False   # stream_options.include_usage: a last chunk with token counts


def _number(body: dict, key: str, lo: float, hi: float, integer: bool) -> Optional[float]:
    v = body.get(key)
    if v is None:
        return None
    # JSON's 3.0 is an integer; a float is finite (is_integer() is False for inf and nan)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            isinstance(v, float) and not (v.is_integer() if integer else math.isfinite(v))):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'} in [{lo:g}, {hi:g}], "
                           f"got {v!r}", key, "invalid_type")
    if not lo <= v <= hi:
        raise RequestError(f"'{key}' must be in [{lo:g}, {hi:g}], got {v!r}", key, "out_of_range")
    return int(v) if integer else v


def _content_text(content: Any, i: int, limits: Limits) -> str:
    """A message's content: a string, or OpenAI content parts [{"type": "text", "text": ...}] (joined).
    Each string or part is checked on its own, as the schema states it (nanochat/serve/schema.py):
    not blank, at most `max_message_chars`."""
    param = f"messages[{i}].content"
    if isinstance(content, str):
        pieces = [(param, content)]
    elif isinstance(content, list) and content:
        pieces = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{param}[{j}] must be {{'type': 'text', 'text': <string>}} (only text is "
                                   f"supported)", f"{param}[{j}]", "invalid_type")
            pieces.append((f"{param}[{j}].text", part["text"]))
    elif isinstance(content, list):
        raise RequestError(f"{param} must hold at least one text part", param, "empty_content")
    else:
        raise RequestError(f"{param} must be a string, got {type(content).__name__}", param, "invalid_type")
    for where, text in pieces:
        if not text.strip():
            raise RequestError(f"{where} must not be empty", where, "empty_content")
        if len(text) > limits.max_message_chars:
            raise RequestError(f"{where} has {len(text):,} characters; the limit is {limits.max_message_chars:,} "
                               f"per message (per text part)", where, "message_too_long")
    return "".join(text for _, text in pieces)


def _messages(body: dict, limits: Limits) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise RequestError("'messages' is required: a list of {'role': ..., 'content': ...}", "messages",
                           "missing_required_parameter")
    if not isinstance(msgs, list):
        raise RequestError(f"'messages' must be a list, got {type(msgs).__name__}", "messages", "invalid_type")
    if not msgs:
        raise RequestError("'messages' must contain at least one message", "messages", "empty_array")
    if len(msgs) > limits.max_messages:
        raise RequestError(f"'messages' has {len(msgs)} messages; the limit is {limits.max_messages}",
                           "messages", "too_many_messages")
    out, total = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]",
                               "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                               f"messages[{i}].role", "invalid_role")
        text = _content_text(m.get("content"), i, limits)
        total += len(text)
        out.append({"role": role, "content": text})
    if total > limits.max_total_chars:
        raise RequestError(f"'messages' hold {total:,} characters in total; the limit is "
                           f"{limits.max_total_chars:,}", "messages", "conversation_too_long")
    if out[-1]["role"] == "assistant":
        raise RequestError("the last message must be from the user (the assistant answers it)",
                           f"messages[{len(out) - 1}].role", "invalid_role")
    return out


def parse_chat_request(body: Any, limits: Limits, defaults: Defaults) -> ChatRequest:
    """Validate a decoded JSON body of either chat protocol; raise RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}", None,
                           "invalid_body")
    messages = _messages(body, limits)
    temperature = _number(body, "temperature", limits.min_temperature, limits.max_temperature, False)
    top_k = _number(body, "top_k", limits.min_top_k, limits.max_top_k, True)
    top_p = _number(body, "top_p", 0.0, 1.0, False)
    if top_p is not None and top_p <= 0:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p!r}", "top_p", "out_of_range")
    # both are checked; the newer name wins
    max_tokens, legacy = (_number(body, key, limits.min_max_tokens, limits.max_max_tokens, True)
                          for key in ("max_completion_tokens", "max_tokens"))
    max_tokens = legacy if max_tokens is None else max_tokens
    n = _number(body, "n", 1, limits.max_n, True)
    seed = body.get("seed")
    seed = int(seed) if isinstance(seed, float) and seed.is_integer() else seed   # JSON's 42.0 is an integer
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise RequestError(f"'seed' must be a non-negative integer, got {seed!r}", "seed", "invalid_type")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise RequestError(f"'stop' must be a string or a list of strings, got {stop!r}", "stop", "invalid_type")
    if len(stops) > limits.max_stop:
        raise RequestError(f"'stop' has {len(stops)} sequences; the limit is {limits.max_stop}", "stop",
                           "too_many_stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", "stream", "invalid_type")
    opts = body.get("stream_options")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise RequestError(f"'stream_options' must be {{'include_usage': true|false}}, got {opts!r}",
                           "stream_options", "invalid_type")
    model = body.get("model")   # any string: one model is served
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {model!r}", "model", "invalid_type")
    return ChatRequest(
        messages=messages,
        temperature=defaults.temperature if temperature is None else float(temperature),
        top_k=defaults.top_k if top_k is None else int(top_k),
        top_p=None if top_p is None or top_p >= 1 else float(top_p),
        max_tokens=defaults.max_tokens if max_tokens is None else int(max_tokens),
        n=1 if n is None else int(n), seed=seed, stop=tuple(s for s in stops if s), stream=stream,
        include_usage=bool(opts.get("include_usage", False)))


def render_prompt(tokenizer, messages: list[dict], context: int) -> list[int]:
    """Tokens of the conversation primed for the assistant's answer; 400 if it does not fit the context."""
    try:
        ids = tokenizer.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
    except ValueError as e:  # role order (e.g. two user messages in a row)
        raise RequestError(f"{e}", "messages", "invalid_conversation") from None
    if len(ids) >= context:
        over = len(ids) - context + 1
        raise RequestError(f"the conversation is {len(ids):,} tokens and the model's context is {context:,}: "
                           f"{over:,} tokens too many (at least one must be left for the answer); shorten "
                           f"or drop earlier messages", "messages", "context_length_exceeded")
    return ids
