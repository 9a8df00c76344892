"""The eval stage (base and chat) and the pipeline report card, on a tiny model.

- base: bits per byte on train and val, CORE on ../shared/data/eval_bundle with missing tasks
  skipped and named, per-task results in result.json and core.csv (mode auto on a pretrain run)
- chat: batched letter-logit scoring equals one-at-a-time scoring; ChatCORE is the mean of the
  centered accuracies in result.json (mode auto on a mid run)
- a `run.pipeline=[mid, eval]` command chains the stages and writes report.md
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import nanochat_run
from nanochat.common import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
needs_data = pytest.mark.skipif(shared_data_dir() is None,
                                reason="../shared/data is absent (CORE bundle, ARC, MMLU are read from it offline)")


@pytest.fixture(scope="module")
def runs(stage_root):
    return stage_root


@needs_data
def test_base_eval(runs):
    env, root, pre = runs
    out = root / "eval_base"
    nanochat_run(env, "stage=eval", f"stage.init_from={pre}", "stage.max_per_task=3", "stage.bpb_tokens=2048",
                 f"paths.eval_bundle={shared_data_dir() / 'eval_bundle'}", f"run.root={root}", f"run.dir={out}")
    r = json.loads((out / "result.json").read_text())
    assert r["mode"] == "base" and r["source_stage"] == "pretrain"
    assert 0.5 < r["train_bpb"] < 20 and 0.5 < r["val_bpb"] < 20
    assert set(r["core_tasks_skipped"]) == {"squad", "coqa"}  # missing from the offline bundle, and named
    assert r["core_tasks_evaluated"] == 20 and r["core_tasks_total"] == 22
    centered = [t["centered"] for t in r["core_results"].values()]
    assert r["core"] == pytest.approx(sum(centered) / len(centered))
    rows = list(csv.reader((out / "core.csv").open()))
    assert rows[0][0] == "task" and rows[-1][0] == "CORE" and len(rows) == 1 + 20 + 2 + 1


def test_categorical_batched_equals_single(runs):
    if shared_data_dir() is None:
        pytest.skip("../shared/data is absent (ARC)")
    from nanochat.checkpoint import load_model_from_run
    from nanochat.chat_eval import score_categorical
    from nanochat.tasks import make_task
    from nanochat.tokenizer import get_tokenizer
    env, _, pre = runs
    model, _ = load_model_from_run(pre, "cpu")
    tok = get_tokenizer(env["NANOCHAT_BASE_DIR"], "demo")
    task = make_task("arc_easy", "test")
    idx = list(range(12))
    batched = score_categorical(model, tok, task, idx, "cpu", batch_size=5)
    single = sum(score_categorical(model, tok, task, [i], "cpu", batch_size=1) for i in idx)
    assert batched == single


@needs_data
@pytest.mark.slow
def test_pipeline_mid_then_chat_eval_and_report(runs):
    env, root, pre = runs
    out = nanochat_run(
        env, "experiment=tiny", "model.depth=2", "run.pipeline=[mid,eval]", f"+stages.mid.init_from={pre}",
        "+stages.mid.num_iterations=3", "+stages.mid.eval_tokens=2048", "+stages.mid.eval_every=-1", "+stages.mid.eval_tasks=[]",
        '+stages.mid.mixture=["arithmetic:size=100","arc_easy:stop=50"]',
        '+stages.eval.tasks=[arc_easy,"arithmetic:max_value=9"]', "+stages.eval.max_per_task=6",
        "+stages.eval.max_new_tokens=12", f"run.root={root}")
    mid = sorted((root / "mid").glob("*/*/COMPLETED"))[-1].parent
    ev = sorted((root / "eval").glob("*/*/COMPLETED"))[-1].parent
    r = json.loads((ev / "result.json").read_text())
    assert r["mode"] == "chat" and r["source"] == str(mid) and r["source_stage"] == "mid"
    assert set(r["task_accuracy"]) == {"arc_easy", "arithmetic"}
    t = r["tasks"]
    assert t["arc_easy"]["chance"] == 0.25 and t["arithmetic"]["chance"] == 0.0
    assert t["arc_easy"]["total"] == 6 and t["arithmetic"]["total"] == 6
    want = ((t["arc_easy"]["accuracy"] - 0.25) / 0.75 + t["arithmetic"]["accuracy"]) / 2
    assert r["chatcore"] == pytest.approx(want)
    assert (ev / "chat_eval.csv").read_text().splitlines()[-1].startswith("ChatCORE")
    report = (root / "report.md").read_text()
    assert "| mid | completed |" in report and "| eval | completed |" in report and "ChatCORE" in report
    # the copy in the last run dir has the same table, its links relative to where it lies
    copy = (ev / "report.md").read_text()
    assert copy.count("| completed |") == report.count("| completed |") == 2
    import re
    for card, d in ((report, root), (copy, ev)):
        pics = re.findall(r"!\[[^]]*\]\(([^)]+)\)", card)
        assert pics and all(not p.startswith("/") and (d / p).is_file() for p in pics), pics
        assert (d / "report.html").is_file()
    assert "report card" in out.stdout
