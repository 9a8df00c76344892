"""Run dirs: naming from values, `latest` lookup, and the frozen record of a run.

Nothing here imports torch or Hydra; the Hydra-specific bits (overrides, choices) are
passed in as plain data by launch/run.py.
"""
from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from launch.validate import command_output
from nanochat.common import atomic_write_json, atomic_write_text
from nanochat.config import Config, ConfigError, config_to_dict
from nanochat.integrity import select_resume_checkpoint, verify
from nanochat.lifecycle import list_checkpoints
from nanochat.stages import Stage, stage

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "hydra-core", "omegaconf", "hydra-submitit-launcher", "submitit", "numpy",
            "pyarrow", "tiktoken", "rustbpe", "rich", "wandb")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
              "SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURM_PROCID", "SLURM_JOB_PARTITION")


def run_tag(cfg: Config) -> str:
    """Tags come from values: `model=d4 model.depth=6` is d6 (a stage may declare its own rule)."""
    if cfg.run.tag:
        return cfg.run.tag
    rule = stage(cfg.stage.name).tag
    return rule(cfg) if rule else f"d{cfg.model.depth}"


def new_run_dir(cfg: Config) -> Path:
    """<root>/<stage>/<tag>/<timestamp>[-n]: unique even for two runs started in the same second."""
    base = Path(cfg.run.root).expanduser() / cfg.stage.name / run_tag(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = base / stamp, 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    return path


def _newest(cfg: Config, stages: list[str], any_tag: bool) -> Optional[Path]:
    """Newest completed run (by COMPLETED's mtime) among `stages` with this run's tag; any_tag: of any tag,
    of the first stage that has one."""
    root, tag = Path(cfg.run.root).expanduser(), "*" if any_tag else run_tag(cfg)
    done = [[p.parent for p in (root / s).glob(f"{tag}/*/COMPLETED")] for s in stages]
    pool = next((d for d in done if d), []) if any_tag else [p for d in done for p in d]
    return max(pool, key=lambda p: (p / "COMPLETED").stat().st_mtime) if pool else None


def resolve_source(cfg: Config, st: Stage) -> tuple[Path, Optional[str]]:
    """stage.init_from of a stage that starts from a run → (the run dir, a note for the plan when `latest`
    took another source than the preferred one), with errors that name every way out."""
    value = cfg.stage.init_from
    if value in (None, "", "none"):
        raise ConfigError("stage.init_from", value, f"set stage.init_from=<run dir> or latest; the {st.name} stage "
                          f"starts from a run of: {', '.join(st.sources)}", "missing source checkpoint")
    if value != "latest":
        return _checked_run_dir(cfg, value), None
    first, rest = st.source_order(cfg)
    any_tag = st.source_tag == "any"
    if (found := _newest(cfg, first, any_tag)) is not None:
        return found.resolve(), None
    where = "" if any_tag else f" for tag {run_tag(cfg)}"
    if (other := _newest(cfg, rest, any_tag)) is not None:
        return other.resolve(), (f"no completed {first[0]} run{where}: starting from the newest "
                                 f"{other.parents[1].name} run, whose generation picks the rules "
                                 f"(stage.init_stage={first[0]} insists on {first[0]})")
    names = " / ".join(first + rest)
    have = [s for s in st.sources if s not in first and _newest(cfg, [s], any_tag)]
    ways = [f"run the {' or '.join(first + rest)} stage{where} first (under run.root={cfg.run.root})",
            "or point stage.init_from at a run dir"]
    if len(st.sources) > 1:
        ways.append(f"or name the source stage with stage.init_stage={'|'.join(st.sources)}"
                    + (f" ({', '.join(have)} has a run)" if have else ""))
    if len(set(st.default_source.values())) > 1 and not cfg.stage.init_stage:
        ways.append("or set model.generation, which picks the source `latest` prefers ("
                    + ", ".join(f"{g}: {s}" for g, s in st.default_source.items()) + ")")
    raise ConfigError("stage.init_from", value, "; ".join(ways), f"no completed {names} run found{where}")


def _checked_run_dir(cfg: Config, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError("stage.init_from", value, "point it at an existing run dir, or use `latest`",
                          "no such directory")
    if not (path / "resolved_config.yaml").exists():
        raise ConfigError("stage.init_from", value, "point it at a run dir made by nanochat-run "
                          "(it holds resolved_config.yaml)", "not a run dir")
    if not list_checkpoints(path):
        raise ConfigError("stage.init_from", value, "point it at a run that saved a checkpoint "
                          "(checkpoints/step_*)", "the run has no checkpoints")
    problems = [] if cfg.run.dry_run else verify(list_checkpoints(path)[-1])  # dry runs stay fast
    if problems:
        raise ConfigError("stage.init_from", value, "re-run (or resume) the source run to get a good checkpoint",
                          f"its newest checkpoint failed verification: {'; '.join(problems)}")
    return path.resolve()


def check_resume_policy(cfg: Config, run_dir: Path, verify_checkpoints: bool = True) -> None:
    """Apply run.resume against the run dir's checkpoints; the workers resume from the newest one left.

    Only the run dir's owner verifies (and may move bad checkpoints aside): the other nodes of a
    multi-node job pass verify_checkpoints=False.
    """
    ckpts = list_checkpoints(run_dir)
    policy = cfg.run.resume
    if policy == "must" and not ckpts:
        raise ConfigError("run.resume", policy, f"there is nothing to resume in {run_dir}; use run.resume=auto "
                          "or point run.dir at a run with checkpoints", "no checkpoint to resume")
    if policy == "never" and ckpts:
        raise ConfigError("run.resume", policy, f"{run_dir} already has checkpoints ({ckpts[-1].name}); use "
                          "run.resume=auto to continue it or a fresh run.dir", "would overwrite checkpoints")
    if ckpts and verify_checkpoints:   # (never with checkpoints was refused above)
        # verify checksums newest first: a bad checkpoint is moved aside (auto) or refuses the launch (must)
        select_resume_checkpoint(run_dir, policy)


# --------------------------------------------------------------------------- freezing

def _git(*args: str) -> str:
    return command_output(["git", *args], cwd=str(REPO_ROOT)) or ""


def git_info() -> dict[str, Any]:
    sha = _git("rev-parse", "HEAD").strip() or None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status.strip()), "branch": _git("rev-parse", "--abbrev-ref", "HEAD").strip()}


