"""Hydra callbacks: the sweep summary written when a multirun ends.

Runs in the launching process after every job returned (also with the Slurm launcher,
which waits for its jobs), so it reads what the jobs left in their run dirs. Then:
- a sweep whose jobs differ in stage.target_flops gets the scaling-law report
  (nanochat/scaling_report.py → <sweep dir>/scaling/report.md);
- an Optuna sweep (sweep=lr_search) prints its best trial as a nanochat-run command.
"""
from __future__ import annotations

import contextlib
import csv
import io
import shlex
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nanochat.common import atomic_write_text, read_json
from nanochat.lifecycle import read_status
from nanochat.results import load_result

FAILED_JOBS: list[str] = []  # read by launch.run.main to set the exit code


def collect_sweep(sweep_dir: Path) -> list[dict]:
    """One row per run dir of the sweep: its status, overrides, size and result (nested fields flattened)."""
    from nanochat.runs import flatten
    rows = []
    for cfg_path in sorted(sweep_dir.glob("**/resolved_config.yaml")):
        run_dir = cfg_path.parent
        if "checkpoints" in run_dir.parts:
            continue
        row: dict[str, Any] = {"job": str(run_dir.relative_to(sweep_dir)), "status": read_status(run_dir)}
        overrides = run_dir / ".hydra" / "overrides.yaml"
        for o in (yaml.safe_load(overrides.read_text()) or []) if overrides.exists() else []:
            k, _, v = str(o).lstrip("+~").partition("=")
            row[f"cfg.{k}"] = v
        with contextlib.suppress(FileNotFoundError, ValueError):
            plan = read_json(run_dir / "plan.json")
            row.update({f"plan.{k}": plan.get(k) for k in ("num_params", "num_iterations", "total_flops")})
        result = load_result(run_dir)
        if result is not None:   # each scalar leaf of nested mappings (lists are left out)
            row.update({k: v for k, v in flatten(result.to_dict(), "result.").items()
                        if v is None or isinstance(v, (int, float, str, bool))})
        rows.append(row)
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        text, path = io.StringIO(), sweep_dir / "summary.csv"
        w = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(path, text.getvalue())
        bad = [r["job"] for r in rows if r["status"] not in ("completed",)]
        FAILED_JOBS.extend(bad)
        print(f"[nanochat] sweep summary: {path} ({len(rows)} jobs, {len(bad)} not completed)", flush=True)
        budgets = {r.get("cfg.stage.target_flops") for r in rows} - {None, ""}
        if len(budgets) >= 2:
            scaling_report(sweep_dir)
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):
            best_trial_command(sweep_dir, list(config.hydra.overrides.task))


def scaling_report(sweep_dir: Path) -> None:
    """The scaling analysis of a FLOP-budget sweep; a failure here must not fail the sweep."""
    try:
        from nanochat.scaling_report import summary_lines, write_report
        path, res = write_report(sweep_dir)
    except Exception as e:
        print(f"[nanochat] scaling report failed: {type(e).__name__}: {e} "
              f"(rerun: nanochat-scaling {sweep_dir})", flush=True)
        return
    for line in summary_lines(res):
        print(f"[nanochat] {line}", flush=True)
    print(f"[nanochat] scaling report: {path}", flush=True)


def best_trial_command(sweep_dir: Path, task_overrides: list[str]) -> Optional[str]:
    """Optuna writes optimization_results.yaml after the last trial; turn it into a command."""
    path = sweep_dir / "optimization_results.yaml"
    try:
        best = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        print(f"[nanochat] optuna: no {path} (no trial completed?)", flush=True)
        return None
    params = best.get("best_params") or {}
    args = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in params]
    args += [f"{k}={v}" for k, v in params.items()]
    cmd = "nanochat-run " + " ".join(shlex.quote(a) for a in args)
    atomic_write_text(sweep_dir / "best_command.txt", cmd + "\n")
    print(f"[nanochat] optuna best value {best.get('best_value')}: {cmd}", flush=True)
    return cmd
