"""The precision policy (nanochat/precision.py): resolution rules, autocast dtypes, loss scaling.

CPU training is fp32 by policy; the plain constructor forces bf16/fp16 on CPU so the autocast and
GradScaler logic runs here for real (on a GPU, bench/gpu_check.py checks the same).
"""
import pytest
import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizer
from nanochat.precision import Precision


def test_resolve_rules():
    cpu = Precision.resolve("cpu", "bfloat16")
    assert cpu.compute_dtype == torch.float32 and not cpu.autocast_enabled and cpu.notes
    assert Precision.resolve("cpu", "float32").notes == ()
    bf16 = Precision.resolve("cuda", "bfloat16", bf16_supported=True)
    assert bf16.compute_dtype == torch.bfloat16 and not bf16.needs_grad_scaler
    old_gpu = Precision.resolve("cuda", "bfloat16", bf16_supported=False)     # e.g. V100, T4
    assert old_gpu.compute_dtype == torch.float16 and old_gpu.needs_grad_scaler and "no bf16" in old_gpu.notes[0]
    assert Precision.resolve("cuda", "float16").needs_grad_scaler
    assert not Precision.resolve("cuda", "float32").autocast_enabled
    assert "GradScaler" in old_gpu.describe()
    with pytest.raises(ValueError, match=r"hardware.dtype='fp8'"):
        Precision.resolve("cuda", "fp8")


def tiny_model():
    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, softcap=15.0)
    model = build_model(cfg, "cpu", 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_bf16_autocast_keeps_master_weights_logits_and_optimizer_states_fp32():
    policy = Precision("cpu", torch.bfloat16)
    model = tiny_model()
    model.fused_loss = False   # the CPU-only fused loss never runs under autocast (CPU policy is fp32)
    opt = build_optimizer(model, embedding_lr=0.1, unembedding_lr=0.01, matrix_lr=0.02, scalar_lr=0.1,
                          weight_decay=0.0)
    idx = torch.randint(0, 64, (2, 16))
    with policy.autocast():
        h = model.transformer.h[0].mlp.c_fc(torch.randn(2, 32))
        logits = model(idx)
        loss = model(idx, idx)
    assert h.dtype == torch.bfloat16                      # matmuls run in bf16
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert logits.abs().max() <= 15.0                     # softcap applied in fp32
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    opt.step()
    policy.check_master_weights(model)
    policy.check_optimizer_states(opt)
    assert any(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    with pytest.raises(TypeError, match="master weights must be torch.float32"):
        policy.check_master_weights(tiny_model().bfloat16())


def test_fp16_scaler_skips_steps_on_inf_and_steps_once_finite():
    policy = Precision("cpu", torch.float16)
    model = tiny_model()
    opt = build_optimizer(model, embedding_lr=0.1, unembedding_lr=0.01, matrix_lr=0.02, scalar_lr=0.1,
                          weight_decay=0.0, grad_clip=1.0)
    model.fused_loss = False
    # fp16 autocast with a scale far past fp16's range (65504): the fp16 activation grads overflow
    # to inf, as on a GPU, until the scaler has backed off enough
    scaler = policy.grad_scaler(init_scale=2.0 ** 30)
    assert scaler.is_enabled()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    skipped = 0
    for _ in range(40):
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        with policy.autocast():
            loss = model(idx, idx)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        if scaler.get_scale() < scale:       # inf found: step skipped, scale halved
            assert not moved
            skipped += 1
        else:
            assert moved and all(torch.isfinite(p).all() for p in model.parameters())
            break
    assert skipped >= 1 and scaler.get_scale() < 2.0 ** 30


def test_disabled_scaler_is_a_pass_through():
    scaler = Precision.resolve("cpu", "float32").grad_scaler()
    assert not scaler.is_enabled()
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss


def test_bf16_embeddings_resolve_only_with_bf16_compute_on_cuda():
    assert Precision.resolve("cuda", "bfloat16", True, embeddings="bfloat16").embedding_dtype == torch.bfloat16
    for args in (("cpu", "float32"), ("cuda", "float32", True), ("cuda", "bfloat16", False)):   # False: fp16 GPU
        p = Precision.resolve(*args, embeddings="bfloat16")
        assert p.embedding_dtype == torch.float32 and any("fp32 embeddings" in n for n in p.notes), args
    assert Precision.resolve("cuda", "bfloat16", True).embedding_dtype == torch.float32   # the default


def test_bf16_embedding_tables_train_with_bf16_adamw_state_and_fp32_residual():
    """hardware.embedding_dtype=bfloat16: wte and value embeddings (their grads and AdamW moments too) in
    bf16, every other weight and state fp32, the lookup upcast so the residual stream stays fp32."""
    policy = Precision("cpu", torch.bfloat16, torch.bfloat16)
    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, softcap=15.0,
                    value_embeds=True)
    model = build_model(cfg, "cpu", 0)
    model.fused_loss = False
    policy.cast_embeddings(model)
    tables = {id(p) for k in ("embedding", "value_embed") for p in model.param_groups()[k]}
    assert len(tables) == 2   # wte + the value embedding of layer 1 (every other layer, the last included)
    assert all((p.dtype == torch.bfloat16) == (id(p) in tables) for p in model.parameters())
    assert model.embed(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float32
    opt = build_optimizer(model, embedding_lr=0.1, unembedding_lr=0.01, matrix_lr=0.02, scalar_lr=0.1,
                          weight_decay=0.0)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model.transformer.wte.weight.detach().clone()
    for _ in range(2):
        with policy.autocast():
            loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.isfinite(loss) and not torch.equal(before, model.transformer.wte.weight)
    policy.check_master_weights(model)
    policy.check_optimizer_states(opt)
    assert opt.state[model.transformer.wte.weight]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[model.lm_head.weight]["exp_avg"].dtype == torch.float32
    with pytest.raises(TypeError, match="master weights"):
        Precision("cpu", torch.bfloat16).check_master_weights(model)   # fp32 tables expected there
