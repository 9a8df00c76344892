"""The modern optimizer against nanochat 92d63d4's own, step by step (shared/data fixture).

`nanochat_checkpoints/92d63d4_optimizer/steps.pt` holds nanochat's `setup_optimizer` + `MuonAdamW` on a
d4 modern model (2 query heads, 1 KV head, SSSL, value embeddings), one batch, base_train's schedules
for 8 steps: the groups, the initial weights, step 0's gradients, each step's schedule and loss, and
the parameters after steps 0, 1, 4 and 7. Our optimizer is built the way a run builds it (config →
plan → training.make_optimizer, schedules by training.apply_schedules).

Tolerances (fp32 eager on CPU on both sides):
- step 0 from nanochat's own gradients is the optimizer alone: equal to fp32 round-off (abs 1e-6;
  measured 2.4e-7).
- step 0's gradients of the parameters that start at zero or at a neutral value (resid/x0/backout
  lambdas; measured ~1e-10) are pure round-off, different in any other forward, and Adam turns their
  sign into a full ±lr step: so step 0 always consumes the fixture's gradients.
- steps 1–7 then use our model's gradients, which equal nanochat's to fp32 round-off (~1e-7); Muon's
  orthogonalization amplifies that in ill-conditioned directions, so parameters are compared per
  tensor by relative Frobenius distance < 1e-3 (measured at most 1.8e-4) and losses to 1e-4
  relative (measured 1.4e-5). Every single refinement switched off lands ≥ 2e-2 away (cautious decay, the subtlest),
  which the last test checks, so the tolerance tells the recipes apart.
"""
from types import SimpleNamespace

import pytest
import torch

from nanochat.common import shared_data_dir
from nanochat.config import config_from_dict
from nanochat.gpt import GPTConfig, build_model
from nanochat.interop import from_nanochat, to_nanochat
from nanochat.plan import make_plan
from nanochat import training as T

SHARED = shared_data_dir()
FIXTURE = SHARED / "nanochat_checkpoints" / "92d63d4_optimizer" / "steps.pt" if SHARED else None
pytestmark = pytest.mark.skipif(FIXTURE is None or not FIXTURE.exists(),
                                reason="shared data (nanochat_checkpoints/92d63d4_optimizer) not available")


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=False)


def plan_for(fx, **stage):
    mc, rule, kw = fx["model_config"], fx["schedule_rule"], fx["setup_optimizer_kwargs"]
    tree = {"model": {"generation": "modern", "depth": mc["n_layer"], "n_embd": mc["n_embd"], "n_head": mc["n_head"],
                      "n_kv_head": mc["n_kv_head"], "vocab_size": mc["vocab_size"], "sequence_len": mc["sequence_len"],
                      "window_pattern": mc["window_pattern"]},
            # B = B_REF: nanochat's setup_optimizer kwargs are base_train's defaults without batch scaling
            "stage": {"name": "pretrain", "total_batch_size": 2 ** 19, "num_iterations": rule["num_iterations"],
                      "warmup_steps": rule["warmup_steps"], "warmdown_ratio": rule["warmdown_ratio"],
                      "final_lr_frac": rule["final_lr_frac"], "weight_decay": kw["weight_decay"], **stage},
            "hardware": {"device_batch_size": 1}}
    return make_plan(config_from_dict(tree))


def setup(fx, **stage):
    kwargs, state = from_nanochat(fx["init_state"], fx["model_config"])
    model = build_model(GPTConfig(**kwargs), "cpu", 0)
    model.load_state_dict(state)
    plan = plan_for(fx, **stage)
    cfg = SimpleNamespace(stage=SimpleNamespace(adam_beta1=0.8, adam_beta2=0.95))
    opt = T.make_optimizer(model, plan, cfg, SimpleNamespace(world=1, rank=0))
    return model, opt, plan, kwargs


def ours_as_nanochat(model, kwargs):
    return to_nanochat({k: v.detach() for k, v in model.state_dict().items()}, kwargs)[1]


