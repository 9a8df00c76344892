"""nanochat-run: compose → validate → plan → freeze → dispatch.

    nanochat-run stage=pretrain model=d12 hardware=1gpu data=fineweb_edu stage.num_iterations=100
    nanochat-run experiment=cpu_demo
    nanochat-run -m model.depth=4,6 stage.num_iterations=50        # sweep, one subdir per job
    nanochat-run ... run.dry_run=true                              # print the plan, create nothing

Hydra composes once, in this process. Nothing here imports torch at module level, so
`--help`, `--cfg job` and `run.dry_run=true` stay fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launch import rundir, validate
from nanochat.lifecycle import EXIT_PREEMPTED, read_status, write_status
from nanochat.config import Config, ConfigError, config_from_dict, config_to_dict
from nanochat.results import Result, load_result
from nanochat.runlock import lock_run_dir
from nanochat.stages import stage, stages

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def dirname_safe(s: Any) -> str:
    """Sweep job dirs are named after their overrides: a path value (paths.base_dir=/data/x) would nest
    each job several dirs deep, and a long list (a data.mixture dict) pass the 255-byte limit of a name,
    so it keeps its start and a hash of the whole (deterministic: run.skip_if_done still finds the job)."""
    s = str(s).replace("/", "_")
    return s if len(s.encode()) <= 200 else s[:120] + "~" + hashlib.sha1(s.encode()).hexdigest()[:12]


# registered at import, so Slurm workers have it too
OmegaConf.register_new_resolver("dirname_safe", dirname_safe, replace=True)


FAILURES: list[str] = []  # this process's failed jobs: the exit code (exit_code)


def _console():
    from rich.console import Console
    return Console(highlight=False)


def print_config_error(e: ConfigError) -> None:
    from rich.markup import escape  # a fix such as `pip install nanochat-hydra[tensorboard]` is not markup
    c = _console()
    c.print(f"[bold red]ConfigError[/] [bold]{escape(e.key)}[/] = {escape(repr(e.value))}: {escape(e.problem)}",
            soft_wrap=True)
    c.print(f"  [green]fix:[/] {escape(e.fix)}", soft_wrap=True)


def print_plan(cfg: Config, rows: list[tuple[str, str]], run_dir: Optional[Path], config: bool = False) -> None:
    """The plan table; config: the resolved config after it."""
    from rich.table import Table
    t = Table(title=f"nanochat plan: stage={cfg.stage.name} tag={rundir.run_tag(cfg)}", show_header=False)
    t.add_column("", style="cyan")
    t.add_column("")
    for k, v in rows + ([("run dir", str(run_dir))] if run_dir is not None else []):
        t.add_row(k, v)
    _console().print(t)
    if config:
        _console().print(rundir.resolved_yaml(cfg))


# --------------------------------------------------------------------------- one stage

def prepare(cfg: Config) -> tuple[Config, Optional[dict], list[tuple[str, str]]]:
    """Resolve the source run (the stage's declared sources), then the stage's planner makes the plan.

    No stage is named here: each declares its sources and planner (nanochat/stages/<name>.py). The
    dry run prints what this returns; a real run freezes it.
    """
    from nanochat.stage_plan import open_source
    st = stage(cfg.stage.name)
    source, rows = None, []
    if str(cfg.stage.init_from or "").startswith("pipeline:"):
        pass  # the dry run of a pipeline: the source is an earlier entry's future run
    elif st.sources:
        path, note = rundir.resolve_source(cfg, st)
        cfg, source = open_source(cfg, st, path)
        rows = [("source", note)] if note else []
    elif cfg.stage.init_from not in (None, "", "none"):
        raise ConfigError("stage.init_from", cfg.stage.init_from, "drop stage.init_from (set it to null)",
                          f"the {st.name} stage starts from no run")
    sp = st.planner(cfg, source)
    if sp.wants_probe or cfg.hardware.device == "cuda":   # auto batch / memory planning: launch/probe.py
        from launch.probe import plan_memory
        sp = plan_memory(cfg, source, sp, st)
    return cfg, (sp.plan.to_dict() if sp.plan is not None else None), sp.rows + rows


def compact_config(cfgs: dict[str, Config]) -> str:
    """The resolved config of a pipeline's dry run, once: the groups its stages share, then each
    entry's stage group, one flow-style mapping each (run.print_config=true prints them in full)."""
    import yaml
    trees = {entry: config_to_dict(c) for entry, c in cfgs.items()}
    shared = {k: v for k, v in next(iter(trees.values())).items() if k not in ("stage", "stages")}
    groups = [*shared.items(), *((f"stage ({entry})", t["stage"]) for entry, t in trees.items())]
    dump = lambda v: yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=116).removesuffix("...\n")
    return "\n".join(f"{k}: {dump(v).strip()}" for k, v in groups)


