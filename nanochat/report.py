"""The report card of a pipeline: one table with every stage's headline metrics.

`launch/run.py` calls `write_report(cfg, results)` after a pipeline completes; `results` is
a list of {"stage", "status", "run_dir", "result"} in run order. The table is printed with
rich and written as markdown to `<run.root>/report.md` (the latest pipeline's card) and to
`report.md` in the last stage's run dir (kept with that run). `build_report` gives the rows
without printing, for tests and other front ends. Each training stage also gets a PNG of its
loss and validation curves against steps and FLOPs (`curves.png` in its run dir, linked below
the table by a path relative to the report, so a moved runs folder keeps its pictures), and
`report.html` next to each report.md is the same card for a browser.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from nanochat import results as R
from nanochat.common import atomic_write_text
from nanochat.stages import stage

def _f(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "–"


def wall_time_s(run_dir: Optional[str]) -> Optional[float]:
    """Seconds from the freeze of the run (resolved_config.yaml) to COMPLETED."""
    d = Path(run_dir) if run_dir else None
    try:
        return max(0.0, (d / "COMPLETED").stat().st_mtime - (d / "resolved_config.yaml").stat().st_mtime)
    except (OSError, TypeError):   # no run dir (None / ...), or one not frozen or not completed
        return None


def _tasks(acc: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())


def stage_metrics(stage: str, r: "dict | R.Result | None") -> str:
    """The headline numbers of one stage's result (result.json, typed by its stage) as one cell of text."""
    if not r:
        return ""
    parts: list[Any] = []   # falsy parts are left out
    if stage == "tokenizer":
        t = R.TokenizerResult.from_dict(r)
        val = t.compression.get(f"{t.tokenizer}/val") or next(iter(t.compression.values()), {})
        parts = [t.vocab_size and f"vocab {t.vocab_size:,}", val and f"{val.get('bytes_per_token', 0):.2f} bytes/token"]
    elif stage == "pretrain":
        p = R.PretrainResult.from_dict(r)
        parts = [p.first_val_bpb is not None and f"val bpb {_f(p.first_val_bpb)} → {_f(p.final_val_bpb)}",
                 p.core is not None and f"CORE {_f(p.core)}", p.tok_per_sec and f"{p.tok_per_sec:,.0f} tok/s"]
    elif stage in ("mid", "sft"):
        c = R.ChatResult.from_dict(r)
        parts = [c.final_val_loss is not None and f"val loss {_f(c.first_val_loss)} → {_f(c.final_val_loss)}",
                 _tasks(c.task_accuracy)]
    elif stage == "rl":
        l = R.RLResult.from_dict(r)
        parts = [l.mean_reward is not None and f"reward {_f(l.first_reward, 3)} → {_f(l.mean_reward, 3)}",
                 *(f"{k} {v:.3f}" for k, v in (l.pass_at_k or {}).items())]
    elif stage == "eval":
        e = R.EvalResult.from_dict(r)
        if e.mode == "base":
            parts = [f"bpb train {_f(e.train_bpb)} / val {_f(e.val_bpb)}", e.core is not None and
                     f"CORE {_f(e.core)} ({e.core_tasks_evaluated}/{e.core_tasks_total} tasks)"]
        else:
            parts = [e.task_accuracy and ("lm-eval " if e.mode == "harness" else "") + _tasks(e.task_accuracy),
                     e.chatcore is not None and f"ChatCORE {_f(e.chatcore)}"]
    return " · ".join(p for p in parts if p)


def build_report(results: list[dict]) -> list[dict]:
    return [{"stage": item.get("stage", "?"), "status": item.get("status", "?"),
             "wall_s": wall_time_s(item.get("run_dir")),
             "metrics": stage_metrics(item.get("kind", item.get("stage", "")), item.get("result")),
             "run_dir": item.get("run_dir") or ""} for item in results]


def fmt_time(s: Optional[float]) -> str:
    return "–" if s is None else f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


