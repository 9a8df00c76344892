"""experiment=speedrun is nanochat 92d63d4's record recipe: its plan equals what nanochat derives.

nanochat 92d63d4's base_train, for `--depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8`
on 8 GPUs with the 32768-token tokenizer, prints (its own code, run on the meta device): params
1,384,122,122, scaling params 729,810,624, FLOPs/token 4,775,225,616, batch 1,048,576, 5,568 iterations,
grad accumulation 4, and the LRs / weight decay below. The test derives them again from nanochat's
formulas (written out here) and pins the printed figures.
"""
import math

import pytest

from launch.run import stage_tree
from conftest import REPO, compose_checked
from nanochat.config import ConfigError, config_from_dict
from nanochat.plan import make_plan

CONF = str(REPO / "conf")


def recipe_plan(*overrides, entry="pretrain"):
    tree = compose_checked(["experiment=speedrun", *overrides, "run.dry_run=true"], CONF)
    return make_plan(config_from_dict(stage_tree(tree, entry))), tree


def nanochat_modern_counts(depth, vocab=32768, seq=2048):
    """nanochat 92d63d4's GPT at --depth: width rounded up to 128-wide heads, no GQA, SSSL windows."""
    d = -(-depth * 64 // 128) * 128
    h, ve_layers = d // 128, [i for i in range(depth) if i % 2 == (depth - 1) % 2]
    blocks = depth * 12 * d * d + len(ve_layers) * 12 * h          # q k v proj + MLP, value-embedding gates
    lm_head = wte = vocab * d
    value_embeds = len(ve_layers) * vocab * d
    lambdas = 2 * depth + 1 + 1                                    # resid, x0, smear λ, backout λ
    total = wte + value_embeds + lm_head + blocks + 24 + lambdas   # + smear gate (24 → 1)
    short = -(-seq // 4 // 128) * 128
    windows = [seq if "SSSL"[i % 4] == "L" or i == depth - 1 else short for i in range(depth)]
    flops = 6 * (blocks + lm_head + 24) + sum(12 * h * 128 * min(w, seq) for w in windows)   # every Linear
    return dict(total=total, scaling=blocks + lm_head, flops=flops, d=d)


def test_record_recipe_numbers_are_nanochats():
    p, tree = recipe_plan()
    n24, n12 = nanochat_modern_counts(24), nanochat_modern_counts(12)
    ratio, B_REF = 8, 2 ** 19
    target = int(ratio * n24["scaling"])
    B = 2 ** round(math.log2(B_REF * (target / (ratio * n12["scaling"])) ** 0.383))
    bs = math.sqrt(B / B_REF)
    dscale = (n24["d"] / 768) ** -0.5
    # nanochat's formulas ...
    assert p.num_params == n24["total"] and p.num_scaling_params == n24["scaling"]
    assert p.flops_per_token == n24["flops"]
    assert p.total_batch_size == B and p.num_iterations == target // B
    assert p.weight_decay == pytest.approx(0.28 * bs * (ratio * n12["scaling"]) / target, rel=1e-12)
    assert p.embedding_lr == pytest.approx(0.3 * bs * dscale) and p.unembedding_lr == pytest.approx(0.008 * bs * dscale)
    assert p.matrix_lr == pytest.approx(0.02 * bs) and p.scalar_lr == pytest.approx(0.5 * bs)
    # ... and the figures its base_train printed
    assert (p.num_params, p.num_scaling_params, p.flops_per_token) == (1_384_122_122, 729_810_624, 4_775_225_616)
    assert (p.total_batch_size, p.num_iterations, p.total_tokens) == (1_048_576, 5_568, 5_838_471_168)
    assert p.total_flops == pytest.approx(2.7880017079711039e19, rel=1e-12)
    assert (p.world_size, p.device_batch_size, p.grad_accum_steps, p.sequence_len) == (8, 16, 4, 2048)
    assert (p.warmup_steps, p.warmdown_steps, p.final_lr_frac) == (40, 3619, 0.05)
    assert p.weight_decay == pytest.approx(0.05973842446340308, rel=1e-12) and p.weight_decay_schedule == "cosine"
    assert (p.muon_momentum_start, p.muon_momentum_end, p.muon_momentum_steps, p.muon_momentum_final) == \
        (0.85, 0.97, 400, 0.90)
    assert p.fp8 == "tensorwise" and p.fp8_layers == 145 and p.optimizer == "modern" and p.grad_clip == 0
    o = p.optim
    groups = {   # setup_optimizer's LRs: lm_head 0.008·bs·dscale, wte 0.3·bs·dscale, ve half, resid 0.5·bs·0.01, …
        "lm_head": (0.008, (0.8, 0.96), 0.01), "embedding": (0.3, (0.8, 0.995), 0.001),
        "value_embed": (0.15, (0.8, 0.995), 0.01), "resid_scalar": (0.5 * bs * 0.01, (0.8, 0.95), 0.05),
        "x0_scalar": (0.5 * bs, (0.96, 0.95), 0.0), "gate_scalar": (0.2, (0.8, 0.95), 0.0)}
    from nanochat.plan import adamw_group_settings
    got = adamw_group_settings(p.embedding_lr, p.unembedding_lr, p.scalar_lr, o)
    for name, (lr, betas, wd) in groups.items():
        assert got[name]["lr"] == pytest.approx(lr, rel=1e-12), name
        assert got[name]["betas"] == betas and got[name]["weight_decay"] == wd, name
    # the pipeline: runs/speedrun.sh's steps
    assert tree["run"]["pipeline"] == ["tokenizer", "pretrain", "base_eval", "sft", "chat_eval"]
    tok = stage_tree(tree, "tokenizer")["stage"]
    assert (tok["vocab_size"], tok["max_chars"]) == (32768, 2_000_000_000)
    assert stage_tree(tree, "sft")["stage"]["init_stage"] == "pretrain"
    assert tree["data"]["source"] == "climbmix"


def test_one_gpu_recipe_has_the_same_numbers():
    p8, _ = recipe_plan()
    tree = compose_checked(["experiment=speedrun_1gpu", "run.dry_run=true"], CONF)
    p1 = make_plan(config_from_dict(stage_tree(tree, "pretrain")))
    assert (p1.world_size, p1.grad_accum_steps) == (1, 32)
    for k in ("num_params", "total_batch_size", "num_iterations", "matrix_lr", "embedding_lr", "weight_decay",
              "warmdown_steps", "total_flops", "optim"):
        assert getattr(p1, k) == getattr(p8, k), k


def test_dec2025_recipe_kept_as_speedrun_d20():
    tree = compose_checked(["experiment=speedrun_d20", "run.dry_run=true"], CONF)
    p = make_plan(config_from_dict(stage_tree(tree, "pretrain")))
    assert (p.generation, p.num_params, p.num_iterations, p.optimizer, p.grad_clip) == \
        ("seed", 560_988_160, 21_400, "seed", 1.0)


def test_record_recipe_on_a_cpu_fails_before_any_work():
    from launch.validate import check_hardware
    tree = compose_checked(["experiment=speedrun", "hardware=cpu", "hardware.dtype=float32"], CONF)
    with pytest.raises(ConfigError, match=r"model\.fp8=.*fp8_emulate"):
        check_hardware(config_from_dict(stage_tree(tree, "pretrain")))


def test_launching_the_record_recipe_on_a_cpu_is_refused_before_the_tokenizer_runs(tmp_path):
    from conftest import run_cli
    p = run_cli(["experiment=speedrun", "hardware=cpu", "hardware.dtype=float32", f"run.root={tmp_path / 'runs'}"],
                tmp_path / "base", tmp_path, timeout=120)
    assert p.returncode != 0
    assert "ConfigError model.fp8 = 'tensorwise'" in p.stdout + p.stderr and "fp8_emulate=true" in p.stdout + p.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "base").exists()   # nothing ran
