"""Tokenizer: real rustbpe training, tiktoken inference, chat rendering rules, artifact io."""
from __future__ import annotations

import json
import re

import pytest
import pyarrow.parquet as pq

from nanochat.common import shared_data_dir
from nanochat.tokenizer import (SPECIAL_TOKENS, Tokenizer, get_token_bytes, get_tokenizer, tokenizer_vocab_size,
                                train_tokenizer)

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data (offline public datasets) is absent")


def _sample_text() -> list[str]:
    """A small mixed corpus: prose, code, numbers, unicode (no shared data needed)."""
    prose = ("The quick brown fox jumps over the lazy dog. It's a sentence we've all seen; "
             "they'll keep using it because it's got every letter. ")
    code = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2))\n"
    numbers = " ".join(str(n) for n in range(1000, 1400)) + " 3.14159 2718281828"
    uni = "naïve café — 東京 Straße 🙂 ünïcödé "
    return [prose * 20, code * 30, numbers, uni * 20] * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(iter(_sample_text()), 512)


def test_special_tokens_exact(tok):
    assert SPECIAL_TOKENS == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                              "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                              "<|output_start|>", "<|output_end|>"]
    assert tok.get_vocab_size() == 512
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(512 - 9, 512))  # specials sit after the 503 mergeable tokens
    assert tok.get_bos_token_id() == ids[0]
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|pad|>")


def test_encode_decode_roundtrip_and_batch(tok):
    texts = _sample_text()[:4] + ["", "x", "  leading spaces\n\n\ttabs", "<|bos|> is plain text here"]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    # special-token strings inside text are ordinary text, never the special id
    assert tok.get_bos_token_id() not in tok.encode("<|bos|>")
    batch = tok.encode(texts, num_threads=4)
    assert batch == [tok.encode(t) for t in texts]
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert tok.encode("hi", prepend="<|bos|>", append=end) == [bos] + tok.encode("hi") + [end]
    assert all(ids[0] == bos for ids in tok.encode(["a", "b c"], prepend=bos))
    assert tok.encode(["a"], append="<|assistant_end|>")[0][-1] == end
    with pytest.raises(TypeError):
        tok.encode(123)


def test_training_learns_merges_and_compresses(tok):
    text = _sample_text()[0]
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2  # the repeated prose must compress well
    assert tok.meta["train_chars"] == sum(map(len, _sample_text()))
    assert tok.meta["chars_per_sec"] > 0


def test_numbers_split_in_groups_of_at_most_two_digits():
    # a corpus of only numbers: a GPT-2 style pattern would learn 3-4 digit tokens here
    corpus = [" ".join(str(n) for n in range(100000, 100000 + 3000))] * 3
    t = train_tokenizer(iter(corpus), 600)
    digit_tokens = [b for b in t.mergeable_ranks if b.isdigit()]
    assert max(len(b) for b in digit_tokens) == 2
    assert not any(re.search(rb"\d{3}", b) for b in t.mergeable_ranks)


def test_vocab_too_small_and_empty_corpus():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(iter(["abc"]), 200)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(iter([]), 300)