def run_stage(cfg: Config, composed: dict, hydra_info: dict, job_dir: Optional[Path],
              show_config: bool = True) -> dict:
    """Validate, plan, freeze and dispatch one stage; returns {'status', 'run_dir', 'result' (a Result or None)}.

    `show_config=False`: a pipeline's dry run prints the configs once, after every stage's plan."""
    from launch.dispatch import dispatch, node_rank
    check = stage(cfg.stage.name).check
    if check is not None:
        check(cfg)
    if not (cfg.run.dry_run or cfg.run.simulate):  # these may plan for hardware this machine lacks
        validate.check_hardware(cfg)
    cfg, plan, rows = prepare(cfg)
    if cfg.run.simulate:   # the planned step on fake tensors: memory table + JSON line, no run dir
        from launch.probe import run_simulation
        from nanochat.simulate import check_request
        check_request(cfg)
        print_plan(cfg, rows, None)
        return {"status": "dry_run", "run_dir": None, "simulation": run_simulation(cfg, plan, show=True)}
    if cfg.run.dry_run:
        print_plan(cfg, rows, None, show_config)
        return {"status": "dry_run", "run_dir": None, "config": cfg}
    run_dir = (Path(cfg.run.dir).expanduser() if cfg.run.dir else job_dir or rundir.new_run_dir(cfg)).resolve()
    if cfg.run.skip_if_done and (run_dir / "COMPLETED").exists():
        print(f"[nanochat] skip: {run_dir} is already COMPLETED (run.skip_if_done=true)", flush=True)
        return {"status": "completed", "run_dir": str(run_dir), "skipped": True}
    node = node_rank(cfg)  # > 0 only on the other nodes of a multi-node job
    # one writer per run dir: node 0's launcher holds the lock (RunDirBusy names the holder) before
    # anything in it changes; the other nodes of the same job must not be refused by it
    lock = lock_run_dir(run_dir, cfg.hardware.nnodes) if node == 0 else None
    try:
        rundir.check_resume_policy(cfg, run_dir, verify_checkpoints=lock is not None)
        cfg = replace(cfg, run=replace(cfg.run, dir=str(run_dir)))
        if node == 0:  # node 0 freezes the run dir, its global rank 0 writes the rest
            rundir.freeze(run_dir, cfg, plan or {}, hydra_info["overrides"], hydra_info["choices"], composed)
        print_plan(cfg, rows, run_dir, cfg.run.print_config)
        rc = dispatch(cfg, run_dir, in_process=hydra_info["in_process"])
        if node > 0:
            # node 0 reports the run (Slurm: the launcher reads task 0's result); this node only says
            # how its own ranks ended, without touching status files rank 0 may still be writing
            status = {0: "completed", EXIT_PREEMPTED: "preempted"}.get(rc, "failed")
            print(f"[nanochat] node {node}: ranks exited {rc} ({status}) → {run_dir}", flush=True)
            return {"status": status, "run_dir": str(run_dir), "result": None, "exit_code": rc, "node_rank": node}
        status = read_status(run_dir)
        if status == "unknown":  # the worker died before writing a status (killed, crashed at import)
            status = "failed"
            write_status(run_dir, "failed", error=f"worker exited with code {rc} without a status")
    finally:
        if lock is not None:
            lock.release()
    color = {"completed": "green", "preempted": "yellow"}.get(status, "red")
    _console().print(f"[bold {color}]{cfg.stage.name} {status}[/] (exit {rc}) → {run_dir}")
    return {"status": status, "run_dir": str(run_dir), "result": load_result(run_dir), "exit_code": rc}


def stage_tree(composed: dict, entry: str) -> dict:
    """The config tree for one pipeline entry: its stage YAML (or the composed one) + stages.<entry>.

    An entry is a stage name, or a label whose `stages.<label>` block names the stage, e.g.
    `stages: {base_eval: {name: eval, mode: base}}` runs the eval stage a second time.
    """
    extra = dict((composed.get("stages") or {}).get(entry) or {})
    name = extra.get("name", entry)
    if composed.get("stage", {}).get("name") == name:
        base = composed["stage"]
    else:
        path = Path(CONF_DIR) / "stage" / f"{name}.yaml"
        if not path.exists():
            raise ConfigError("run.pipeline", entry, f"use stage names from: {', '.join(stages())}, or a "
                              f"label with `stages.{entry}.name: <stage>`", "unknown stage in pipeline")
        base = {**OmegaConf.to_container(OmegaConf.load(path), resolve=True), "name": name}
    return {**composed, "stage": {**base, **extra}}


