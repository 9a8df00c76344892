"""Observability for training stages: metrics.jsonl (always), wandb and TensorBoard (opt-in),
progress (a live bar on a terminal, plain lines in a file), and an opt-in profiler.

Only rank 0 tracks; other ranks get a Tracker that does nothing, so stage code can call
it unconditionally.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from nanochat.common import atomic_write_text

FIRST_LINES = 5   # plain lines for the first steps of an attempt, whatever the interval: a log shows the start


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """On resume: drop lines logged after the checkpoint (and a torn last line from a kill), so the file
    reads as one clean run."""
    if path.exists():
        from nanochat.plots import read_metrics
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path.parent)
                                        if r.get("step", 0) <= keep_through_step))


def duration(s: float) -> str:
    s = int(max(0.0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plain_line(label: str, done: int, total: int, fields: list[str], elapsed_s: float, per_unit_s: float) -> str:
    """The one greppable progress format of training steps and long evaluations alike:
    `pretrain step 120/300 | loss 3.8470 | … | elapsed 1m05s | eta 2m10s`."""
    eta = duration(per_unit_s * (total - done)) if per_unit_s > 0 else "?"
    return " | ".join([f"{label} {done}/{total}", *fields, f"elapsed {duration(elapsed_s)}", f"eta {eta}"])


class Cadence:
    """When a plain line is due: the first `first` calls, the last one, then every `every_s` seconds."""

    def __init__(self, every_s: float, first: int = FIRST_LINES):
        self.every_s, self.first, self.calls = every_s, first, 0
        self.last = -math.inf if first else time.monotonic()

    def due(self, done: int, total: int) -> bool:
        self.calls += 1
        now = time.monotonic()
        if due := self.calls <= self.first or done >= total or now - self.last >= self.every_s:
            self.last = now
        return due


# stats key → how a plain line shows it (the loop's `stats` dict; unknown numeric keys print as `key value`)
_FIELDS = {"loss": "loss {:.4f}", "reward": "reward {:.4f}", "lrm": "lrm {:.3f}", "tok_per_sec": "{:,.0f} tok/s",
           "mfu": "mfu {:.2%}", "dt_s": "dt {:.2f}s"}


def stat_fields(stats: dict) -> list[str]:
    out = [_FIELDS[k].format(v) if k in _FIELDS else f"{k} {v:.4g}" for k, v in stats.items()
           if k not in ("step", "total") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    torch = sys.modules.get("torch")   # never import it here: tracking is used by torch-free code too
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out.append(f"peak mem {torch.cuda.max_memory_allocated() / 2 ** 30:.1f}GiB")
    return out


class Profiler:
    """torch.profiler over the training steps [start, start + steps): a Chrome trace and a top-ops
    table (CPU and, on CUDA, device time) in the run dir. `step(done)` after every training step."""

    def __init__(self, run_dir: Path, start: int, steps: int, total: int, log: Any = print):
        self.run_dir, self.log = Path(run_dir), log
        self.start = max(1, min(start, total - steps))  # a run shorter than the window still gets one
        self.stop_at = self.start + steps
        self._prof = None

    def step(self, done: int) -> None:
        if self._prof is None and self.start <= done < self.stop_at:
            from torch.profiler import profile
            self._prof = profile(record_shapes=True, profile_memory=True)  # CPU, and CUDA where available
            self._prof.start()
        elif self._prof is not None and done >= self.stop_at:
            self.finish()

    def finish(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.stop()
        trace, table = self.run_dir / "profile_trace.json", self.run_dir / "profile_ops.txt"
        prof.export_chrome_trace(str(trace))
        avg = prof.key_averages()
        sorts = ["self_cpu_time_total"] + (["self_device_time_total"] if any(e.self_device_time_total for e in avg)
                                           else [])
        table.write_text("\n\n".join(f"top ops by {s}\n" + avg.table(sort_by=s, row_limit=25) for s in sorts))
        self.log(f"profile of steps {self.start}..{self.stop_at - 1}: {trace} (chrome://tracing, "
                 f"https://ui.perfetto.dev) and {table}")


class Tracker:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 wandb_mode: str = "disabled", wandb_project: str = "nanochat", wandb_name: Optional[str] = None,
                 config: Optional[dict] = None, progress: bool = True, desc: str = "train",
                 log_interval_s: float = 30.0, tensorboard: bool = False, profile: Optional[tuple[int, int]] = None):
        self.enabled, self.total_steps, self.desc = enabled, total_steps, desc
        run_dir = Path(run_dir)
        self.t0 = time.time()
        self._file = self._wandb = self._tb = self._progress = self._task = self._plain = self._profiler = None
        self._pace_from: Optional[tuple] = None   # (time, step) of the first progress line: the ETA's pace
        self._history_until: Optional[int] = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        truncate_metrics(path, start_step)
        self._file = open(path, "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            id_file = run_dir / "wandb_id.txt"   # stable per run dir: a resumed run continues the same wandb run
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self._wandb = wandb.init(mode=wandb_mode, project=wandb_project, dir=str(run_dir),
                                     name=wandb_name or run_dir.name, config=config or {},
                                     id=id_file.read_text().strip(), resume="allow")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
            # events in the run dir itself: `tensorboard --logdir runs/` names each run by its dir;
            # purge_step drops what a killed attempt logged past the checkpoint this one resumes from
            self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=start_step or None)
        if profile is not None:
            self._profiler = Profiler(run_dir, *profile, total=total_steps, log=self.print)
        self._history_until = start_step + 2   # CUDA allocations recorded for an OOM's snapshot until then
        if "torch" in sys.modules:
            from nanochat.batch_size import memory_history
            memory_history(True)
        if progress and total_steps > 0 and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            self._progress = Progress(
                TextColumn(f"[bold]{desc}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                refresh_per_second=2, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(desc, total=total_steps, completed=start_step, info="")
        elif progress and total_steps > 0:  # a file (Slurm, nohup, CI): plain lines, no bar glyphs
            self._plain = Cadence(log_interval_s)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        # tensors → numbers, nan / inf → strings (JSON has neither)
        row = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        row = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        row.setdefault("elapsed_s", round(time.time() - self.t0, 3))
        self._file.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numbers, step=row.get("step"))
        if self._tb is not None:
            for k, v in numbers.items():
                if k != "step":
                    self._tb.add_scalar(k, v, global_step=row.get("step"))

    def progress(self, step: int, text: str = "", stats: Optional[dict] = None) -> None:
        """After each training step: the live bar (terminal) or a plain line when due (file), and the
        profiler's step. `stats` (loss or reward, lrm, tok_per_sec, mfu, dt_s …) make the plain line;
        without them it shows `text`."""
        if self._profiler is not None:
            self._profiler.step(step)
        if self._history_until is not None and step >= self._history_until and "torch" in sys.modules:
            from nanochat.batch_size import memory_history
            memory_history(False)
            self._history_until = None
        if self._progress is not None:
            short = {k: v for k, v in (stats or {}).items() if k in ("loss", "reward", "tok_per_sec", "mfu")}
            self._progress.update(self._task, completed=step, info=text or " | ".join(stat_fields(short)))
        elif self._plain is not None and self._plain.due(step, self.total_steps):
            fields = stat_fields(stats) if stats is not None else [text]
            now = time.time()
            elapsed = now - self.t0
            # the ETA's pace from the first step on: setup and the first step's one-off costs left out
            t1, s1 = self._pace_from = self._pace_from or (now, step)
            per_step = (now - t1) / (step - s1) if step > s1 else (stats or {}).get("dt_s") or elapsed
            print(plain_line(f"{self.desc} step", step, self.total_steps, fields, elapsed, per_step), flush=True)

    def print(self, msg: str) -> None:
        if self._progress is not None:   # only an enabled tracker has one
            self._progress.console.print(msg, highlight=False, markup=False)
        elif self.enabled:
            print(msg, flush=True)

    def close(self) -> None:
        for name, method in (("_profiler", "finish"), ("_progress", "stop"), ("_file", "close"), ("_tb", "close"),
                             ("_wandb", "finish")):
            if getattr(self, name) is not None:
                getattr(getattr(self, name), method)()
                setattr(self, name, None)
