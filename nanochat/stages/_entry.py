"""Worker entrypoint: `python -m nanochat.stages._entry --config <run_dir>/resolved_config.yaml`.

Every stage declares a worker, `(cfg: Config, run_dir: Path) -> Result` (nanochat/results.py; a
dict also does). This harness reads the frozen config with plain OmegaConf (never Hydra), runs
the stage's worker, and on rank 0 writes result.json + COMPLETED (completed), or status.json
(preempted / failed). The same `execute()` runs in-process when the launcher dispatches a
single-process job.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path

from nanochat.common import dist_env, distributed
from nanochat.config import Config, load_config
from nanochat.results import Result
from nanochat.runlock import writer_lock
from nanochat.stages import stage
from nanochat.lifecycle import (EXIT_PREEMPTED, STOP, EvalInterrupted, Preempted, guard_parent, mark_completed,
                                write_status)


def execute(cfg: Config, run_dir: Path) -> int:
    """Run the worker of the stage cfg.stage.name; return the process exit code."""
    rank = dist_env()[0]
    STOP.signum = None
    STOP.install()
    held = ExitStack()
    try:
        held.enter_context(writer_lock(run_dir))  # a new launcher sees us as a live writer of this dir
        result = stage(cfg.stage.name).worker(cfg, Path(run_dir))
    except (Preempted, EvalInterrupted) as e:  # EvalInterrupted: a stage with no training state (eval), rerun it
        if rank == 0:
            trained = isinstance(e, Preempted)
            write_status(run_dir, "preempted", step=e.step if trained else 0, signal=e.signal_name,
                         **({} if trained else {"during": "evaluation"}))
            what = f"at step {e.step} by {e.signal_name}; resume" if trained else \
                f"during evaluation by {e.signal_name}; rerun"
            print(f"[nanochat] preempted {what} with run.resume=auto run.dir={run_dir}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if rank == 0:
            write_status(run_dir, "failed", error="interrupted (KeyboardInterrupt)")
        return 130
    except Exception as e:  # the launcher reports it; keep the traceback in the run dir
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        if rank == 0:
            try:
                write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}", traceback=tb)
            except OSError as io:  # e.g. the disk that failed the checkpoint is still full
                print(f"[nanochat] could not write status.json: {io}", file=sys.stderr, flush=True)
        return 1
    else:
        if rank == 0:
            mark_completed(run_dir, result.to_dict() if isinstance(result, Result) else result or {})
        return 0
    finally:
        STOP.uninstall()
        if "torch" in sys.modules and (dist := distributed()):
            dist.destroy_process_group()
        held.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="<run_dir>/resolved_config.yaml")
    ap.add_argument("--run-dir", default=None, help="default: the config's dir (node > 0 keeps its copy elsewhere)")
    args = ap.parse_args(argv)
    guard_parent()  # first, before the slow imports: never outlive the launcher (or torchrun)
    return execute(load_config(args.config), Path(args.run_dir or Path(args.config).parent))


if __name__ == "__main__":
    sys.exit(main())
