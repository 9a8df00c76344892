"""nanochat/packed.py: oneDNN-prepacked linear layers for CPU inference, on a real GPT.

- the packed model's logits match the plain model's (fp32 round-off), decode included
- a row's output is bitwise the same computed alone or among 1-17 rows (what lets the serving
  scheduler compute only the rows in use)
- state_dict() is unchanged; packing twice is a no-op; a forward with gradients is refused
- a cached forward of a padded batch's real tokens as one flat row (gpt.Ragged, serving's prefill)
  gives every token bitwise the padded forward's logits, keys and values
"""
from __future__ import annotations

import pytest
import torch

from nanochat.gpt import GPTConfig, KVCache, Ragged, build_model
from nanochat.packed import PackedLinear, pack_for_inference, packing_available

pytestmark = pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN (mkldnn) linear ops")


def _model(**kw):
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **kw)
    m = build_model(cfg, "cpu", 0)
    with torch.no_grad():   # zero-init projections would make every position alike
        g = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


@pytest.mark.parametrize("modern", [False, True])
def test_packed_model_matches_plain_and_keeps_its_parameters(modern):
    kw = dict(value_embeds=True, window_pattern="SL", smear=True, resid_lambdas=True, x0_lambdas=True,
              backout=True) if modern else {}
    plain, packed = _model(**kw), _model(**kw)
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    n = pack_for_inference(packed)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert n == linears + plain.config.n_layer   # every Linear, plus one fused q/k/v per layer
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == n
    after = packed.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)
        # prefill then decode on the KV cache
        caches = [KVCache.for_model(m, 3, 32) for m in (plain, packed)]
        outs = [m(ids[:, :12], kv_cache=c) for m, c in zip((plain, packed), caches)]
        outs += [m(ids[:, 12:13], kv_cache=c) for m, c in zip((plain, packed), caches)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[3], outs[2], rtol=1e-5, atol=1e-5)
    assert pack_for_inference(packed) == 0   # already packed


def test_a_rows_output_does_not_depend_on_its_neighbours():
    m = _model()
    pack_for_inference(m)
    ids = torch.randint(0, 300, (17, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = []
        for b in range(1, 18):
            cache = KVCache.for_model(m, b, 16)
            pre = m(ids[:b, :8], kv_cache=cache)
            ref.append((pre[0], m(ids[:b, 8:], kv_cache=cache)[0]))
    assert all(torch.equal(a, b) for first in ref[:1] for other in ref[1:] for a, b in zip(first, other))


def test_packed_layers_refuse_training_and_other_dtypes():
    m = _model()
    pack_for_inference(m)
    ids = torch.randint(0, 300, (2, 8))
    m.transformer.wte.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        m(ids)
    bf16 = _model().to(torch.bfloat16)
    assert pack_for_inference(bf16) == 0 and not any(isinstance(x, PackedLinear) for x in bf16.modules())


@pytest.mark.parametrize("modern", [False, True])
def test_a_flat_row_of_real_tokens_equals_the_padded_batch(modern):
    """Rows holding 3, 0, 0 and 9 tokens get chunks of 5, 13, 0 and 9 tokens: padded to 16 columns,
    or as one flat row of 27 real tokens + 5 padding. Every real token's logits, keys and values are
    bitwise the same (smear included: rows 0 and 3 start after cached tokens); positions advance by the
    real lengths."""
    kw = dict(value_embeds=True, window_pattern="SL", smear=True, resid_lambdas=True, x0_lambdas=True,
              backout=True) if modern else {}
    m = _model(**kw)
    pack_for_inference(m)
    held, lens, T = [3, 0, 0, 9], [5, 13, 0, 9], 16
    g = torch.Generator().manual_seed(1)
    history = torch.randint(0, 300, (4, 9), generator=g)
    chunks = [torch.randint(0, 300, (n,), generator=g) for n in lens]
    L = torch.tensor(lens)
    at = (L.unsqueeze(1) - torch.arange(4, 0, -1)).clamp(min=0)   # each row's last 4 tokens

    def cache() -> KVCache:
        c = KVCache.for_model(m, 4, 48)
        for i, n in enumerate(held):
            if n:
                one = KVCache.for_model(m, 1, 48)
                m(history[i:i + 1, :n], kv_cache=one)
                c.copy_rows_from(one, 0, [i])
        c.min_keys = 32
        return c

    with torch.inference_mode():
        padded, flat = cache(), cache()
        ids = torch.zeros(4, T, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, :len(chunk)] = chunk
        want = m(ids, kv_cache=padded, logits_at=at)
        row = torch.repeat_interleave(torch.arange(4), L)
        col = torch.cat([torch.arange(n) for n in lens])
        flat_ids = torch.cat([torch.cat(chunks), torch.zeros(5, dtype=torch.long)]).unsqueeze(0)
        got = m(flat_ids, kv_cache=flat, logits_at=at + (L.cumsum(0) - L).unsqueeze(1), ragged=Ragged(row, col, T))
    for i, (h, n) in enumerate(zip(held, lens)):
        if n:
            assert torch.equal(got[i], want[i])
        end = h + n
        assert torch.equal(flat.k[:, i, :, :end], padded.k[:, i, :, :end])
        assert torch.equal(flat.v[:, i, :, :end], padded.v[:, i, :, :end])
    assert flat.pos.tolist() == [h + n for h, n in zip(held, lens)]