def run_pipeline(cfg: Config, composed: dict, hydra_info: dict, job_dir: Optional[Path]) -> dict:
    """Stages one after another, each in its own run dir, chained through init_from."""
    produced: dict[str, str] = {}
    results = []
    if not cfg.run.dry_run:   # bad input in any entry (fp8 on a CPU, too many GPUs) fails before the first runs
        for entry in cfg.run.pipeline:
            validate.check_hardware(config_from_dict(stage_tree(composed, entry)))
    for i, entry in enumerate(cfg.run.pipeline):
        tree = stage_tree(composed, entry)
        tree["run"] = {**tree["run"], "pipeline": None, "dir": None}
        stage_cfg = config_from_dict(tree)
        name = stage_cfg.stage.name
        if stage_cfg.stage.init_from == "latest":
            # chain to what this pipeline produced last among the stages this one prefers to start from,
            # else among the others it accepts
            groups = stage(name).source_order(stage_cfg)
            last = next((s for group in groups for s in reversed(produced) if s in group), None)
            if last is not None:
                tree["stage"]["init_from"] = produced[last]
                stage_cfg = config_from_dict(tree)
        sub_dir = (job_dir / f"{i}_{entry}") if job_dir is not None else None
        out = run_stage(stage_cfg, tree, hydra_info, sub_dir, show_config=cfg.run.print_config)
        results.append({"stage": entry, "kind": name, **out})
        if out["status"] not in ("completed", "dry_run"):
            return {"status": out["status"], "stages": results}
        produced.pop(name, None)  # re-inserted: dict order is the order stages finished
        # a dry run: later stages chain to this one's (future) output
        produced[name] = f"pipeline:{name}" if out["status"] == "dry_run" else out["run_dir"]
    if cfg.run.dry_run and not cfg.run.print_config:
        _console().print("resolved config (run.print_config=true prints each stage's in full):\n" +
                         compact_config({r["stage"]: r["config"] for r in results}), soft_wrap=True, markup=False)
    if not cfg.run.dry_run:
        from nanochat.report import write_report
        write_report(cfg, results)
    return {"status": "dry_run" if cfg.run.dry_run else "completed", "stages": results}


# --------------------------------------------------------------------------- hydra glue

