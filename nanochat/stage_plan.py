"""The stage contract: which run a stage starts from, and the one function that derives its plan.

Each stage declares, in its YAML (conf/stage/<name>.yaml), three things the launcher reads
without knowing any stage by name:

    sources: [pretrain, mid]     # stages whose runs it may start from (null: none)
    source_tag: same             # `latest` looks at runs with this run's tag (any: every tag)
    planner: nanochat.chat_plan.sft_plan   # (cfg, source) -> StagePlan

The planner is pure Python (no torch): the launcher calls it for `run.dry_run=true` and
for a real run alike, and freezes what it returns as the run's plan.json, which the worker
then trains with. So the dry run prints exactly the numbers the run uses.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from nanochat.common import read_json
from nanochat.config import Config, ConfigError, config_from_dict
from nanochat.plan import Plan, make_plan, plan_rows


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


def load_source(path: str | Path) -> SourceRun:
    from nanochat.lifecycle import list_checkpoints
    path = Path(path)
    tree = yaml.safe_load((path / "resolved_config.yaml").read_text())
    cfg = config_from_dict(tree)
    plan = read_json(path / "plan.json") if (path / "plan.json").exists() else {}
    ckpts = list_checkpoints(path)
    return SourceRun(path=path, stage=cfg.stage.name, config=cfg, plan=plan, checkpoint=ckpts[-1] if ckpts else None)


@dataclass
class StagePlan:
    """What a planner returns: the plan the run uses (None for stages without one) and its rows."""
    plan: Optional[Plan]
    rows: list[tuple[str, str]] = field(default_factory=list)
    wants_probe: bool = False   # hardware.device_batch_size=auto: a real run probes, then plans again


Planner = Callable[[Config, Optional[SourceRun]], StagePlan]


def planner_for(cfg: Config) -> Planner:
    """The function named by stage.planner (`module.function`)."""
    name = cfg.stage.planner
    mod, _, fn = name.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError("stage.planner", name, "name a function as module.function, e.g. "
                          "nanochat.stage_plan.train_plan", f"cannot import it ({e})") from None


def source_candidates(cfg: Config) -> list[str]:
    """The stages whose runs `init_from=latest` searches: stage.init_stage, else the generation's
    stage.default_source (sft: a modern model starts from pretrain as chat_sft does, a seed one from mid),
    else every stage of stage.sources (the newest run wins)."""
    st = cfg.stage
    accepted = list(st.sources or [])
    if st.init_stage:
        if accepted and st.init_stage not in accepted:
            raise ConfigError("stage.init_stage", st.init_stage,
                              f"the {st.name} stage starts from a run of: {', '.join(accepted)}",
                              "a source stage this stage does not accept")
        return [st.init_stage]
    default = (st.default_source or {}).get(cfg.model.generation)
    return [default] if default else accepted


def check_source(cfg: Config, source: SourceRun) -> None:
    """A source run of a stage this stage does not accept is refused before any work."""
    accepted = list(cfg.stage.sources or [])
    if accepted and source.stage not in accepted:
        raise ConfigError("stage.init_from", str(source.path),
                          f"point it at a run of: {', '.join(accepted)} (or set stage.sources to accept "
                          f"{source.stage})", f"a {source.stage} run; the {cfg.stage.name} stage does not "
                          f"start from that stage")


def with_source_model(cfg: Config, source: SourceRun) -> Config:
    """A later stage trains the checkpoint's architecture (and tokenizer), not the one in `model=`."""
    st = replace(cfg.stage, init_from=str(source.path))
    model = source.config.model
    vocab = (source.plan.get("model") or {}).get("vocab_size")
    if model.vocab_size is None and vocab is not None:
        model = replace(model, vocab_size=vocab)
    data = replace(cfg.data, tokenizer=source.config.data.tokenizer)
    return replace(cfg, model=model, data=data, stage=st)


def fill_vocab(cfg: Config) -> Config:
    from nanochat.common import get_base_dir
    from nanochat.tokenizer import tokenizer_vocab_size  # cheap: no torch/tiktoken at import
    if cfg.model.vocab_size is not None:
        return cfg
    vocab = tokenizer_vocab_size(get_base_dir(cfg.paths.base_dir), cfg.data.tokenizer)
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab)) if vocab is not None else cfg


def source_rows(cfg: Config, source: Optional[SourceRun]) -> list[tuple[str, str]]:
    if source is not None:
        return [("init_from", f"{source.path} ({source.stage}, {source.generation})")]
    if cfg.stage.init_from:
        return [("init_from", str(cfg.stage.init_from))]
    return []


# --------------------------------------------------------------------------- planners

def tokenizer_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    rows = [("data", f"{cfg.data.name} ({cfg.data.source})"), ("vocab_size", f"{cfg.stage.vocab_size:,}"),
            ("max_chars", f"{cfg.stage.max_chars:,}"), ("doc_cap", f"{cfg.stage.doc_cap:,}"),
            ("artifact", f"{cfg.paths.base_dir}/tokenizer/{cfg.data.tokenizer}")]
    return StagePlan(None, rows)


def train_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    """Pretraining (and any stage that trains by plan.py's depth rules)."""
    cfg = fill_vocab(cfg)
    p = make_plan(cfg, probe=probe)
    if source is not None:
        p = replace(p, source=str(source.path))
    return StagePlan(p, plan_rows(p) + source_rows(cfg, source),
                     wants_probe=cfg.hardware.device_batch_size == "auto" and probe is None)


MODEL_ROWS = ("generation", "depth / width / heads", "vocab (padded)", "params")


def model_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    """Stages that only load a model (eval): its shape, nothing about training."""
    cfg = fill_vocab(cfg)
    p = make_plan(cfg)
    p = replace(p, source=str(source.path) if source else None)
    return StagePlan(p, [r for r in plan_rows(p) if r[0] in MODEL_ROWS] + source_rows(cfg, source))


def serve_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    from nanochat.serve.plan import serve_rows
    sp = model_plan(cfg, source)
    return StagePlan(sp.plan, sp.rows + serve_rows(cfg, sp.plan.model.n_kv_head, sp.plan.model.head_dim))


def call_planner(cfg: Config, source: Optional[SourceRun], **kw: Any) -> StagePlan:
    fn = planner_for(cfg)
    return fn(cfg, source, **kw) if kw else fn(cfg, source)
