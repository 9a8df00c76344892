"""ZeRO-2 MuonAdamW over 2 real processes (gloo, CPU) against a single process on the same batch.

The model has shapes whose first dim / count does not divide by 2 (3 layers → odd Muon stacks,
odd scalar vectors, a 1-element lambda) so the padding paths run.
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizer, muon_momentum
from nanochat.plan import OPTIMIZER_RECIPES

CFG = dict(sequence_len=16, vocab_size=101, n_layer=3, n_head=2, n_kv_head=1, n_embd=64,
           value_embeds=True, window_pattern="SL", resid_lambdas=True, x0_lambdas=True, smear=True,
           backout=True, qk_scale=1.2)
STEPS = 4
OPT = dict(embedding_lr=0.05, unembedding_lr=0.01, matrix_lr=0.02, scalar_lr=0.05, weight_decay=0.1,
           grad_clip=0.05)   # small enough to clip every step: exercises the global-norm path
# the two recipes: Dec 2025 (plain Muon) and nanochat 92d63d4's (NorMuon state, cautious decay, per-group AdamW)
RECIPES = {name: {k: v for k, v in r.items() if not k.startswith("muon_momentum")}
           for name, r in OPTIMIZER_RECIPES.items()}


def make_model(seed: int = 0):
    """A model with its zero-initialized weights nudged: at the plain init some gradients are
    exactly zero in exact arithmetic, and Adam turns their round-off noise into ±lr steps."""
    model = build_model(GPTConfig(**CFG), "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 101, (4, 17), generator=g) for _ in range(STEPS + 1)]


def train(model, opt, data, rank=0, world=1, steps=range(STEPS)):
    for g in opt.param_groups:
        if g["kind"] == "adamw":
            g["eps"] = 1e-4   # comparable to the gradients: makes AdamW sensitive to their scale,
                              # so summing instead of averaging across ranks would show
    for s in steps:
        for g in opt.param_groups:
            if g["kind"] == "muon":
                g["momentum"] = muon_momentum(s)
        idx = data[s].chunk(world)[rank]          # this rank's half of the global batch
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, recipe):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = batches()
        model = make_model(0)
        opt = build_optimizer(model, world_size=world, rank=rank, settings=RECIPES[recipe], **OPT)
        train(model, opt, data, rank, world)
        torch.save(model.state_dict(), os.path.join(out_dir, f"model_rank{rank}.pt"))
        # per-rank optimizer state: save, rebuild, load, and take one more step both ways
        sd_path = os.path.join(out_dir, f"optim_rank{rank}.pt")
        torch.save(opt.state_dict(), sd_path)
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, opt, data, rank, world, steps=[STEPS])
        model2 = make_model(99)
        model2.load_state_dict(snapshot)
        opt2 = build_optimizer(model2, world_size=world, rank=rank, settings=RECIPES[recipe], **OPT)
        opt2.load_state_dict(torch.load(sd_path, weights_only=True))
        train(model2, opt2, data, rank, world, steps=[STEPS])
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
        # state is sharded: this rank holds moments for only its slice of wte
        wte_state = opt.state[model.transformer.wte.weight]["exp_avg"]
        muon_state = sorted(k for p in model.transformer.h.parameters() for k in opt.state.get(p, {}))
        with open(os.path.join(out_dir, f"result_rank{rank}.json"), "w") as f:
            json.dump({"resume_equal": same, "wte_state_numel": wte_state.numel(), "muon_state": muon_state,
                       "grad_norm": float(opt.last_grad_norm)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("recipe", ["seed", "modern"])
def test_zero2_two_processes_match_single_process(tmp_path, recipe):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), recipe), nprocs=world, join=True)

    # reference: one process, the whole global batch
    torch.set_num_threads(1)
    ref = make_model(0)
    ref_opt = build_optimizer(ref, settings=RECIPES[recipe], **OPT)
    train(ref, ref_opt, batches())

    wte_numel = ref.transformer.wte.weight.numel()
    for rank in range(world):
        got = torch.load(tmp_path / f"model_rank{rank}.pt", weights_only=True)
        for name, want in ref.state_dict().items():
            if recipe == "seed" or want.dim() < 2:
                torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")
                continue
            # cautious decay's mask [O·p >= 0] flips where an update element is at round-off level
            # (gradients averaged over two halves vs the whole batch): such an element is one decay
            # step lr·sqrt(rows/cols)·wd·|p| apart (≤ 4e-3·|p| here). Everything else matches tightly.
            diff = (got[name] - want).abs()
            off = diff > 1e-5 + 1e-4 * want.abs()
            assert off.float().mean() < 1e-3, f"rank {rank}: {name}: {int(off.sum())} elements differ"
            assert (diff <= STEPS * 4e-3 * want.abs() + 1e-5).all(), f"rank {rank}: {name}: max diff {diff.max()}"
        res = json.loads((tmp_path / f"result_rank{rank}.json").read_text())
        assert res["resume_equal"], f"rank {rank}: resuming from its optimizer shard diverged"
        assert res["wte_state_numel"] == wte_numel // world
        assert res["grad_norm"] > OPT["grad_clip"]   # clipping was active
        if recipe == "modern":   # each rank holds NorMuon's second moment for the matrices it owns
            assert "second_momentum_buffer" in res["muon_state"]
    # the run moved the weights (the comparison is not between two untouched inits)
    init = make_model(0)
    assert not torch.allclose(init.lm_head.weight, ref.lm_head.weight)


def test_world_size_without_process_group_fails_clearly():
    model = build_model(GPTConfig(**CFG), "cpu", seed=0)
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        build_optimizer(model, world_size=2, rank=0, **OPT)