def rel_dist(model, kwargs, want):
    got = ours_as_nanochat(model, kwargs)
    return {k: ((got[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in want.items()}


def step0_with_fixture_grads(fx, model, opt, plan):
    grads = from_nanochat(fx["steps"][0]["grads"], fx["model_config"])[1]
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    T.apply_schedules(opt, 0, plan)
    opt.step()
    opt.zero_grad(set_to_none=True)


def replay(fx, model, opt, plan, kwargs, check=True):
    step0_with_fixture_grads(fx, model, opt, plan)
    for i in range(1, len(fx["steps"])):
        loss = model(fx["x"], fx["y"])
        loss.backward()
        T.apply_schedules(opt, i, plan)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if check:
            assert loss.item() == pytest.approx(fx["steps"][i]["loss"], rel=1e-4), f"loss before step {i}"
            if fx["steps"][i].get("params_after") is not None:
                d = rel_dist(model, kwargs, fx["steps"][i]["params_after"])
                worst = max(d, key=d.get)
                assert d[worst] < 1e-3, f"after step {i}: {worst} is {d[worst]:.2e} (relative) from nanochat's"
    return rel_dist(model, kwargs, fx["steps"][-1]["params_after"])


def test_groups_and_schedules_are_nanochats(fx):
    model, opt, plan, _ = setup(fx)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {}
    for g in opt.param_groups:
        for p in g["params"]:
            ours[names[id(p)]] = g
    assert len(ours) == len(list(model.parameters()))
    for want in fx["param_groups"]:
        for name in want["params"]:
            g = ours[name]
            assert g["kind"] == want["kind"], name
            assert g["lr"] == pytest.approx(want["lr"], rel=1e-12), name
            assert g["weight_decay"] == pytest.approx(want["weight_decay"], rel=1e-12), name
            if want["kind"] == "adamw":
                assert tuple(g["betas"]) == tuple(want["betas"]) and g["eps"] == want["eps"], name
            else:
                assert g["ns_steps"] == want["ns_steps"] and g["beta2"] == want["beta2"], name
                assert g["ns"] == "polar_express" and g["normuon"] and g["cautious"] and g["equilibrate"] \
                    and g["renorm"] and g["ns_safety"] == 1.01
    for i, s in enumerate(fx["steps"]):   # base_train's LR multiplier, Muon momentum, cosine weight decay
        lrm = T.apply_schedules(opt, i, plan)
        muon = next(g for g in opt.param_groups if g["kind"] == "muon")
        assert lrm == pytest.approx(s["schedule"]["lrm"], rel=1e-12)
        assert muon["momentum"] == pytest.approx(s["schedule"]["muon_momentum"], rel=1e-12)
        assert muon["weight_decay"] == pytest.approx(s["schedule"]["muon_weight_decay"], rel=1e-12, abs=1e-15)


def test_step0_is_nanochats_update(fx):
    model, opt, plan, kwargs = setup(fx)
    assert model(fx["x"], fx["y"]).item() == pytest.approx(fx["steps"][0]["loss"], rel=1e-6)
    step0_with_fixture_grads(fx, model, opt, plan)
    got = ours_as_nanochat(model, kwargs)
    for k, want in fx["steps"][0]["params_after"].items():
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=k)


def test_replay_eight_steps_matches_nanochat(fx):
    model, opt, plan, kwargs = setup(fx)
    replay(fx, model, opt, plan, kwargs)


@pytest.mark.parametrize("stage", [{"cautious_wd": False}, {"optimizer": "seed"}], ids=["no-cautious", "dec2025"])
def test_other_recipes_land_far_from_nanochat(fx, stage):
    """The tolerance above separates recipes: one refinement off, or the Dec-2025 optimizer, is far off."""
    model, opt, plan, kwargs = setup(fx, **stage)
    d = replay(fx, model, opt, plan, kwargs, check=False)
    assert max(d.values()) > 1e-2
