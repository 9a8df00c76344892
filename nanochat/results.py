"""result.json as dataclasses: what each stage reports, each field defined once.

A stage returns one of these; the worker harness writes `to_dict()` (with `result_type`, the
class name) as result.json; readers (launch/run.py's objective, report.py, scaling_report.py)
go through `load_result` / `from_dict` and attributes, so a renamed field fails a test rather
than a report. Reading is tolerant: a field an older file lacks reads as its default (None),
keys this code does not know are kept in `extra` (and written back out flat).
No torch here: the launcher and the reports import it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional


@dataclass(kw_only=True)
class Result:
    extra: dict = field(default_factory=dict)   # keys without a field (a custom stage's, a newer file's)

    @classmethod
    def from_dict(cls, d: "dict | Result | None") -> "Result":
        """The typed result of a result.json dict; `Result.from_dict` picks the class it was written as."""
        d = d.to_dict() if isinstance(d, Result) else dict(d or {})
        kind = d.pop("result_type", None)
        sub = next((c for c in _subclasses(Result) if c.__name__ == kind), None) if cls is Result else None
        if sub is not None:
            return sub.from_dict(d)
        names = cls.field_names()
        return cls(**{k: d.pop(k) for k in list(d) if k in names}, extra={**d.pop("extra", {}), **d})

    def to_dict(self) -> dict:
        return {"result_type": type(self).__name__, **{k: getattr(self, k) for k in self.field_names()}, **self.extra}

    def get(self, key: str, default: Any = None) -> Any:
        """A field, else an `extra` key: for names that come from the user (run.objective)."""
        return getattr(self, key) if key in self.field_names() else self.extra.get(key, default)

    @classmethod
    def field_names(cls) -> list[str]:
        """The fields, in declaration order (result.json's key order), less `extra`."""
        return [f.name for f in fields(cls) if f.name != "extra"]

    # a custom stage may extend a result as a dict: {**train_chat(run), "mine": 1}
    def keys(self):
        return self.to_dict().keys()

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


def _subclasses(cls: type) -> list[type]:
    return [s for c in cls.__subclasses__() for s in (c, *_subclasses(c))]


def load_result(run_dir: str | Path) -> Optional[Result]:
    """The run dir's result.json, typed; None when there is none (not completed) or it is unreadable."""
    try:
        return Result.from_dict(json.loads((Path(run_dir) / "result.json").read_text()))
    except (OSError, ValueError):
        return None


@dataclass(kw_only=True)
class TrainResult(Result):
    """What every training stage reports (pretrain, mid, sft, rl), written by nanochat/loop.py."""
    step: int = 0
    num_iterations: Optional[int] = None
    world_size: Optional[int] = None
    num_params: Optional[int] = None
    tokens_seen: Optional[int] = None        # tokens the steps trained on: pretrain all, chat assistant, rl sampled
    final_train_loss: Optional[float] = None  # debiased EMA (β 0.9) of the step losses; None in rl (no loss)
    train_time_s: Optional[float] = None     # the steps, the first of each attempt left out (one-off costs)
    wall_time_s: Optional[float] = None      # every attempt: setup, training, evaluations
    tok_per_sec: Optional[float] = None      # tokens_seen of the timed steps / train_time_s
    mfu: Optional[float] = None              # the last step's model FLOPs utilization (pretrain only)
    peak_memory_mb: Optional[float] = None


@dataclass(kw_only=True)
class PretrainResult(TrainResult):
    first_val_bpb: Optional[float] = None
    final_val_bpb: Optional[float] = None
    best_val_bpb: Optional[float] = None
    params: dict = field(default_factory=dict)   # by role, for scaling-law fits (plan.param_breakdown)
    flops_per_token: Optional[int] = None
    flops: Optional[float] = None
    target_flops: Optional[float] = None
    core: Optional[float] = None
    mixture: dict = field(default_factory=dict)            # data.source=mixture: source → weight
    val_bpb_by_source: dict = field(default_factory=dict)  # and each source's final val bpb


@dataclass(kw_only=True)
class ChatResult(TrainResult):
    """mid / sft: validation loss in nats per assistant token."""
    first_val_loss: Optional[float] = None
    final_val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    task_accuracy: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    chatcore: Optional[float] = None
    mixture: list = field(default_factory=list)
    source: Optional[str] = None


@dataclass(kw_only=True)
class RLResult(TrainResult):
    task: Optional[str] = None
    first_reward: Optional[float] = None     # the first step's mean reward
    mean_reward: Optional[float] = None      # the last step's mean reward
    reward_ema: Optional[float] = None       # debiased EMA (β 0.9) of the steps' mean rewards
    pass_at_k: Optional[dict] = None


@dataclass(kw_only=True)
class EvalResult(Result):
    mode: Optional[str] = None               # base | chat | harness
    train_bpb: Optional[float] = None        # base: bits per byte on the train / val splits
    val_bpb: Optional[float] = None
    core: Optional[float] = None             # base: the CORE metric over the bundle's tasks
    core_tasks_evaluated: Optional[int] = None
    core_tasks_total: Optional[int] = None
    core_tasks_skipped: Optional[dict] = None
    core_results: Optional[dict] = None
    core_skipped: Optional[str] = None       # why CORE did not run (no eval bundle offline)
    eval_bundle: Optional[str] = None
    chatcore: Optional[float] = None         # chat: mean centered accuracy
    chatcore_tasks: Optional[list] = None
    task_accuracy: dict = field(default_factory=dict)   # chat / harness: accuracy by task
    tasks: dict = field(default_factory=dict)
    skipped: Optional[dict] = None
    harness: Optional[dict] = None           # harness: lm-eval's summary (nanochat/harness.py)
    source: Optional[str] = None
    source_stage: Optional[str] = None
    source_step: Optional[int] = None
    eval_time_s: Optional[float] = None


@dataclass(kw_only=True)
class TokenizerResult(Result):
    tokenizer: Optional[str] = None
    path: Optional[str] = None
    vocab_size: Optional[int] = None
    requested_vocab_size: Optional[int] = None
    train_chars: Optional[int] = None
    train_docs: Optional[int] = None
    train_seconds: Optional[float] = None
    chars_per_sec: Optional[float] = None
    wall_seconds: Optional[float] = None
    compression: dict = field(default_factory=dict)   # source label → bytes per token (and references)
    notes: dict = field(default_factory=dict)
