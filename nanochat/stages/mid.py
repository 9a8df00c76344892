"""Stage `mid`: mid-training on a conversation mixture, packed into a token stream.

Conversations (chat, multiple choice, tool use, spelling, arithmetic) are rendered with
the chat template and concatenated into one stream that fills rows of `sequence_len`, as in
pretraining, except that only assistant tokens are trained on (targets of -1 elsewhere).

This module also holds what `mid` and `sft` share (the `sft` stage differs only in its
batches and defaults): building the task mixture from `stage.mixture`, the effective plan
(horizon from `num_epochs` when `stage.num_iterations` is null, batch size and LRs
inherited from the source checkpoint when null), the training loop with checkpoints,
resume, preemption and metrics (nanochat/training.py), and the end-of-stage task scores.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from nanochat import training as T
from nanochat.common import atomic_write_json
from nanochat.config import Config
from nanochat.plan import Plan, valid_device_batches
from nanochat.tasks import TaskDataError, TaskMixture, make_task
from nanochat.tasks.common import Task
from nanochat.tokenizer import get_tokenizer

# The default mid-training mixture (nanochat: SmolTalk, MMLU auxiliary_train, GSM8K, identity ×2,
# spelling). Entries marked optional are skipped, with a note, when their data is neither local
# nor downloadable, so the default works offline with ../shared/data.
DEFAULT_MID_MIXTURE = [
    ("smoltalk", True), ("mmlu_aux", True), ("arc_easy", True), ("arc_challenge", True), ("gsm8k", True),
    ("identity", True), ("identity", True), ("simplespelling:size=20000", False),
    ("spellingbee:size=8000", False), ("arithmetic:size=8000", False),
]
# tasks whose conversations have a grader (used for the end-of-stage scores)
GRADED = ("arc_easy", "arc_challenge", "mmlu", "mmlu_aux", "mmlu_auxiliary_train", "gsm8k", "humaneval",
          "spellingbee", "simplespelling", "arithmetic")


# --------------------------------------------------------------------------- tasks

def _spec_name(spec: Any) -> str:
    from nanochat.tasks import parse_spec
    return parse_spec(spec)[0]


def build_mixture(specs: Optional[list], default: list, split: str, *, data_dir: Optional[str], base_dir: Path,
                  seed: int, max_per_task: int = -1, log: Callable[[str], None] = print) -> tuple[TaskMixture, list]:
    """A TaskMixture from config specs (every spec required) or the stage default (optional ones skipped)."""
    entries = [(s, False) for s in specs] if specs else list(default)
    tasks, names = [], []
    for spec, optional in entries:
        try:
            task = make_task(spec, split, data_dir=data_dir, base_dir=str(base_dir))
        except (TaskDataError, OSError) as e:
            if not optional:
                raise ValueError(f"stage.mixture entry {spec!r}: {e}") from e
            log(f"mixture: skipping {spec!r} (no data: {str(e)[:120]})")
            continue
        if max_per_task > 0 and len(task) > max_per_task:
            task.stop = task.start + max_per_task * task.step
        tasks.append(task)
        names.append(spec if isinstance(spec, str) else dict(spec))
    if not tasks:
        raise ValueError(f"stage.mixture: no task has data (tried {[s for s, _ in entries]}); "
                         f"set stage.mixture to tasks available offline, e.g. [arithmetic, spellingbee]")
    return TaskMixture(tasks, seed=seed), names


def held_out_specs(specs: list) -> list:
    """The graded tasks of a mixture, for validation and scoring on their held-out split."""
    out = []
    for spec in specs:
        name = _spec_name(spec)
        if name not in GRADED:
            continue
        if name in ("mmlu_aux", "mmlu_auxiliary_train"):
            spec = "mmlu"
        if spec not in out:
            out.append(spec)
    return out


def val_mixture(specs: list, *, data_dir: Optional[str], base_dir: Path, seed: int, per_task: int,
                log: Callable[[str], None] = print) -> Optional[TaskMixture]:
    """Held-out conversations of the graded mixture tasks (at most `per_task` each)."""
    tasks = []
    for spec in held_out_specs(specs):
        try:
            t = make_task(spec, "test", data_dir=data_dir, base_dir=str(base_dir))
        except (TaskDataError, OSError, ValueError) as e:
            log(f"validation: skipping {spec!r} ({str(e)[:100]})")
            continue
        t.stop = t.start + min(len(t), per_task) * t.step
        tasks.append(t)
    return TaskMixture(tasks, seed=seed) if tasks else None


# --------------------------------------------------------------------------- batches

class PackedChatLoader:
    """Rendered conversations packed back to back into (B, T) rows; targets -1 off the assistant.

    Rank r reads conversations r, r+world, ... of the mixture (epochs repeat it). The state
    (cursor, epoch, leftover tokens) makes resume exact. A batch with no trained target
    (possible with very long user turns) is skipped, so the loss is never 0/0.
    """

    def __init__(self, task: Task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world: int = 1,
                 device: Any = "cpu", state: Optional[dict] = None):
        self.task, self.tok = task, tokenizer
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world
        self.device = torch.device(device)
        self.max_tokens = max(2048, seq_len + 1)
        self.cursor, self.epoch = rank, 0
        self.ids: list[int] = []
        self.mask: list[int] = []
        if len(task) == 0:
            raise ValueError("PackedChatLoader: the task mixture is empty")
        if state is not None:
            self.cursor, self.epoch = state["cursor"], state["epoch"]
            self.ids, self.mask = list(state["ids"]), list(state["mask"])

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "ids": list(self.ids), "mask": list(self.mask)}

    def _next_conversation(self) -> None:
        if self.cursor >= len(self.task):
            self.epoch += 1
            self.cursor = self.rank % len(self.task)
        ids, mask = self.tok.render_conversation(self.task[self.cursor], max_tokens=self.max_tokens)
        self.cursor += self.world
        self.ids.extend(ids)
        self.mask.extend(mask)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1
        while True:
            while len(self.ids) < need:
                self._next_conversation()
            ids = torch.tensor(self.ids[:need], dtype=torch.long)
            mask = torch.tensor(self.mask[1:need], dtype=torch.bool)
            # keep the last token: it is the next batch's first input (one continuous stream)
            del self.ids[:need - 1], self.mask[:need - 1]
            if mask.any():
                break
        x = ids[:-1].view(self.B, self.T)
        y = torch.where(mask, ids[1:], -1).view(self.B, self.T)
        return x.to(self.device), y.to(self.device)


def count_tokens(task: Task, tokenizer, max_tokens: int, sample: int = 20000) -> int:
    """Rendered tokens in a mixture (exact up to `sample` conversations, else estimated from a sample)."""
    n = len(task)
    idx = range(n) if n <= sample else range(0, n, max(1, n // sample))
    total = sum(len(tokenizer.render_conversation(task[i], max_tokens=max_tokens)[0]) for i in idx)
    return total if n <= sample else int(total * n / len(idx))


# --------------------------------------------------------------------------- effective plan

def inherit(cfg_value: Any, source_plan: Optional[dict], key: str, fallback: Any) -> Any:
    """A null stage value takes the source checkpoint's (its run's plan), else the fresh plan's."""
    if cfg_value is not None:
        return cfg_value
    if source_plan and source_plan.get(key) is not None:
        return source_plan[key]
    return fallback


