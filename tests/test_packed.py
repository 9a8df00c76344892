"""nanochat/packed.py: oneDNN-prepacked linear layers for CPU inference, on a real GPT.

- the packed model's logits match the plain model's (fp32 round-off), decode included
- a row's output is bitwise the same computed alone or among 1-17 rows (what lets the serving
  scheduler compute only the rows in use)
- state_dict() is unchanged; packing twice is a no-op; a forward with gradients is refused
"""
from __future__ import annotations

import pytest
import torch

from nanochat.gpt import GPTConfig, KVCache, build_model
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
