"""Attention backends (nanochat/attention.py) against the textbook math: forward, backward, KV decode.

Every backend this machine has (sdpa and flex on CPU; flash only where the package and a GPU are)
is checked, at the kernel level and inside the model.
"""
import pytest
import torch

from nanochat import attention as A
from nanochat.gpt import GPTConfig, KVCache, build_model

CPU_BACKENDS = A.available_backends("cpu")
WINDOWS = [1, 5, 16, 40, 64]   # 40 = T (full), 64 > T (full)


def qkv(B=2, H=4, Hkv=2, T=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, requires_grad=True) for h in (H, Hkv, Hkv)]


def test_this_machine_has_sdpa_and_flex():
    assert CPU_BACKENDS[:2] == ["sdpa", "flex"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_forward_matches_reference(backend):
    for window in WINDOWS:
        q, k, v = (t.detach() for t in qkv())
        y = A.causal_attention(q, k, v, window, 0.36, backend)
        yr = A.reference_attention(q.double(), k.double(), v.double(), window, 0.36)
        torch.testing.assert_close(y, yr.float(), atol=2e-5, rtol=1e-4, msg=f"{backend} window {window}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_backward_matches_reference(backend):
    if not A.supports_backward(backend, "cpu"):
        pytest.skip(f"{backend} has no backward kernel on CPU in torch {torch.__version__} "
                    "(bench/gpu_check.py checks it on a GPU)")
    for window in WINDOWS:
        q, k, v = qkv()
        scale = 1.44 / 4.0
        y = A.causal_attention(q, k, v, window, scale, backend)
        g = torch.randn_like(y)
        dq, dk, dv = torch.autograd.grad((y * g).sum(), (q, k, v))
        yr = A.reference_attention(q.double(), k.double(), v.double(), window, scale)
        rq, rk, rv = torch.autograd.grad((yr * g.double()).sum(), (q, k, v))
        torch.testing.assert_close(y, yr.float(), atol=2e-5, rtol=1e-4, msg=f"{backend} window {window} fwd")
        for a, b, n in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
            torch.testing.assert_close(a, b.float(), atol=5e-5, rtol=1e-4, msg=f"{backend} window {window} {n}")


def test_reference_is_the_textbook_window():
    # query 5 with window 3 sees keys 3, 4, 5 only: perturbing key 2 or key 6 leaves it unchanged
    q, k, v = (t.detach() for t in qkv(B=1, H=1, Hkv=1, T=8, D=4))
    base = A.reference_attention(q, k, v, 3)[0, 0, 5]
    for j, changes in ((2, False), (3, True), (6, False)):
        v2 = v.clone()
        v2[0, 0, j] += 1.0
        moved = not torch.allclose(A.reference_attention(q, k, v2, 3)[0, 0, 5], base)
        assert moved == changes, j


def test_cached_attention_ragged_rows_match_reference():
    q, k, v = (t.detach() for t in qkv(B=2, H=4, Hkv=2, T=20, D=8, seed=3))
    window = 6
    full = A.reference_attention(q, k, v, window, 0.3)
    # row 0 decodes position 19, row 1 position 11 (its cache holds 12 keys; slots past it are junk)
    positions = torch.tensor([[19], [11]])
    keys, vals = k.clone(), v.clone()
    keys[1, :, 12:] = 1e4
    vals[1, :, 12:] = 1e4
    qs = torch.stack([q[0, :, 19:20], q[1, :, 11:12]])
    y = A.cached_attention(qs, keys, vals, positions, window, 0.3)
    torch.testing.assert_close(y[0, :, 0], full[0, :, 19], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[1, :, 0], full[1, :, 11], atol=1e-5, rtol=1e-5)


def test_resolve_backend_rules_and_errors():
    assert A.resolve_backend("auto", "cpu") == "sdpa"
    assert A.resolve_backend("auto", "cuda") == ("flash" if A._flash_func() else "flex")  # never dense on GPU
    assert A.resolve_backend("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match=r"hardware.attention='flash' is not available on cpu"):
        A.resolve_backend("flash", "cpu")
    with pytest.raises(ValueError, match=r"hardware.attention='dense'.*auto, sdpa, flex, flash"):
        A.resolve_backend("dense", "cpu")


def model_with(backend: str, n_kv_head: int = 2):
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                    window_pattern="SSL", short_window=5, qk_scale=1.2)
    model = build_model(cfg, "cpu", 0)
    with torch.no_grad():  # nudge the zero-initialized projections so attention carries signal
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.attn_backend = backend
    return model


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_backends_agree_and_kv_decode_equals_full_forward(backend):
    idx = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(2))
    ref_model, model = model_with("sdpa"), model_with(backend)
    ref_model.fused_loss = model.fused_loss = False
    if A.supports_backward(backend, "cpu"):
        loss_ref, loss = ref_model(idx, idx), model(idx, idx)
        loss_ref.backward()
        loss.backward()
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
        for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(full, ref_model(idx), atol=1e-5, rtol=1e-5)
        cache = KVCache.for_model(model, batch_size=3, max_len=24)
        steps = [model(idx[:, :9], kv_cache=cache)]          # prefill past the short window
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(9, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_decode_attention_is_row_and_padding_invariant():
    """A decode step (one query per row) gives bitwise the same output for a row whatever the other
    rows and however far the key length is padded (multiples of 16, as the serving scheduler pads)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, S = 5, 4, 2, 32, 256
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    positions = torch.tensor([[3], [40], [100], [150], [230]])
    ref = A.cached_attention(q, k, v, positions, window=S, scale=0.2)
    for b in range(B):   # the math, in fp64: row b's query sees keys 0..positions[b] of its kv head
        n = int(positions[b]) + 1
        kk = k[b, :, :n].double().repeat_interleave(H // Hkv, dim=0)
        vv = v[b, :, :n].double().repeat_interleave(H // Hkv, dim=0)
        want = torch.softmax(q[b].double() @ kk.transpose(-1, -2) * 0.2, dim=-1) @ vv
        torch.testing.assert_close(ref[b], want.float(), rtol=1e-5, atol=1e-5)
    for keys in range(240, S + 1, 16):
        assert torch.equal(A.cached_attention(q, k[:, :, :keys], v[:, :, :keys], positions, S, 0.2), ref)
    for b in range(B):
        keys = -(-(int(positions[b]) + 1) // 16) * 16
        alone = A.cached_attention(q[b:b + 1], k[b:b + 1, :, :keys], v[b:b + 1, :, :keys], positions[b:b + 1], S, 0.2)
        assert torch.equal(alone, ref[b:b + 1])
