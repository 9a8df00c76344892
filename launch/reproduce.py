"""nanochat-reproduce: re-run a run from the files it saved.

    nanochat-reproduce RUN_DIR                    # same config, new run dir next to the original
    nanochat-reproduce RUN_DIR stage.num_iterations=50
    nanochat-reproduce RUN_DIR --resume           # continue RUN_DIR itself from its last checkpoint
    nanochat-reproduce RUN_DIR --strict           # refuse when the code (git SHA / dirty) differs

Reads the frozen `resolved_config.yaml` (not `.hydra/config.yaml`: that one lacks the
launcher's derivations) and `meta.json`, recomputes the plan and checks it matches the
saved `plan.json`, then dispatches exactly as nanochat-run does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launch import rundir
from launch.run import FAILURES, exit_code, print_config_error, prepare, run_stage
from nanochat.common import read_json
from nanochat.config import ConfigError, config_from_dict


def plan_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += plan_diff(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-9 * max(abs(a), 1)):
            out.append(f"{prefix}{k}: {a!r} → {b!r}")
    return out


def check_git(meta: dict, strict: bool) -> None:
    old = meta.get("git", {})
    now = rundir.git_info()
    problems = []
    if old.get("sha") and now.get("sha") and old["sha"] != now["sha"]:
        problems.append(f"the run was made at git {old['sha'][:10]}, the code is now at {now['sha'][:10]}")
    if old.get("dirty"):
        problems.append("the run was made from a dirty tree (its diff is in git.diff)")
    for p in problems:
        if strict:
            raise ConfigError("--strict", True, "check out the run's commit (and apply its git.diff), or drop --strict",
                              p)
        print(f"[nanochat-reproduce] warning: {p}", file=sys.stderr, flush=True)


def reproduce(run_dir: Path, overrides: list[str], resume: bool, strict: bool) -> dict[str, Any]:
    run_dir = run_dir.expanduser().resolve()
    cfg_path = run_dir / "resolved_config.yaml"
    if not cfg_path.exists():
        raise ConfigError("RUN_DIR", str(run_dir), "point at a run dir made by nanochat-run "
                          "(it holds resolved_config.yaml)", "not a run dir")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(o, None, "write overrides as key=value, e.g. stage.num_iterations=50",
                              "not an override")
    merged = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    tree = OmegaConf.to_container(merged, resolve=True)
    meta = read_json(run_dir / "meta.json") if (run_dir / "meta.json").exists() else {}
    check_git(meta, strict)
    tree["run"]["dir"] = str(run_dir) if resume else None
    if not resume and run_dir.parent.parent.name == tree["stage"]["name"]:
        tree["run"]["root"] = str(run_dir.parents[2])  # new dir next to the original: <root>/<stage>/<tag>/
    if resume:
        tree["run"]["resume"] = "must"
    cfg = config_from_dict(tree, frozen=True)
    _, plan, _ = prepare(cfg)
    saved_plan = run_dir / "plan.json"
    if plan and saved_plan.exists():
        diff = plan_diff(read_json(saved_plan), plan)
        if diff and not overrides:
            raise ConfigError("plan.json", str(saved_plan), "the code now derives different numbers from the same "
                              "config; check out the run's commit, or pass overrides to accept the change",
                              "recomputed plan differs: " + "; ".join(diff[:5]))
        for d in diff:
            print(f"[nanochat-reproduce] plan change from overrides: {d}", flush=True)
    info = {"overrides": [f"reproduce={run_dir}", *overrides], "choices": meta.get("choices", {}),
            "in_process": True}
    return run_stage(cfg, tree, info, None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanochat-reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value changes to the frozen config")
    ap.add_argument("--resume", action="store_true", help="continue RUN_DIR itself from its last checkpoint")
    ap.add_argument("--strict", action="store_true", help="refuse if the git SHA differs or the run was dirty")
    args = ap.parse_args(argv)
    try:
        out = reproduce(args.run_dir, args.overrides, args.resume, args.strict)
        if out["status"] not in ("completed",):
            FAILURES.append(f"{out.get('run_dir')}: {out['status']}")
    except ConfigError as e:
        print_config_error(e)
        sys.exit(2)
    sys.exit(exit_code())


if __name__ == "__main__":
    main()
