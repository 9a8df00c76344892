"""Observability for training stages: metrics.jsonl (always), wandb (opt-in), a rich progress bar.

Only rank 0 tracks; other ranks get a Tracker that does nothing, so stage code can call
it unconditionally.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """On resume: drop lines logged after the checkpoint, so the file reads as one clean run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= keep_through_step:
                kept.append(line)
        except ValueError:
            continue  # a torn last line from a kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    tmp.replace(path)


class Tracker:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 wandb_mode: str = "disabled", wandb_project: str = "nanochat", wandb_name: Optional[str] = None,
                 config: Optional[dict] = None, progress: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.t0 = time.time()
        self._file = None
        self._wandb = None
        self._progress = None
        self._task = None
        if not enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        truncate_metrics(path, start_step)
        self._file = open(path, "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(mode=wandb_mode, project=wandb_project, dir=str(self.run_dir),
                                     name=wandb_name or self.run_dir.name, config=config or {},
                                     id=self._wandb_id(), resume="allow")
        if progress and total_steps > 0:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            self._progress = Progress(
                TextColumn(f"[bold]{desc}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                refresh_per_second=2, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(desc, total=total_steps, completed=start_step, info="")

    def _wandb_id(self) -> str:
        """Stable id per run dir so a resumed run continues the same wandb run."""
        p = self.run_dir / "wandb_id.txt"
        if p.exists():
            return p.read_text().strip()
        import uuid
        rid = uuid.uuid4().hex[:12]
        p.write_text(rid)
        return rid

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in metrics.items()}
        row.setdefault("elapsed_s", round(time.time() - self.t0, 3))
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    def progress(self, step: int, info: str, stats: Optional[dict] = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(msg, highlight=False, markup=False)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
