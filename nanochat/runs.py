"""nanochat-runs: see run dirs side by side. It only reads them; nothing here writes into a run dir.

    nanochat-runs ls [ROOT] [--stage S] [--tag T] [--status S] [--json]   one row per run; a sweep is one table
    nanochat-runs diff RUN_A RUN_B                                       config and plan keys that differ
    nanochat-runs plot RUN... --metric NAME [-o FILE] [--x step|flops]   one PNG overlaying the runs' curves

A run dir is a dir holding `resolved_config.yaml` (the launcher freezes it first); a sweep dir holds
Hydra's `multirun.yaml`. Status comes from the files the run leaves (nanochat/lifecycle.py) and, for a
live run, the launcher's lock (nanochat/runlock.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from nanochat.common import read_json
from nanochat.lifecycle import read_status
from nanochat.plots import _flops_per_step, pyplot, read_metrics, save
from nanochat.runlock import STALE_S, lock_holders, read_holder
from nanochat.tracking import duration

STATUSES = ("completed", "running", "preempted", "failed", "unknown")


class RunsError(Exception):
    """Bad input to nanochat-runs: printed as one clear line, never a traceback."""


def headline(stage: str) -> Optional[tuple[str, str]]:
    """(result.json key, 'min' | 'max') of a stage's headline figure, as the stage declares it."""
    from nanochat.stages import stages
    key = getattr(stages().get(stage), "headline", None)
    return None if key is None else (key, "min" if ("loss" in key or "bpb" in key) else "max")


def read_file(path: Path) -> Any:
    """A run dir's JSON or YAML file, parsed; None when missing, torn (a killed writer) or foreign."""
    try:
        if path.suffix == ".json":
            return read_json(path)
        import yaml
        return yaml.safe_load(path.read_text())
    except Exception:
        return None


def _alive(run_dir: Path) -> bool:
    """A launcher holds the run: on this host its flock shows in /proc/locks; elsewhere its heartbeat is fresh."""
    holder = read_holder(run_dir)   # none ({}): no host, no heartbeat, not alive
    if holder.get("host") == socket.gethostname():
        return bool(lock_holders(run_dir / "run.lock"))
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_S


def _last_metrics(run_dir: Path) -> dict:
    """The newest step's metrics, merged (train and val rows share a step), from the file's tail."""
    rows = read_metrics(run_dir, tail_bytes=65536)
    last = rows[-1].get("step") if rows else None
    return {k: v for r in rows if r.get("step") == last for k, v in r.items()}


def run_info(run_dir: Path) -> dict:
    """One row of `ls`: what the run is, how far it got, its headline figure."""
    cfg, meta, plan, result = (read_file(run_dir / name) or {} for name in
                               ("resolved_config.yaml", "meta.json", "plan.json", "result.json"))
    last, status = _last_metrics(run_dir), read_status(run_dir)
    status = "running" if status != "completed" and _alive(run_dir) else status if status in STATUSES else "unknown"
    stage_cfg = cfg.get("stage") if isinstance(cfg, dict) else None
    stage = meta.get("stage") or (stage_cfg or {}).get("name") or "?"
    head = headline(stage)
    value = result.get(head[0]) if head else None
    git = meta.get("git") or {}
    sha = (git.get("sha") or "")[:8] + ("+dirty" if git.get("dirty") else "")
    wall = result.get("wall_time_s", last.get("elapsed_s"))
    return {"dir": str(run_dir), "stage": stage, "tag": meta.get("tag") or "?", "status": status,
            "step": result.get("step", last.get("step")), "total": plan.get("num_iterations"),
            "headline": head[0] if head else None, "value": value if isinstance(value, (int, float)) else None,
            "wall_time_s": wall, "git": sha or None, "created": meta.get("created"),
            "overrides": meta.get("overrides") or [], "valid": bool(stage_cfg) and bool(meta)}


