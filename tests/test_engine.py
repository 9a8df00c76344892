"""The inference engine against a real tiny GPT and a real (small, freshly trained) tokenizer.

- cached batched decoding == naive full-recompute greedy decoding (seed and modern architectures)
- sampling is reproducible from the seed, rows diverge at temperature > 0
- the calculator tool: a tiny model trained to call it gets the result forced in with mask 0
"""
import collections
import json
import textwrap

import pytest
import torch

from nanochat.engine import Engine, sample_next_token
from nanochat.execution import use_calculator
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import train_tokenizer


def _tool_conversation(question, expr, output, answer):
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": [{"type": "python", "text": expr},
                                          {"type": "python_output", "text": output},
                                          {"type": "text", "text": f" so #### {answer}"}]},
    ]}


# The training data deliberately carries WRONG tool outputs: whatever the engine forces in at
# inference must come from the calculator, not from the model's memory.
TOOL_CONVERSATIONS = [
    _tool_conversation("What is 12*7?", "12*7", "99", "99"),
    _tool_conversation("Count the r in strawberry", "'strawberry'.count('r')", "7", "7"),
    _tool_conversation("Open the file f", "open('f')", "42", "42"),  # refused by the calculator
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [collections.__doc__, textwrap.__doc__, json.__doc__, torch.nn.Module.__doc__] * 3
    texts += ["What is 12*7? 12*7 = 84, so the answer is #### 84. Count the r in strawberry."] * 5
    return train_tokenizer(iter(texts), vocab_size=320)


def random_gpt(tokenizer, seed=0, **toggles):
    """A tiny GPT whose weights are ALL random (the standard init zeroes the output projections,
    which would make attention, and so the KV cache, invisible in the outputs)."""
    cfg = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=4, n_kv_head=2,
                    n_embd=64, **toggles)
    model = build_model(cfg, "cpu", seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if p.ndim == 2 and p.shape[0] >= cfg.vocab_size else 0.15
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def naive_greedy(model, tokenizer, prompt, max_tokens):
    """Reference: recompute the full forward every step (no cache), greedy, with the tool rule
    applied by re-reading the generated text. Returns (tokens, masks) like Engine.generate_batch."""
    end_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    py_start, py_end = tokenizer.encode_special("<|python_start|>"), tokenizer.encode_special("<|python_end|>")
    ids, masks, forced = list(prompt), [0] * len(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            if forced:
                tok, m = forced.pop(0), 0
            else:
                tok, m = int(model(torch.tensor([ids]))[0, -1].argmax()), 1
            if tok in end_ids:
                break
            ids.append(tok)
            masks.append(m)
            if tok == py_end and py_start in ids[len(prompt):]:
                gen = ids[len(prompt):]
                start = len(gen) - 1 - gen[::-1].index(py_start)
                result = use_calculator(tokenizer.decode(gen[start + 1:-1]))
                if result is not None:
                    forced = [tokenizer.encode_special("<|output_start|>"), *tokenizer.encode(result),
                              tokenizer.encode_special("<|output_end|>")]
    return ids, masks


PROMPTS = ["hello world", "What is 12*7?", "The quick brown fox"]


@pytest.mark.parametrize("toggles", [
    {},  # seed architecture
    dict(window_pattern="SL", short_window=5, value_embeds=True, smear=True, resid_lambdas=True,
         x0_lambdas=True, backout=True, qk_scale=1.2, pad_vocab_to=64),  # modern toggles
], ids=["seed", "modern"])
def test_cached_greedy_equals_naive_recompute(tokenizer, toggles):
    model = random_gpt(tokenizer, seed=1, **toggles)
    engine = Engine(model, tokenizer)
    for text in PROMPTS:
        prompt = tokenizer.encode(text, prepend="<|bos|>")
        ref_ids, ref_masks = naive_greedy(model, tokenizer, prompt, max_tokens=30)
        got_ids, got_masks = engine.generate_batch(prompt, num_samples=3, max_tokens=30, temperature=0.0)
        assert len(ref_ids) > len(prompt)
        for ids, masks in zip(got_ids, got_masks):
            assert ids == ref_ids, text
            assert masks == ref_masks, text


def test_streaming_columns_match_batch(tokenizer):
    model = random_gpt(tokenizer, seed=2)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("streaming", prepend="<|bos|>")
    steps = list(engine.generate(prompt, num_samples=2, max_tokens=12, temperature=0.8, seed=5))
    assert 1 <= len(steps) <= 12
    assert all(len(col) == 2 and len(m) == 2 for col, m in steps)
    seqs, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.8, seed=5)
    end_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    for r in range(2):
        streamed = []
        for col, _ in steps:
            if col[r] in end_ids:
                break
            streamed.append(col[r])
        assert seqs[r] == prompt + streamed


def test_sampling_is_reproducible_and_rows_diverge(tokenizer):
    model = random_gpt(tokenizer, seed=3)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("Once upon a time", prepend="<|bos|>")
    kw = dict(num_samples=4, max_tokens=20, temperature=1.0)
    a, _ = engine.generate_batch(prompt, seed=7, **kw)
    b, _ = engine.generate_batch(prompt, seed=7, **kw)
    c, _ = engine.generate_batch(prompt, seed=8, **kw)
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) > 1, "samples of one prompt should differ at temperature 1"
    greedy, _ = engine.generate_batch(prompt, seed=7, num_samples=4, max_tokens=20, temperature=0.0)
    assert len({tuple(x) for x in greedy}) == 1, "greedy rows must agree"
    top1, _ = engine.generate_batch(prompt, seed=9, num_samples=2, max_tokens=20, temperature=1.0, top_k=1)
    assert top1 == greedy[:2], "top_k=1 sampling is greedy decoding"