def compose(overrides: list[str], name: str = "config") -> tuple[Config, dict]:
    """Compose conf/ with Hydra in this process exactly as nanochat-run would: (the config, its resolved tree)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        tree = validate.resolved_tree(hydra_compose(name, overrides=overrides))
    return config_from_dict(tree), tree


def run_job(dcfg: DictConfig) -> dict:
    import os
    composed = validate.resolved_tree(dcfg)
    cfg = config_from_dict(composed)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {k: v for k, v in dict(hc.runtime.choices).items() if not k.startswith("hydra/")}
    hydra_info = {"overrides": list(hc.overrides.task), "choices": choices,
                  "in_process": not multirun and "SLURM_JOB_ID" not in os.environ}  # Slurm: the launcher task
    job_dir = Path(hc.runtime.output_dir) if multirun else None
    return (run_pipeline if cfg.run.pipeline else run_stage)(cfg, composed, hydra_info, job_dir)


def objective(out: dict, key: Optional[str], stage_name: str) -> float:
    """The job's final metric as a float, for any sweeper to optimise (Optuna: sweep=lr_search):
    run.objective, else the headline its (last) stage declares (a field of its result type).

    A failed job, or one without the metric, returns NaN: Optuna records the trial as failed
    and carries on; the basic sweeper ignores return values.
    """
    if out.get("status") != "completed":
        return float("nan")
    last = out["stages"][-1] if "stages" in out else out  # a pipeline: its last stage
    asked = key is not None
    key = key or stage(last.get("kind", stage_name)).headline
    if key is None:  # a stage without a headline (tokenizer, serve)
        return float("nan")
    value = Result.from_dict(last.get("result")).get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        if asked:  # the user's run.objective; a headline a run does not report (chat-mode eval) stays quiet
            print(f"[nanochat] run.objective={key!r}: not a number in result.json ({value!r}); returning NaN",
                  flush=True)
        return float("nan")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_entry(dcfg: DictConfig) -> Any:
    """The Hydra task: never raises, never exits (a multirun must survive a bad job).

    Returns the job's final metric (`objective`), which is what sweepers optimise.
    """
    key = OmegaConf.select(dcfg, "run.objective", default=None)
    stage_name = str(OmegaConf.select(dcfg, "stage.name"))
    try:
        out = run_job(dcfg)
    except ConfigError as e:
        print_config_error(e)
        FAILURES.append(f"config: {e}")
        return float("nan")
    except Exception as e:
        traceback.print_exc()
        FAILURES.append(f"{type(e).__name__}: {e}")
        return float("nan")
    if out["status"] not in ("completed", "dry_run"):
        FAILURES.append(f"{out.get('run_dir')}: {out['status']}")
    return objective(out, key, stage_name)


def exit_code() -> int:
    from launch.callbacks import FAILED_JOBS
    if FAILED_JOBS or not all(": preempted" in f for f in FAILURES):
        return 1
    return EXIT_PREEMPTED if FAILURES else 0


def sweep_jobs(argv: list[str]) -> tuple[str, list[list[str]]]:
    """The config name and each job's overrides that `nanochat-run -m <argv>` will launch, as Hydra's
    basic sweeper expands them (command-line sweeps and `hydra.sweeper.params`, e.g. sweep=depths),
    without hydra.* overrides. Another sweeper (Optuna) draws its jobs as it goes: its one job here is
    the config without the swept keys."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    args = get_args_parser().parse_args(argv)
    name, parser = args.config_name or "config", OverridesParser.create()
    overrides = parser.parse_overrides([o for o in args.overrides if not o.lstrip("+~").startswith("hydra")])
    for o in overrides:   # the Slurm launcher's fields (nodes, gpus_per_node, ...) are resolved ONCE from the
        # master config: a sweep over hardware would submit every job with the first job's resources
        if o.is_sweep_override() and o.key_or_group.split(".")[0] == "hardware":
            raise ConfigError(o.key_or_group, o.input_line.partition("=")[2],
                              "run one sweep per hardware setting (e.g. hardware=8gpu), or use the basic launcher",
                              "cannot sweep hardware.* under hydra/launcher=slurm: Slurm resources "
                              "(nodes, gpus_per_node) are fixed for the whole sweep")
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        sweeper = hydra_compose(name, overrides=fixed, return_hydra_config=True).hydra.sweeper
    if not sweeper._target_.endswith("BasicSweeper"):
        return name, [fixed]
    params = parser.parse_overrides([f"{k}={v}" for k, v in (sweeper.params or {}).items()])
    return name, [job for batch in BasicSweeper.split_arguments(params + overrides, None) for job in batch]


def check_before_submitting(argv: list[str]) -> None:
    """Under the Slurm launcher, plan every job of the sweep here, as its dry run would, before anything
    is queued: a bad config, a hardware sweep or a device batch over the GPU's memory (launch/probe.py; the
    whole step is rehearsed unless hardware.memory_check=false) is a ConfigError now, not a job that fails
    once Slurm has given it the GPUs. The hardware itself is checked in the job (this host may have no GPU),
    and each job's source run must exist when it is submitted."""
    if not (any(a in ("-m", "--multirun") for a in argv)
            and any(a.startswith("hydra/launcher=") and "slurm" in a for a in argv)):
        return
    name, jobs = sweep_jobs(argv)
    print(f"[nanochat] planning {len(jobs)} job(s) before submitting (a GPU job's step is rehearsed on fake "
          f"tensors: minutes the first time, then cached)", flush=True)
    for i, job in enumerate(jobs):
        cfg, composed = compose([*job, "run.dry_run=true"], name)
        if cfg.hardware.memory_check is None:   # null: rehearse GPU steps before queueing
            composed["hardware"]["memory_check"] = True
            cfg = config_from_dict(composed)
        try:
            with contextlib.redirect_stdout(io.StringIO()):   # the plan tables: the job prints them
                (run_pipeline if cfg.run.pipeline else run_stage)(
                    cfg, composed, {"overrides": job, "choices": {}, "in_process": False}, None)
        except ConfigError:
            print(f"[nanochat] nothing submitted: job {i + 1} of {len(jobs)} ({' '.join(job) or 'no overrides'}) "
                  f"fails its plan", flush=True)
            raise


def main() -> None:
    try:
        check_before_submitting(sys.argv[1:])
    except ConfigError as e:
        print_config_error(e)
        sys.exit(2)
    _hydra_entry()
    sys.exit(exit_code())


if __name__ == "__main__":
    main()
