"""The one training loop every training stage runs (pretrain, mid, sft, rl).

A stage has the loop build its model and optimizer (`Loop.build`), builds its data and evaluations,
then hands the loop what differs: a step function (one optimizer step at a given step index → its
loss or reward and token count), its evaluations (name, when due, a callable returning metrics),
and its loader state for checkpoints. The loop owns everything else, written once:

    for step in 0..N:
        evaluations due at `step` (skipped at the step a resume starts from: they ran before
        its checkpoint); a stop signal inside one checkpoints this step boundary → Preempted
        periodic / last save
        stop check (every rank agrees) → checkpoint → Preempted
        schedules → step function → EMA, timing, metrics.jsonl, progress
    final evaluations (after the last checkpoint, so a resume from it redoes only them)

Checkpoints hold the LoopState below besides tensors, so a resumed run continues exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from nanochat import training as T
from nanochat.checkpoint import latest_checkpoint, load_meta, load_model_state, load_rank_state, \
    save_checkpoint, set_rng_state
from nanochat.config import Config, config_to_dict
from nanochat.gpt import build_model
from nanochat.lifecycle import STOP, EvalInterrupted, Preempted, stop_requested_all_ranks
from nanochat.results import TrainResult
from nanochat.tracking import Tracker

EMA_BETA = 0.9  # smoothing of the step's train metric (loss or reward), debiased by 1 - β^steps


@dataclass
class LoopState:
    """Everything besides tensors that a resumed loop needs to continue exactly."""
    step: int = 0
    tokens_seen: int = 0              # tokens the steps trained on (all ranks)
    timed_tokens: int = 0             # tokens of the timed steps (the first step of each attempt is not timed)
    train_time_s: float = 0.0         # the timed steps only
    wall_time_s: float = 0.0          # every attempt up to the last checkpoint (setup, training, evals)
    train_ema: float = 0.0            # raw EMA of the step's train metric (loss, or reward in rl)
    val_first: Optional[float] = None  # the stage's validation metric (lower is better): first / last / best
    val_last: Optional[float] = None
    val_best: Optional[float] = None
    evals: dict = field(default_factory=dict)   # the last metrics of each evaluation, by name
    extra: dict = field(default_factory=dict)   # a stage's own state

    # names before the one loop (checkpoints written by older code still resume)
    _LEGACY = {"smooth_loss": "train_ema", "first_val_bpb": "val_first", "last_val_bpb": "val_last",
               "best_val_bpb": "val_best"}

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        names = {f.name for f in fields(cls)}
        d = {cls._LEGACY.get(k, k): v for k, v in d.items()}
        state = cls(**{k: v for k, v in d.items() if k in names})
        state.timed_tokens = state.timed_tokens or state.extra.pop("timed_tokens", 0)
        return state

    def smoothed(self) -> Optional[float]:
        """The debiased EMA of the train metric; None before the first step."""
        return self.train_ema / (1 - EMA_BETA ** self.step) if self.step else None


@dataclass
class Evaluation:
    """One evaluation: `run(step)` returns the metrics to log (metrics.jsonl keys, without "step")."""
    name: str
    run: Callable[[int], dict]
    every: int = -1       # at steps divisible by `every` (when > 0) ...
    first: bool = True    # ... step 0 included
    last: bool = True     # and at the last step, before its checkpoint
    final: bool = False   # instead: once, after the last checkpoint (a resume from it redoes it)

    def due(self, step: int, last: bool) -> bool:
        periodic = self.every > 0 and step % self.every == 0 and (step > 0 or self.first)
        return not self.final and (self.last if last else periodic)


@dataclass
class StepOut:
    """What a stage's step function reports about one optimizer step."""
    value: float                                # the train metric over all ranks: mean loss (or mean reward)
    tokens: int                                 # tokens trained on, all ranks
    log: dict = field(default_factory=dict)     # the stage's own per-step metrics.jsonl keys


