"""Muon + AdamW optimizer (single process): math, grouping, state save/load, schedules."""
import math

import pytest
import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat.plan import OPTIMIZER_RECIPES
from nanochat.optim import (MuonAdamW, build_optimizer, lr_multiplier, muon_momentum, muon_scale,
                            orthogonalize, weight_decay_at)

MODERN = dict(value_embeds=True, window_pattern="SSSL", resid_lambdas=True, x0_lambdas=True,
              smear=True, backout=True, qk_scale=1.2, pad_vocab_to=64)


def tiny(**kw):
    base = dict(sequence_len=16, vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    base.update(kw)
    return GPTConfig(**base)


def make_opt(model, **kw):
    args = dict(embedding_lr=0.1, unembedding_lr=0.01, matrix_lr=0.02, scalar_lr=0.05)
    args.update(kw)
    return build_optimizer(model, **args)


# ----------------------------------------------------------------------------- Muon math

@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 96), (3, 40, 24)])
@pytest.mark.parametrize("ns", ["newton_schulz", "polar_express"])
def test_orthogonalize_is_close_to_semi_orthogonal(shape, ns):
    g = torch.Generator().manual_seed(0)
    # a gradient-like matrix with singular values spread over [0.02, 1] (condition number 50)
    U, _, Vh = torch.linalg.svd(torch.randn(shape, generator=g), full_matrices=False)
    k = min(shape[-2:])
    s = torch.logspace(math.log10(0.02), 0, k)[torch.randperm(k, generator=g)]
    G = U @ torch.diag_embed(s) @ Vh
    O = orthogonalize(G, ns)
    assert O.shape == G.shape and O.dtype == torch.float32
    sv = torch.linalg.svdvals(O)
    # quintic NS deliberately lands in ~[0.7, 1.2]; Polar Express is tighter
    lo, hi = (0.6, 1.25) if ns == "newton_schulz" else (0.8, 1.15)
    assert sv.min() > lo and sv.max() < hi, (sv.min(), sv.max())
    # and it points where the exact polar factor U·Vᵀ points
    polar = U @ Vh
    cos = (O * polar).sum(dim=(-2, -1)) / (O.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all(), cos


@pytest.mark.parametrize("cond", [1e2, 1e6])
@pytest.mark.parametrize("ns", ["newton_schulz", "polar_express"])
def test_gram_form_matches_direct_iteration(cond, ns):
    """The Gram evaluation (CPU fp32, aspect >= 2) computes the same polynomial as the direct one."""
    g = torch.Generator().manual_seed(0)
    U, _, Vh = torch.linalg.svd(torch.randn(3, 48, 160, generator=g), full_matrices=False)
    G = (U * torch.logspace(-math.log10(cond), 0, 48)) @ Vh
    G[0] = torch.outer(torch.randn(48, generator=g), torch.randn(160, generator=g))   # rank one
    ref = orthogonalize(G.double(), ns, dtype=torch.float64, gram=False)
    for X in (G, G.mT):                      # wide and tall
        gram = orthogonalize(X, ns, gram=True)
        want = ref if X is G else ref.mT
        assert ((gram.double() - want).norm() / want.norm()) < 2e-3
    assert torch.equal(orthogonalize(G, ns), orthogonalize(G, ns, gram=True))   # the CPU default
    assert orthogonalize(torch.zeros(2, 8, 32), ns).abs().max() == 0


def test_orthogonalize_rejects_unknown_method():
    with pytest.raises(ValueError, match="polar_express"):
        orthogonalize(torch.randn(4, 4), "svd")


def test_muon_step_matches_hand_computation():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 8))
    p0 = p.detach().clone()
    opt = MuonAdamW([dict(kind="muon", name="m", params=[p], lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=0.01)])
    grads = [torch.randn(32, 8) for _ in range(3)]
    buf = torch.zeros(32, 8)
    ref = p0.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        upd = 0.1 * g + 0.9 * buf                        # Nesterov: g.lerp(buf, momentum)
        lr = 0.1 * muon_scale(ref.shape)                 # decay uses the update's LR (nanochat 92d63d4)
        ref = ref - lr * (orthogonalize(upd) + 0.01 * ref)
    assert muon_scale(p.shape) == 2.0                    # sqrt(32/8)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6)