def fit_device_batch(total: int, dbs: int, seq: int, world: int) -> int:
    """Largest device batch <= dbs that divides total into whole micro-steps (tiny runs shrink it)."""
    if total % (dbs * seq * world) == 0:
        return dbs
    valid = valid_device_batches(total, seq, world, limit=dbs)
    if not valid:
        raise ValueError(f"stage.total_batch_size={total} is not a multiple of sequence_len × world = "
                         f"{seq * world}; pick a multiple")
    return valid[-1]


LR_KEYS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")


def base_lrs(cfg: Config, source_meta: dict, plan: Plan) -> dict:
    """Unscaled LRs: the stage's own, else the source's base LRs (before its init_lr_frac), else the plan's."""
    src = ((source_meta.get("loop_state") or {}).get("extra") or {}).get("base_lrs") or source_meta.get("plan")
    return {k: inherit(getattr(cfg.stage, k), src, k, getattr(plan, k)) for k in LR_KEYS}


def effective_plan(plan: Plan, cfg: Config, source_meta: dict, *, num_iterations: int,
                   total_batch_size: int, device_batch_size: int, grad_accum: int, lr_frac: float,
                   warmup_ratio: float, warmdown_ratio: float, momentum_ramp: bool, horizon_source: str) -> Plan:
    """The launcher's plan with the chat stage's horizon, batch and (inherited, scaled) LRs.

    Null stage values are inherited from the source checkpoint (`source_meta`, its meta.json).
    """
    st = cfg.stage
    lrs = {k: v * lr_frac for k, v in base_lrs(cfg, source_meta, plan).items()}
    wd = inherit(st.weight_decay, source_meta.get("plan"), "weight_decay", plan.weight_decay)
    N = num_iterations
    wu = st.warmup_steps if st.warmup_steps is not None else round(
        (st.warmup_ratio if st.warmup_ratio is not None else warmup_ratio) * N)
    wu = min(wu, N)
    wd_steps = min(round((st.warmdown_ratio if st.warmdown_ratio is not None else warmdown_ratio) * N), N - wu)
    final = st.final_lr_frac if st.final_lr_frac is not None else 0.0
    mom = (0.85, 0.95) if momentum_ramp else (0.95, 0.95)   # chat stages: 0.85 → 0.95 over 300, no warmdown leg
    return dataclasses.replace(
        plan, num_iterations=N, horizon_source=horizon_source, total_batch_size=total_batch_size,
        device_batch_size=device_batch_size, grad_accum_steps=grad_accum, total_tokens=N * total_batch_size,
        total_flops=float(plan.flops_per_token) * N * total_batch_size, weight_decay=wd,
        warmup_steps=wu, warmdown_steps=wd_steps, final_lr_frac=final, muon_momentum_start=mom[0],
        muon_momentum_end=mom[1], muon_momentum_steps=300, muon_momentum_final=None, notes=list(plan.notes) + [f"{cfg.stage.name}: LRs × {lr_frac}"], **lrs)


