"""Watching runs: plain progress lines in a file, profiles, TensorBoard events, the read-only
`nanochat-runs` browser on real tiny runs (completed sweep, failed, running then preempted),
and a short pipeline dry run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli

LINE = re.compile(r"^pretrain step (\d+)/200 \| loss \d+\.\d{4} \| lrm \d\.\d{3} \| [\d,]+ tok/s \| mfu [\d.]+% \| "
                  r"dt [\d.]+s \| elapsed \d+m\d\ds \| eta (\d+h\d\dm|\d+m\d\ds)$")


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs_root(base_dir, tmp_path_factory):
    """A run root with a two-job sweep (completed), a failed run, and a run seen live, then stopped."""
    root = tmp_path_factory.mktemp("watch_runs")
    tiny = ["experiment=tiny", f"run.root={root}", "stage.save_every=-1"]
    run_cli([*tiny, "model.depth=1", "model.vocab_size=64"], base_dir, root)  # fails in the worker
    run_cli(["-m", *tiny, "model.depth=1,2", "stage.num_iterations=4", "stage.eval_every=2",
             f"hydra.sweep.dir={root}/sweeps/depths"], base_dir, root, check=True)
    live = root / "pretrain" / "d1" / "live"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.run", *tiny, "model.depth=1", "stage.num_iterations=200",
                             "stage.eval_every=-1", "run.log_interval_s=0", "run.profile=true", "run.profile_start=1",
                             "run.profile_steps=2", f"run.dir={live}"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (live / "profile_ops.txt").exists():  # the profile window (steps 1..2) is over
            assert proc.poll() is None and time.monotonic() < deadline, "the live run ended early"
            time.sleep(0.2)
        running = run_cli(["ls", str(root), "--status", "running", "--json"], base_dir, root, module="nanochat.runs")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return root, live, json.loads(running.stdout), out


def runs_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(list(args), root, root, module="nanochat.runs")


# --------------------------------------------------------------------------- progress lines

def test_plain_lines_when_stdout_is_a_file(runs_root):
    _, _, _, out = runs_root
    steps = [int(m.group(1)) for m in map(LINE.match, out.splitlines()) if m]
    assert steps[:3] == [1, 2, 3], out[-3000:]  # run.log_interval_s=0: every step
    assert steps == list(range(1, len(steps) + 1))
    assert "━" not in out and "\x1b[" not in out  # no bar glyphs, no terminal codes in a file
    assert "profile of steps 1..2" in out


def test_cadence_first_steps_then_every_interval():
    from nanochat.tracking import FIRST_LINES, Cadence
    c = Cadence(3600.0)
    due = [c.due(s, 100) for s in range(1, 101)]
    assert due[:FIRST_LINES] == [True] * FIRST_LINES and not any(due[FIRST_LINES:-1]) and due[-1]
    assert all(Cadence(0.0).due(s, 100) for s in range(1, 101))
    c = Cadence(0.05, first=0)
    assert not c.due(1, 10)
    time.sleep(0.06)
    assert c.due(2, 10) and not c.due(3, 10)


def test_tracker_plain_line_from_stats_or_text(tmp_path, capsys):
    from nanochat.tracking import Tracker
    t = Tracker(tmp_path, enabled=True, total_steps=10, desc="rl", log_interval_s=0)
    t.progress(1, stats={"step": 1, "total": 10, "reward": 0.25, "lrm": 1.0, "dt_s": 0.5})
    t.progress(2, "reward 0.3 | 1.0s/step")
    t.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rl step 1/10 | reward 0.2500 | lrm 1.000 | dt 0.50s | elapsed ")
    assert lines[1].startswith("rl step 2/10 | reward 0.3 | 1.0s/step | elapsed ") and " | eta " in lines[1]


def test_eta_paces_from_the_first_step_not_the_setup(tmp_path, capsys, monkeypatch):
    """60 s of setup before step 1, then 2 s a step: the ETA is 2 s × the steps left, not 62 s × them."""
    import nanochat.tracking as tracking
    clock = [1000.0]
    monkeypatch.setattr(tracking.time, "time", lambda: clock[0])
    t = tracking.Tracker(tmp_path, enabled=True, total_steps=10, desc="pretrain", log_interval_s=0)
    for step, now in ((1, 1060.0), (2, 1062.0), (3, 1064.0)):
        clock[0] = now
        t.progress(step, stats={"step": step, "total": 10, "loss": 5.0, "dt_s": 2.0})
    t.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("elapsed 1m00s | eta 0m18s"), lines[0]   # step 1: its own dt × 9
    assert lines[2].endswith("elapsed 1m04s | eta 0m14s"), lines[2]   # 2 s/step × 7


def test_eval_progress_uses_the_same_format():
    from nanochat.lifecycle import EvalProgress
    seen = []
    p = EvalProgress("ARC-Easy", 40, seen.append, every_s=0.0)
    for done in range(0, 41, 10):
        p.step(done)
    assert len(seen) == 3 and re.match(r"^  eval ARC-Easy 10/40 \| [\d.]+/s \| elapsed \d+m\d\ds \| eta", seen[0])


# --------------------------------------------------------------------------- profile, TensorBoard

def test_profile_writes_trace_and_top_ops(runs_root):
    _, live, _, _ = runs_root
    trace = json.loads((live / "profile_trace.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    ops = (live / "profile_ops.txt").read_text()
    assert "top ops by self_cpu_time_total" in ops and "aten::mm" in ops


def test_tensorboard_events_are_readable(tmp_path):
    pytest.importorskip("tensorboard", reason="tracking.tensorboard needs the tensorboard package "
                                              "(pip install nanochat-hydra[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from nanochat.tracking import Tracker
    t = Tracker(tmp_path, enabled=True, total_steps=4, tensorboard=True, progress=False)
    for s in range(1, 5):
        t.log({"step": s, "train/loss": 5.0 - s, "val/bpb": 2.0})
    t.close()
    t = Tracker(tmp_path, enabled=True, total_steps=6, start_step=2, tensorboard=True, progress=False)
    t.log({"step": 3, "train/loss": 0.5})   # a resumed attempt: what the killed one logged past step 2 goes
    t.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert {"train/loss", "val/bpb"} <= set(ea.Tags()["scalars"])
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 4.0), (3, 0.5)]


def test_tensorboard_without_its_package_is_refused_before_the_run(base_dir, workdir):
    import importlib.util
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    p = run_cli(["experiment=tiny", "tracking.tensorboard=true", f"run.root={workdir}/runs"], base_dir, workdir)
    assert p.returncode != 0 and "nanochat-hydra[tensorboard]" in p.stdout and not (workdir / "runs").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA out-of-memory error needs a GPU")
def test_cuda_oom_writes_the_memory_snapshot(tmp_path):
    from nanochat.batch_size import explain_oom, memory_history
    keep = torch.ones(1024, device="cuda")
    memory_history(True)
    with pytest.raises(MemoryError, match="memory snapshot: ") as e:
        with explain_oom(8, 1, tmp_path):
            torch.empty(2 ** 50, dtype=torch.uint8, device="cuda")
    memory_history(False)
    snap = tmp_path / "oom_memory_snapshot_rank0.pickle"
    assert str(snap) in str(e.value) and snap.stat().st_size > 0 and keep.sum() == 1024


# --------------------------------------------------------------------------- nanochat-runs

def test_runs_ls_statuses_and_sweep_table(runs_root):
    root, live, running, _ = runs_root
    assert [r["dir"] for r in running] == [str(live)] and running[0]["status"] == "running"
    before = _snapshot(root)
    p = runs_cli(root, "ls", str(root))
    assert p.returncode == 0, p.stderr
    assert re.search(r"pretrain\s+d1\s+failed\s", p.stdout)
    assert re.search(r"pretrain\s+d1\s+preempted\s+\d+/200", p.stdout)
    sweep = p.stdout.split("sweep ", 1)[1]
    assert "2 jobs; * = best final_val_bpb" in sweep and "model.depth" in sweep
    rows = {r[1:].split()[0]: r for r in sweep.splitlines()[2:]}  # swept depth → row ("*" in column 0 = best)
    assert set(rows) == {"1", "2"} and sum(r.startswith("*") for r in rows.values()) == 1
    js = json.loads(runs_cli(root, "ls", str(root), "--json", "--status", "completed").stdout)
    assert len(js) == 2 and all(r["step"] == r["total"] == 4 and r["value"] > 0 and r["git"] for r in js)
    best = min(js, key=lambda r: r["value"])
    assert rows[best["dir"].split("model.depth=")[1][0]].startswith("*")
    assert runs_cli(root, "ls", str(root), "--stage", "sft").stdout.strip() == "no runs match the filters"
    assert _snapshot(root) == before  # nothing written into any run dir


def test_runs_diff_and_plot(runs_root, tmp_path):
    root, live, _, _ = runs_root
    a, b = sorted((root / "sweeps" / "depths").glob("*model.depth=*"))
    p = runs_cli(root, "diff", str(a), str(b))
    assert re.search(r"config\.model\.depth\s+1\s+2", p.stdout) and "plan.num_params" in p.stdout, p.stdout
    png = tmp_path / "bpb.png"
    p = runs_cli(root, "plot", str(root / "sweeps" / "depths"), str(live), "--metric", "train/loss",
                 "--x", "flops", "-o", str(png))
    assert p.returncode == 0 and "3 of 3 runs" in p.stdout, p.stdout + p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("case", ["empty", "unknown_metric", "half_written", "not_a_run", "into_run_dir"])
def test_runs_bad_input_is_one_clear_line(runs_root, tmp_path, case):
    root, live, _, _ = runs_root
    if case == "empty":
        p, want = runs_cli(root, "ls", str(tmp_path)), "no run dirs under"
    elif case == "unknown_metric":
        p, want = runs_cli(root, "plot", str(live), "--metric", "nope", "-o", str(tmp_path / "x.png")), "train/loss"
    elif case == "half_written":  # a dir torn mid-freeze, or made by something else
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "resolved_config.yaml").write_text("stage: [unclosed\n")
        (tmp_path / "x" / "status.json").write_text("[1, 2]")
        (tmp_path / "x" / "metrics.jsonl").write_text('[3]\n{"step": 1, "loss"')
        p, want = runs_cli(root, "ls", str(tmp_path)), "half-written, or not made by nanochat-run"
        assert p.returncode == 0 and "unknown" in p.stdout
    elif case == "not_a_run":
        p, want = runs_cli(root, "diff", str(tmp_path), str(live)), "not a run dir"
    else:
        p, want = runs_cli(root, "plot", str(live), "--metric", "train/loss", "-o", str(live / "x.png")), "never writes"
    assert want in p.stdout + p.stderr and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert case == "half_written" or p.returncode == 2


# --------------------------------------------------------------------------- dry run

def test_speedrun_dry_run_is_short(base_dir, workdir):
    p = run_cli(["experiment=speedrun", "run.dry_run=true"], base_dir, workdir)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) < 200, len(lines)
    assert p.stdout.count("nanochat plan: stage=") == 5 and p.stdout.count("resolved config") == 1
    assert "5,568 (from target_param_data_ratio)" in p.stdout and "stage (chat_eval): {name: eval" in p.stdout
    full = run_cli(["experiment=speedrun", "run.dry_run=true", "run.print_config=true"], base_dir, workdir)
    assert full.stdout.count("\nmodel:\n") == 5  # every stage's config in full


# --------------------------------------------------------------------------- evaluations sized to the run

def test_chatcore_is_sized_to_the_run():
    from nanochat.chat_plan import CHATCORE_CAT, chatcore_cap
    from nanochat.stage_plan import due_count
    assert [due_count(10, 4, True), due_count(8, 4, True), due_count(8, 4, False), due_count(8, -1, True)] == [4, 3, 2, 1]
    assert chatcore_cap(None, 4 * 2048, 1) == 100                       # a 4-step CPU run: the floor
    assert chatcore_cap(None, 3_000_000, 1) == 600                      # 5% of its compute
    assert chatcore_cap(None, 10 ** 9, 6) == -1                         # a full-size SFT: every problem
    assert chatcore_cap(-1, 4 * 2048, 1) == -1 and chatcore_cap(7, 10 ** 9, 1) == 7  # one key away
    assert max(CHATCORE_CAT.values()) == 14042


def test_sft_plan_lists_its_evaluations(runs_root, base_dir):
    root, _, _, _ = runs_root
    src = next((root / "sweeps" / "depths").glob("*model.depth=1*"))
    args = ["experiment=tiny", "stage=sft", "model.depth=1", f"stage.init_from='{src}'", "stage.chatcore_every=2",
            'stage.mixture=["arithmetic:size=200,max_value=20"]', "stage.num_iterations=4", "run.dry_run=true"]
    out = run_cli(args, base_dir, root, env_extra={"COLUMNS": "300"}).stdout
    rows = {p[1].strip(): p[2].strip() for p in (l.split("│") for l in out.splitlines()) if len(p) == 4}
    assert rows["validation"] == "2 × 4,096 tokens (every 10 steps and at the end)", out
    assert rows["ChatCORE"].startswith("2 × (ARC-Easy, ARC-Challenge, MMLU: ≤ 100 problems each; GSM8K, HumanEval")
    assert re.match(r"≈ [\d.e+]+ FLOPs = \d+% of training", rows["evaluation cost"])
    full = run_cli([*args, "stage.chatcore_max_cat=-1"], base_dir, root, env_extra={"COLUMNS": "300"}).stdout
    assert "MMLU: all problems each" in full
