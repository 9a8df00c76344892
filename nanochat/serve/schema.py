"""The documented API: Pydantic models of the request and response bodies, for /docs and /openapi.json.

The routes validate with nanochat/serve/limits.py (its OpenAI-style 400 errors name the field and
the limit); these models describe the same rules, built from the server's `Limits`, so the schema
states this server's bounds: a body the schema rejects, the server rejects too. What a JSON schema
cannot say is in the descriptions and answered 400: the roles' order (an optional system message,
then user and assistant alternating, the last from the user), the characters of all messages (or
content parts) together, and the conversation's length in tokens.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from nanochat.serve.limits import ROLES, Limits

NON_BLANK = r"\S"   # at least one character that is not whitespace (a JSON-schema pattern is a search)


# --------------------------------------------------------------------------- errors

class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error | authentication_error | rate_limit_error | server_error")
    param: Optional[str] = Field(description="the offending field, e.g. messages[0].content")
    code: Optional[str]


class ErrorResponse(BaseModel):
    """OpenAI's error body."""
    error: ErrorDetail


# --------------------------------------------------------------------------- responses

# None while a streamed answer goes on; why it ended otherwise
FinishReason = Optional[Literal["stop", "length", "cancelled", "error"]]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: FinishReason
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A whole answer (`stream` false)."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletionChunk(ChatCompletion):   # id, created and model as a whole answer's
    """One `data:` event of a streamed answer (`stream` true); the stream ends with `data: [DONE]`."""
    object: Literal["chat.completion.chunk"]
    choices: list[ChunkChoice]
    usage: Optional[Usage] = Field(None, description="last chunk only, with stream_options.include_usage")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class NanochatEvent(BaseModel):
    """One `data:` event of nanochat's protocol: a piece of text, or the last event (`done`)."""
    token: Optional[str] = None
    gpu: Optional[int] = Field(None, description="the replica that serves the request")
    kind: Optional[str] = Field(None, description="text | python_start | python | python_end | output_start | "
                                                  "output | output_end")
    done: Optional[bool] = None
    finish_reason: Optional[str] = None
    tokens: Optional[int] = None
    tokens_per_second: Optional[float] = None
    error: Optional[str] = None


class Health(BaseModel):
    status: Literal["ok", "warming", "draining", "failed"]
    ready: bool
    model: str
    replicas: list[dict[str, Any]]
    free_slots: int
    context: int


# --------------------------------------------------------------------------- requests (bounds from Limits)

def request_models(limits: Limits, max_n: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(ChatCompletionRequest, NanochatChatRequest) with this server's limits as schema bounds."""
    open_ = ConfigDict(extra="allow")   # unknown fields (e.g. OpenAI's frequency_penalty) are ignored

    # one string or text part: not blank, at most max_message_chars (the server checks each, nanochat/serve/limits.py)
    text = Annotated[str, Field(min_length=1, max_length=limits.max_message_chars, pattern=NON_BLANK)]
    part = create_model("TextPart", __config__=open_, type=(Literal["text"], ...), text=(text, ...))
    parts = Annotated[list[part], Field(min_length=1, description="content parts: text only, joined")]
    message = create_model(
        "ChatMessage", __config__=open_,
        role=(Literal[ROLES], Field(description="system (first only), then user and assistant alternating; "
                                                "the last message is the user's")),
        content=(Union[text, parts], Field(description=f"a string, or {{'type': 'text'}} parts; each at most "
                                                       f"{limits.max_message_chars:,} characters, not blank")))
    n_max = min(limits.max_n, max_n)
    common = dict(
        messages=(list[message], Field(min_length=1, max_length=limits.max_messages,
                                       description=f"at most {limits.max_total_chars:,} characters in all")),
        model=(Optional[str], Field(None, description="ignored: this server serves one model")),
        temperature=(Optional[float], Field(None, ge=limits.min_temperature, le=limits.max_temperature,
                                            description="0 (or below 1e-5) = greedy")),
        top_k=(Optional[int], Field(None, ge=limits.min_top_k, le=limits.max_top_k)),
        top_p=(Optional[float], Field(None, gt=0, le=1)),
        max_tokens=(Optional[int], Field(None, ge=limits.min_max_tokens, le=limits.max_max_tokens)),
        max_completion_tokens=(Optional[int], Field(None, ge=limits.min_max_tokens, le=limits.max_max_tokens,
                                                    description="wins over max_tokens")),
        seed=(Optional[int], Field(None, ge=0, le=2 ** 63 - 1, description="same seed, same sampled text")),
        stop=(Union[str, Annotated[list[str], Field(max_length=limits.max_stop)], None],
              Field(None, description=f"up to {limits.max_stop} strings")),
    )
    stream_opts = create_model("StreamOptions", __config__=open_, include_usage=(bool, False))
    # the two protocols differ in what `n` and `stream` mean: (model, n, stream)
    docs = (("ChatCompletionRequest", "answers to the same prompt", "true: text/event-stream of chat.completion.chunk "
             "events"), ("NanochatChatRequest", "ignored: one answer", "ignored: the answer always streams"))
    openai_req, nanochat_req = (create_model(
        name, __config__=open_, **common, n=(Optional[int], Field(None, ge=1, le=n_max, description=n_doc)),
        stream=(bool, Field(False, description=stream_doc)), stream_options=(Optional[stream_opts], None))
        for name, n_doc, stream_doc in docs)
    return openai_req, nanochat_req

