"""Our tokenizer as a Hugging Face `tokenizer.json` + chat template, and back.

tiktoken's BPE (ours) and the `tokenizers` library's BPE agree when:
- the byte → unicode map is GPT-2's (`ByteLevel` pre-tokenizer, regex off) after a `Split` with our
  pattern (Oniguruma runs it, possessive quantifiers included);
- merges are ordered by the rank of the token they make, each found by running tiktoken's own merge
  loop on the token with only lower ranks allowed (it must end in exactly two parts);
- `ignore_merges=True`: tiktoken takes a whole pre-token that is in the vocab as one token before
  merging, so must the HF model.
Special tokens are added after the mergeable ranks, in our order, so their ids are ours. Like every
nanochat document, `tokenizer(text)` starts with <|bos|> (`add_special_tokens=False` leaves it out), so
lm-eval's `--model hf` scores the same ids as our own model class (nanochat/harness.py).

The chat template renders exactly what `Tokenizer.render_conversation` tokenizes (bos, a leading system
message merged into the first user turn with a blank line, <|python_start|>…<|python_end|> tool calls and
<|output_start|>…<|output_end|> tool outputs from list-of-parts assistant content), and
`add_generation_prompt` primes <|assistant_start|> as `render_for_completion` does. The text between two
special tokens is tokenized as one piece; our renderer tokenizes each content part on its own, so two
adjacent text parts of one assistant message may tokenize differently (merge them first).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

BOS, EOS = "<|bos|>", "<|assistant_end|>"   # padding is <|bos|> too (as config.json's pad_token_id)

CHAT_TEMPLATE = (
    "{%- set ns = namespace(sys='') -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] == 'system' -%}"
    "{%- set ns.sys = m['content'] + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}"
    "<|user_start|>{{ ns.sys + m['content'] }}<|user_end|>"
    "{%- set ns.sys = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "<|assistant_start|>"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}"
    "{%- elif p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>"
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>"
    "{%- else -%}{{ raise_exception('unknown content part type ' + p['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- else -%}{{ raise_exception('role ' + m['role'] + ': use system (first), user, assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable unicode map (what the ByteLevel pre-tokenizer uses)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode as gpt2_map
    return gpt2_map()


def _as_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _split_in_two(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token` using only ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """The BPE merge list (in GPT-2 unicode) that rebuilds every multi-byte token, in rank order."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split_in_two(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens")
        merges.append((_as_unicode(parts[0]), _as_unicode(parts[1])))
    return merges


def to_hf_tokenizer(tok: Tokenizer):
    """A transformers `PreTrainedTokenizerFast` whose ids equal ours (text and special tokens)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    ranks = tok.mergeable_ranks
    vocab = {_as_unicode(t): r for t, r in ranks.items()}
    if len(vocab) != len(ranks) or sorted(vocab.values()) != list(range(len(ranks))):
        raise ValueError("tokenizer ranks are not a dense 0..N-1 range of distinct tokens")
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges_from_ranks(ranks), ignore_merges=True,
                                  fuse_unk=False, byte_fallback=False))
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    for s in SPECIAL_TOKENS:
        if raw.token_to_id(s) != tok.special_tokens[s]:
            raise ValueError(f"special token {s} got id {raw.token_to_id(s)}, ours is {tok.special_tokens[s]}")
    # every nanochat document starts with <|bos|>: tokenizer(text) adds it (add_special_tokens=False does not)
    bos = tok.special_tokens[BOS]
    raw.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=BOS,
                                 add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
                                 model_max_length=None)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def from_hf_dir(hf_dir: Path) -> Tokenizer:
    """Our Tokenizer from an exported dir's tokenizer.json (ids and pattern must be ours)."""
    import json
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (hf_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{hf_dir}: missing tokenizer files {missing}; export again or copy them in")
    spec: dict[str, Any] = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{hf_dir}/tokenizer.json: model.type={model.get('type')!r}, expected BPE")
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(inverse[ch] for ch in s): int(i) for s, i in model["vocab"].items()}
    pattern = next((p["pattern"].get("Regex") for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", [])
                    if p.get("type") == "Split"), None)
    if pattern is None:
        raise ValueError(f"{hf_dir}/tokenizer.json: no Split pre-tokenizer with a regex (not one of our exports)")
    tok = Tokenizer(ranks, pattern=pattern)
    added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    if any(added.get(s) != tok.special_tokens[s] for s in SPECIAL_TOKENS):
        raise ValueError(f"{hf_dir}/tokenizer.json: special tokens {added} differ from ours {tok.special_tokens}")
    return tok
