"""The stages, each declared once in Python: `STAGE = Stage(...)` at the end of its module.

A stage module (nanochat/stages/<name>.py) says everything the launcher and the worker need to
know about its stage: its config schema, the planner that derives its plan, the worker that runs
it, the runs it may start from, its headline result. Nothing outside it names the stage; its YAML
(conf/stage/<name>.yaml) holds values only. `stages()` finds the declarations by import: every
module of this package, and the `nanochat.stages` entry points of installed distributions (a stage
from outside the repo: `[project.entry-points."nanochat.stages"] distill = "my_pkg.distill:STAGE"`).
Importing them all is cheap because stage modules import torch (and anything heavy) inside their
worker only: the launcher imports every declaration for a dry run, so a renamed worker or planner
fails there, before any run dir exists.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from nanochat.config import Config, ConfigError
from nanochat.results import Result

if TYPE_CHECKING:
    from nanochat.stage_plan import StagePlan


@dataclass(frozen=True)
class Stage:
    name: str
    schema: type                  # its config dataclass (nanochat/config.py): the keys stage.* may have
    planner: Callable[..., "StagePlan"]   # (cfg, source, probe=None): pure Python, the dry run == the run
    worker: Callable[[Config, Path], "Result | dict"]  # runs in the worker process; returns result.json's fields
    sources: tuple[str, ...] = ()  # stages whose runs it starts from (empty: none, it starts from scratch)
    default_source: dict = field(default_factory=dict)  # model.generation → the source `latest` tries first
    source_tag: str = "same"      # same: `latest` reads runs of this run's tag; any: of every tag
    headline: Optional[str] = None  # result.json field a sweep optimises when run.objective is null
    result: type[Result] = Result  # the worker's result type (nanochat/results.py): headline is one of its fields
    tag: Optional[Callable[[Config], str]] = None  # the run's tag (its dir under <root>/<name>/); null: d<depth>
    one_process: bool = False     # one process whatever hardware.nproc_per_node (serve: replicas are threads)
    check: Optional[Callable[[Config], None]] = None  # raises ConfigError before any run dir is made

    def source_order(self, cfg: Config) -> tuple[list[str], list[str]]:
        """(stages `latest` reads first, stages it falls back to when they have no run).

        stage.init_stage alone when set; else the generation's default source, then the other
        sources (sft: a modern model starts from pretrain as chat_sft does, a seed one from mid);
        else all the sources at once (the newest run wins)."""
        if pick := cfg.stage.init_stage:
            if pick not in self.sources:
                raise ConfigError("stage.init_stage", pick, f"the {self.name} stage starts from a run of: "
                                  f"{', '.join(self.sources) or 'none'}", "a source stage this stage does not accept")
            return [pick], []
        first = self.default_source.get(cfg.model.generation)
        return ([first], [s for s in self.sources if s != first]) if first else (list(self.sources), [])


_FOUND: dict[str, Stage] = {}


def stages() -> dict[str, Stage]:
    """Every declared stage by name (imported once per process)."""
    if not _FOUND:
        found = [importlib.import_module(f"{__name__}.{m.name}").STAGE
                 for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
        found += [ep.load() for ep in entry_points(group="nanochat.stages")]
        if bad := [st for st in found if not isinstance(st, Stage)]:
            raise TypeError(f"{bad[0]!r} is not a nanochat.stages.Stage")
        names = [st.name for st in found]
        if len(set(names)) < len(names):  # an installed package must not silently replace a stage
            raise TypeError(f"stage {[n for n in names if names.count(n) > 1][0]!r} is declared twice")
        _FOUND.update((st.name, st) for st in found)
    return _FOUND


def stage(name: Any) -> Stage:
    found = stages()
    if not isinstance(name, str) or name not in found:
        raise ConfigError("stage.name", name, f"pick one of: {', '.join(found)} (stage=<name>), or declare one "
                          f"(README: Adding a stage)", "unknown stage")
    return found[name]
