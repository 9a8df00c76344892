"""Hydra callbacks: the sweep summary written when a multirun ends.

Runs in the launching process after every job returned (also with the Slurm launcher,
which waits for its jobs), so it reads what the jobs left in their run dirs.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nanochat.common import read_json

FAILED_JOBS: list[str] = []  # read by launch.run.main to set the exit code


def _flatten(prefix: str, obj: Any, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}{k}." if prefix or k else k, v, out) if isinstance(v, dict) \
                else _flatten(f"{prefix}{k}", v, out)
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix.rstrip(".")] = obj


def collect_sweep(sweep_dir: Path) -> list[dict]:
    rows = []
    for cfg_path in sorted(sweep_dir.glob("**/resolved_config.yaml")):
        run_dir = cfg_path.parent
        if "checkpoints" in run_dir.parts:
            continue
        row: dict[str, Any] = {"job": str(run_dir.relative_to(sweep_dir))}
        status = "completed" if (run_dir / "COMPLETED").exists() else "unknown"
        try:
            status = read_json(run_dir / "status.json").get("status", status)
        except (FileNotFoundError, ValueError):
            pass
        row["status"] = status
        try:
            overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        except FileNotFoundError:
            overrides = []
        for o in overrides:
            k, _, v = str(o).lstrip("+~").partition("=")
            row[f"cfg.{k}"] = v
        try:
            plan = read_json(run_dir / "plan.json")
            row["plan.num_params"] = plan.get("num_params")
            row["plan.num_iterations"] = plan.get("num_iterations")
            row["plan.total_flops"] = plan.get("total_flops")
        except (FileNotFoundError, ValueError):
            pass
        try:
            flat: dict = {}
            _flatten("", read_json(run_dir / "result.json"), flat)
            row.update({f"result.{k}": v for k, v in flat.items()})
        except (FileNotFoundError, ValueError):
            pass
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, rows: list[dict]) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path = sweep_dir / "summary.csv"
    tmp = sweep_dir / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return path


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        path = write_summary(sweep_dir, rows)
        bad = [r["job"] for r in rows if r["status"] not in ("completed",)]
        FAILED_JOBS.extend(bad)
        print(f"[nanochat] sweep summary: {path} ({len(rows)} jobs, {len(bad)} not completed)", flush=True)
