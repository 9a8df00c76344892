"""Bits per byte on a real nanochat GPT and tokenizer; and the distributed path of the base evals
(bits per byte and CORE's strided examples) under 2 real gloo processes."""
import gzip
import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import shared_data_dir
from nanochat.loss_eval import evaluate_bpb

SHARED = shared_data_dir()
B, T = 2, 32


def _c4_docs(max_chars):
    docs, n = [], 0
    with gzip.open(SHARED / "pretrain" / "c4-sample.00000-of-00001.json.gz", "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            n += len(docs[-1])
            if n > max_chars:
                break
    return docs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and stay fast when other jobs share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    if SHARED is None:
        pytest.skip("../shared/data is absent: no text to train the test tokenizer on")
    from nanochat.tokenizer import train_tokenizer
    return train_tokenizer(iter(_c4_docs(300_000)), 1024)


def tiny_gpt(vocab_size, seq_len=T, seed=0):
    from nanochat.gpt import GPTConfig, build_model
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(cfg, "cpu", seed)
    g = torch.Generator().manual_seed(seed)  # non-zero output projections: losses vary per token
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def make_batches(tokenizer, n_batches):
    """(x, y) pairs from a BOS-delimited token stream of held-out C4 docs: targets include BOS
    (a special token, 0 bytes) at document boundaries."""
    bos = tokenizer.get_bos_token_id()
    docs = [line for d in _c4_docs(2_000_000)[-60:] for line in d.splitlines() if line.strip()]  # short docs
    stream = [t for ids in tokenizer.encode(docs, prepend=bos) for t in ids]
    need = n_batches * B * T + 1
    assert len(stream) >= need
    out = []
    for i in range(n_batches):
        chunk = torch.tensor(stream[i * B * T: (i + 1) * B * T + 1])
        out.append((chunk[:-1].view(B, T), chunk[1:].view(B, T)))
    return out


def token_bytes_of(tokenizer):
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int32)


def reference_bpb(model, batches, token_bytes):
    """Independent path: full logits → log-softmax → pick the target, skip 0-byte/ignored targets."""
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logp = F.log_softmax(model(x).double(), dim=-1).reshape(-1, model.config.vocab_size)
            y = y.reshape(-1)
            keep = [i for i, tgt in enumerate(y.tolist()) if tgt >= 0 and int(token_bytes[tgt]) > 0]
            nats -= float(logp[keep, y[keep]].sum())
            nbytes += int(token_bytes[y[keep]].sum())
    return nats / (math.log(2) * nbytes)


def test_bpb_matches_an_independent_computation(tokenizer):
    model = tiny_gpt(tokenizer.get_vocab_size())
    batches = make_batches(tokenizer, 3)
    tb = token_bytes_of(tokenizer)
    assert any((y == tokenizer.get_bos_token_id()).any() for _, y in batches)  # specials are present
    got = evaluate_bpb(model, iter(batches), 3, tb)
    assert got == pytest.approx(reference_bpb(model, batches, tb), rel=1e-5)
    assert 1.0 < got < 20.0


def test_uniform_model_costs_log2_vocab_per_token(tokenizer):
    """Zero lm_head → logits 0 → every token costs ln V nats: bpb = log2(V)·tokens/bytes exactly."""
    model = tiny_gpt(tokenizer.get_vocab_size())
    with torch.no_grad():
        model.lm_head.weight.zero_()
    batches = make_batches(tokenizer, 2)
    tb = token_bytes_of(tokenizer)
    ys = torch.cat([y.reshape(-1) for _, y in batches])
    counted = ys[tb[ys] > 0]
    expected = math.log2(tokenizer.get_vocab_size()) * len(counted) / int(tb[counted].sum())
    assert evaluate_bpb(model, iter(batches), 2, tb) == pytest.approx(expected, rel=1e-6)


