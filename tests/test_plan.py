"""The depth dial: published nanochat figures, precedence rules, and agreement with the real model."""
import math

import pytest

from nanochat.config import ConfigError, config_from_dict
from nanochat.plan import make_plan, model_shape
from nanochat.shapes import flops_per_token, param_counts


def plan_for(model=None, stage=None, hardware=None):
    tree = {"model": model or {}, "stage": {"name": "pretrain", **(stage or {})}, "hardware": hardware or {}}
    return make_plan(config_from_dict(tree))


def test_seed_d20_published_numbers():
    p = plan_for({"depth": 20}, hardware={"nproc_per_node": 8, "device_batch_size": 32})
    assert p.num_params == 560_988_160
    assert p.total_batch_size == 524_288
    assert p.num_iterations == 21_400
    assert p.grad_accum_steps == 1
    assert (p.model.n_embd, p.model.n_head, p.model.head_dim) == (1280, 10, 128)


def test_seed_d32_published_numbers():
    p = plan_for({"depth": 32}, hardware={"nproc_per_node": 8, "device_batch_size": 32})
    assert p.num_params == 1_879_048_192
    assert p.num_iterations == 71_680


def test_grad_accum_one_vs_eight_gpus():
    assert plan_for({"depth": 20}, hardware={"nproc_per_node": 8, "device_batch_size": 32}).grad_accum_steps == 1
    assert plan_for({"depth": 20}, hardware={"nproc_per_node": 1, "device_batch_size": 32}).grad_accum_steps == 8


def test_seed_flops_formula():
    p = plan_for({"depth": 20}, hardware={"device_batch_size": 32})
    s = p.model
    expected = 6 * (p.num_params - s.padded_vocab_size * s.n_embd) + 12 * s.n_layer * s.n_head * s.head_dim * 2048
    assert p.flops_per_token == expected


@pytest.mark.parametrize("depth,log2b", [(8, 18), (10, 19), (12, 19), (16, 19), (18, 20), (20, 20), (26, 20), (32, 21)])
def test_modern_auto_batch(depth, log2b):
    p = plan_for({"depth": depth, "generation": "modern"}, hardware={"device_batch_size": 1, "nproc_per_node": 8})
    assert p.total_batch_size == 2 ** log2b
    assert p.model.head_dim == 128 and p.model.n_embd % 128 == 0


