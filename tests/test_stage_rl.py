"""The rl stage: rollouts with the Engine, masked policy gradient, pass@k, resume, 2-process DDP.

- the policy-gradient step raises log p of samples with positive advantage and lowers it for
  negative ones; prompt and forced tool-output tokens get no gradient
- `nanochat-run stage=rl` from a checkpoint on one process (arithmetic, offline) and on GSM8K
  under torchrun with 2 gloo ranks (the optimizer reduces the gradients)
- a run resumed from a mid-run checkpoint ends with the same weights as an uninterrupted one
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import nanochat_run
from nanochat.common import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def source(stage_root):
    return stage_root


# the tiny pretrain run (an accepted source of rl) stands in for an SFT run (saves minutes)
RL = ["stage=rl", "model.depth=2", "stage.examples_per_step=2", "stage.num_samples=3", "stage.max_new_tokens=12",
      "stage.eval_examples=2", "stage.eval_num_samples=2", "stage.temperature=1.0"]


def test_rollout_targets_mask_forced_tokens():
    from nanochat.stages.rl import rollout_tensors
    seqs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7]]
    masks = [[0, 0, 1, 0, 0, 1], [0, 0, 1, 1]]  # prompt 0s, a forced tool output (4, 5) 0s
    x, y = rollout_tensors(seqs, masks, pad=99, device="cpu")
    assert x.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 99, 99]]
    assert y.tolist() == [[-1, 3, -1, -1, 6], [-1, 3, 7, -1, -1]]


def test_policy_gradient_moves_logprobs_with_advantage():
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.stages.rl import policy_gradient_backward, rollout_tensors
    model = build_model(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
                        "cpu", 0)
    prompt = [1, 5, 9]
    seqs = [prompt + [10, 11, 12], prompt + [20, 21, 22]]
    masks = [[0] * 3 + [1, 0, 1], [0] * 3 + [1, 1, 1]]  # token 11 forced (tool output): never trained
    x, y = rollout_tensors(seqs, masks, pad=0, device="cpu")

    def logps():
        with torch.no_grad():
            return -model(x, y.clamp(min=0), loss_reduction="none").view_as(y)

    before = logps()
    adv = torch.tensor([0.5, -0.5])
    policy_gradient_backward(model, x, y, adv, device_batch=1, normalizer=float((y >= 0).sum()))
    # the forced token's target position carries no loss, so zero advantage ⇒ zero gradient
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = logps()
    sampled = y >= 0
    assert (after[0][sampled[0]] > before[0][sampled[0]]).all()   # rewarded sample: more likely
    assert (after[1][sampled[1]] < before[1][sampled[1]]).all()   # penalized sample: less likely
    model.zero_grad(set_to_none=True)
    policy_gradient_backward(model, x, y, torch.zeros(2), device_batch=2, normalizer=1.0)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


@pytest.mark.slow
def test_rl_single_process_and_resume(source, monkeypatch):
    from nanochat.config import load_config
    from nanochat.stages._entry import execute
    env, root, pre = source
    run = root / "rl1"
    nanochat_run(env, *RL, f"stage.init_from={pre}", "stage.task=\"arithmetic:max_value=9\"",
                 "stage.num_iterations=4", "stage.save_every=2", "stage.pass_at_k_every=2",
                 f"run.root={root}", f"run.dir={run}")
    r = json.loads((run / "result.json").read_text())
    assert r["step"] == 4 and set(r["pass_at_k"]) == {"pass@1", "pass@2"}
    assert 0 <= r["pass_at_k"]["pass@1"] <= r["pass_at_k"]["pass@2"] <= 1
    assert r["tokens_seen"] > 0  # sampled tokens
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if "train/reward" in m] == [1, 2, 3, 4]
    assert sum("val/pass@1" in m for m in rows) == 3  # steps 0, 2, 4
    w_full = torch.load(run / "checkpoints" / "step_000004" / "model.pt")
    # resume from the step-2 checkpoint (in-process worker) and land on the same weights
    shutil.rmtree(run / "checkpoints" / "step_000004")
    for f in ("COMPLETED", "result.json", "status.json"):
        (run / f).unlink()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", env["NANOCHAT_BASE_DIR"])
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    assert execute(load_config(str(run / "resolved_config.yaml")), run) == 0
    w_resumed = torch.load(run / "checkpoints" / "step_000004" / "model.pt")
    for k in w_full:
        assert torch.equal(w_full[k], w_resumed[k]), k


@pytest.mark.slow
def test_rl_gsm8k_ddp_two_ranks(source):
    if shared_data_dir() is None:
        pytest.skip("../shared/data is absent: GSM8K is read from its gsm8k/ folder offline")
    env, root, pre = source
    run = root / "rl_ddp"
    nanochat_run(env, *RL, f"stage.init_from={pre}", "stage.task=gsm8k", "stage.num_iterations=2",
                 "stage.pass_at_k_every=-1", "hardware.nproc_per_node=2", f"run.root={root}", f"run.dir={run}")
    r = json.loads((run / "result.json").read_text())
    assert r["world_size"] == 2 and r["step"] == 2 and r["task"] == "gsm8k"
    assert "pass@2" in r["pass_at_k"]  # evaluated at the end, questions split across the ranks
    assert (run / "checkpoints" / "step_000002" / "optim_rank1.pt").exists()
