"""Stage `rl`: on-policy reinforcement learning on a task with a reward (GSM8K by default).

Each step, every rank takes its share of `examples_per_step` training questions and, for
each, samples `num_samples` answers with the Engine (tool calls run, their outputs are
forced in). The task's reward scores each answer (0/1 for GSM8K); the advantage of a
sample is its reward minus the mean reward of its question's samples (no std division,
no KL, no clipping: nanochat's simplified GRPO, i.e. REINFORCE with a mean baseline). The
loss is the policy gradient -Σ advantage·log p(token), normalized by the number of sampled
tokens, over sampled tokens only: prompt, padding and forced tool-output tokens are masked.

pass@k on the first `eval_examples` test questions (`eval_num_samples` samples each) runs
every `pass_at_k_every` steps and at the end. Runs on one CPU or under torchrun: the
optimizer reduces the gradients across ranks (no DDP wrapper). Which questions a step uses,
and the sampling seeds, are functions of the step, so a resumed run continues exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from nanochat.chat_plan import rl_plan
from nanochat.config import Config, RLStageConfig
from nanochat.lifecycle import check_stop
from nanochat.results import RLResult
from nanochat.stages import Stage
from nanochat.tokenizer import get_tokenizer

if TYPE_CHECKING:  # torch and what imports it load in the worker only: the launcher imports this module
    import torch
    from nanochat.engine import Engine


def sample_rollouts(engine: Engine, tokenizer, task, index: int, num_samples: int, max_new_tokens: int,
                    temperature: float, top_k: Optional[int], seed: int):
    """Sample answers to question `index`: (sequences, masks, rewards)."""
    conv = task[index]
    prompt = tokenizer.render_for_completion(conv)
    budget = max(1, min(max_new_tokens, engine.model.rotary_len - len(prompt)))  # within the RoPE table
    engine.model.eval()
    seqs, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget,
                                        temperature=temperature, top_k=top_k, seed=seed)
    rewards = [float(task.reward(conv, tokenizer.decode(s[len(prompt):]))) for s in seqs]
    return seqs, masks, rewards


def rollout_tensors(seqs: list[list[int]], masks: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for a group of samples; targets are -1 except on sampled tokens."""
    import torch
    from torch.nn.utils.rnn import pad_sequence
    x = pad_sequence([torch.tensor(s[:-1], dtype=torch.long) for s in seqs], batch_first=True, padding_value=pad)
    y = pad_sequence([torch.tensor([t if keep else -1 for t, keep in zip(s[1:], m[1:])], dtype=torch.long)
                      for s, m in zip(seqs, masks)], batch_first=True, padding_value=-1)
    return x.to(device), y.to(device)


def policy_gradient_backward(model, x: torch.Tensor, y: torch.Tensor, advantages: torch.Tensor, device_batch: int,
                             normalizer: float) -> None:
    """Accumulate grads of -Σ advantage·log p(sampled token) / normalizer, in chunks of device_batch rows.

    Targets of -1 (prompt, padding, forced tool output) contribute nothing.
    """
    for b0 in range(0, x.size(0), device_batch):
        xb, yb, ab = x[b0:b0 + device_batch], y[b0:b0 + device_batch], advantages[b0:b0 + device_batch]
        nll = model(xb, yb, loss_reduction="none").view_as(yb).float()
        logp = -nll * (yb >= 0)
        loss = -(logp * ab.unsqueeze(1)).sum() / normalizer
        loss.backward()


def pass_at_k(model, tokenizer, task, num_examples: int, k: int, max_new_tokens: int, temperature: float,
              top_k: Optional[int], seed: int, device) -> dict:
    """{"pass@1".."pass@k"}: fraction of test questions with a correct answer among the first i samples."""
    import torch
    from nanochat import training as T
    from nanochat.common import rank_world
    from nanochat.engine import Engine
    rank, world = rank_world()
    engine = Engine(model, tokenizer)
    n = min(num_examples, len(task))
    hits = torch.zeros(k + 1, dtype=torch.float64, device=device)  # [0] counts questions
    for i in range(rank, n, world):
        check_stop()  # a preemption is acted on between questions, not after the whole pass
        _, _, rewards = sample_rollouts(engine, tokenizer, task, i, k, max_new_tokens, temperature, top_k, seed + i)
        hits[0] += 1
        for j in range(1, k + 1):
            hits[j] += float(any(r > 0 for r in rewards[:j]))
    hits = T.dist_sum(hits)
    return {f"pass@{j}": float(hits[j] / hits[0].clamp(min=1)) for j in range(1, k + 1)}