# --------------------------------------------------------------------------- the loop

def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _dist_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def val_loss(model, loader, steps: int, rt: T.Runtime) -> float:
    """Mean cross-entropy (nats) per trained (assistant) token over `steps` batches, all ranks."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = torch.zeros((), dtype=torch.float64, device=rt.device)
    try:
        for _ in range(steps):
            x, y = next(loader)
            with rt.autocast():
                losses = model(x, y, loss_reduction="none").reshape(-1).float()
            valid = y.reshape(-1) >= 0
            total += torch.where(valid, losses, torch.zeros_like(losses)).sum(dtype=torch.float64)
            count += valid.sum()
    finally:
        model.train()
    total, count = _dist_sum(total), _dist_sum(count)
    return float(total / count.clamp(min=1))


def task_scores(model, tokenizer, specs: list, cfg: Config, rt: T.Runtime, max_examples: int,
                log: Callable[[str], None]) -> dict:
    """Accuracy per graded task (held-out split), scored like the chat eval stage."""
    from nanochat.stages.eval import evaluate_chat_tasks
    if not specs:
        return {}
    out = evaluate_chat_tasks(model, tokenizer, specs, rt.device, max_per_task=max_examples,
                              data_dir=cfg.paths.shared_data, base_dir=rt.base_dir, log=log,
                              max_new_tokens=cfg.stage.eval_max_new_tokens, batch_size=8, seed=cfg.run.seed)
    return out["tasks"]


def source_checkpoint_meta(init_from: Optional[str]) -> dict:
    from nanochat.checkpoint import latest_checkpoint, load_meta
    if not init_from:
        raise ValueError("this stage needs stage.init_from (a run dir or `latest`)")
    ckpt = latest_checkpoint(init_from)
    if ckpt is None:
        raise FileNotFoundError(f"stage.init_from={init_from}: no checkpoint in {init_from}/checkpoints")
    return load_meta(ckpt)


def source_tokenizer_name(cfg: Config, meta: dict) -> str:
    """The tokenizer the source model was trained with (its run's data.tokenizer)."""
    return (meta.get("config") or {}).get("data", {}).get("tokenizer") or cfg.data.tokenizer


@dataclasses.dataclass
class ChatData:
    """What a chat stage trains on: a loader factory (given a resume state) and the horizon."""
    make_train: Callable[[Optional[dict]], Any]
    make_val: Optional[Callable[[], Any]]
    val_steps: int
    plan: Plan
    eval_specs: list
    info: dict
    base_lrs: dict = dataclasses.field(default_factory=dict)  # saved so the next stage inherits unscaled LRs


def train_chat(cfg: Config, run_dir: Path, rt: T.Runtime, tokenizer, data: ChatData) -> dict:
    """The mid/sft training loop (same structure and checkpoint/resume/preemption as pretrain)."""
    st = cfg.stage
    plan = data.plan
    if rt.master:
        atomic_write_json(run_dir / "effective_plan.json", plan.to_dict())
    model, _ = T.init_model(plan, cfg, rt, st.init_from)
    optimizer = T.make_optimizer(model, plan, cfg, rt)
    state, loader_state = T.try_resume(run_dir, cfg, rt, model, optimizer)
    resumed = state.step > 0 or loader_state is not None
    state.extra["base_lrs"] = data.base_lrs
    loader = data.make_train(loader_state)
    N = plan.num_iterations
    tracker = T.make_tracker(cfg, run_dir, rt, N, state.step)
    if resumed:
        tracker.print(f"resumed from step {state.step} of {N}")
    tracker.print(f"{st.name}: {plan.num_params:,} params | {N} steps ({plan.horizon_source}) | "
                  f"{plan.grad_accum_steps} micro-batches of {plan.device_batch_size}×{plan.sequence_len} per rank "
                  f"× {rt.world} ranks | matrix LR {plan.matrix_lr:.4g} | {data.info}")
    start_step = state.step
    last_dt = 0.0
    try:
        while True:
            step = state.step
            last = step == N
            fresh = not (resumed and step == start_step)
            if fresh and data.make_val is not None and _due(step, st.eval_every, last):
                vl = val_loss(model, data.make_val(), data.val_steps, rt)
                state.record_val(vl)  # for mid: the val loss (nats/token)
                tracker.log({"step": step, "val/loss": vl})
                tracker.print(f"step {step:05d} | val loss {vl:.4f}")
            if fresh and step > 0 and not last and st.eval_metrics_every > 0 and step % st.eval_metrics_every == 0:
                scores = task_scores(model, tokenizer, data.eval_specs, cfg, rt, st.eval_examples, tracker.print)
                tracker.log({"step": step, **{f"task/{k}": v["accuracy"] for k, v in scores.items()}})
            if fresh and step > start_step and (last or (st.save_every > 0 and step % st.save_every == 0)):
                T.save(run_dir, cfg, plan, rt, model, optimizer, loader.state_dict(), state)
            if last:
                break
            T.checkpoint_if_stopped(run_dir, cfg, plan, rt, model, optimizer, loader.state_dict(), state, tracker)

            # ---- one optimizer step: loss normalized by the trained tokens of the whole step
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(plan.grad_accum_steps)]
            counts = [int((y >= 0).sum()) for _, y in batches]
            n_global = float(_dist_sum(torch.tensor(float(sum(counts)), device=rt.device)))
            loss_sum = torch.zeros((), device=rt.device)
            for (x, y), n in zip(batches, counts):
                if n == 0:
                    continue
                with rt.autocast():
                    loss = model(x, y)
                w = n * rt.world / n_global  # the optimizer averages ranks' gradients
                (loss * w).backward()
                loss_sum += loss.detach() * n
            lrm = T.apply_schedules(optimizer, step, plan)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = float(_dist_sum(loss_sum)) / n_global
            rt.sync()
            last_dt = time.perf_counter() - t0
            T.check_finite(train_loss, step + 1)
            state.step = step + 1
            state.tokens_seen += int(n_global)
            state.train_time_s += last_dt
            beta = 0.9
            state.smooth_loss = beta * state.smooth_loss + (1 - beta) * train_loss
            smooth = state.smooth_loss / (1 - beta ** state.step)
            if state.step % max(1, st.log_every) == 0 or state.step == N:
                tracker.log({"step": state.step, "train/loss": train_loss, "train/loss_smooth": smooth,
                             "lr": plan.matrix_lr * lrm, "lrm": lrm, "trained_tokens": int(n_global),
                             "dt_ms": last_dt * 1000, "train_time_s": state.train_time_s})
            tracker.progress(state.step, f"loss {smooth:.3f} | {n_global / max(last_dt, 1e-9):,.0f} tok/s")
        scores = task_scores(model, tokenizer, data.eval_specs, cfg, rt, st.eval_examples, tracker.print)
        if scores:
            tracker.log({"step": state.step, **{f"task/{k}": v["accuracy"] for k, v in scores.items()}})
            for k, v in scores.items():
                tracker.print(f"  {k}: {v['accuracy']:.3f} ({v['correct']}/{v['total']})")
    finally:
        tracker.close()
    return {
        "step": state.step,
        "final_val_loss": state.last_val_bpb,
        "best_val_loss": state.best_val_bpb,
        "first_val_loss": state.first_val_bpb,
        "final_train_loss": state.smooth_loss / (1 - 0.9 ** max(1, state.step)) if state.step else None,
        "trained_tokens": state.tokens_seen,
        "num_params": plan.num_params,
        "train_time_s": state.train_time_s,
        "task_accuracy": {k: v["accuracy"] for k, v in scores.items()},
        "tasks": scores,
        "mixture": data.info.get("mixture"),
        "num_iterations": N,
        "world_size": rt.world,
        "peak_memory_mb": T.peak_memory_mb(rt.device),
    }


