"""The one training loop (nanochat/loop.py): resume, evaluations under a stop signal, one result definition.

- a toy stage on the loop (a real tiny GPT, its own step and an evaluation) stopped inside the
  evaluation at step 4 checkpoints step 4 and exits Preempted; the resumed run skips step 4's
  evaluations (they ran before the checkpoint), and ends with the losses and weights of an
  unbroken run
- final_train_loss is the debiased EMA of metrics.jsonl's train/loss for every stage (pretrain,
  sft); rl has none and reports the same EMA of its rewards as reward_ema
"""
from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import nanochat_run, read_metrics

RL = ["stage=rl", "model.depth=2", "stage.examples_per_step=2", "stage.num_samples=2", "stage.max_new_tokens=8",
      "stage.eval_examples=1", "stage.eval_num_samples=1", "stage.pass_at_k_every=-1",
      'stage.task="arithmetic:max_value=9"']


def debiased_ema(values: list[float], beta: float = 0.9) -> float:
    ema = 0.0
    for v in values:
        ema = beta * ema + (1 - beta) * v
    return ema / (1 - beta ** len(values))


def _toy_stage(run_dir: Path, cfg, calls: list, stop_at: int = -1):
    """A stage written against the loop: random-token batches, an evaluation that can be stopped."""
    from nanochat.lifecycle import STOP, check_stop
    from nanochat.loop import Evaluation, Loop, StepOut
    loop = Loop(cfg, run_dir)
    model, optimizer, _ = loop.build()

    def step(i: int) -> StepOut:
        x = torch.randint(0, 2048, (2, 17), generator=torch.Generator().manual_seed(i))
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepOut(loss.item(), 32)

    def probe(i: int) -> dict:
        calls.append(i)
        if i == stop_at:  # a SIGTERM arriving mid-pass, as the signal handler records it
            STOP.signum = signal.SIGTERM
            check_stop()
        return {"val/probe": 10.0 - i}

    loop.run(step, [Evaluation("probe", probe, every=2)], lambda: {"step": loop.state.step}, header="toy",
             val_key="val/probe")
    return loop, model


def test_stop_inside_evaluation_checkpoints_and_resume_skips_its_evals(tiny_pretrained, tmp_path, monkeypatch):
    from nanochat.config import load_config
    from nanochat.lifecycle import STOP, Preempted
    env, pre = tiny_pretrained
    monkeypatch.setenv("NANOCHAT_BASE_DIR", env["NANOCHAT_BASE_DIR"])
    cfg = load_config(str(pre / "resolved_config.yaml"))
    cfg = replace(cfg, stage=replace(cfg.stage, save_every=-1, keep_last=-1), run=replace(cfg.run, resume="auto"))
    full, cut = tmp_path / "full", tmp_path / "cut"
    for d in (full, cut):
        d.mkdir()
        shutil.copy(pre / "plan.json", d)

    calls: list = []
    loop, model = _toy_stage(full, cfg, calls)
    assert calls == [0, 2, 4, 6, 8]
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    calls = []
    try:
        with pytest.raises(Preempted):
            _toy_stage(cut, cfg, calls, stop_at=4)
    finally:
        STOP.signum = None
    assert calls == [0, 2, 4]
    assert [p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_000004"]

    calls = []
    resumed, model = _toy_stage(cut, cfg, calls)
    assert calls == [6, 8]  # step 4's evaluations ran before its checkpoint
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    a, b = ({r["step"]: r["train/loss"] for r in read_metrics(d) if "train/loss" in r} for d in (full, cut))
    assert a == b and sorted(a) == list(range(1, 9))
    r = resumed.result()
    assert r["step"] == 8 and r["tokens_seen"] == 8 * 32
    assert (resumed.state.val_first, resumed.state.val_last, resumed.state.val_best) == (10.0, 2.0, 2.0)
    assert r["final_train_loss"] == pytest.approx(debiased_ema([a[s] for s in range(1, 9)]), rel=1e-12)
    assert r["final_train_loss"] == loop.result()["final_train_loss"]


def test_pretrain_final_train_loss_is_the_debiased_ema(tiny_pretrained):
    _, pre = tiny_pretrained
    r = json.loads((pre / "result.json").read_text())
    train = [m["train/loss"] for m in read_metrics(pre) if "train/loss" in m]
    assert len(train) == r["step"] == 8
    assert r["final_train_loss"] == pytest.approx(debiased_ema(train), rel=1e-9)


@pytest.mark.slow
def test_chat_and_rl_share_the_definition(stage_root):
    env, root, pre = stage_root
    sft = root / "sft_ema"
    nanochat_run(env, "experiment=tiny", "model.depth=2", "stage=sft", f"stage.init_from={pre}",
                 'stage.mixture=["arithmetic:size=50"]', "stage.num_iterations=3",
                 "stage.eval_every=-1", "stage.eval_tasks=[]", f"run.root={root}", f"run.dir={sft}")
    r = json.loads((sft / "result.json").read_text())
    train = [m["train/loss"] for m in read_metrics(sft) if "train/loss" in m]
    assert len(train) == 3 and r["final_train_loss"] == pytest.approx(debiased_ema(train), rel=1e-9)
    rl = root / "rl_ema"
    nanochat_run(env, *RL, f"stage.init_from={pre}", "stage.num_iterations=2", f"run.root={root}", f"run.dir={rl}")
    r = json.loads((rl / "result.json").read_text())
    rewards = [m["train/reward"] for m in read_metrics(rl) if "train/reward" in m]
    assert r["final_train_loss"] is None and r["mean_reward"] == rewards[-1]
    assert r["reward_ema"] == pytest.approx(debiased_ema(rewards), rel=1e-9)


def test_loop_state_of_a_checkpoint_from_before_the_one_loop_still_resumes():
    """Checkpoints written before the loop named the EMA and validation fields differently."""
    from nanochat.loop import LoopState
    old = {"step": 40, "smooth_loss": 2.5, "first_val_bpb": 3.0, "last_val_bpb": 2.0, "best_val_bpb": 1.9,
           "extra": {"timed_tokens": 1234}, "gone_field": 1}
    s = LoopState.from_dict(old)
    assert (s.step, s.train_ema, s.val_first, s.val_last, s.val_best) == (40, 2.5, 3.0, 2.0, 1.9)
    assert s.timed_tokens == 1234 and "timed_tokens" not in s.extra
    assert LoopState.from_dict(s.__dict__) == s