def run(cfg: Config, run_dir: Path) -> RLResult:
    import torch
    from nanochat import loop as L, training as T
    from nanochat.engine import Engine
    from nanochat.tasks import make_task
    loop = L.Loop(cfg, run_dir)
    rt, eplan, st = loop.rt, loop.plan, cfg.stage  # eplan: nanochat/chat_plan.py's rl_plan (horizon, LRs)
    tokenizer = get_tokenizer(rt.base_dir, eplan.stage.tokenizer or cfg.data.tokenizer)
    train_task, test_task = (make_task(st.task, split, data_dir=cfg.paths.shared_data, base_dir=str(rt.base_dir))
                             for split in ("train", "test"))
    E, S = st.examples_per_step, st.num_samples
    model, optimizer, _ = loop.build()
    state = loop.state
    engine = Engine(model, tokenizer)
    pad = tokenizer.encode_special("<|assistant_end|>")

    def step(step: int) -> L.StepOut:
        """Rollouts for this rank's questions, then one policy-gradient step."""
        mine = list(range(rt.rank, E, rt.world))
        groups = [sample_rollouts(engine, tokenizer, train_task, (step * E + j) % len(train_task), S,
                                  st.max_new_tokens, st.temperature, st.top_k, cfg.run.seed * 1_000_003 + step * E + j)
                  for j in mine]
        reward_sum, sampled_tokens = sum(sum(rewards) for _, _, rewards in groups), 0
        model.train()
        for seqs, masks, rewards in groups:
            r = torch.tensor(rewards, dtype=torch.float32, device=rt.device)
            adv = r - r.mean()
            x, y = rollout_tensors(seqs, masks, pad, rt.device)
            n_valid = int((y >= 0).sum())
            sampled_tokens += n_valid
            if n_valid == 0 or bool((adv == 0).all()):
                continue  # nothing sampled, or no signal (all samples scored alike)
            # token-level normalization per question, averaged over this rank's questions
            with rt.autocast():
                policy_gradient_backward(model, x, y, adv, eplan.device_batch_size, n_valid * len(mine))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals = T.dist_sum(torch.tensor([reward_sum, float(len(mine) * S), float(sampled_tokens)],
                                        dtype=torch.float64, device=rt.device))
        mean_reward = float(totals[0] / totals[1])
        state.extra.setdefault("first_reward", mean_reward)
        state.extra["last_reward"] = mean_reward
        return L.StepOut(mean_reward, int(totals[2]), {"sampled_tokens": int(totals[2])})

    def evaluate(_: int) -> dict:
        res = pass_at_k(model, tokenizer, test_task, st.eval_examples, st.eval_num_samples, st.max_new_tokens,
                        st.temperature, st.top_k, cfg.run.seed + 1_000_003, rt.device)
        return {f"val/{k}": v for k, v in res.items()}

    header = (f"rl on {st.task}: {len(train_task):,} train questions | {eplan.num_iterations} steps × {E} questions "
              f"× {S} samples | matrix LR {eplan.matrix_lr:.4g}")
    loop.run(step, [L.Evaluation("pass@k", evaluate, every=st.pass_at_k_every)], lambda: {"step": state.step},
             header=header, metric="reward")
    pass_k = state.evals.get("pass@k")
    return loop.result(RLResult, task=st.task, first_reward=state.extra.get("first_reward"),
                       mean_reward=state.extra.get("last_reward"), reward_ema=state.smoothed(),
                       pass_at_k={k[len("val/"):]: v for k, v in pass_k.items()} if pass_k else None)


# --------------------------------------------------------------------------- the declaration

STAGE = Stage("rl", schema=RLStageConfig, planner=rl_plan, worker=run, sources=("sft", "mid", "pretrain"),
              default_source={"seed": "sft", "modern": "sft"}, headline="mean_reward", result=RLResult)