def _rel(path: str | Path, base: Optional[Path]) -> str:
    """`path` relative to the report's dir, so a copied or moved runs folder keeps its links."""
    return os.path.relpath(Path(path).resolve(), Path(base).resolve()) if path and base is not None else str(path)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]] = ()) -> list[str]:
    """A markdown table's lines: the header, its rule, then one line per row (each cell as str() gives it)."""
    return [f"| {' | '.join(header)} |", "|---" * len(header) + "|"] + [f"| {' | '.join(map(str, r))} |" for r in rows]


def to_markdown(rows: list[dict], title: str, base: Optional[Path] = None,
                curves: Sequence[tuple[str, Path]] = ()) -> str:
    """The card: the table, then each stage's curves; run dirs and images link relative to the report's dir
    (`base`)."""
    total = sum(r["wall_s"] or 0 for r in rows)
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} · total wall time {fmt_time(total)}",
             ""] + md_table(("stage", "status", "wall time", "metrics", "run dir"),
                            ((r["stage"], r["status"], fmt_time(r["wall_s"]), r["metrics"].replace("|", "\\|"),
                              f"`{_rel(r['run_dir'], base)}`") for r in rows))
    lines += (["", "## Curves"] if curves else []) + [
        line for stage, path in curves for line in ("", f"### {stage}", "", f"![{stage} curves]({_rel(path, base)})")]
    return "\n".join(lines) + "\n"


def write_curves(results: list[dict]) -> list[tuple[str, Path]]:
    """curves.png in each training stage's run dir; (stage, path) for those drawn.

    A figure that cannot be drawn (no metrics, no matplotlib) is left out, never fatal.
    """
    out = []
    for item in results:
        kind = item.get("kind", item.get("stage", ""))
        # a training stage is one whose declared result type is a TrainResult (nanochat/stages)
        if not item.get("run_dir") or not issubclass(stage(kind).result, R.TrainResult):
            continue
        try:
            from nanochat.plots import training_curves
            path = training_curves(Path(item["run_dir"]), Path(item["run_dir"]) / "curves.png",
                                   f"{item.get('stage', kind)}: loss and validation")
        except Exception as e:
            print(f"[nanochat] report: no curves for {item.get('stage')}: {type(e).__name__}: {e}", flush=True)
            continue
        if path is not None:
            out.append((item.get("stage", kind), path))
    return out


def to_html(markdown: str, title: str) -> str:
    """The same card as a self-contained HTML page (open it in a browser), rendered from its markdown by
    markdown-it (rich's own markdown parser)."""
    from html import escape
    from markdown_it import MarkdownIt
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title><style>{style}</style>"
            f"</head><body>{MarkdownIt('commonmark').enable('table').render(markdown)}</body></html>\n")


def write_report(cfg: Any, results: list[dict]) -> Path:
    """Print the report card and write report.md (see the module docstring); returns its path."""
    rows = build_report(results)
    title = f"nanochat report card ({cfg.experiment or 'pipeline'}, d{cfg.model.depth})"
    curves = write_curves(results)
    root = Path(cfg.run.root).expanduser()
    path = root / "report.md"
    last = [Path(r["run_dir"]) for r in reversed(rows) if r["run_dir"]][:1]   # the last stage's run dir, if any
    for d in [root] + last:  # each copy links relative to where it lies
        markdown = to_markdown(rows, title, d, curves)
        atomic_write_text(d / "report.md", markdown)
        atomic_write_text(d / "report.html", to_html(markdown, title))
    from rich.console import Console   # a dependency (pyproject.toml): no plain-text fallback needed
    from rich.table import Table
    t = Table(title=title, show_lines=True)
    for col in ("stage", "status", "wall time", "metrics"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["stage"], r["status"], fmt_time(r["wall_s"]), r["metrics"])
    c = Console(highlight=False)
    c.print(t)
    c.print(f"report: {path}")
    return path
