"""What planners share: the source run a stage starts from, and the plan a planner returns.

A stage's declaration (nanochat/stages/<name>.py) names its planner, pure Python (no torch): the
launcher calls it for `run.dry_run=true` and for a real run alike, and freezes what it returns as
the run's plan.json, which the worker then trains with. So the dry run prints exactly the numbers
the run uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from nanochat.common import get_base_dir, read_json
from nanochat.config import Config, ConfigError, load_config
from nanochat.plan import Plan, make_plan, plan_rows

if TYPE_CHECKING:
    from nanochat.stages import Stage


@dataclass
class SourceRun:
    """A finished run a stage starts from: what its files say (no torch, no checkpoint load)."""
    path: Path
    stage: str
    config: Config
    plan: dict
    checkpoint: Optional[Path]

    @property
    def generation(self) -> str:
        return self.plan.get("generation") or self.config.model.generation

    def has_optimizer_state(self) -> bool:
        return self.checkpoint is not None and any(self.checkpoint.glob("optim_rank*.pt"))


def open_source(cfg: Config, stage: "Stage", path: Path) -> tuple[Config, SourceRun]:
    """The run at `path` that `stage` starts from, and `cfg` with its architecture and tokenizer: a later
    stage trains the checkpoint's model, not the one in `model=`. A run of a stage this stage does not
    accept is refused before any work."""
    from nanochat.lifecycle import list_checkpoints
    src = load_config(str(path / "resolved_config.yaml"))
    plan = read_json(path / "plan.json") if (path / "plan.json").exists() else {}
    source = SourceRun(path, src.stage.name, src, plan, (list_checkpoints(path) or [None])[-1])  # the newest
    if source.stage not in stage.sources:
        raise ConfigError("stage.init_from", str(path), f"point it at a run of: {', '.join(stage.sources)}",
                          f"a {source.stage} run; the {stage.name} stage does not start from that stage")
    model = replace(src.model, vocab_size=src.model.vocab_size or (plan.get("model") or {}).get("vocab_size"))
    return replace(cfg, model=model, data=replace(cfg.data, tokenizer=src.data.tokenizer),
                   stage=replace(cfg.stage, init_from=str(path))), source


@dataclass
class StagePlan:
    """What a planner returns: the plan the run uses (None for stages without one) and its rows."""
    plan: Optional[Plan]
    rows: list[tuple[str, str]] = field(default_factory=list)
    wants_probe: bool = False   # hardware.device_batch_size=auto: a real run probes, then plans again


def fill_vocab(cfg: Config) -> Config:
    """model.vocab_size null → the tokenizer's, once it exists."""
    from nanochat.tokenizer import tokenizer_vocab_size  # cheap: no torch/tiktoken at import
    vocab = cfg.model.vocab_size or tokenizer_vocab_size(get_base_dir(cfg.paths.base_dir), cfg.data.tokenizer)
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab))


def source_rows(cfg: Config, source: Optional[SourceRun]) -> list[tuple[str, str]]:
    if source is not None:
        return [("init_from", f"{source.path} ({source.stage}, {source.generation})")]
    return [("init_from", str(cfg.stage.init_from))] if cfg.stage.init_from else []


# --------------------------------------------------------------------------- planners

def mixture_rows(cfg: Config, train_tokens: Optional[int]) -> tuple[list[tuple[str, str]], list[str]]:
    """data=mixture: each source's weight, tokens and epochs (ConfigError for a source without data)."""
    if cfg.data.source != "mixture":
        return [], []
    from nanochat.mixture import plan_rows
    return plan_rows(cfg, train_tokens)


def due_count(steps: int, every: int, at_zero: bool) -> int:
    """How many times an evaluation due every `every` steps and at the last one runs in [0, steps]."""
    return 1 if every <= 0 else steps // every + int(at_zero) + int(steps % every > 0)


def when(every: int) -> str:
    return f"every {every} steps and at the end" if every > 0 else "at the end"


CORE_TASKS, CORE_EXAMPLE_TOKENS = 22, 1000   # the CORE bundle; an example with its few-shot context, roughly


def pretrain_eval_rows(p: Plan, st: Any) -> list[tuple[str, str]]:
    """The pretraining's evaluations, their size and an estimate of their cost against the training's."""
    N, tokens = p.num_iterations, st.eval_tokens or p.eval_tokens or 0
    vp = due_count(N, st.eval_every, at_zero=True)
    cp = due_count(N, st.core_every, at_zero=False) if st.core_every > 0 else 0
    per = "all" if st.core_max_per_task < 0 else f"≤ {st.core_max_per_task:,}"
    flops = (vp * tokens + cp * CORE_TASKS * max(st.core_max_per_task, 0) * CORE_EXAMPLE_TOKENS) * p.flops_per_token / 3
    return [("validation", f"{vp} × {tokens:,} tokens ({when(st.eval_every)})"),
            ("CORE", f"{cp} × {CORE_TASKS} tasks, {per} examples each ({when(st.core_every)})"
                     if cp else "off (stage.core_every=-1)"),
            ("evaluation cost", f"≈ {flops:.2g} FLOPs = {flops / max(p.total_flops, 1):.1%} of training"
                                + (" + CORE over all examples" if cp and st.core_max_per_task < 0 else ""))]


def train_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    """Pretraining (and any stage that trains by plan.py's depth rules)."""
    cfg = fill_vocab(cfg)
    p = make_plan(cfg, probe=probe)
    mix, warnings = mixture_rows(cfg, p.num_iterations * p.total_batch_size)
    p = replace(p, source=str(source.path) if source else None, notes=p.notes + warnings)
    return StagePlan(p, plan_rows(p) + mix + pretrain_eval_rows(p, cfg.stage) + source_rows(cfg, source),
                     wants_probe=cfg.hardware.device_batch_size == "auto" and probe is None)


def model_rows(p: Plan) -> list[tuple[str, str]]:
    """The rows of the model's shape, nothing about training."""
    return [r for r in plan_rows(p) if r[0] in ("generation", "depth / width / heads", "vocab (padded)", "params")]


def model_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    """Stages that only load a model (eval): its shape, nothing about training."""
    cfg = fill_vocab(cfg)
    p = replace(make_plan(cfg), source=str(source.path) if source else None)
    return StagePlan(p, model_rows(p) + source_rows(cfg, source))