class Loop:
    """Runtime, plan, resume, the loop itself and the shared result fields of one training run."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.t0 = time.time()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rt = T.setup_runtime(cfg)
        self.plan = T.load_plan(self.run_dir)
        self.state = LoopState()
        self.resumed = False
        self.model: Any = None
        self.optimizer: Any = None
        self.tracker: Optional[Tracker] = None
        self.loader_state: Callable[[], Optional[dict]] = lambda: None
        self.tok_per_sec = 0.0
        self.mfu: Optional[float] = None
        self.wall_before = 0.0
        self.metric, self.val_key = "loss", None
        self.log = print if self.rt.master else (lambda s: None)

    # ------------------------------------------------------------------ model, resume, save

    def build(self, convert: Optional[Callable[[Any], None]] = None) -> tuple[Any, Any, Optional[dict]]:
        """The plan's model (fresh and seeded, or stage.init_from's last weights; then `convert(model)`, before
        the optimizer: pretrain's fp8 layers) and its optimizer, restored with the RNG from the run dir's newest
        checkpoint (run.resume != never). Returns (model, optimizer, this rank's loader state: None when
        starting fresh or when the checkpoint has none)."""
        cfg, rt, init_from = self.cfg, self.rt, self.cfg.stage.init_from
        model = self.model = build_model(T.gpt_config(self.plan), rt.device, cfg.run.seed)
        model.attn_backend = cfg.hardware.attention
        model.activation_checkpointing = cfg.model.activation_checkpointing
        rt.precision.cast_embeddings(model)   # before any load: a checkpoint's tables are cast on copy
        if init_from:
            ckpt = latest_checkpoint(init_from)
            if ckpt is None:
                raise FileNotFoundError(f"stage.init_from={init_from}: no checkpoint in {init_from}/checkpoints")
            model.load_state_dict(load_model_state(ckpt, rt.device), strict=True)
        if convert is not None:
            convert(model)
        optimizer = self.optimizer = T.make_optimizer(model, self.plan, cfg, rt)
        ckpt = latest_checkpoint(self.run_dir) if cfg.run.resume != "never" else None
        if ckpt is None:
            return model, optimizer, None
        model.load_state_dict(load_model_state(ckpt, rt.device), strict=True)
        rank_state = load_rank_state(ckpt, rt.rank, rt.device)
        if rank_state["optim"] is None:
            raise FileNotFoundError(f"{ckpt}: no optim_rank{rt.rank}.pt; was it saved with a different world size "
                                    f"(now {rt.world})?")
        optimizer.load_state_dict(rank_state["optim"])
        if rank_state["rng"] is not None:
            set_rng_state(rank_state["rng"])
        self.state = LoopState.from_dict(load_meta(ckpt)["loop_state"])
        self.resumed = True
        return model, optimizer, rank_state["loader"]

    def save(self) -> Path:
        cfg, plan, rt = self.cfg, self.plan, self.rt
        meta = {"stage": cfg.stage.name, "model_config": plan.model.gpt_config_kwargs(), "loop_state": vars(self.state),
                "config": config_to_dict(cfg), "plan": plan.to_dict(), "world_size": rt.world}
        return save_checkpoint(self.run_dir, self.state.step, model=self.model, optimizer=self.optimizer,
                               loader_state=self.loader_state(), meta=meta, rank=rt.rank,
                               keep_last=getattr(cfg.stage, "keep_last", -1))

    def checkpoint_if_stopped(self) -> None:
        """At a step boundary: if any rank got a stop signal, every rank checkpoints, then Preempted."""
        if not stop_requested_all_ranks():
            return
        self.save()
        self.tracker.print(f"stop signal ({STOP.name or 'peer rank'}): checkpointed at step {self.state.step}")
        raise Preempted(self.state.step, STOP.name or "peer")

    # ------------------------------------------------------------------ the loop

    def _evaluate(self, ev: Evaluation, step: int) -> None:
        self.model.eval()  # evaluations run the model in eval mode; training resumes in train mode
        try:
            metrics = ev.run(step) or {}
        finally:
            self.model.train()
        if not metrics:
            return
        self.state.evals[ev.name] = metrics
        if self.val_key in metrics:
            s = self.state
            s.val_last = v = metrics[self.val_key]
            s.val_first = v if s.val_first is None else s.val_first
            s.val_best = v if s.val_best is None else min(s.val_best, v)
        self.tracker.log({"step": step, **metrics})
        # `<name>/...` keys are an evaluation's details (per task): logged, not printed
        shown = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith(ev.name + "/")]
        if shown:
            self.tracker.print(f"step {step:05d} | " + " | ".join(shown))

    def run(self, step_fn: Callable[[int], StepOut], evals: list[Evaluation],
            loader_state: Callable[[], Optional[dict]], *, header: str, metric: str = "loss",
            val_key: Optional[str] = None, flops_per_token: Optional[int] = None) -> None:
        """Train from the resumed step to plan.num_iterations (see the module docstring).

        `metric` names the step value ("loss": its EMA is final_train_loss; "reward" for rl);
        `val_key` is the evaluation metric kept as val first / last / best; `flops_per_token`
        turns throughput into MFU.
        """
        cfg, rt, plan, st, state = self.cfg, self.rt, self.plan, self.cfg.stage, self.state
        self.loader_state, self.val_key, self.metric = loader_state, val_key, metric
        N = plan.num_iterations
        self.tracker = tracker = Tracker(
            self.run_dir, enabled=rt.master, total_steps=N, start_step=state.step, wandb_mode=cfg.wandb.mode,
            wandb_project=cfg.wandb.project, wandb_name=cfg.wandb.name, config=config_to_dict(cfg), desc=st.name,
            log_interval_s=cfg.run.log_interval_s, tensorboard=cfg.tracking.tensorboard,
            profile=(cfg.run.profile_start, cfg.run.profile_steps) if cfg.run.profile else None)
        peak = T.peak_flops(rt.device, rt.precision.compute_dtype) if flops_per_token else None
        if self.resumed:
            tracker.print(f"resumed from step {state.step} of {N}")
        tracker.print(header + (f" | peak {peak / 1e9:.0f} GFLOP/s" if peak else ""))
        start_step, self.wall_before = state.step, state.wall_time_s  # earlier attempts (0 on a fresh run)
        try:
            while True:
                step = state.step
                last = step == N
                fresh = not (self.resumed and step == start_step)  # this step's evals ran before the checkpoint
                try:
                    for ev in evals:
                        if fresh and ev.due(step, last):
                            self._evaluate(ev, step)
                except EvalInterrupted:  # a stop signal inside an evaluation: checkpoint this step, exit
                    self.checkpoint_if_stopped()
                    raise
                state.wall_time_s = self.wall_before + (time.time() - self.t0)  # what a checkpoint saved now carries
                if fresh and step > start_step and (last or (st.save_every > 0 and step % st.save_every == 0)):
                    self.save()
                if last:
                    break
                self.checkpoint_if_stopped()

                rt.sync()
                t0 = time.perf_counter()
                lrm = T.apply_schedules(self.optimizer, step, plan)
                out = step_fn(step)
                rt.sync()
                dt = time.perf_counter() - t0
                if metric == "loss" and not math.isfinite(out.value):
                    raise FloatingPointError(
                        f"loss is {out.value} at step {step + 1}: training diverged. The last good checkpoint is "
                        f"kept; lower the learning rates (stage.matrix_lr / embedding_lr) or check the data, then "
                        f"resume with run.resume=auto")
                state.step = step + 1
                state.tokens_seen += out.tokens
                if step > start_step:  # the first step pays one-off costs (allocations, compile)
                    state.train_time_s += dt
                    state.timed_tokens += out.tokens
                state.train_ema = EMA_BETA * state.train_ema + (1 - EMA_BETA) * out.value
                smooth = state.smoothed()
                self.tok_per_sec = out.tokens / max(dt, 1e-9)
                self.mfu = flops_per_token * self.tok_per_sec / (peak * rt.world) if peak else None
                if state.step % max(1, st.log_every) == 0 or state.step == N:
                    tracker.log({"step": state.step, f"train/{metric}": out.value, f"train/{metric}_smooth": smooth,
                                 "lr": plan.matrix_lr * lrm, "lrm": lrm, "tok_per_sec": self.tok_per_sec,
                                 **({"mfu": self.mfu} if self.mfu is not None else {}), "dt_ms": dt * 1000,
                                 "tokens": state.tokens_seen, "train_time_s": state.train_time_s, **out.log})
                # the bar and the plain line are both made from these stats (nanochat/tracking.py)
                tracker.progress(state.step, stats={"step": state.step, "total": N, metric: smooth, "lrm": lrm,
                                                    "tok_per_sec": self.tok_per_sec, "mfu": self.mfu, "dt_s": dt})
            try:
                for ev in [e for e in evals if e.final]:
                    self._evaluate(ev, state.step)
            except EvalInterrupted as e:  # trained and saved at step N: a resume only redoes these
                raise Preempted(state.step, e.signal_name) from None
        finally:
            tracker.close()

    # ------------------------------------------------------------------ the result

    def result(self, cls: type[TrainResult] = TrainResult, **fields: Any) -> TrainResult:
        """The stage's result: the fields every training stage shares (each defined here once) + `fields`."""
        s = self.state
        return cls(step=s.step, num_iterations=self.plan.num_iterations, world_size=self.rt.world,
                   num_params=self.plan.num_params, tokens_seen=s.tokens_seen,
                   final_train_loss=s.smoothed() if self.metric == "loss" else None,  # rl: rewards, no loss
                   train_time_s=s.train_time_s, wall_time_s=self.wall_before + (time.time() - self.t0),
                   tok_per_sec=s.timed_tokens / s.train_time_s if s.train_time_s > 0 else self.tok_per_sec,
                   mfu=self.mfu, peak_memory_mb=T.peak_memory_mb(self.rt.device), **fields)