def find_runs(root: Path) -> list[Path]:
    """Run dirs at or under `root`, oldest first (never descending into a run dir's own subdirs)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "resolved_config.yaml" in filenames:
            found.append(Path(dirpath))
            dirnames.clear()
        else:
            dirnames.sort()
    return found


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cells(info: dict, root: Path) -> list[str]:
    step = f"{_fmt(info['step'])}/{_fmt(info['total'])}" if info["total"] else _fmt(info["step"])
    head = f"{info['headline']} {_fmt(info['value'])}" if info["value"] is not None else "-"
    wall = info["wall_time_s"]
    return [info["stage"], info["tag"], info["status"], step, head, duration(wall) if isinstance(wall, (int, float))
            else "-", info["git"] or "-", os.path.relpath(info["dir"], root)]


HEADER = ["stage", "tag", "status", "step", "headline", "wall", "git", "dir"]


def _sweep_table(sweep: Path, infos: list[dict]) -> str:
    """One table for a sweep: the swept keys as columns, the best headline point marked `*`."""
    parsed = [dict(o.lstrip("+~").split("=", 1) for o in i["overrides"] if "=" in o) for i in infos]
    swept = [k for k in dict.fromkeys(k for p in parsed for k in p) if len({p.get(k) for p in parsed}) > 1]
    scored = [(i["value"], n) for n, i in enumerate(infos) if i["value"] is not None and math.isfinite(i["value"])]
    sense = (headline(infos[scored[0][1]]["stage"]) or ("", "min"))[1] if scored else "min"
    best = (min if sense == "min" else max)(scored)[1] if scored else None
    rows = [[" ", *swept, *HEADER]] + [["*" if n == best else " ", *(p.get(k, "-") for k in swept),
                                        *_cells(info, sweep)] for n, (info, p) in enumerate(zip(infos, parsed))]
    best_note = f"; * = best {infos[best]['headline']}" if best is not None else ""
    return f"sweep {sweep} ({len(infos)} jobs{best_note})\n" + _table(rows)


def cmd_ls(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser().resolve()
    if not root.is_dir():
        raise RunsError(f"{args.root}: no such directory")
    infos = [run_info(d) for d in find_runs(root)]
    if not infos:
        raise RunsError(f"no run dirs under {root} (a run dir holds resolved_config.yaml; runs go to run.root, "
                        f"default runs/)")
    infos = [i for i in infos if all(getattr(args, k) in (None, "", i[k]) for k in ("stage", "tag", "status"))]
    infos.sort(key=lambda i: (i["created"] or "", i["dir"]))
    if args.json:
        print(json.dumps([{k: v for k, v in i.items() if k != "valid"} for i in infos], indent=1))
        return 0
    if not infos:
        print("no runs match the filters")
        return 0
    groups: dict[Optional[Path], list[dict]] = {}
    for i in infos:   # by the Hydra multirun dir (it holds multirun.yaml) a run belongs to, if any
        sweep = next((p for p in Path(i["dir"]).parents if (p / "multirun.yaml").is_file()), None)
        groups.setdefault(sweep, []).append(i)
    out = [_table([HEADER, *(_cells(i, root) for i in groups.pop(None))])] if None in groups else []
    out += [_sweep_table(s, g) for s, g in groups.items()]
    print("\n\n".join(out))
    if broken := [i["dir"] for i in infos if not i["valid"]]:
        print(f"\n{len(broken)} dir(s) with a missing or unreadable resolved_config.yaml / meta.json (half-written, "
              f"or not made by nanochat-run): {', '.join(broken[:5])}")
    return 0


def _run_dir(arg: str) -> Path:
    d = Path(arg).expanduser().resolve()
    if not (d / "resolved_config.yaml").is_file():
        raise RunsError(f"{arg}: not a run dir (no resolved_config.yaml); `nanochat-runs ls` lists them")
    return d


def flatten(obj: Any, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = _run_dir(args.run_a), _run_dir(args.run_b)
    lines = []
    for name, label in (("resolved_config.yaml", "config"), ("plan.json", "plan")):
        fa, fb = flatten(read_file(a / name) or {}), flatten(read_file(b / name) or {})
        for k in sorted(set(fa) | set(fb)):
            va, vb = fa.get(k, "<absent>"), fb.get(k, "<absent>")
            if k != "run.dir" and va != vb:
                lines.append([f"{label}.{k}", *(v if isinstance(v, str) else json.dumps(v) for v in (va, vb))])
    if lines:
        print(_table([["key", "A", "B"], *lines]) + f"\nA = {a}\nB = {b}")
    else:
        print(f"no config or plan key differs between {a} and {b}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    runs = []
    for arg in args.runs:
        if not (found := find_runs(Path(arg).expanduser().resolve())):
            raise RunsError(f"{arg}: no run dirs there (a run dir holds resolved_config.yaml)")
        runs += found
    out = Path(args.output or f"{args.metric.replace('/', '_')}.png").resolve()
    if inside := [r for r in runs if r in out.parents]:
        raise RunsError(f"-o {out}: inside the run dir {inside[0]}; nanochat-runs never writes into a run dir")
    curves = {}
    for r in runs:   # (x, value) points of the metric; x = step, or FLOPs = step × the plan's FLOPs per step
        pts = [(row["step"], row[args.metric]) for row in read_metrics(r)
               if isinstance(row.get(args.metric), (int, float)) and isinstance(row.get("step"), int)]
        per_step = _flops_per_step(r) if args.x == "flops" and pts else 1.0
        if per_step is None:
            raise RunsError(f"--x flops: {r}/plan.json has no flops_per_token × total_batch_size; use --x step")
        curves[r] = [(step * per_step, v) for step, v in pts if args.x == "step" or step > 0]  # a log axis has no 0
    if not any(curves.values()):
        names = sorted({k for r in runs for k, v in _last_metrics(r).items() if isinstance(v, (int, float))} - {"step"})
        raise RunsError(f"--metric {args.metric}: not in the metrics.jsonl of any of these runs; metrics they log: "
                        f"{', '.join(names) or 'none'}")
    common = os.path.commonpath([str(r) for r in runs]) if len(runs) > 1 else str(runs[0].parent)
    fig, ax = pyplot().subplots(figsize=(8, 5))
    for r, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), label=os.path.relpath(r, common), lw=1.2, marker="." if len(pts) <= 50 else None)
    flops = args.x == "flops"
    ax.set(xlabel="FLOPs" if flops else "step", ylabel=args.metric, xscale="log" if flops else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, out)
    print(f"{out} ({sum(1 for pts in curves.values() if pts)} of {len(runs)} runs have {args.metric})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nanochat-runs", description="Browse run dirs (read only).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ls", help="one row per run under ROOT (default runs/)")
    p.add_argument("root", nargs="?", default="runs")
    p.add_argument("--stage")
    p.add_argument("--tag")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("diff", help="config and plan keys that differ between two runs")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p = sub.add_parser("plot", help="overlay one metric of several runs (or sweep dirs) in a PNG")
    p.add_argument("runs", nargs="+")
    p.add_argument("--metric", required=True, help="a metrics.jsonl key, e.g. train/loss_smooth or val/bpb")
    p.add_argument("-o", "--output", help="PNG path (default <metric>.png here)")
    p.add_argument("--x", choices=("step", "flops"), default="step")
    args = ap.parse_args(argv)
    try:
        return {"ls": cmd_ls, "diff": cmd_diff, "plot": cmd_plot}[args.cmd](args)
    except RunsError as e:
        print(f"nanochat-runs: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nanochat-runs ls | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
