"""Byte-level BPE tokenizer: trained with `rustbpe`, run with `tiktoken`.

Training (rustbpe) learns the merges with the GPT-4 split pattern, except that
numbers split into groups of at most 2 digits (nanochat's choice for small vocabs).
Inference uses tiktoken built from the learned mergeable ranks plus our special
tokens, which is fast and releases the GIL, so batch encoding in threads scales.

Artifact layout, `<base_dir>/tokenizer/<name>/`:
    tokenizer.tiktoken   one `base64(token bytes) rank` line per mergeable token
    token_bytes.npy      int32 byte length per token id (0 for special tokens), for bits-per-byte
    meta.json            vocab_size, pattern, special tokens, training time, chars/s, corpus
"""
from __future__ import annotations

import base64
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

SPECIAL_TOKENS = [
    "<|bos|>",              # every document starts with this
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",      # assistant calls the python tool
    "<|output_start|>", "<|output_end|>",      # python tool output back to the assistant
]

# GPT-4's pattern with \p{N}{1,3} changed to \p{N}{1,2}: fewer number tokens wasted at small vocabs.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# assistant content parts: the special tokens around the text, and whether the model trains on it
_PARTS = {
    "text": (None, 1),
    "python": (("<|python_start|>", "<|python_end|>"), 1),          # the model learns to call the tool
    "python_output": (("<|output_start|>", "<|output_end|>"), 0),   # comes from the tool at inference
}

_RANKS_FILE = "tokenizer.tiktoken"
_BYTES_FILE = "token_bytes.npy"
_META_FILE = "meta.json"