def package_versions() -> dict[str, Optional[str]]:
    out = dict.fromkeys(PACKAGES)
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def resolved_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def freeze(run_dir: Path, cfg: Config, plan: dict, overrides: list[str], choices: dict,
           composed: dict, argv: Optional[list[str]] = None) -> dict:
    """Write resolved_config.yaml, plan.json, meta.json, git.diff and .hydra/ atomically."""
    text = resolved_yaml(cfg)
    assert "${" not in text, "resolved config still holds an interpolation"
    git = git_info()
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "run_dir": str(run_dir.resolve()),
            "stage": cfg.stage.name, "tag": run_tag(cfg), "argv": list(argv if argv is not None else sys.argv),
            "overrides": overrides, "choices": choices, "git": git, "hostname": socket.gethostname(),
            "user": getpass.getuser(), "python": platform.python_version(), "platform": platform.platform(),
            "packages": package_versions(),
            "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ}}
    hydra_dir = run_dir / ".hydra"
    atomic_write_text(hydra_dir / "config.yaml", yaml.safe_dump(composed, sort_keys=False))
    atomic_write_text(hydra_dir / "overrides.yaml", yaml.safe_dump(overrides))
    atomic_write_text(hydra_dir / "choices.yaml", yaml.safe_dump(choices))
    atomic_write_text(run_dir / "resolved_config.yaml", text)
    atomic_write_json(run_dir / "plan.json", plan)
    if git["dirty"]:
        atomic_write_text(run_dir / "git.diff", _git("diff", "HEAD"))
    atomic_write_json(run_dir / "meta.json", meta)
    return meta

