"""Typed contracts: result.json and the chat plan are dataclasses, read back through them.

- every headline a stage declares (what a sweep optimises) is a field of the stage's result type
  (rename a field and this fails, not a report)
- result.json round-trips with its type; an older file without `result_type` or with fewer keys
  still reads (missing fields are None, unknown keys kept)
- objective() and the report card read typed results; the chat plan survives plan.json
"""
from __future__ import annotations

import json
import math

import pytest

from nanochat import results as R

def test_headline_keys_are_fields_of_the_stage_result():
    from nanochat.stages import stages
    for st in stages().values():
        assert st.headline is None or st.headline in st.result.field_names(), (st.name, st.headline)
    assert stages()["pretrain"].result is R.PretrainResult and stages()["sft"].result is R.ChatResult


def test_round_trip_and_tolerant_reads(tmp_path):
    r = R.RLResult(step=4, task="gsm8k", mean_reward=0.5, pass_at_k={"pass@1": 0.25}, extra={"custom": 1})
    (tmp_path / "result.json").write_text(json.dumps(r.to_dict()))
    back = R.load_result(tmp_path)
    assert back == r and isinstance(back, R.RLResult)
    assert json.loads((tmp_path / "result.json").read_text())["custom"] == 1  # extra stays flat in the file
    old = {"step": 8, "final_val_bpb": 1.25, "tokens_seen": 100, "no_longer_a_field": True}  # before result_type
    p = R.PretrainResult.from_dict(old)
    assert (p.final_val_bpb, p.tokens_seen, p.core, p.params) == (1.25, 100, None, {})
    assert p.extra == {"no_longer_a_field": True} and p.to_dict()["no_longer_a_field"] is True
    assert R.Result.from_dict(old).get("final_val_bpb") == 1.25  # untyped: still readable by key
    assert R.load_result(tmp_path / "missing") is None
    with pytest.raises(TypeError):
        R.PretrainResult(final_val_bpp=1.0)  # a typo in a writer fails at once
    assert {**R.ChatResult(step=2), "mine": 1}["step"] == 2  # a custom stage may extend it as a dict


def test_objective_warns_only_for_the_users_key(capsys):
    """A declared headline a run does not report (a chat-mode eval has no val_bpb) is NaN without noise;
    the user's own run.objective that is not a number says so."""
    from launch.run import objective
    out = {"status": "completed", "stages": [{"kind": "eval", "result": {"result_type": "EvalResult"}}]}
    assert math.isnan(objective(out, None, "eval")) and "run.objective" not in capsys.readouterr().out
    assert math.isnan(objective(out, "val_bpb", "eval")) and "run.objective='val_bpb'" in capsys.readouterr().out


def test_objective_and_report_read_typed_results():
    from launch.run import objective
    from nanochat.report import stage_metrics
    res = R.PretrainResult(step=3, first_val_bpb=2.0, final_val_bpb=1.5, tok_per_sec=1000.0)
    out = {"status": "completed", "result": res}
    assert objective(out, None, "pretrain") == 1.5
    assert objective(out, "tok_per_sec", "pretrain") == 1000.0
    assert math.isnan(objective(out, "core", "pretrain"))  # a field without a value
    assert objective({"status": "completed", "result": res.to_dict()}, None, "pretrain") == 1.5
    assert objective({"status": "completed", "result": {"mean_reward": 0.5}}, None, "rl") == 0.5  # an old file
    assert stage_metrics("pretrain", res) == stage_metrics("pretrain", res.to_dict())
    assert "val bpb 2.0000 → 1.5000" in stage_metrics("pretrain", res)
    assert "reward" in stage_metrics("rl", R.RLResult(first_reward=0.1, mean_reward=0.3))


def test_chat_plan_is_typed_through_plan_json():
    from nanochat.plan import ChatStagePlan, Plan
    from nanochat.config import Config
    from nanochat.plan import make_plan
    p = make_plan(Config())
    assert p.stage is None and Plan.from_dict(json.loads(json.dumps(p.to_dict()))).stage is None
    p.stage = ChatStagePlan(mixture=["gsm8k"], packing="bestfit", load_optimizer=True, base_lrs={"matrix_lr": 0.02})
    d = json.loads(json.dumps(p.to_dict()))
    assert d["stage"]["packing"] == "bestfit"  # plan.json keeps the same keys
    back = Plan.from_dict(d)
    assert back.stage == p.stage and back.stage.mixture == ["gsm8k"]
