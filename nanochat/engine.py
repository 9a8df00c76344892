"""Batched generation on the model's KV cache, with calculator tool use.

One prompt, N samples: the prompt is prefilled once (batch 1), its cache rows are copied
into an N-row cache, and the N rows then decode one token per step together (a list of
prompts, e.g. lm-eval's requests, gets a row each the same way). Each step yields a column
of N tokens and N masks:

    mask 1  the model sampled this token
    mask 0  the engine forced it: a calculator result (<|output_start|>…<|output_end|>), or
            padding for a row that already finished (its terminal token repeated)

RL trains only on mask-1 tokens; chat UIs print everything.

Tool use: when a row emits <|python_start|> expr <|python_end|>, the engine decodes `expr`,
evaluates it with `use_calculator` (arithmetic and `'str'.count('x')` only) and queues
<|output_start|> result <|output_end|> as forced tokens for that row; the model then
continues after them as if it had read the tool's answer. A row stops at
<|assistant_end|> or <|bos|>; the whole generation stops when all rows stopped or after
`max_tokens` steps (forced tokens count as steps).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from nanochat.execution import use_calculator
from nanochat.gpt import KVCache


GREEDY_BELOW = 1e-5   # a lower temperature is greedy (as vLLM): logits / temperature would overflow to inf


def sample_next_token(logits: torch.Tensor, rng: torch.Generator, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """(B, V) logits → (B,) token ids. temperature 0 is greedy; top_k keeps the k largest logits;
    top_p (nucleus) keeps the smallest set of tokens whose probability reaches p."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    keep_k = top_k is not None and 0 < top_k < logits.size(-1)
    vals, idx = torch.topk(logits, top_k, dim=-1) if keep_k else (logits, None)
    probs = F.softmax(vals.float() / temperature, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False   # a top_p below float32's smallest number compares as 0
        probs = probs.masked_fill(drop, 0.0)
        idx = order if idx is None else idx.gather(1, order)
    choice = torch.multinomial(probs, 1, generator=rng)
    return (choice if idx is None else idx.gather(1, choice)).squeeze(1)


def _prompts(tokens, num_samples: int) -> list[list[int]]:
    """The prompt each row continues: a list of prompts as given (num_samples 1), or one prompt
    num_samples times; ValueError for anything else."""
    many = isinstance(tokens, (list, tuple)) and bool(tokens) and all(isinstance(t, (list, tuple)) for t in tokens)
    if num_samples < 1 or (many and num_samples != 1):
        raise ValueError(f"Engine.generate(num_samples={num_samples}): must be >= 1 (1 for a list of prompts)")
    one = list(tokens) if isinstance(tokens, (list, tuple)) else []
    prompts = [list(p) for p in tokens] if many else [one] * num_samples
    if not all(p and all(isinstance(t, int) for t in p) for p in prompts):
        raise ValueError("Engine.generate(tokens=...): give a non-empty list of token ids (or of such lists)")
    return prompts


@dataclass
class RowState:
    """Per-sequence decoding state: forced tokens waiting, whether we are inside a tool call.

    Shared by `Engine.generate` and the serving scheduler (nanochat/serve/scheduler.py): both
    feed each sampled token through `Engine.advance`, which applies the calculator tool."""
    forced: deque[int] = field(default_factory=deque)
    python_tokens: Optional[list[int]] = None   # the open tool call's tokens so far; None outside a call
    done: bool = False
    end_token: Optional[int] = None


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end, self.python_start, self.python_end, self.output_start, self.output_end = (
            tokenizer.encode_special(f"<|{name}|>")
            for name in ("assistant_end", "python_start", "python_end", "output_start", "output_end"))

    def new_row(self, prompt: list[int]) -> RowState:
        """Decoding state for a sequence that continues `prompt`: a prompt may end inside an open tool
        call (continuing a cut-off answer), which the row picks up."""
        for i in range(len(prompt) - 1, -1, -1):
            if prompt[i] in (self.python_end, self.assistant_end, self.bos):
                break
            if prompt[i] == self.python_start:
                return RowState(python_tokens=list(prompt[i + 1:]))
        return RowState()

    def advance(self, row: RowState, sampled: int) -> tuple[int, int]:
        """The token this row emits now and its mask: a forced tool-output token (mask 0) if one is
        queued, else `sampled` (mask 1). Updates the row's tool state and `done`."""
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        if token in (self.assistant_end, self.bos):
            row.done, row.end_token = True, token
        elif token == self.python_start:
            row.python_tokens = []
        elif token == self.python_end and row.python_tokens is not None:
            result = use_calculator(self.tokenizer.decode(row.python_tokens))   # None: the calculator refuses it
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.python_tokens = None
        elif row.python_tokens is not None:
            row.python_tokens.append(token)
        return token, mask

    @torch.inference_mode()
    def generate(self, tokens: list[int] | list[list[int]], num_samples: int = 1, max_tokens: Optional[int] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 seed: int = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, token_masks), one entry per row, once per step.

        tokens: one prompt (token ids; `num_samples` rows continue it) or a list of prompts (one row each,
        num_samples 1: rows of different lengths decode together, e.g. a batch of lm-eval requests).
        max_tokens None = until the model's sequence_len is full (for the longest prompt).
        """
        prompts = _prompts(tokens, num_samples)
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = self.model.config.sequence_len - longest
            if max_tokens < 1:
                raise ValueError(f"prompt of {longest} tokens fills the model's sequence_len="
                                 f"{self.model.config.sequence_len}; pass max_tokens explicitly")
        if max_tokens < 1:
            return
        if longest + max_tokens > self.model.rotary_len:
            raise ValueError(f"prompt ({longest}) + max_tokens ({max_tokens}) exceeds the model's "
                             f"position limit {self.model.rotary_len}; lower max_tokens")
        device = self.model.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)

        # prefill each distinct prompt once, then copy its cache rows to every row that continues it
        cache = KVCache.for_model(self.model, batch_size=len(prompts), max_len=longest + max_tokens)
        keys = [tuple(p) for p in prompts]
        last: dict[tuple, torch.Tensor] = {}   # each distinct prompt's last logits
        for p in dict.fromkeys(keys):
            prefill = KVCache.for_model(self.model, batch_size=1, max_len=len(p))
            last[p] = self.model(torch.tensor([p], dtype=torch.long, device=device), kv_cache=prefill)[:, -1, :]
            cache.copy_rows_from(prefill, src_row=0, dst_rows=[r for r, q in enumerate(keys) if q == p])
        logits = torch.cat([last[p] for p in keys])

        rows = [self.new_row(p) for p in prompts]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
            # a finished row repeats its terminal token (mask 0)
            steps = [(row.end_token, 0) if row.done else self.advance(row, sampled[i]) for i, row in enumerate(rows)]
            column, masks = [t for t, _ in steps], [m for _, m in steps]
            yield column, masks
            if all(row.done for row in rows) or step == max_tokens - 1:
                return
            logits = self.model(torch.tensor(column, device=device).unsqueeze(1), kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: list[int] | list[list[int]], num_samples: int = 1, stop: Sequence[str] = (),
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Run `generate` to the end. Returns (sequences, masks) per row: each sequence is the
        prompt followed by the generated tokens, without the terminal <|assistant_end|>/<|bos|>;
        masks mark prompt tokens 0, sampled tokens 1, forced tool-output tokens 0.

        stop: strings that also end a row once its generated text contains one (lm-eval's `until`; the
        sequence keeps the token that completed it, the caller cuts the text)."""
        prompts = _prompts(tokens, num_samples)
        results = [list(p) for p in prompts]
        masks = [[0] * len(p) for p in prompts]
        done = [False] * len(prompts)
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i] or token in (self.assistant_end, self.bos):
                    done[i] = True
                    continue
                results[i].append(token)
                masks[i].append(mask)
                if stop:   # a stop string ends within the last tokens: decode only those
                    tail = self.tokenizer.decode(results[i][max(len(prompts[i]), len(results[i]) - 32):])
                    done[i] = any(x and x in tail for x in stop)
            if all(done):
                break
        return results, masks