def test_save_load_token_bytes(tok, tmp_path):
    d = tmp_path / "tokenizer" / "mini"
    tok.save(d, extra_meta={"data": "unit"})
    meta = json.loads((d / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["data"] == "unit"
    assert tokenizer_vocab_size(tmp_path, "mini") == 512
    assert tokenizer_vocab_size(tmp_path, "absent") is None
    t2 = get_tokenizer(tmp_path, "mini")
    for text in _sample_text()[:4]:
        assert t2.encode(text) == tok.encode(text)
    assert t2.special_tokens == tok.special_tokens
    # the bits-per-byte table: summing token byte lengths gives back the UTF-8 size exactly
    tb = get_token_bytes(tmp_path, "mini")
    assert tb.dtype.is_floating_point is False and tb.shape == (512,)
    assert tb[-9:].tolist() == [0] * 9
    for text in _sample_text()[:4]:
        ids = tok.encode(text)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_missing_tokenizer_error_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nanochat-run stage=tokenizer data=fineweb_edu"):
        get_tokenizer(tmp_path, "fineweb_edu")
    with pytest.raises(FileNotFoundError, match="stage=tokenizer"):
        get_token_bytes(tmp_path, "fineweb_edu")


# ---------------------------------------------------------------------- chat rendering

def _spans(tok, ids, mask):
    """Decode runs of equal mask value, for readable assertions."""
    out, cur, m0 = [], [], None
    for i, m in zip(ids, mask):
        if m0 is not None and m != m0:
            out.append((m0, tok.decode(cur)))
            cur = []
        cur.append(i)
        m0 = m
    out.append((m0, tok.decode(cur)))
    return out


def test_render_basic_masks(tok):
    conv = {"messages": [{"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "Ciao"}]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask)
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    assert _spans(tok, ids, mask) == [
        (0, "<|bos|><|user_start|>Hi there<|user_end|><|assistant_start|>"),
        (1, "Hello!<|assistant_end|>"),
        (0, "<|user_start|>Bye<|user_end|><|assistant_start|>"),
        (1, "Ciao<|assistant_end|>"),
    ]


def test_render_system_merged_into_first_user(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Yo"}]}
    ids, mask = tok.render_conversation(conv)
    assert tok.decode(ids).startswith("<|bos|><|user_start|>Be brief.\n\nHi<|user_end|>")
    same = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Yo"}]}
    assert (ids, mask) == tok.render_conversation(same)


def test_render_tool_parts(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is 12*3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*3"},
            {"type": "python_output", "text": "36"},
            {"type": "text", "text": "It is 36."}]}]}
    ids, mask = tok.render_conversation(conv)
    assert _spans(tok, ids, mask) == [
        (0, "<|bos|><|user_start|>What is 12*3?<|user_end|><|assistant_start|>"),
        (1, "Let me compute. <|python_start|>12*3<|python_end|>"),   # tool call: trained on
        (0, "<|output_start|>36<|output_end|>"),                     # tool output: masked
        (1, "It is 36.<|assistant_end|>"),
    ]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "x"}], "role 'assistant' but 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "c"}], "alternate"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([], "no messages"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "unknown type 'image'"),
    ([{"role": "user", "content": ["not", "a", "string"]}], "must be a string"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_render_errors(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 200}]}
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=10**6)
    ids, mask = tok.render_conversation(conv, max_tokens=37)
    assert len(ids) == len(mask) == 37
    assert (ids, mask) == (full_ids[:37], full_mask[:37])


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    prompt = tok.render_for_completion(conv)
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    full, _ = tok.render_conversation(conv)
    assert full[:len(prompt)] == prompt  # the prompt is exactly the rendered prefix
    assert tok.decode(prompt) == "<|bos|><|user_start|>2+2?<|user_end|><|assistant_start|>"
    assert len(conv["messages"]) == 2  # input not mutated
    with pytest.raises(ValueError, match="last message"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


# ---------------------------------------------------------------------- real public text

def _parquet_texts(path, n_chars):
    out, total = [], 0
    for t in pq.read_table(path, columns=["text"]).column(0).to_pylist():
        out.append(t)
        total += len(t)
        if total >= n_chars:
            break
    return out


@needs_shared
def test_train_on_one_source_measure_on_another():
    """A tokenizer trained on C4 compresses held-out C4 better than one trained on Shakespeare, and vice versa."""
    pre = SHARED / "pretrain"
    c4 = _parquet_texts(pre / "parquet" / "shard_00000.parquet", 700_000)
    shakes = (pre / "tinyshakespeare.txt").read_text(encoding="utf-8")
    c4_train, c4_test = c4[:-40], "\n".join(c4[-40:])
    sh_train, sh_test = shakes[:900_000], shakes[900_000:1_000_000]
    t_c4 = train_tokenizer(iter(c4_train), 2048)
    t_sh = train_tokenizer(iter([sh_train[i:i + 10_000] for i in range(0, len(sh_train), 10_000)]), 2048)

    def bpt(t, text):
        return len(text.encode()) / len(t.encode(text))

    assert bpt(t_c4, c4_test) > bpt(t_sh, c4_test)
    assert bpt(t_sh, sh_test) > bpt(t_c4, sh_test)
    cc = "\n".join(_parquet_texts(pre / "parquet" / "shard_00001.parquet", 100_000))
    for t in (t_c4, t_sh):
        assert t.decode(t.encode(cc)) == cc  # byte-level: any text round-trips, even noisy web pages
        assert bpt(t, cc) > 1.5


# ---------------------------------------------------------------------- the stage

def test_tokenizer_stage_run(tmp_path, monkeypatch):
    from nanochat.config import config_from_dict
    from nanochat.stages.tokenizer import run
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    cfg = config_from_dict({
        "stage": {"name": "tokenizer", "vocab_size": 600,
                  "max_chars": 150_000, "doc_cap": 10_000, "eval_chars": 20_000},
        "data": {"name": "demo", "source": "demo", "tokenizer": "unit_demo", "demo_chars": 200_000},
        "paths": {"base_dir": str(tmp_path / "base")},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = run(cfg, run_dir)
    assert result["vocab_size"] == 600 and result["train_chars"] == 150_000
    assert result["chars_per_sec"] > 0 and result["train_seconds"] > 0
    assert tokenizer_vocab_size(tmp_path / "base", "unit_demo") == 600
    tok = get_tokenizer(tmp_path / "base", "unit_demo")
    meta = json.loads((tmp_path / "base" / "tokenizer" / "unit_demo" / "meta.json").read_text())
    assert meta["train_chars"] == 150_000 and meta["data"] == "demo"
    comp = result["compression"]
    assert {"demo/train", "demo/val"} <= set(comp)
    for label, row in comp.items():
        assert row["bytes_per_token"] == round(row["bytes"] / row["tokens"], 4)
        assert row["bytes_per_token"] > 1.0, label
    if SHARED is not None:
        assert {"c4", "common_crawl", "shakespeare"} <= set(comp)
    for ref in ("gpt2", "gpt4"):  # measured when tiktoken has them cached, else a note says why not
        assert all(f"{ref}_bytes_per_token" in row for row in comp.values()) or "skipped" in result["notes"][ref]
    assert json.loads((run_dir / "tokenizer_eval.json").read_text())["vocab_size"] == 600
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