class Tokenizer:
    """tiktoken encoding + chat rendering. Build with `train_tokenizer` or `Tokenizer.load`."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 name: str = "nanochat", meta: dict | None = None):
        import tiktoken
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.meta = dict(meta or {})
        offset = len(mergeable_ranks)
        self.special_tokens = {tok: offset + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    # ------------------------------------------------------------------ basics
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_tokens[name]

    def encode(self, text: str | list[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode ordinary text (special-token strings in the text are NOT parsed as specials).

        A list of strings is encoded in `num_threads` threads and gives a list of lists.
        `prepend`/`append` take a token id or a special token name such as "<|bos|>".
        """
        if isinstance(text, str):
            batch = [self.enc.encode_ordinary(text)]
        elif isinstance(text, (list, tuple)):
            batch = self.enc.encode_ordinary_batch(list(text), num_threads=max(1, num_threads))
        else:
            raise TypeError(f"encode() takes a str or a list of str, got {type(text).__name__}")
        pre, post = ([] if t is None else [self.encode_special(t) if isinstance(t, str) else int(t)]
                     for t in (prepend, append))
        if pre or post:
            batch = [pre + ids + post for ids in batch]
        return batch[0] if isinstance(text, str) else batch

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    # ------------------------------------------------------------------ chat
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Tokenize a conversation; return (ids, mask) where mask=1 marks tokens the model trains on.

        Rules: a leading system message is merged into the first user turn; then roles must
        alternate user, assistant, user, ...; user turns and python tool outputs are masked out
        (0); assistant text, python tool calls and `<|assistant_end|>` are trained on (1). The
        result is truncated to `max_tokens`.
        """
        messages = check_messages(conversation)
        if messages[0]["role"] == "system":
            messages = [{**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                        *messages[2:]]

        sp = self.special_tokens
        ids: list[int] = [self.bos_token_id]
        mask: list[int] = [0]

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add([sp["<|user_start|>"], *self.enc.encode_ordinary(content), sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                around, m = _PARTS[part["type"]]
                tokens = self.enc.encode_ordinary(part["text"])
                add([sp[around[0]], *tokens, sp[around[1]]] if around else tokens, m)
            add([sp["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt for generation: drop the last (assistant) message and prime `<|assistant_start|>`."""
        messages = check_messages(conversation)
        if messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion expects the last message to be the assistant's "
                             f"(it is dropped and regenerated), got role {messages[-1]['role']!r}")
        conv = {**conversation, "messages": list(messages[:-1])}   # render_conversation does not mutate
        return self.render_conversation(conv, max_tokens=10**9)[0] + [self.special_tokens["<|assistant_start|>"]]

    # ------------------------------------------------------------------ io
    def token_byte_lengths(self) -> list[int]:
        """Raw byte length of every token id (0 for special tokens): the bits-per-byte denominator."""
        lengths = [0] * self.get_vocab_size()
        for tok, rank in self.mergeable_ranks.items():
            lengths[rank] = len(tok)
        return lengths

    def save(self, directory: str | Path, extra_meta: dict | None = None) -> Path:
        """Write the artifact atomically (files land via tmp + rename); returns the dir."""
        import io

        import numpy as np
        from nanochat.common import atomic_write_bytes, atomic_write_json, atomic_write_text
        directory = Path(directory)  # the atomic writes create it
        lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}"
                 for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        atomic_write_text(directory / _RANKS_FILE, "\n".join(lines) + "\n")
        buf = io.BytesIO()
        np.save(buf, np.asarray(self.token_byte_lengths(), dtype=np.int32))
        atomic_write_bytes(directory / _BYTES_FILE, buf.getvalue())
        self.meta = {**self.meta, **(extra_meta or {}), "vocab_size": self.get_vocab_size(),
                     "num_merges": len(self.mergeable_ranks) - 256, "pattern": self.pattern,
                     "special_tokens": self.special_tokens}
        atomic_write_json(directory / _META_FILE, self.meta)  # written last: its presence means complete
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        meta_path, ranks_path = directory / _META_FILE, directory / _RANKS_FILE
        if not meta_path.is_file() or not ranks_path.is_file():
            raise FileNotFoundError(f"no tokenizer artifact in {directory} (need {_RANKS_FILE} and {_META_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        lines = [line.split() for line in ranks_path.read_text(encoding="ascii").splitlines() if line]
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
        tok = cls(ranks, pattern=meta.get("pattern", SPLIT_PATTERN), name=directory.name, meta=meta)
        saved = meta.get("special_tokens")
        if saved and saved != tok.special_tokens:
            raise ValueError(f"tokenizer in {directory} was saved with special tokens {saved}, "
                             f"this code expects {tok.special_tokens}; retrain it")
        return tok


def check_messages(conversation: Any) -> list[dict]:
    """The messages of `conversation` if render_conversation takes them, else a ValueError saying what is wrong.

    They are an optional system message, then user and assistant turns alternating from a user's; content
    is a string, or for the assistant a list of {'type': text | python | python_output, 'text': str} parts.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation has no messages" if messages == [] else
                         "a conversation is a dict {'messages': [{'role': ..., 'content': ...}, ...]}")
    system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    if system and len(messages) == 1:
        raise ValueError("a system message must be followed by a user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        expected, content = "system" if system and i == 0 else ("user", "assistant")[(i - system) % 2], m["content"]
        if m["role"] != expected:
            raise ValueError(f"message {i} has role {m['role']!r} but {expected!r} was expected: roles must "
                             "alternate user/assistant (an optional system message may come first)")
        if not isinstance(content, (str, list)) or (expected != "assistant" and not isinstance(content, str)):
            parts = " or a list of parts" if expected == "assistant" else ""
            raise ValueError(f"message {i} ({expected}) content must be a string{parts}, got {type(content).__name__}")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise ValueError(f"message {i} part {j}: expected {{'type': ..., 'text': str}}, got {part!r}")
            if part.get("type") not in _PARTS:
                raise ValueError(f"message {i} part {j}: unknown type {part.get('type')!r}; "
                                 "use text, python or python_output")
    return messages


# ---------------------------------------------------------------------- training

def train_tokenizer(text_iterator: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE with rustbpe; `vocab_size` counts the 256 bytes, merges and specials."""
    import rustbpe
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special + 1:
        raise ValueError(f"stage.vocab_size={vocab_size} is too small: need at least "
                         f"{256 + n_special + 1} (256 byte tokens + {n_special} special tokens + 1 merge)")
    seen = {"chars": 0, "docs": 0, "tens": -1}

    def counted() -> Iterator[str]:  # the text the trainer saw, counted
        for text in text_iterator:
            seen["chars"] += len(text)
            seen["docs"] += 1
            yield text

    def every_ten_percent(record: logging.LogRecord) -> bool:  # rustbpe logs every 1% of merges
        m = re.match(r"Progress: (\d+)%", record.getMessage())
        if not m:
            return True
        tens, last = int(m.group(1)) // 10, seen["tens"]
        seen["tens"] = max(last, tens)
        return tens > last

    log = logging.getLogger("rustbpe")
    log.addFilter(every_ten_percent)
    try:
        t0 = time.time()
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(counted(), vocab_size - n_special, pattern=SPLIT_PATTERN)
        seconds = time.time() - t0
    finally:
        log.removeFilter(every_ten_percent)
    if seen["chars"] == 0:
        raise ValueError("tokenizer training got an empty corpus (no text): check data.* settings")
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    meta = {"train_seconds": round(seconds, 3), "train_chars": seen["chars"], "train_docs": seen["docs"],
            "chars_per_sec": round(seen["chars"] / max(seconds, 1e-9), 1), "requested_vocab_size": vocab_size}
    tok = Tokenizer(ranks, pattern=bpe.get_pattern(), meta=meta)
    if tok.get_vocab_size() < vocab_size:
        # rustbpe stops early when the corpus has no more pairs to merge; say so rather than hide it
        tok.meta["note"] = (f"corpus too small for {vocab_size} tokens: learned "
                            f"{tok.get_vocab_size()} (give more text or a smaller stage.vocab_size)")
    return tok


# ---------------------------------------------------------------------- lookup by name

def tokenizer_dir(base_dir: str | Path, name: str) -> Path:
    return Path(base_dir).expanduser() / "tokenizer" / name


def get_tokenizer(base_dir: str | Path, name: str) -> Tokenizer:
    """Load the artifact `<base_dir>/tokenizer/<name>/`, with a clear error if it was never trained."""
    d = tokenizer_dir(base_dir, name)
    if not (d / _META_FILE).is_file():
        raise FileNotFoundError(f"tokenizer {name!r} not found in {d}. Train it first: `nanochat-run "
                                f"stage=tokenizer data={name}` (or set data.tokenizer to an existing name)")
    return Tokenizer.load(d)


def get_token_bytes(base_dir: str | Path, name: str, device: Any = "cpu"):
    """int32 tensor: byte length of each token id (0 for specials), for bits-per-byte."""
    import numpy as np
    import torch
    path = tokenizer_dir(base_dir, name) / _BYTES_FILE
    # an artifact without the file (or none: get_tokenizer says how to train one) counts them from its ranks
    arr = np.load(path) if path.is_file() else np.asarray(get_tokenizer(base_dir, name).token_byte_lengths())
    return torch.from_numpy(arr.astype(np.int32)).to(device)


def tokenizer_vocab_size(base_dir: str | Path, name: str) -> int | None:
    """Vocab size from the artifact's meta.json, or None if absent. No torch/tiktoken import."""
    path = tokenizer_dir(base_dir, name) / _META_FILE
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["vocab_size"])
    except (FileNotFoundError, KeyError, ValueError):
        return None