def test_sample_next_token_top_k_restricts_support():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(2000, 1)
    rng = torch.Generator().manual_seed(0)
    out = sample_next_token(logits, rng, temperature=2.0, top_k=2)
    assert set(out.tolist()) == {1, 2}
    out = sample_next_token(logits, rng, temperature=1.0)
    assert set(out.tolist()) >= {1, 2, 4}
    assert sample_next_token(logits[:1], rng, temperature=0.0).tolist() == [1]
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, rng, temperature=-1.0)


def test_max_tokens_and_bad_input(tokenizer):
    model = random_gpt(tokenizer, seed=4)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("abc", prepend="<|bos|>")
    steps = list(engine.generate(prompt, num_samples=1, max_tokens=3, temperature=0.0))
    assert len(steps) <= 3
    with pytest.raises(ValueError, match="token ids"):
        list(engine.generate([], max_tokens=3))
    with pytest.raises(ValueError, match="num_samples"):
        list(engine.generate(prompt, num_samples=0, max_tokens=3))
    with pytest.raises(ValueError, match="max_tokens"):
        list(engine.generate(prompt, max_tokens=10_000))


@pytest.fixture(scope="module")
def tool_model(tokenizer):
    """A tiny GPT trained (for real, a few hundred Adam steps) to answer with calculator calls."""
    rows = [tokenizer.render_conversation(c)[0] for c in TOOL_CONVERSATIONS]
    T = max(len(r) for r in rows) - 1
    x = torch.tensor([r[:-1] + [0] * (T - len(r) + 1) for r in rows])
    y = torch.tensor([r[1:] + [-1] * (T - len(r) + 1) for r in rows])  # -1: no loss on padding
    cfg = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                    n_embd=64)
    model = build_model(cfg, "cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(400):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    return model.eval()


def _completion(engine, tokenizer, conversation, extra=(), max_tokens=45):
    prompt = tokenizer.render_for_completion(conversation) + list(extra)
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=max_tokens, temperature=0.0)
    assert seqs[0] == seqs[1] and masks[0] == masks[1]
    return seqs[0][len(prompt):], masks[0][len(prompt):]


@pytest.mark.parametrize("which,expr,result", [(0, "12*7", "84"), (1, "'strawberry'.count('r')", "3")])
def test_calculator_output_is_forced_with_mask_zero(tokenizer, tool_model, which, expr, result):
    engine = Engine(tool_model, tokenizer)
    sp = tokenizer.encode_special
    out, m = _completion(engine, tokenizer, TOOL_CONVERSATIONS[which])
    call = [sp("<|python_start|>"), *tokenizer.encode(expr), sp("<|python_end|>")]
    assert out[:len(call)] == call, f"precondition: the trained model should call the tool, got {tokenizer.decode(out)!r}"
    assert m[:len(call)] == [1] * len(call), "the tool call itself is sampled by the model"
    forced = [sp("<|output_start|>"), *tokenizer.encode(result), sp("<|output_end|>")]
    assert out[len(call):len(call) + len(forced)] == forced, tokenizer.decode(out)
    assert m[len(call):len(call) + len(forced)] == [0] * len(forced)
    # every mask-0 token of the completion is the forced tool output, nothing else
    assert [t for t, k in zip(out, m) if k == 0] == forced
    # the memorized (wrong) tool output of the training data never got in
    wrong = TOOL_CONVERSATIONS[which]["messages"][1]["content"][1]["text"]
    assert wrong not in tokenizer.decode(out[len(call):len(call) + len(forced)])


def test_refused_expression_forces_nothing(tokenizer, tool_model):
    engine = Engine(tool_model, tokenizer)
    sp = tokenizer.encode_special
    out, m = _completion(engine, tokenizer, TOOL_CONVERSATIONS[2])
    call = [sp("<|python_start|>"), *tokenizer.encode("open('f')"), sp("<|python_end|>")]
    assert out[:len(call)] == call, f"precondition: the trained model should call the tool, got {tokenizer.decode(out)!r}"
    assert all(k == 1 for k in m), "the calculator refuses open(...): nothing may be forced"


def test_prompt_ending_inside_a_tool_call(tokenizer, tool_model):
    """Continuing a cut-off answer: the open <|python_start|> in the prompt is picked up."""
    engine = Engine(tool_model, tokenizer)
    sp = tokenizer.encode_special
    out, m = _completion(engine, tokenizer, TOOL_CONVERSATIONS[0],
                         extra=[sp("<|python_start|>"), *tokenizer.encode("12*7")], max_tokens=10)
    forced = [sp("<|output_start|>"), *tokenizer.encode("84"), sp("<|output_end|>")]
    assert out[0] == sp("<|python_end|>")
    assert out[1:1 + len(forced)] == forced and m[1:1 + len(forced)] == [0] * len(forced)
