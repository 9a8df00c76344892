"""GPT model: structure, counts, causality, KV cache, toggles, fused paths, determinism."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, KVCache, _ReluSquared, _RMSNorm, build_model, linear_softcap_cross_entropy
from nanochat.shapes import param_counts

MODERN = dict(value_embeds=True, window_pattern="SSSL", resid_lambdas=True, x0_lambdas=True,
              smear=True, backout=True, qk_scale=1.2, pad_vocab_to=64, rope_base=100000.0)
TOGGLES = ["value_embeds", "window_pattern", "resid_lambdas", "x0_lambdas", "smear", "backout", "qk_scale",
           "pad_vocab_to"]
ON = dict(value_embeds=True, window_pattern="SL", resid_lambdas=True, x0_lambdas=True, smear=True, backout=True,
          qk_scale=1.2, pad_vocab_to=64)


def tiny(**kw) -> GPTConfig:
    base = dict(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=4, n_embd=64)
    base.update(kw)
    return GPTConfig(**base)


def perturbed(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model whose zero-initialized weights are nudged, so every path carries signal."""
    model = build_model(cfg, "cpu", seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def expected_params(V, d, L, n_head, n_kv, value_embeds=False, resid=False, x0=False, smear=False, backout=False):
    """The contract's layout formula, written out independently of the model code."""
    hd = d // n_head
    kvd = n_kv * hd
    n = V * d + d * V + L * (d * d + 2 * d * kvd + d * d + d * 4 * d + 4 * d * d)
    if value_embeds:
        n += sum(1 for i in range(L) if i % 2 == (L - 1) % 2) * (V * kvd + 12 * n_kv)   # gate reads 12 channels
    return n + L * resid + L * x0 + 25 * smear + backout


# ----------------------------------------------------------------------------- structure / counts

def test_seed_default_structure_and_d20_count():
    cfg = GPTConfig()   # defaults = seed d20
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 560_988_160
    assert cfg.padded_vocab_size == 65536 and cfg.head_dim == 128
    names = {n for n, _ in model.named_parameters()}
    assert "transformer.wte.weight" in names and "lm_head.weight" in names
    assert model.lm_head.weight is not model.transformer.wte.weight          # untied
    assert not any(n.endswith("bias") for n in names)                         # no biases
    assert not any("norm" in n for n in names)                                # parameter-free RMSNorm
    assert not any(isinstance(m, torch.nn.Embedding) and m is not model.transformer.wte
                   for m in model.modules())                                  # no learned positions
    assert model.windows == [cfg.max_positions] * cfg.n_layer                 # unlimited context
    assert not model.value_embeds and model.resid_lambdas is None and model.smear_gate is None


def test_init_zeroes_output_projections_and_is_on_device():
    model = build_model(tiny(), "cpu", seed=0)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_proj.weight.abs().sum() == 0
        assert block.attn.c_q.weight.std() > 0
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.rope.device.type == "cpu" and torch.isfinite(model.rope).all()


@pytest.mark.parametrize("depth", [2, 4, 6, 12, 20, 26])
@pytest.mark.parametrize("toggles", ["seed", "modern", "modern_gqa"])
def test_param_count_matches_analytic_formula(depth, toggles):
    d = 64 * depth
    n_head = max(1, d // 128)
    n_kv = n_head
    extra = {}
    if toggles != "seed":
        extra = dict(MODERN)
    if toggles == "modern_gqa" and n_head % 2 == 0:
        n_kv = n_head // 2
    vocab = 50_000   # not a multiple of 64: exercises padding
    cfg = GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=depth, n_head=n_head, n_kv_head=n_kv,
                    n_embd=d, **extra)
    with torch.device("meta"):
        model = GPT(cfg)
    V = cfg.padded_vocab_size
    assert V == (vocab if toggles == "seed" else 50_048)
    want = expected_params(V, d, depth, n_head, n_kv, value_embeds=bool(extra), resid=bool(extra),
                           x0=bool(extra), smear=bool(extra), backout=bool(extra))
    assert model.num_params() == want == param_counts(cfg)["total"]
    # scaling params: block matrices (+ VE gates) + lm_head
    hd = d // n_head
    blocks = depth * (2 * d * d + 2 * d * n_kv * hd + 8 * d * d)
    gates = sum(1 for i in range(depth) if i % 2 == (depth - 1) % 2) * 12 * n_kv if extra else 0
    assert model.num_scaling_params() == blocks + gates + d * V


def test_estimate_flops_formula():
    for extra in ({}, dict(MODERN, short_window=8)):
        cfg = tiny(n_layer=4, **extra)
        with torch.device("meta"):
            model = GPT(cfg)
        emb = cfg.padded_vocab_size * cfg.n_embd
        if cfg.value_embeds:
            emb += 2 * cfg.padded_vocab_size * cfg.n_kv_head * cfg.head_dim   # layers 1 and 3
        spans = [8, 8, 8, 32] if extra else [32] * 4     # min(tokens to the left, seq); SSSL, last always L
        attn = sum(12 * cfg.n_head * cfg.head_dim * w for w in spans)
        assert model.windows == ([9, 9, 9, cfg.max_positions] if extra else [cfg.max_positions] * 4)
        scalars = (4 + 4 + 1 + 1) if extra else 0    # resid, x0, smear, backout lambdas: no matmul (the
                                                     # 24 → 1 smear gate is a Linear: nanochat 92d63d4 counts it)
        assert model.estimate_flops() == 6 * (model.num_params() - emb - scalars) + attn
    # the published seed figure: d20 at seq 2048
    with torch.device("meta"):
        d20 = GPT(GPTConfig())
    N = 560_988_160
    assert d20.estimate_flops() == 6 * (N - 65536 * 1280) + 12 * 20 * 10 * 128 * 2048


def test_window_sizes_and_defaults():
    # nanochat 92d63d4: S sees ceil(seq/4/128)·128 tokens to its left plus itself, L sequence_len
    for seq, short in ((32, 128), (2048, 512), (2049, 640), (4096, 1024)):
        cfg = tiny(sequence_len=seq, n_layer=6, window_pattern="SSSL", long_window=seq)
        assert cfg.left_windows() == [short, short, short, seq, short, seq]   # last layer always L
        assert cfg.window_sizes() == [short + 1] * 3 + [seq + 1, short + 1, seq + 1]
        assert cfg.attention_spans() == [min(short, seq)] * 3 + [seq, min(short, seq), seq]
    cfg = tiny(n_layer=3, window_pattern="S", short_window=5)   # no long_window: L is unlimited
    assert cfg.window_sizes() == [6, 6, cfg.max_positions] and cfg.attention_spans() == [5, 5, 32]


@pytest.mark.parametrize("kw,field", [
    (dict(n_kv_head=3), "n_kv_head"), (dict(n_embd=66), "n_embd"), (dict(window_pattern="SXL"), "window_pattern"),
    (dict(n_layer=0), "n_layer"), (dict(n_head=64), "n_head"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


# ----------------------------------------------------------------------------- forward semantics

@pytest.mark.parametrize("extra", [{}, dict(MODERN, short_window=5, n_kv_head=2)], ids=["seed", "modern"])
def test_causality(extra):
    model = perturbed(tiny(**extra))
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 97, (2, 32), generator=g)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 20, 31):
            idx2 = idx.clone()
            idx2[:, t] = (idx2[:, t] + 1) % 97
            out = model(idx2)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4   # the changed position does change


def test_logits_fp32_shape_softcap_and_padding_sliced():
    model = perturbed(tiny(pad_vocab_to=64))
    assert model.lm_head.weight.shape[0] == 128
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (2, 10, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0


def test_loss_reduction_none_and_ignore_index():
    model = perturbed(tiny(pad_vocab_to=64))
    idx = torch.randint(0, 97, (2, 12))
    tgt = torch.randint(0, 97, (2, 12))
    tgt[0, :4] = -1
    with torch.no_grad():
        logits = model(idx)
        per_tok = model(idx, tgt, loss_reduction="none")
        mean = model(idx, tgt)
    ref = F.cross_entropy(logits.view(-1, 97), tgt.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_tok, ref)
    assert (per_tok.view(2, 12)[0, :4] == 0).all()
    torch.testing.assert_close(mean, ref.sum() / (tgt != -1).sum())


@pytest.mark.parametrize("softcap", [15.0, 0.0])
def test_fused_loss_matches_unfused(softcap):
    cfg = tiny(softcap=softcap, pad_vocab_to=64)
    idx = torch.randint(0, 97, (3, 32))
    tgt = torch.randint(0, 97, (3, 32))
    tgt[1, 5:9] = -1
    grads, losses = [], []
    for fused in (True, False):
        model = perturbed(cfg)
        model.fused_loss = fused
        model.loss_chunk = 7        # ragged chunks
        loss = model(idx, tgt)
        (loss * 0.5).backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_linear_cross_entropy_blocks_and_no_grad():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(40, 16, generator=g)).requires_grad_()
    t = torch.randint(0, 40, (50,), generator=g)
    ref = F.cross_entropy(15 * torch.tanh(x @ w.T / 15), t)
    gx, gw = torch.autograd.grad(ref, (x, w))
    # tiny block budget → several GEMM blocks, each with several chunks
    out = linear_softcap_cross_entropy(x, w, t, 15.0, chunk=4, block_bytes=40 * 4 * 12)
    hx, hw = torch.autograd.grad(out, (x, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(hx, gx)
    torch.testing.assert_close(hw, gw)
    with torch.no_grad():
        torch.testing.assert_close(linear_softcap_cross_entropy(x, w, t, 15.0), ref)


def test_custom_autograd_functions_gradcheck():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: _RMSNorm.apply(a, 1e-6), (x,))
    torch.testing.assert_close(_RMSNorm.apply(x, 1e-6), F.rms_norm(x, (8,), eps=1e-6))
    h = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ReluSquared.apply, (h,))
    torch.testing.assert_close(_ReluSquared.apply(h), F.relu(h).square())


def test_rotary_complex_and_real_paths_agree():
    from nanochat.gpt import apply_rotary, rotary_tables
    rope = rotary_tables(16, 8, 10000.0)[None, :, None]
    x = torch.randn(2, 16, 3, 8)
    y32 = apply_rotary(x, rope)
    y64 = apply_rotary(x.double(), rope.double())      # real path
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y32.norm(dim=-1), x.norm(dim=-1))   # a rotation


def test_every_toggle_combination_forward_backward():
    idx = torch.randint(0, 97, (2, 16))
    tgt = torch.randint(0, 97, (2, 16))
    for bits in itertools.product([False, True], repeat=len(TOGGLES)):
        kw = {name: (ON[name] if on else tiny().__dict__[name]) for name, on in zip(TOGGLES, bits)}
        cfg = tiny(n_layer=2, n_embd=32, n_head=2, n_kv_head=1 if bits[0] else 2, sequence_len=16, **kw)
        model = build_model(cfg, "cpu", seed=0)
        loss = model(idx, tgt)
        loss.backward()
        assert torch.isfinite(loss), kw
        for n, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (kw, n)


@pytest.mark.parametrize("toggle", TOGGLES)
def test_each_toggle_changes_output_and_trains(toggle):
    idx = torch.randint(0, 97, (2, 32))
    tgt = torch.randint(0, 97, (2, 32))
    kw = {toggle: ON[toggle]}
    if toggle == "window_pattern":
        kw["short_window"] = 8    # the default (128 tokens) would cover this 32-token context
    on = perturbed(tiny(**kw))
    off = perturbed(tiny())
    loss_on = on(idx, tgt)
    loss_on.backward()
    for n, p in on.named_parameters():    # every parameter, including the toggle's own, gets signal
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    if toggle != "pad_vocab_to":          # padding must not change the function (only the layout)
        with torch.no_grad():
            assert not torch.allclose(loss_on, off(idx, tgt))


def test_pad_vocab_is_function_preserving():
    a = perturbed(tiny())
    b = build_model(tiny(pad_vocab_to=64), "cpu", 0)
    with torch.no_grad():
        b.transformer.wte.weight[:97] = a.transformer.wte.weight
        b.lm_head.weight[:97] = a.lm_head.weight
        for pa, pb in zip(a.transformer.h.parameters(), b.transformer.h.parameters()):
            pb.copy_(pa)
        idx = torch.randint(0, 97, (2, 16))
        torch.testing.assert_close(a(idx), b(idx))


# ----------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("arch", ["seed", "modern"])
def test_kv_cache_decode_equals_full_forward(n_kv_head, arch):
    extra = dict(MODERN, short_window=6) if arch == "modern" else {}
    model = perturbed(tiny(n_kv_head=n_kv_head, **extra))
    model.eval()
    idx = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=3, max_len=32)
        outs = [model(idx[:, :11], kv_cache=cache)]          # prefill
        for t in range(11, 30):                              # single-token decode
            outs.append(model(idx[:, t:t + 1], kv_cache=cache))
        assert (cache.pos == 30).all()
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_kv_cache_copy_rows_and_ragged_positions():
    model = perturbed(tiny(n_kv_head=2, **dict(MODERN, short_window=5)))
    model.eval()
    prompts = [torch.randint(0, 97, (1, n)) for n in (7, 12)]
    cont = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        batch = KVCache.for_model(model, batch_size=2, max_len=24)
        for r, p in enumerate(prompts):                       # prefill each prompt alone, copy in
            single = KVCache.for_model(model, batch_size=1, max_len=24)
            model(p, kv_cache=single)
            batch.copy_rows_from(single, src_row=0, dst_rows=[r])
        assert batch.pos.tolist() == [7, 12]
        steps = [model(cont[:, t:t + 1], kv_cache=batch) for t in range(6)]
        dec = torch.cat(steps, 1)
        for r, p in enumerate(prompts):
            full = model(torch.cat([p, cont[r:r + 1]], 1))
            torch.testing.assert_close(dec[r], full[0, -6:], rtol=1e-4, atol=1e-4)
        # one prompt → N rows (the engine's sampling pattern)
        one = KVCache.for_model(model, batch_size=1, max_len=24)
        model(prompts[0], kv_cache=one)
        many = KVCache.for_model(model, batch_size=3, max_len=24)
        many.copy_rows_from(one)
        nxt = torch.randint(0, 97, (3, 1))
        out = model(nxt, kv_cache=many)
        for r in range(3):
            ref = model(torch.cat([prompts[0], nxt[r:r + 1]], 1))[0, -1]
            torch.testing.assert_close(out[r, -1], ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_overflow_is_a_clear_error():
    model = build_model(tiny(), "cpu", 0)
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def test_generate_greedy_matches_argmax_of_full_forward():
    model = perturbed(tiny())
    model.eval()
    prompt = [1, 2, 3, 4]
    out = list(model.generate(prompt, max_tokens=5, temperature=0.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[4:]


# ----------------------------------------------------------------------------- determinism / precision

def test_init_deterministic_given_seed():
    cfg = tiny(**MODERN)
    a, b, c = build_model(cfg, "cpu", 7), build_model(cfg, "cpu", 7), build_model(cfg, "cpu", 8)
    for (n, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.slow
def test_torch_compile_on_cpu_matches_eager():
    cfg = tiny(n_layer=2, **dict(MODERN, short_window=8))
    model = perturbed(cfg)
    idx = torch.randint(0, 97, (2, 32))
    tgt = torch.randint(0, 97, (2, 32))
    ref = model(idx, tgt)
    ref.backward()
    gref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, dynamic=False)
    out = compiled(idx, tgt)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, gref[n], rtol=1e-3, atol=1e-5, msg=n)


def test_building_and_running_a_model_does_not_import_dynamo():
    """torch._dynamo costs ~2 s of start-up on a small CPU. Only an optimizer (torch.optim imports
    it) or torch.compile should pay it: not chat, eval or serve, which build a model and run it."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "from nanochat.gpt import GPTConfig, build_model\n"
            "cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,"
            " value_embeds=True, window_pattern='SL', short_window=8)\n"
            "m = build_model(cfg, 'cpu', 0)\n"
            "with torch.no_grad(): m(torch.zeros(1, 16, dtype=torch.long))\n"
            "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout[-500:]


def test_kv_cache_copies_a_row_within_itself():
    """The serving scheduler compacts rows by copying the highest one down inside the same cache."""
    c = KVCache(batch_size=3, num_kv_heads=1, max_len=8, head_dim=4, num_layers=2, n_embd=6)
    for t in (c.k, c.v, c.last_x):
        t.copy_(torch.randn_like(t))
    c.pos[2] = 5
    want = (c.k[:, 2, :, :5].clone(), c.v[:, 2, :, :5].clone(), c.last_x[2].clone())
    c.copy_rows_from(c, src_row=2, dst_rows=[0])
    assert torch.equal(c.k[:, 0, :, :5], want[0]) and torch.equal(c.v[:, 0, :, :5], want[1])
    assert torch.equal(c.last_x[0], want[2]) and int(c.pos[0]) == 5