def test_muon_update_is_semi_orthogonal_in_a_model_step():
    model = build_model(tiny(), "cpu", 0)
    opt = make_opt(model, matrix_lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 97, (8, 17))       # 128 tokens: the (64, 256) gradient has full rank
    model(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()
    # output projections start at zero, so only they get a gradient on step one
    W = model.transformer.h[0].mlp.c_proj.weight.detach()           # (64, 256): wide, scale 1
    delta = (W - before["transformer.h.0.mlp.c_proj.weight"]) / -muon_scale(W.shape)
    sv = torch.linalg.svdvals(delta)
    assert sv.max() < 1.25 and (sv > 0.5).float().mean() > 0.75, sv


# ----------------------------------------------------------------------------- AdamW path

def test_adamw_path_equals_torch_adamw():
    torch.manual_seed(0)
    shapes = [(7, 5), (11,), (3, 4, 2)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [dict(params=ps[:2], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
                         dict(params=ps[2:], lr=0.003, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.0)]
    ours = MuonAdamW([dict(g, kind="adamw", name=str(i)) for i, g in enumerate(groups(a))])
    ref = torch.optim.AdamW(groups(b), foreach=False)
    for step in range(6):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape)
            pa.grad, pb.grad = g.clone(), g.clone()
        if step == 3:   # an LR change mid-run, as the schedule does
            for o in (ours, ref):
                o.param_groups[0]["lr"] = 0.005
        ours.step()
        ref.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- grouping

@pytest.mark.parametrize("extra", [{}, MODERN], ids=["seed", "modern"])
def test_build_optimizer_groups_cover_every_param_once(extra):
    model = build_model(tiny(**extra), "cpu", 0)
    opt = make_opt(model, weight_decay=0.2, settings={"muon_ns": "polar_express"})
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in opt.param_groups}
    muon = by_name["matrix"]
    assert muon["kind"] == "muon" and muon["ns"] == "polar_express" and muon["weight_decay"] == 0.2
    assert all(p.dim() == 2 for p in muon["params"])
    block_params = {id(p) for p in model.transformer.h.parameters()}
    assert {id(p) for p in muon["params"]} == block_params
    assert by_name["embedding"]["params"][0] is model.transformer.wte.weight
    assert by_name["lm_head"]["params"][0] is model.lm_head.weight
    assert by_name["lm_head"]["lr"] == 0.01 and by_name["embedding"]["lr"] == 0.1
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"]
        if g["kind"] == "adamw":
            assert g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.0
    if extra:
        assert {"value_embed", "resid_scalar", "x0_scalar", "gate_scalar"} <= set(by_name)


def test_bad_groups_fail_clearly():
    with pytest.raises(ValueError, match="Muon needs matrices"):
        MuonAdamW([dict(kind="muon", name="m", params=[torch.nn.Parameter(torch.randn(4))], lr=0.1)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", name="x", params=[torch.nn.Parameter(torch.randn(4))], lr=0.1)])


def test_training_reduces_loss_with_lr_schedule_loop():
    torch.manual_seed(0)
    model = build_model(tiny(**MODERN), "cpu", 0)
    opt = make_opt(model)
    idx = torch.randint(0, 97, (4, 17))
    losses = []
    for step in range(12):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_multiplier(step, 12, 2, 4, 0.0)
            if g["kind"] == "muon":
                g["momentum"] = muon_momentum(step)
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- state

def _train(model, opt, batches):
    for idx in batches:
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("recipe", ["seed", "modern"])
def test_state_dict_roundtrip_resumes_exactly(tmp_path, recipe):
    cfg = tiny(**MODERN)
    batches = [torch.randint(0, 97, (2, 17)) for _ in range(5)]
    settings = {k: v for k, v in OPTIMIZER_RECIPES[recipe].items() if not k.startswith("muon_momentum")}
    m1 = build_model(cfg, "cpu", 0)
    o1 = make_opt(m1, weight_decay=0.1, settings=settings)
    _train(m1, o1, batches[:3])
    torch.save({"model": m1.state_dict(), "optim": o1.state_dict()}, tmp_path / "ckpt.pt")
    _train(m1, o1, batches[3:])

    m2 = build_model(cfg, "cpu", 123)                     # different init, then restored
    o2 = make_opt(m2, weight_decay=0.1, settings=settings)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    if recipe == "modern":   # NorMuon's factored second moment is part of the saved state
        assert any("second_momentum_buffer" in st for st in ck["optim"]["state"].values())
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["optim"])
    assert o2.param_groups[0]["initial_lr"] == o1.param_groups[0]["initial_lr"]
    _train(m2, o2, batches[3:])
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n


def test_muon_buckets_in_chunks_compute_what_whole_buckets_do(monkeypatch):
    """A bucket stepped in slices (one matrix each here) gives the whole-bucket step: the momentum and
    NorMuon buffers keep their stacked (k, m, n) layout, and the parameters match to round-off."""
    import nanochat.optim as O
    cfg = tiny(**MODERN)
    settings = {k: v for k, v in OPTIMIZER_RECIPES["modern"].items() if not k.startswith("muon_momentum")}
    batches = [torch.randint(0, 97, (2, 17)) for _ in range(3)]
    runs = []
    for chunk_bytes in (O.MUON_CHUNK_BYTES, 1):
        monkeypatch.setattr(O, "MUON_CHUNK_BYTES", chunk_bytes)
        m = build_model(cfg, "cpu", 0)
        o = make_opt(m, weight_decay=0.1, settings=settings)
        _train(m, o, batches)
        runs.append((m, o))
    (m1, o1), (m2, o2) = runs
    assert any(len(b) > 1 for g in o1.param_groups if g["kind"] == "muon" for b in o1._buckets(g))
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for k, st in o1.state_dict()["state"].items():
        for name, v in st.items():
            assert v.shape == o2.state_dict()["state"][k][name].shape, (k, name)


# ----------------------------------------------------------------------------- schedules

def test_lr_multiplier():
    # 100 steps, 10 warmup, 20 warmdown to 0.1
    f = lambda s: lr_multiplier(s, 100, 10, 20, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == 1.0 and f(80) == 1.0
    assert f(90) == pytest.approx(0.5 * 1 + 0.5 * 0.1)
    assert f(100) == pytest.approx(0.1)
    assert lr_multiplier(0, 100, 0, 0, 0.0) == 1.0 and lr_multiplier(99, 100, 0, 0, 0.0) == 1.0
    assert lr_multiplier(100, 100, 0, 20, 0.0) == 0.0


def test_modern_muon_momentum_schedule():
    """nanochat 92d63d4's base_train: 0.85 → 0.97 over 400 steps, then 0.97 → 0.90 through the warmdown."""
    f = lambda s: muon_momentum(s, 0.85, 0.97, 400, final=0.90, warmdown_steps=650, num_iterations=1000)
    assert f(0) == pytest.approx(0.85) and f(200) == pytest.approx(0.91)
    assert f(349) == pytest.approx(0.91 + 0.06 * 149 / 200)   # still ramping inside the warmdown: ramp wins
    assert f(400) == pytest.approx(0.97 * (1 - 50 / 650) + 0.90 * 50 / 650)
    assert f(1000) == pytest.approx(0.90)
    g = lambda s: muon_momentum(s, 0.85, 0.97, 400, final=0.90, warmdown_steps=100, num_iterations=1000)
    assert g(600) == pytest.approx(0.97) and g(950) == pytest.approx(0.935)


def test_muon_momentum_and_weight_decay_schedules():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10_000) == pytest.approx(0.95)
    assert weight_decay_at(50, 100, 0.2) == 0.2
    assert weight_decay_at(50, 100, 0.2, "linear") == pytest.approx(0.1)
    assert weight_decay_at(0, 100, 0.2, "cosine") == pytest.approx(0.2)
    assert weight_decay_at(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert weight_decay_at(100, 100, 0.2, "cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cosine"):
        weight_decay_at(1, 10, 0.1, "exp")


def test_grad_clip_matches_torch_clip_grad_norm():
    cfg = tiny(**MODERN)
    idx = torch.randint(0, 97, (2, 17))
    models = [build_model(cfg, "cpu", 0) for _ in range(2)]
    opts = [make_opt(models[0], grad_clip=0.01), make_opt(models[1])]
    for m in models:
        m(idx[:, :-1], idx[:, 1:]).backward()
    norm = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.01)
    for o in opts:
        o.step()
    torch.testing.assert_close(opts[0].last_grad_norm, norm)
    assert norm > 0.01
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- recipes in the plan

def _plan(model=None, **stage):
    from nanochat.config import config_from_dict
    from nanochat.plan import make_plan
    tree = {"model": {"depth": 4, **(model or {})}, "stage": {"name": "pretrain", "num_iterations": 10, **stage},
            "hardware": {"device_batch_size": 1}}
    return make_plan(config_from_dict(tree))


def test_recipe_keys_resolve_per_generation_and_show_in_the_dry_run():
    from nanochat.plan import plan_rows
    modern, seed = _plan({"generation": "modern"}), _plan()
    assert modern.optimizer == "modern" and modern.optim["normuon"] and modern.optim["cautious_wd"]
    assert modern.optim["lm_head_betas"] == [0.8, 0.96] and modern.optim["gate_lr"] == 0.2
    assert (modern.muon_momentum_end, modern.muon_momentum_steps, modern.muon_momentum_final) == (0.97, 400, 0.9)
    assert modern.grad_clip == 0 and seed.grad_clip == 1.0      # d575940's base_train clips at 1.0
    assert seed.optimizer == "seed" and not seed.optim["normuon"] and seed.optim["muon_ns"] == "newton_schulz"
    assert (seed.muon_momentum_end, seed.muon_momentum_steps, seed.muon_momentum_final) == (0.95, 300, None)
    rows = dict(plan_rows(modern))
    assert "NorMuon" in rows["optimizer"] and "cautious" in rows["optimizer"]
    assert rows["AdamW lm_head"].endswith("betas (0.8, 0.96), wd 0.01") and "AdamW x0_scalar" in rows
    assert "AdamW x0_scalar" not in dict(plan_rows(seed))        # the seed model has no x0 lambdas
    # per run: one refinement off, or the Dec-2025 optimizer on the modern model
    off = _plan({"generation": "modern"}, normuon=False, cautious_wd=False)
    assert not off.optim["normuon"] and not off.optim["cautious_wd"] and off.optim["muon_equilibrate"]
    old = _plan({"generation": "modern"}, optimizer="seed")
    assert old.optim == {**seed.optim} and old.muon_momentum_end == 0.95


@pytest.mark.parametrize("model,stage,key", [
    ({}, {"x0_betas": [0.9, 0.95]}, "stage.x0_betas"),                      # seed model: no x0 lambdas
    ({}, {"gate_lr": 0.1}, "stage.gate_lr"),                                # ... no smear / backout
    ({"generation": "modern"}, {"normuon": False, "muon_beta2": 0.8}, "stage.muon_beta2"),
    ({}, {"muon_ns_safety": 1.05}, "stage.muon_ns_safety"),                 # Newton–Schulz has none
    ({}, {"optimizer": "adam"}, "stage.optimizer"),
    ({"generation": "modern"}, {"lm_head_betas": [0.8]}, "stage.lm_head_betas"),
    ({"generation": "modern"}, {"muon_momentum_final": 1.2}, "stage.muon_momentum_start"),
])
def test_optimizer_keys_that_do_not_apply_are_config_errors(model, stage, key):
    from nanochat.config import ConfigError
    with pytest.raises(ConfigError) as e:
        _plan(model, **stage)
    assert e.value.key == key and "Fix:" in str(e.value)
