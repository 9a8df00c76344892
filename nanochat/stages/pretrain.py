"""Stage `pretrain`: next-token training of a fresh GPT on a text corpus.

Driven only by the run dir's frozen `resolved_config.yaml` and `plan.json`. One loop
iteration at step s: (eval / sample / CORE / save when due) → stop-signal check →
grad_accum micro-steps → schedules → optimizer step → log. Checkpoints hold model,
optimizer shard, loader position and RNG per rank, so a resumed run continues with
exactly the batches and updates an uninterrupted run would have made.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from nanochat.batch_size import explain_oom
from nanochat.config import Config, TrainStageConfig
from nanochat.common import barrier
from nanochat.lifecycle import EvalInterrupted
from nanochat.plan import param_breakdown
from nanochat.stage_plan import train_plan
from nanochat.stages import Stage
from nanochat.tokenizer import get_token_bytes, get_tokenizer

if TYPE_CHECKING:  # torch and what imports it load in the worker only: the launcher imports this module
    from nanochat import training as T

SAMPLE_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
]


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def eval_steps(tokens: int, plan) -> int:
    per = plan.device_batch_size * plan.sequence_len * plan.world_size
    return max(1, tokens // per)


def val_bpb(model, cfg: Config, plan, rt: T.Runtime, tokenizer, token_bytes, tokens: int) -> float:
    from nanochat.dataloader import DataLoader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.precision import fp8_disabled
    loader = DataLoader(cfg.data, tokenizer, plan.device_batch_size, plan.sequence_len, "val", rt.rank, rt.world,
                        rt.device, base_dir=rt.base_dir)
    model.eval()
    try:
        with rt.autocast(), fp8_disabled(model):   # evaluations in the compute dtype, as nanochat
            return evaluate_bpb(model, loader, eval_steps(tokens, plan), token_bytes)
    finally:
        model.train()
        loader.close()


def samples(model, tokenizer, max_tokens: int = 24) -> list[str]:
    from nanochat.precision import fp8_disabled
    model.eval()
    out = []
    bos = tokenizer.get_bos_token_id()
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=bos)
        with fp8_disabled(model):
            gen = list(model.generate(ids, max_tokens=max_tokens, temperature=0.0))
        out.append(prompt + tokenizer.decode(gen))
    model.train()
    return out


def run_core(model, tokenizer, cfg: Config, rt: T.Runtime, max_per_task: int, progress: Any = False) -> dict:
    from nanochat.core_eval import ensure_eval_bundle, evaluate_core
    from nanochat.precision import fp8_disabled
    bundle = ensure_eval_bundle(rt.base_dir, cfg.paths.eval_bundle)
    model.eval()
    try:
        with rt.autocast(), fp8_disabled(model):
            return evaluate_core(model, tokenizer, bundle, rt.device, max_per_task=max_per_task, progress=progress)
    finally:
        model.train()


class SlotLoader:
    """One loader per micro-batch slot: slot j of rank r reads data shard r + world·j of world·accum.

    So the global batch of a step is the same documents whatever the split between ranks and
    gradient accumulation: 2 ranks × accum 1 sees exactly what 1 rank × accum 2 sees.
    """

    def __init__(self, cfg: Config, plan, rt: T.Runtime, tokenizer, state: Optional[dict]):
        from nanochat.dataloader import DataLoader
        slots = plan.grad_accum_steps
        states = (state or {}).get("slots") or [None] * slots
        if len(states) != slots:
            raise ValueError(f"checkpoint loader state has {len(states)} slots, this run needs {slots}; "
                             "resume with the same total_batch_size / device_batch_size / world size")
        self.loaders = [DataLoader(cfg.data, tokenizer, plan.device_batch_size, plan.sequence_len, "train",
                                   rt.rank + rt.world * j, rt.world * slots, rt.device, base_dir=rt.base_dir,
                                   state=states[j]) for j in range(slots)]

    def next(self, slot: int):
        return next(self.loaders[slot])

    def state_dict(self) -> dict:
        return {"slots": [l.state_dict() for l in self.loaders]}

    def close(self) -> None:
        for l in self.loaders:
            if hasattr(l, "close"):
                l.close()


def run(cfg: Config, run_dir: Path) -> dict:
    import torch
    from nanochat import training as T
    from nanochat.dataset import list_shards
    from nanochat.precision import convert_fp8
    wall_t0 = time.time()
    rt = T.setup_runtime(cfg)
    plan = T.load_plan(run_dir)
    st = cfg.stage
    tokenizer = get_tokenizer(rt.base_dir, cfg.data.tokenizer)
    if tokenizer.get_vocab_size() > plan.model.padded_vocab_size:
        raise ValueError(f"model.vocab_size={plan.model.vocab_size} is smaller than the tokenizer "
                         f"{cfg.data.tokenizer!r} ({tokenizer.get_vocab_size()} tokens); set model.vocab_size=null")
    token_bytes = get_token_bytes(rt.base_dir, cfg.data.tokenizer, rt.device)
    if rt.master:  # build / download the corpus once, before the other ranks look for it
        list_shards(cfg.data, rt.base_dir, "train")
        list_shards(cfg.data, rt.base_dir, "val")
    barrier()

    model, _ = T.init_model(plan, cfg, rt, st.init_from)
    if cfg.model.fp8:   # before the optimizer and compile, as nanochat; the weights stay fp32 Parameters
        fp8_names = convert_fp8(model, cfg.model.fp8, emulate=cfg.model.fp8_emulate)
        if rt.master:
            print(f"fp8 ({cfg.model.fp8}{', emulated' if cfg.model.fp8_emulate else ''}): "
                  f"{len(fp8_names)} Linear layers converted")
    optimizer = T.make_optimizer(model, plan, cfg, rt)
    state, loader_state = T.try_resume(run_dir, cfg, rt, model, optimizer)
    resumed = state.step > 0 or loader_state is not None
    train_loader = SlotLoader(cfg, plan, rt, tokenizer, loader_state)
    train_model = torch.compile(model, dynamic=False) if cfg.hardware.compile else model
    scaler = rt.precision.grad_scaler()  # a no-op unless fp16 on CUDA
    N = plan.num_iterations
    tracker = T.make_tracker(cfg, run_dir, rt, N, state.step)
    peak = T.peak_flops(rt.device, rt.dtype)
    if resumed:
        tracker.print(f"resumed from step {state.step} of {N}")
    tracker.print(f"params {plan.num_params:,} | {plan.total_batch_size:,} tokens/step = {plan.device_batch_size}×"
                  f"{plan.sequence_len}×{rt.world}×{plan.grad_accum_steps} | {N} steps | peak {peak / 1e9:.0f} GFLOP/s")

    start_step = state.step
    wall_before = state.wall_time_s  # earlier attempts (0 on a fresh run): result.json covers them all
    step_tokens = plan.total_batch_size
    last_dt, tok_per_sec, mfu = 0.0, 0.0, 0.0
    try:
        while True:
            step = state.step
            last = step == N
            fresh = not (resumed and step == start_step)  # this step's evals ran before the checkpoint
            try:
                if fresh and _due(step, st.eval_every, last):
                    bpb = val_bpb(model, cfg, plan, rt, tokenizer, token_bytes, st.eval_tokens or plan.eval_tokens)
                    state.record_val(bpb)
                    tracker.log({"step": step, "val/bpb": bpb})
                    tracker.print(f"step {step:05d} | val bpb {bpb:.4f}")
                if fresh and rt.master and st.sample_every > 0 and _due(step, st.sample_every, last):
                    for s in samples(model, tokenizer):
                        tracker.print(f"  sample: {s!r}")
                # CORE skips step 0, as nanochat does: with core_every > horizon it runs once, at the end
                if fresh and st.core_every > 0 and (last or step > 0) and _due(step, st.core_every, last):
                    core = run_core(model, tokenizer, cfg, rt, st.core_max_per_task)
                    tracker.log({"step": step, "core": core["core"]})
                    state.extra["core"] = core["core"]
                    tracker.print(f"step {step:05d} | CORE {core['core']:.4f} ({core['tasks_evaluated']} tasks)")
            except EvalInterrupted:  # a stop signal inside an evaluation: checkpoint this step, exit
                T.checkpoint_if_stopped(run_dir, cfg, plan, rt, model, optimizer, train_loader.state_dict(), state,
                                        tracker)
                raise
            state.wall_time_s = wall_before + (time.time() - wall_t0)  # what a checkpoint saved now carries
            if fresh and step > start_step and (last or (st.save_every > 0 and step % st.save_every == 0)):
                T.save(run_dir, cfg, plan, rt, model, optimizer, train_loader.state_dict(), state)
            if last:
                break
            T.checkpoint_if_stopped(run_dir, cfg, plan, rt, model, optimizer, train_loader.state_dict(), state, tracker)

            # ---- one optimizer step
            rt.sync()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=rt.device)
            with explain_oom(plan.device_batch_size, plan.grad_accum_steps):  # OOM → which batch to try
                for micro in range(plan.grad_accum_steps):
                    x, y = train_loader.next(micro)
                    with rt.autocast():
                        loss = train_model(x, y)
                    loss_sum += loss.detach()
                    scaler.scale(loss / plan.grad_accum_steps).backward()
                lrm = T.apply_schedules(optimizer, step, plan)
                scaler.step(optimizer)  # unscales first, skips the step on inf/nan grads (fp16)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            train_loss = T.all_reduce_mean(loss_sum / plan.grad_accum_steps).item()
            rt.sync()
            last_dt = time.perf_counter() - t0
            T.check_finite(train_loss, step + 1)

            state.step = step + 1
            state.tokens_seen += step_tokens
            if step > start_step:  # the first step pays one-off costs (allocations, compile)
                state.train_time_s += last_dt
                state.extra["timed_tokens"] = state.extra.get("timed_tokens", 0) + step_tokens
            beta = 0.9
            state.smooth_loss = beta * state.smooth_loss + (1 - beta) * train_loss
            smooth = state.smooth_loss / (1 - beta ** state.step)  # debiased EMA
            tok_per_sec = step_tokens / last_dt
            mfu = plan.flops_per_token * tok_per_sec / (peak * rt.world)
            if state.step % max(1, st.log_every) == 0 or state.step == N:
                tracker.log({"step": state.step, "train/loss": train_loss, "train/loss_smooth": smooth,
                             "lr": plan.matrix_lr * lrm, "lrm": lrm, "tok_per_sec": tok_per_sec, "mfu": mfu,
                             "dt_ms": last_dt * 1000, "tokens": state.tokens_seen,
                             "train_time_s": state.train_time_s})
            tracker.progress(state.step, f"loss {smooth:.3f} | {tok_per_sec:,.0f} tok/s | MFU {mfu * 100:.1f}%")
    finally:
        tracker.close()
        train_loader.close()

    result = {
        "step": state.step,
        "final_val_bpb": state.last_val_bpb,
        "best_val_bpb": state.best_val_bpb,
        "first_val_bpb": state.first_val_bpb,
        "final_train_loss": state.smooth_loss,
        "tokens_seen": state.tokens_seen,
        "num_params": plan.num_params,
        "params": param_breakdown(plan.model),  # by role, for scaling-law fits (nanochat-scaling)
        "flops_per_token": plan.flops_per_token,
        "flops": float(plan.flops_per_token) * state.tokens_seen,
        "target_flops": st.target_flops,
        "wall_time_s": wall_before + (time.time() - wall_t0),  # all attempts: setup, training, evals
        "train_time_s": state.train_time_s,
        "tok_per_sec": state.extra.get("timed_tokens", 0) / state.train_time_s if state.train_time_s > 0 else tok_per_sec,
        "mfu": mfu,
        "peak_memory_mb": T.peak_memory_mb(rt.device),
        "world_size": rt.world,
    }
    if "core" in state.extra:
        result["core"] = state.extra["core"]
    return result


# --------------------------------------------------------------------------- the declaration

STAGE = Stage("pretrain", schema=TrainStageConfig, planner=train_plan, worker=run, headline="final_val_bpb")
