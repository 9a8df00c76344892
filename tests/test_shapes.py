"""nanochat/shapes.py is the one formula for the model's shape: the built GPT must match it role by role."""
from __future__ import annotations

import pytest
import torch

from nanochat.config import ModelConfig
from nanochat.gpt import GPT, GPTConfig
from nanochat.plan import model_shape, param_breakdown
from nanochat.shapes import ROLES, flops_per_token, param_counts

TOGGLES = ("value_embeds", "resid_lambdas", "x0_lambdas", "smear", "backout")


def _built(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


# both generations through the planner (odd and even depth, GQA), then each toggle alone on the seed model
PLANNED = [dict(generation=g, depth=d, n_kv_head=kv) for g in ("seed", "modern") for d, kv in ((3, None), (4, 1))]
ALONE = [{t: True, "window_pattern": "SL"} for t in TOGGLES]


@pytest.mark.parametrize("m", PLANNED + ALONE, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_every_role_counts_what_the_model_builds(m):
    mc = ModelConfig(**{"aspect_ratio": 32, "head_dim": 32, "sequence_len": 64, **m})
    shape = model_shape(mc, vocab_size=1000)
    model = _built(GPTConfig(**shape.gpt_config_kwargs()))
    built = {role: sum(p.numel() for p in ps) for role, ps in model.param_groups().items()}
    for s in (shape, model.config):       # the plan's shape and the model's own config read the same
        c = param_counts(s)
        assert {r: c[r] for r in ROLES} == built
        assert c["total"] == model.num_params() and c["scaling"] == model.num_scaling_params()
        assert flops_per_token(s) == model.estimate_flops()
    for t in TOGGLES:                      # a toggle that is on has parameters; one that is off has none
        role = {"value_embeds": "value_embed", "resid_lambdas": "resid_scalar", "x0_lambdas": "x0_scalar",
                "smear": "gate_scalar", "backout": "gate_scalar"}[t]
        if getattr(shape, t):
            assert built[role] > 0
    bd = param_breakdown(shape)
    assert bd["total"] == model.num_params() and bd["matmul"] == model.num_scaling_params()
