"""The pretrain stage: exact resume, DDP equivalence, divergence handling, observability."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, losses, only_run_dir, read_metrics, run_cli
from nanochat.tracking import truncate_metrics


def _cut_back(run_dir: Path, step: int) -> None:
    """Make a finished run look as if it had been killed right after checkpoint `step`."""
    for ck in (run_dir / "checkpoints").iterdir():
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    for name in ("COMPLETED", "result.json"):
        (run_dir / name).unlink()
    truncate_metrics(run_dir / "metrics.jsonl", step + 3)  # a kill loses some logged-but-unsaved steps


def test_exact_resume_is_bitwise(base_dir, workdir):
    full, cut = workdir / "full", workdir / "cut"
    args = [*TINY, "stage.num_iterations=16", "stage.save_every=8", "stage.keep_last=3", "stage.eval_every=8"]
    run_cli([*args, f"run.dir={full}"], base_dir, workdir, check=True)
    shutil.copytree(full, cut)
    _cut_back(cut, 8)
    p = run_cli([*args, f"run.dir={cut}", "run.resume=must"], base_dir, workdir)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "resumed from step 8" in p.stdout
    a, b = losses(full), losses(cut)
    assert list(b) == list(range(1, 17))  # no duplicated or missing steps in metrics.jsonl
    assert [a[s] for s in range(9, 17)] == [b[s] for s in range(9, 17)]
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (full, cut))
    assert ra["final_val_bpb"] == rb["final_val_bpb"] and ra["tokens_seen"] == rb["tokens_seen"]


def test_checkpoint_contents_and_pruning(base_dir, workdir):
    run = workdir / "run"
    run_cli([*TINY, "stage.num_iterations=6", "stage.save_every=2", "stage.keep_last=2", f"run.dir={run}"],
            base_dir, workdir, check=True)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000006"]  # keep_last=2, no temp dirs left behind
    ck = run / "checkpoints" / "step_000006"
    for f in ("model.pt", "meta.json", "optim_rank0.pt", "dataloader_rank0.json", "rng_rank0.pt"):
        assert (ck / f).exists(), f
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["step"] == 6 and meta["loop_state"]["step"] == 6 and meta["model_config"]["n_layer"] == 4


def test_metrics_result_and_wandb_offline(base_dir, workdir):
    run = workdir / "run"
    p = run_cli([*TINY, "stage.num_iterations=4", "stage.eval_every=2", "stage.sample_every=4", "wandb.mode=offline",
                 f"run.dir={run}"], base_dir, workdir, env_extra={"WANDB_DIR": str(workdir)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("  sample: ") == 8 and "The capital of France is" in p.stdout  # 4 prompts, steps 0, 4
    rows = read_metrics(run)
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 4
    for k in ("step", "train/loss", "lr", "tok_per_sec", "mfu", "elapsed_s"):
        assert k in train[0], k
    assert [r["step"] for r in rows if "val/bpb" in r] == [0, 2, 4]
    res = json.loads((run / "result.json").read_text())
    for k in ("final_val_bpb", "best_val_bpb", "tokens_seen", "flops", "train_time_s", "peak_memory_mb"):
        assert res[k] is not None, k
    assert res["tokens_seen"] == 4 * 1024
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run dir missing"


def test_divergence_stops_with_clear_error(base_dir, workdir):
    run = workdir / "run"
    p = run_cli([*TINY, "stage.num_iterations=30", "stage.save_every=1", "stage.keep_last=50",
                 "stage.matrix_lr=1e30", "stage.embedding_lr=1e30", "stage.unembedding_lr=1e30", f"run.dir={run}"],
                base_dir, workdir)
    assert p.returncode != 0
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "FloatingPointError" in status["error"] and "at step" in status["error"]
    bad_step = int(status["error"].split("at step ")[1].split(":")[0])
    kept = sorted(int(c.name.split("_")[1]) for c in (run / "checkpoints").iterdir() if c.name.startswith("step_"))
    assert kept and max(kept) == bad_step - 1  # the last good checkpoint stays, no checkpoint of the bad step


@pytest.mark.slow
def test_ddp_equals_grad_accum(base_dir, workdir):
    """2 ranks × accum 1 and 1 rank × accum 2 see the same global batches: same loss curve."""
    common = [*TINY, "stage.num_iterations=8", "stage.total_batch_size=2048", "hardware.device_batch_size=8",
              "stage.eval_every=-1"]
    run_cli([*common, "hardware.nproc_per_node=2", f"run.dir={workdir / 'ddp'}"], base_dir, workdir, check=True)
    run_cli([*common, "hardware.nproc_per_node=1", f"run.dir={workdir / 'accum'}"], base_dir, workdir, check=True)
    a, b = losses(workdir / "ddp"), losses(workdir / "accum")
    assert list(a) == list(b) == list(range(1, 9))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-4), (s, a[s], b[s])


@pytest.mark.slow
def test_ddp_resume_matches(base_dir, workdir):
    full, cut = workdir / "full", workdir / "cut"
    args = [*TINY, "hardware.nproc_per_node=2", "stage.total_batch_size=2048", "stage.num_iterations=8",
            "stage.save_every=4", "stage.keep_last=3", "stage.eval_every=-1"]
    run_cli([*args, f"run.dir={full}"], base_dir, workdir, check=True)
    shutil.copytree(full, cut)
    _cut_back(cut, 4)
    run_cli([*args, f"run.dir={cut}", "run.resume=must"], base_dir, workdir, check=True)
    a, b = losses(full), losses(cut)
    for s in range(5, 9):
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-5)