def eval_specs_for(cfg: Config, mixture_names: list) -> list:
    st = cfg.stage
    return list(st.eval_tasks) if st.eval_tasks is not None else held_out_specs(mixture_names)


def chat_stage_setup(cfg: Config, run_dir: Path, default_mixture: list):
    """What mid and sft start with: runtime, plan, source checkpoint meta, its tokenizer, the mixture."""
    rt = T.setup_runtime(cfg)
    plan = T.load_plan(run_dir)
    st = cfg.stage
    meta = source_checkpoint_meta(st.init_from)
    tokenizer = get_tokenizer(rt.base_dir, source_tokenizer_name(cfg, meta))
    log = print if rt.master else (lambda s: None)
    mixture, names = build_mixture(st.mixture, default_mixture, "train", data_dir=cfg.paths.shared_data,
                                   base_dir=rt.base_dir, seed=cfg.run.seed, max_per_task=st.max_examples_per_task,
                                   log=log)
    return rt, plan, st, meta, tokenizer, log, mixture, names


def run(cfg: Config, run_dir: Path) -> dict:
    rt, plan, st, meta, tokenizer, log, mixture, names = chat_stage_setup(cfg, run_dir, DEFAULT_MID_MIXTURE)
    seq = plan.sequence_len
    src_plan = meta.get("plan")
    total = inherit(st.total_batch_size, src_plan, "total_batch_size", plan.total_batch_size)
    dbs = fit_device_batch(total, plan.device_batch_size, seq, rt.world)
    accum = total // (dbs * seq * rt.world)
    if st.num_iterations:
        N, source = st.num_iterations, "num_iterations"
    else:
        tokens = count_tokens(mixture, tokenizer, max(2048, seq + 1))
        N, source = max(1, math.ceil(st.num_epochs * tokens / total)), f"{st.num_epochs} epoch(s) of {tokens:,} tokens"
    eplan = effective_plan(plan, cfg, meta, num_iterations=N, total_batch_size=total, device_batch_size=dbs,
                           grad_accum=accum, lr_frac=st.init_lr_frac if st.init_lr_frac is not None else 1.0,
                           warmup_ratio=0.0, warmdown_ratio=0.2, momentum_ramp=True, horizon_source=source)
    val = val_mixture(names, data_dir=cfg.paths.shared_data, base_dir=rt.base_dir, seed=cfg.run.seed,
                      per_task=200, log=log)
    val_steps = max(1, st.eval_tokens // (dbs * seq * rt.world))
    data = ChatData(
        make_train=lambda state: PackedChatLoader(mixture, tokenizer, dbs, seq, rt.rank, rt.world, rt.device, state),
        make_val=(lambda: PackedChatLoader(val, tokenizer, dbs, seq, rt.rank, rt.world, rt.device)) if val else None,
        val_steps=val_steps, plan=eplan, eval_specs=eval_specs_for(cfg, names),
        info={"mixture": names, "conversations": len(mixture)}, base_lrs=base_lrs(cfg, meta, plan))
    return train_chat(cfg, run_dir, rt, tokenizer, data)
