"""End to end: a real tiny FLOP-budget sweep → the callback's scaling report (PNGs that decode)
→ its recommended command dry-runs; report-card curves; 4 Optuna trials through nanochat-run -m
(and 2 under the real Slurm launcher)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow
FAST = ["stage.eval_every=-1", "stage.eval_tokens=2048", "stage.save_every=-1", "stage.log_every=1"]


def _image_has_content(path: Path) -> None:
    from nanochat.plots import pyplot
    img = pyplot().imread(path)  # decodes the PNG
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    flat = img[..., :3].reshape(-1, 3)
    assert flat.std() > 0.05, f"{path} is nearly blank"
    assert len(np.unique((flat * 255).astype(np.uint8), axis=0)) > 20, f"{path} has too few colors"


def test_tiny_flop_sweep_writes_the_scaling_report(base_dir, workdir):
    sweep = workdir / "sweep"
    p = run_cli(["-m", *TINY, *FAST, "stage.num_iterations=null", "model.depth=1,2",
                 "stage.target_flops=1e9,3e9", f"hydra.sweep.dir={sweep}"], base_dir, workdir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[nanochat] scaling report:" in p.stdout  # the sweep callback ran it: the jobs varied a budget
    result = json.loads(next(sweep.glob("*model.depth=2*target_flops=3*/result.json")).read_text())
    bd = result["params"]
    assert bd["total"] == result["num_params"] == sum(bd[k] for k in ("wte", "value_embeds", "lm_head",
                                                                      "matrices", "scalars"))
    assert result["flops"] == pytest.approx(result["flops_per_token"] * result["tokens_seen"])
    assert result["flops"] == pytest.approx(3e9, rel=0.5) and result["wall_time_s"] > 0

    # the CLI on the same dir, counting all params, for an explicit budget
    from nanochat.scaling_report import main
    assert main([str(sweep), "--params", "total", "--budget", "1e11", "--bootstrap", "20"]) == 0
    md = (sweep / "scaling" / "report.md").read_text()
    assert "counts **total** parameters" in md and "4 of 4 runs used" in md and "N_opt ∝ C^a" in md
    assert "fewer" not in md or "< 3" in md  # 2 sizes per budget: measured minima, and it says so
    for name in ("isoflop", "optimal", "depth", "ratio"):
        _image_has_content(sweep / "scaling" / f"{name}.png")
        assert f"({name}.png)" in md
    cmd = md.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert cmd.startswith("nanochat-run stage=pretrain experiment=tiny") and "model.depth=" in cmd
    # the recommendation is a command that really composes and plans
    q = run_cli([*shlex.split(cmd)[1:], "run.dry_run=true"], base_dir, workdir)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-2000:]

    # the report card's training curves, from one of these run dirs
    from nanochat.report import write_curves
    run = next(sweep.glob("*model.depth=1*target_flops=3*"))
    [(stage, png)] = write_curves([{"stage": "pretrain", "kind": "pretrain", "run_dir": str(run)}])
    assert png == run / "curves.png"
    _image_has_content(png)


def _trials(sweep: Path) -> list[dict]:
    out = []
    for d in sorted(sweep.glob("trial_*")):
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        lr = [o for o in overrides if o.startswith("stage.matrix_lr=")]
        out.append({"dir": d, "matrix_lr": lr[0] if lr else None,
                    "bpb": json.loads((d / "result.json").read_text())["final_val_bpb"]})
    return out


def _check_optuna(sweep: Path, stdout: str, n: int) -> None:
    trials = _trials(sweep)
    assert len(trials) == n and len({t["matrix_lr"] for t in trials}) == n  # the sampler set the LRs
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # each job returned its final val bpb to the sweeper, which picked the lowest
    assert best["best_value"] == pytest.approx(min(t["bpb"] for t in trials))
    cmd = (sweep / "best_command.txt").read_text().strip()
    assert f"stage.matrix_lr={best['best_params']['stage.matrix_lr']}" in cmd and "optuna best value" in stdout


def test_optuna_lr_search_four_trials(base_dir, workdir):
    sweep = workdir / "lr"
    p = run_cli(["-m", "sweep=lr_search", *TINY, *FAST, "model.depth=1", "stage.num_iterations=3",
                 "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.n_startup_trials=2",
                 f"hydra.sweep.dir={sweep}"], base_dir, workdir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_optuna(sweep, p.stdout, 4)


@pytest.mark.slurm
def test_optuna_lr_search_under_slurm(base_dir, workdir):
    from slurm_cluster import ensure_slurm
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    sweep = workdir / "lr_slurm"
    p = run_cli(["-m", "hydra/launcher=slurm", "sweep=lr_search", *TINY, *FAST, "model.depth=1",
                 "stage.num_iterations=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                 f"hydra.sweep.dir={sweep}"], base_dir, workdir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_optuna(sweep, p.stdout, 2)
    assert list((sweep / ".submitit").glob("*/*_submission.sh"))  # the trials ran as Slurm jobs