def test_special_and_ignored_targets_do_not_count(tokenizer):
    model = tiny_gpt(tokenizer.get_vocab_size())
    tb = token_bytes_of(tokenizer)
    (x, y), = make_batches(tokenizer, 1)
    bos = tokenizer.get_bos_token_id()
    base = evaluate_bpb(model, [(x, y)], 1, tb)
    ignored = torch.where(y == bos, torch.full_like(y, -1), y)
    other_special = torch.where(y == bos, torch.full_like(y, tokenizer.encode_special("<|user_end|>")), y)
    assert evaluate_bpb(model, [(x, ignored)], 1, tb) == pytest.approx(base, rel=1e-9)
    assert evaluate_bpb(model, [(x, other_special)], 1, tb) == pytest.approx(base, rel=1e-9)
    # ...while changing an ordinary target does change it
    changed = y.clone()
    pos = (y != bos).nonzero()[0]
    changed[pos[0], pos[1]] = (y[pos[0], pos[1]] + 1) % 256
    assert evaluate_bpb(model, [(x, changed)], 1, tb) != pytest.approx(base, rel=1e-9)


def test_steps_bound_the_batches_read(tokenizer):
    model = tiny_gpt(tokenizer.get_vocab_size())
    tb = token_bytes_of(tokenizer)
    batches = make_batches(tokenizer, 3)
    pulled = []

    def gen():
        for b in batches:
            pulled.append(1)
            yield b
    assert evaluate_bpb(model, gen(), 2, tb) == pytest.approx(reference_bpb(model, batches[:2], tb), rel=1e-5)
    assert len(pulled) == 2
    with pytest.raises(ValueError, match="ran out after 3 of 5 steps"):
        evaluate_bpb(model, iter(batches), 5, tb)
    with pytest.raises(ValueError, match="steps=0"):
        evaluate_bpb(model, iter(batches), 0, tb)
    x, y = batches[0]
    with pytest.raises(ValueError, match="0 bytes"):
        evaluate_bpb(model, [(x, torch.full_like(y, -1))], 1, tb)


# ----------------------------------------------------------------------------- 2 real processes

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, workdir):
    import torch.distributed as dist
    from nanochat.core_eval import evaluate_task, load_core_tasks, load_task_examples
    from nanochat.tokenizer import Tokenizer
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok = Tokenizer.load(os.path.join(workdir, "tok"))
        model = tiny_gpt(tok.get_vocab_size())
        batches = torch.load(os.path.join(workdir, "batches.pt"))
        mine = batches[rank::world]  # each rank its own share, as the val loader does
        bpb = evaluate_bpb(model, iter(mine), len(mine), token_bytes_of(tok))
        spec = {s.label: s for s in load_core_tasks(os.path.join(workdir, "bundle"))}["hellaswag_zeroshot"]
        acc = evaluate_task(model, tok, spec, load_task_examples(spec), "cpu", max_per_task=9)
        with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
            json.dump({"bpb": bpb, "acc": acc}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_results_equal_single_process(tokenizer, tmp_path):
    import torch.multiprocessing as mp
    from nanochat.core_eval import evaluate_task, load_core_tasks, load_task_examples
    bundle = SHARED / "eval_bundle"
    if not (bundle / "core.yaml").is_file():
        pytest.skip("../shared/data/eval_bundle is absent")
    tokenizer.save(tmp_path / "tok")
    batches = make_batches(tokenizer, 4)
    torch.save(batches, tmp_path / "batches.pt")
    os.symlink(bundle, tmp_path / "bundle")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    model = tiny_gpt(tokenizer.get_vocab_size())
    single_bpb = evaluate_bpb(model, iter(batches), 4, token_bytes_of(tokenizer))
    spec = {s.label: s for s in load_core_tasks(bundle)}["hellaswag_zeroshot"]
    single_acc = evaluate_task(model, tokenizer, spec, load_task_examples(spec), "cpu", max_per_task=9)
    assert r0 == r1  # all-reduced: every rank reports the same numbers
    assert r0["bpb"] == pytest.approx(single_bpb, rel=1e-6)
    assert r0["acc"] == pytest.approx(single_acc, abs=1e-7)
    # the per-rank halves differ from the whole, so the all-reduce is what made them equal
    half = evaluate_bpb(model, iter(batches[0::2]), 2, token_bytes_of(tokenizer))
    assert half != pytest.approx(single_bpb, rel=1e-6)