def test_modern_scaling_rules():
    ref = plan_for({"depth": 12, "generation": "modern"}, hardware={"device_batch_size": 1})
    big = plan_for({"depth": 20, "generation": "modern"}, hardware={"device_batch_size": 1})
    assert ref.matrix_lr == pytest.approx(0.02) and ref.weight_decay == pytest.approx(0.28)
    bscale = math.sqrt(2 ** 20 / 2 ** 19)
    assert big.matrix_lr == pytest.approx(0.02 * bscale)
    assert big.weight_decay == pytest.approx(0.28 * bscale * ref.num_scaling_params / big.num_scaling_params)
    assert ref.warmup_steps == 40 and ref.warmdown_steps == round(0.65 * ref.num_iterations)
    assert ref.final_lr_frac == 0.05
    assert ref.num_iterations == int(12 * ref.num_scaling_params // ref.total_batch_size)
    assert ref.model.value_embeds and ref.model.window_pattern == "SSSL" and ref.model.padded_vocab_size % 64 == 0


def test_horizon_precedence():
    base = {"total_batch_size": 8192}
    hw = {"device_batch_size": 4}
    m = {"depth": 4, "sequence_len": 256}
    both = plan_for(m, {**base, "num_iterations": 7, "target_flops": 1e15}, hw)
    assert (both.num_iterations, both.horizon_source) == (7, "num_iterations")
    flops = plan_for(m, {**base, "target_flops": 1e15, "target_param_data_ratio": 3}, hw)
    assert flops.horizon_source == "target_flops"
    assert flops.num_iterations == round(1e15 / (flops.flops_per_token * 8192))
    ratio = plan_for(m, {**base, "target_param_data_ratio": 3}, hw)
    assert ratio.num_iterations == int(3 * ratio.num_params // 8192)


def test_seed_lr_scaling_and_schedule():
    p = plan_for({"depth": 20}, hardware={"device_batch_size": 32})
    assert p.embedding_lr == pytest.approx(0.2 * (1280 / 768) ** -0.5)
    assert p.unembedding_lr == pytest.approx(0.004 * (1280 / 768) ** -0.5)
    assert p.matrix_lr == 0.02
    assert p.warmup_steps == 0 and p.warmdown_steps == round(0.2 * 21400) and p.final_lr_frac == 0.0
    assert (p.muon_momentum_start, p.muon_momentum_end, p.muon_momentum_steps) == (0.85, 0.95, 300)


def test_grad_accum_error_names_all_four_numbers():
    with pytest.raises(ConfigError) as e:
        plan_for({"depth": 4, "sequence_len": 512}, {"total_batch_size": 6144}, {"device_batch_size": 8, "nproc_per_node": 1})
    msg = str(e.value)
    for n in ("6144", "device_batch_size=8", "sequence_len=512", "world_size=1"):
        assert n in msg
    assert "[1, 2, 3, 4, 6, 12]" in msg or "hardware.device_batch_size in" in msg


def test_odd_depth_gets_valid_heads():
    for depth in (3, 5, 7, 9, 11, 13):
        s = model_shape(config_from_dict({"model": {"depth": depth}}).model)
        assert s.n_embd % s.n_head == 0 and s.head_dim % 2 == 0


def test_gqa_must_divide():
    with pytest.raises(ConfigError, match="n_kv_head"):
        plan_for({"depth": 6, "n_kv_head": 2})  # 3 heads


@pytest.mark.parametrize("model", [
    {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "vocab_size": 1000},
    {"depth": 3, "aspect_ratio": 32, "head_dim": 32, "vocab_size": 1000, "n_kv_head": 1},
    {"depth": 4, "generation": "modern", "aspect_ratio": 32, "head_dim": 32, "vocab_size": 1000},
    {"depth": 3, "generation": "modern", "aspect_ratio": 32, "head_dim": 32, "vocab_size": 999, "n_kv_head": 1,
     "sequence_len": 64},
    {"depth": 4, "value_embeds": True, "smear": True, "aspect_ratio": 32, "head_dim": 32, "vocab_size": 500,
     "window_pattern": "SL", "sequence_len": 64},
])
def test_analytic_counts_equal_built_model(model):
    pytest.importorskip("torch")
    from nanochat.gpt import GPTConfig, build_model
    model = {"sequence_len": 64, **model}
    p = plan_for(model, {"total_batch_size": 64 * 2, "num_iterations": 1}, {"device_batch_size": 2})
    m = build_model(GPTConfig(**p.model.gpt_config_kwargs()), "cpu", 0)
    assert m.num_params() == p.num_params
    assert m.num_scaling_params() == p.num_scaling_params
    assert m.estimate_flops() == p.flops_per_token
    assert param_counts(p.model)["total"] == sum(t.numel() for t in m.parameters())
    assert flops_per_token(p.model) == p.flops_per_token


def test_modern_windows_and_flops_follow_nanochat():
    """92d63d4: S = ceil(seq/4/128)·128 tokens left, L = seq; FLOPs leave out lookups and lambdas."""
    from nanochat.shapes import attention_spans
    p = plan_for({"depth": 12, "generation": "modern"}, hardware={"device_batch_size": 1})
    s = p.model
    assert (s.short_window, s.long_window, s.n_head, s.head_dim) == (512, 2048, 6, 128)
    assert attention_spans(s) == [512, 512, 512, 2048] * 3
    c = param_counts(s)
    n_ve = 6                                      # layers 1, 3, …, 11
    assert c["matrix"] == 12 * 12 * 768 ** 2 + n_ve * 12 * s.n_kv_head  # the gate reads 12 channels
    scalars = c["resid_scalar"] + c["x0_scalar"] + c["gate_scalar"]
    assert scalars == 12 + 12 + 24 + 1 + 1   # resid, x0, smear gate + lambda, backout
    # nanochat counts 6 × every Linear weight: the smear gate (24 → 1) is one, the lambdas are not
    dense = c["total"] - s.padded_vocab_size * 768 - n_ve * s.padded_vocab_size * 768 - scalars + 24
    assert p.flops_per_token == 6 * dense + 12 * 6 * 128 * (9 * 512 + 3 * 2048)
    seed = plan_for({"depth": 12}, hardware={"device_batch_size": 1}).model
    assert seed.long_window is None and seed.rope_bf16 and not s.rope_bf16
