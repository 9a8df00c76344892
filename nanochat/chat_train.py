"""What the chat stages (mid, sft) train with, over the plan the launcher froze.

The run dir's plan.json is already the stage's plan (nanochat/chat_plan.py derived it from
the source run: horizon, batch, inherited LRs, schedule, packing); this module builds the
loaders it names, warm-starts the optimizer when asked, and gives the one training loop
(nanochat/loop.py: checkpoint / resume / preemption / metrics, as pretraining) its step and
its evaluations (validation loss, task scores, ChatCORE). Evaluations yield to a stop signal
between batches: the run then checkpoints at the step boundary and exits preempted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from nanochat import loop as L, training as T
from nanochat.chat_data import LOADERS
from nanochat.chat_eval import chatcore, evaluate_chat_tasks
from nanochat.chat_plan import build_mixture, held_out_specs
from nanochat.common import atomic_write_json
from nanochat.config import Config
from nanochat.loss_eval import evaluate_bpb
from nanochat.results import ChatResult
from nanochat.tokenizer import get_tokenizer

VAL_PER_TASK = 200


def warm_start_optimizer(optimizer: Any, source: str, rt: T.Runtime, log: Callable[[str], None]) -> bool:
    """Carry the source checkpoint's optimizer state (momentum, second moments, ...) into `optimizer`.

    Generic over state_dict(): every group keeps this stage's settings (LRs, initial LRs, momentum,
    weight decay: the source's are at the end of its schedule), only per-parameter state moves.
    A source without optimizer state for this rank (or saved with another world size or another
    optimizer layout) warns and continues with a fresh optimizer, as nanochat does.
    """
    from nanochat.checkpoint import latest_checkpoint, load_meta, load_rank_state
    ckpt = latest_checkpoint(source)
    state = load_rank_state(ckpt, rt.rank, rt.device)["optim"] if ckpt is not None else None
    src_world = load_meta(ckpt).get("world_size", rt.world) if ckpt is not None else rt.world
    ours = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if state is None:
        why = f"{ckpt} has no optimizer state (optim_rank{rt.rank}.pt)"
    elif src_world != rt.world:
        why = f"{ckpt} was saved by {src_world} ranks, this run has {rt.world} (optimizer state is sharded per rank)"
    else:
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            why = f"its optimizer state does not fit this optimizer ({e})"
        else:
            for group, keep in zip(optimizer.param_groups, ours):
                group.update(keep)
            log(f"optimizer: state warm-started from {ckpt} (LRs and schedules are this stage's)")
            return True
    log(f"WARNING: stage.load_optimizer=true but {why}; starting with a fresh optimizer")
    return False


def train_step(model, optimizer, batches: list, rt: T.Runtime) -> tuple[float, int]:
    """One optimizer step over `batches`, the loss normalized by the trained tokens of the whole step.

    Returns (mean loss per trained token, trained tokens), both over all ranks.
    """
    counts = [int((y >= 0).sum()) for _, y in batches]
    n_global = float(T.dist_sum(torch.tensor(float(sum(counts)), device=rt.device)))
    loss_sum = torch.zeros((), device=rt.device)
    for (x, y), n in zip(batches, counts):
        if n == 0:
            continue
        with rt.autocast():
            loss = model(x, y)
        w = n * rt.world / n_global  # the optimizer averages ranks' gradients
        (loss * w).backward()
        loss_sum += loss.detach() * n
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(T.dist_sum(loss_sum)) / n_global, int(n_global)


def train_chat(cfg: Config, run_dir: Path) -> ChatResult:
    """The mid/sft stage over the frozen plan: its model, data and evaluations over the one loop (nanochat/loop.py)."""
    from nanochat.tasks import TaskDataError, TaskMixture, make_task
    loop = L.Loop(cfg, run_dir)
    rt, plan, log, st = loop.rt, loop.plan, loop.log, cfg.stage
    tokenizer = get_tokenizer(rt.base_dir, plan.stage.tokenizer or cfg.data.tokenizer)
    mix, names = build_mixture(st.mixture, [(s, True) for s in plan.stage.mixture], "train",
                               data_dir=cfg.paths.shared_data, base_dir=rt.base_dir, seed=cfg.run.seed,
                               max_per_task=st.max_examples_per_task, log=log)
    val_tasks = []   # held-out conversations of the graded mixture tasks (at most VAL_PER_TASK each)
    for spec in held_out_specs(names):
        try:
            t = make_task(spec, "test", data_dir=cfg.paths.shared_data, base_dir=str(rt.base_dir))
        except (TaskDataError, OSError, ValueError) as e:
            log(f"validation: skipping {spec!r} ({str(e)[:100]})")
            continue
        t.stop = t.start + min(len(t), VAL_PER_TASK) * t.step
        val_tasks.append(t)
    val = TaskMixture(val_tasks, seed=cfg.run.seed) if val_tasks else None
    eval_specs = list(st.eval_tasks) if st.eval_tasks is not None else held_out_specs(names)
    if rt.master:
        atomic_write_json(loop.run_dir / "effective_plan.json", plan.to_dict())
    model, optimizer, loader_state = loop.build()
    if not loop.resumed and plan.stage.load_optimizer:
        warm_start_optimizer(optimizer, st.init_from, rt, log)

    def loader(task, state: Optional[dict] = None):
        return LOADERS[plan.stage.packing](task, tokenizer, plan.device_batch_size, plan.sequence_len, rt.rank,
                                           rt.world, rt.device, state)
    train_loader = loader(mix, loader_state)
    val_steps = max(1, (plan.eval_tokens or 0) // (plan.device_batch_size * plan.sequence_len * rt.world))
    chatcore_every = plan.stage.chatcore_every or -1
    scores: dict = {}

    def step(_: int) -> L.StepOut:
        loss, n = train_step(model, optimizer, [next(train_loader) for _ in range(plan.grad_accum_steps)], rt)
        return L.StepOut(loss, n, {"trained_tokens": n})

    def validation(step: int) -> dict:
        loop.tracker.print(f"step {step:05d} | validation: {val_steps} batches")
        with rt.autocast():  # nats per trained (assistant) token
            return {"val/loss": evaluate_bpb(model, loader(val), val_steps, None, "validation")}

    def chat_core(_: int) -> dict:
        cc = chatcore(model, tokenizer, rt.device, max_cat=plan.stage.chatcore_max_cat or st.chatcore_max_cat,
                      max_sample=st.chatcore_max_sample, data_dir=cfg.paths.shared_data, base_dir=rt.base_dir,
                      log=loop.tracker.print, seed=cfg.run.seed)
        if cc["chatcore"] is None:
            return {}
        return {"chatcore": cc["chatcore"], **{f"chatcore/{k}": v["accuracy"] for k, v in cc["tasks"].items()}}

    def tasks(_: int, final: bool = False) -> dict:
        """Accuracy per graded task (held-out split), scored like the chat eval stage."""
        s = evaluate_chat_tasks(model, tokenizer, eval_specs, rt.device, max_per_task=st.eval_examples,
                                data_dir=cfg.paths.shared_data, base_dir=rt.base_dir, log=log,
                                max_new_tokens=st.eval_max_new_tokens, batch_size=8,
                                seed=cfg.run.seed)["tasks"] if eval_specs else {}
        if final:
            scores.update(s)
            for k, v in s.items():
                loop.tracker.print(f"  {k}: {v['accuracy']:.3f} ({v['correct']}/{v['total']})")
        return {f"task/{k}": v["accuracy"] for k, v in s.items()}

    evals = [L.Evaluation("val_loss", validation, every=st.eval_every)] if val is not None else []
    evals += [L.Evaluation("chatcore", chat_core, every=chatcore_every, first=False, last=chatcore_every > 0),
              L.Evaluation("task", tasks, every=st.eval_metrics_every, first=False, last=False),
              L.Evaluation("task", lambda s: tasks(s, final=True), final=True)]
    header = (f"{st.name}: {plan.num_params:,} params | {plan.num_iterations} steps ({plan.horizon_source}) | "
              f"{plan.grad_accum_steps} micro-batches of {plan.device_batch_size}×{plan.sequence_len} per rank "
              f"× {rt.world} ranks ({plan.stage.packing}) | matrix LR {plan.matrix_lr:.4g} | "
              f"{len(mix):,} conversations")
    loop.run(step, evals, train_loader.state_dict, header=header, val_key="val/loss")
    s = loop.state
    return loop.result(ChatResult, final_val_loss=s.val_last, best_val_loss=s.val_best, first_val_loss=s.val_first,
                       task_accuracy={k: v["accuracy"] for k, v in scores.items()}, tasks=scores,
                       chatcore=s.evals.get("chatcore", {}).get("chatcore"), mixture=names, source=plan.source)
