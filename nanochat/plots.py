"""PNG figures with matplotlib's Agg backend (no display needed), written atomically.

Shared by the scaling report (`nanochat/scaling_report.py`) and the pipeline report card
(`nanochat/report.py`). matplotlib is imported on first use, so importing this module is free.
"""
from __future__ import annotations

import json
import os
from contextlib import suppress
from pathlib import Path
from typing import Optional


def pyplot():
    """matplotlib.pyplot on the Agg backend (safe on headless machines and in worker processes)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Write `fig` as PNG via a temporary file + rename, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    os.replace(tmp, path)
    pyplot().close(fig)
    return path


def read_metrics(run_dir: Path, tail_bytes: int = 0) -> list[dict]:
    """metrics.jsonl rows (of its last `tail_bytes` only, when given); a cut line (the tail's first) or a
    torn one (a run killed mid-write) is skipped."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes) if tail_bytes else 0)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        with suppress(ValueError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict)]


def _flops_per_step(run_dir: Path) -> Optional[float]:
    """FLOPs of one optimizer step from the run's (effective) plan, when it has one."""
    from nanochat.runs import read_file
    for name in ("effective_plan.json", "plan.json"):
        plan = read_file(Path(run_dir) / name)
        with suppress(KeyError, TypeError, ValueError):  # no such plan, or one without them
            return float(plan["flops_per_token"]) * float(plan["total_batch_size"])
    return None


def debiased_ema(values: list[float], beta: float = 0.9) -> list[float]:
    """nanochat's smoothed train loss: an EMA with its start-up bias divided out (1 - beta^n)."""
    out, ema = [], 0.0
    for n, v in enumerate(values, 1):
        ema = beta * ema + (1 - beta) * v
        out.append(ema / (1 - beta ** n))
    return out


def log_ticks(ax, lo: float, hi: float, n: int = 4) -> None:
    """At most n labelled ticks on a log axis, spread evenly, no minor labels (which overlap when
    the range spans less than a decade, as a short run's FLOPs do)."""
    from matplotlib import ticker
    if hi <= lo:
        return
    ticks = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{t:.2g}" for t in ticks]))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def training_curves(run_dir: Path, out: Path, title: str) -> Optional[Path]:
    """Train loss and the validation metric against steps (left) and FLOPs (right); None if no data.

    The train loss is drawn as nanochat reports it, a debiased EMA (the line), with the raw
    per-step values as faint points behind it. The validation metric is val/bpb (pretrain),
    val/loss (mid, sft), or the first val/* key (rl); a mixture adds a dashed curve per source.
    """
    rows = read_metrics(run_dir)
    train_key = next((k for k in ("train/loss", "train/reward") if any(k in r for r in rows)), None)
    val_keys = [k for r in rows for k in r if k.startswith("val/")]
    val_key = next((k for k in ("val/bpb", "val/loss") if k in val_keys), val_keys[0] if val_keys else None)
    if train_key is None and val_key is None:
        return None
    fps = _flops_per_step(run_dir)
    ncols = 2 if fps else 1
    fig, axes = pyplot().subplots(2, ncols, figsize=(5.5 * ncols, 6), squeeze=False)
    for row, key in enumerate((train_key, val_key)):
        pts = [(r["step"], r[key]) for r in rows if key and key in r and "step" in r]
        for col, ax in enumerate(axes[row]):
            if not pts:
                ax.set_visible(False)
                continue
            if col == 1:  # FLOPs on a log axis: step 0 (no FLOPs yet) has no place on it
                pts = [(s * fps, v) for s, v in pts if s > 0] or pts
            xs, ys = zip(*pts)
            if row == 0:  # raw values faint, the debiased EMA as the curve
                ax.plot(xs, ys, ".", ms=4, alpha=0.3, color="C0", label="raw")
                ax.plot(xs, debiased_ema(ys), color="C0", lw=1.6, label="EMA (debiased, β=0.9)")
            else:
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, color="C1", label=key)
                # a mixture's per-source curves (val/bpb/<source>) next to the weighted total
                for i, sub in enumerate(sorted({k for r in rows for k in r if k.startswith(f"{key}/")})):
                    sp = [(r["step"], r[sub]) for r in rows if sub in r and (col == 0 or r["step"] > 0)]
                    ax.plot([s if col == 0 else s * fps for s, _ in sp], [v for _, v in sp], lw=1, ls="--",
                            color=f"C{i + 2}", label=sub.rsplit("/", 1)[1])
            if len(ax.get_lines()) > 1:  # raw + EMA, or a mixture's sources
                ax.legend(fontsize=7, loc="upper right", frameon=False)
            ax.set(xlabel="step" if col == 0 else "FLOPs", ylabel=key)
            if col == 1 and min(xs) > 0:
                ax.set_xscale("log")
                log_ticks(ax, min(xs), max(xs))
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save(fig, out)
