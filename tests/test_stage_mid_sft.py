"""The mid and sft stages, driven through `nanochat-run` like a user would, on a tiny model.

- pretrain → mid → sft chained with init_from=latest; val loss falls; checkpoints, result.json
- LRs, batch and horizon inherited from the source checkpoint when null (effective_plan.json)
- mid resume: a run resumed from its step-2 checkpoint logs bitwise the same losses as an
  uninterrupted run
- loaders: SFT rows that cannot fit are truncated or skipped, so no batch is all padding and
  the loss is finite; the packed stream resumes exactly from its state
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import nanochat_run
from nanochat.common import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def newest(root: Path, stage: str) -> Path:
    runs = sorted((root / stage).glob("*/*/COMPLETED"), key=lambda p: p.stat().st_mtime)
    assert runs, f"no completed {stage} run under {root}"
    return runs[-1].parent


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


MIX = 'stage.mixture=["arithmetic:size=300,max_value=20","simplespelling:size=300,max_len=5"]'
CHAT = ["stage.eval_examples=4", "stage.eval_max_new_tokens=12", "stage.log_every=1"]


@pytest.fixture(scope="module")
def env_root(stage_root):
    env, root, _ = stage_root
    return env, root


@pytest.mark.slow
def test_pretrain_mid_sft_chain(env_root):
    env, root = env_root
    pre = newest(root, "pretrain")
    nanochat_run(env, "experiment=tiny", "model.depth=2", "stage=mid", "stage.init_from=latest", "stage.num_iterations=6",
                 "stage.eval_every=3", "stage.eval_tokens=2048", MIX, *CHAT, f"run.root={root}")
    mid = newest(root, "mid")
    r = json.loads((mid / "result.json").read_text())
    assert r["step"] == 6 and r["num_iterations"] == 6
    assert r["final_val_loss"] < r["first_val_loss"], r  # it learns the conversations
    assert set(r["task_accuracy"]) == {"arithmetic", "simplespelling"}  # scored on the held-out split
    assert all(0.0 <= a <= 1.0 for a in r["task_accuracy"].values())
    assert (mid / "checkpoints" / "step_000006" / "model.pt").exists()
    src = json.loads((pre / "plan.json").read_text())
    eff = json.loads((mid / "effective_plan.json").read_text())
    # null total_batch_size and LRs come from the source checkpoint; mid keeps LRs × 1.0
    assert eff["total_batch_size"] == src["total_batch_size"]
    assert eff["matrix_lr"] == pytest.approx(src["matrix_lr"])
    assert eff["embedding_lr"] == pytest.approx(src["embedding_lr"])
    train = [m for m in metrics(mid) if "train/loss" in m]
    assert len(train) == 6 and all(m["trained_tokens"] > 0 for m in train)

    nanochat_run(env, "experiment=tiny", "model.depth=2", "stage=sft", "stage.init_from=latest", MIX, *CHAT,
                 "stage.examples_per_step=8", "stage.num_epochs=1", "stage.num_iterations=null", "stage.max_examples_per_task=20",
                 "stage.eval_every=-1", "stage.init_lr_frac=0.5", f"run.root={root}")
    sft = newest(root, "sft")
    r = json.loads((sft / "result.json").read_text())
    # horizon from num_epochs: 40 conversations / 8 per step
    assert r["num_iterations"] == 5 and r["step"] == 5
    eff = json.loads((sft / "effective_plan.json").read_text())
    assert eff["matrix_lr"] == pytest.approx(0.5 * src["matrix_lr"])  # base LRs × init_lr_frac, not compounded
    cfg = (sft / "resolved_config.yaml").read_text()
    assert str(mid) in cfg  # chained to the newest mid run
    losses = [m["train/loss"] for m in metrics(sft) if "train/loss" in m]
    assert len(losses) == 5 and all(l == l and l < 1e4 for l in losses)  # finite, no NaN


@pytest.mark.slow
def test_sft_latest_source_falls_back_to_pretrain(env_root, tmp_path):
    """A seed SFT prefers a mid run; with only a pretrain run of its tag, `latest` takes that one and the plan
    says so (before: "no completed mid run found")."""
    env, root = env_root
    pre = newest(root, "pretrain")
    own = tmp_path / "runs"
    shutil.copytree(pre, own / "pretrain" / "d2" / pre.name)
    out = nanochat_run({**env, "COLUMNS": "400"}, "experiment=tiny", "model.depth=2", "stage=sft", MIX,
                       f"run.root={own}", "run.dry_run=true").stdout
    assert "no completed mid run for tag d2: starting from the newest pretrain run" in out, out
    assert f"{own / 'pretrain' / 'd2' / pre.name} (pretrain, seed)" in out


@pytest.mark.slow
def test_mid_resume_is_exact(env_root, monkeypatch):
    from nanochat.config import load_config
    from nanochat.stages._entry import execute
    env, root = env_root
    pre = newest(root, "pretrain")
    run_dir = root / "resume"
    nanochat_run(env, "experiment=tiny", "model.depth=2", "stage=mid", f"stage.init_from={pre}",
                 "stage.num_iterations=4", "stage.eval_every=-1", "stage.save_every=2", "stage.eval_tasks=[]", MIX,
                 f"run.root={root}", f"run.dir={run_dir}")
    full = [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]
    # turn the run back into one that stopped at its step-2 checkpoint, then resume it (in-process worker)
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    for f in ("COMPLETED", "result.json", "status.json"):
        (run_dir / f).unlink()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", env["NANOCHAT_BASE_DIR"])
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    assert execute(load_config(str(run_dir / "resolved_config.yaml")), run_dir) == 0
    resumed = [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]
    assert len(full) == len(resumed) == 4
    assert full == resumed  # steps 3 and 4 bitwise equal on CPU
    assert json.loads((run_dir / "result.json").read_text())["step"] == 4


def _tokenizer(env_root):
    from nanochat.tokenizer import get_tokenizer
    env, _ = env_root
    return get_tokenizer(env["NANOCHAT_BASE_DIR"], "demo")


def test_sft_loader_never_all_padding(env_root):
    from nanochat.chat_data import PaddedChatLoader
    from nanochat.tasks import TaskMixture, make_task
    tok = _tokenizer(env_root)
    long_user = {"messages": [{"role": "user", "content": "tell me " * 200},
                              {"role": "assistant", "content": "ok"}]}

    class Long(make_task("arithmetic:size=4", "train").__class__):
        def get_example(self, index):
            return long_user if index % 2 == 0 else super().get_example(index)

    task = TaskMixture([Long(size=40)], seed=1)
    loader = PaddedChatLoader(task, tok, batch_size=4, seq_len=32)
    for _ in range(10):
        x, y = next(loader)
        assert x.shape[1] <= 32 and x.shape == y.shape
        assert ((y >= 0).sum(dim=1) > 0).all()  # every row trains on something
    assert loader.skipped > 0  # the long-user conversations were dropped, not padded to nothing
    # a conversation longer than the window is truncated, not dropped
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "la " * 100}]}

    class LongAnswer(Long):
        def get_example(self, index):
            return long_answer

    x, y = next(PaddedChatLoader(TaskMixture([LongAnswer(size=4)]), tok, batch_size=2, seq_len=16))
    assert x.shape == (2, 16) and (y >= 0).sum() >= 16


def test_sft_loss_finite_on_real_model(env_root):
    from nanochat.checkpoint import load_model_from_run
    from nanochat.chat_data import PaddedChatLoader
    from nanochat.tasks import TaskMixture, make_task
    env, root = env_root
    tok = _tokenizer(env_root)
    model, _ = load_model_from_run(newest(root, "pretrain"), "cpu")
    task = TaskMixture([make_task("arithmetic:size=16", "train"), make_task("simplespelling:size=16,max_len=6",
                                                                            "train")])
    loader = PaddedChatLoader(task, tok, batch_size=4, seq_len=model.config.sequence_len)
    for _ in range(4):
        x, y = next(loader)
        assert (x[y < 0] >= 0).all()
        loss = model(x, y)
        assert torch.isfinite(loss)


def test_packed_loader_state_resumes_exactly(env_root):
    from nanochat.chat_data import PackedChatLoader
    from nanochat.tasks import TaskMixture, make_task
    tok = _tokenizer(env_root)
    task = TaskMixture([make_task("arithmetic:size=50", "train"), make_task("simplespelling:size=50", "train")])
    a = PackedChatLoader(task, tok, batch_size=2, seq_len=64, rank=1, world=2)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(a) for _ in range(8)]  # crosses an epoch boundary (50 conversations per rank)
    b = PackedChatLoader(task, tok, batch_size=2, seq_len=64, rank=1, world=2, state=state)
    for (xa, ya), (xb, yb) in zip(want, (next(b) for _ in range(8))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # targets are the next token where the assistant speaks, -1 elsewhere
    x, y = want[0]
    valid = y[:, :-1] >= 0
    assert torch.equal(y[:, :-1][valid], x[:, 1:][valid])
    assert (y >= 0).any() and (y == -1).any()


def test_default_mixture_offline(env_root):
    from nanochat.chat_plan import DEFAULT_MID_MIXTURE, build_mixture
    from nanochat.chat_plan import SEED_SFT_MIXTURE as DEFAULT_SFT_MIXTURE
    if shared_data_dir() is None:
        pytest.skip("../shared/data is absent: the offline default mixture needs its task files")
    env, _ = env_root
    os.environ["NANOCHAT_OFFLINE"] = "1"  # never reach for the hub in this test
    notes = []
    try:
        mix, names = build_mixture(None, DEFAULT_MID_MIXTURE, "train", data_dir=None, base_dir=env["NANOCHAT_BASE_DIR"],
                                   seed=0, log=notes.append)
        assert "gsm8k" in names and "arithmetic:size=8000" in names and names.count("identity") == 2
        assert any("smoltalk" in n for n in notes)  # hub-only: skipped with a note, not an error
        assert len(mix) > 10000
        mix, names = build_mixture(None, DEFAULT_SFT_MIXTURE, "train", data_dir=None,
                                   base_dir=env["NANOCHAT_BASE_DIR"], seed=0, log=notes.append)
        assert "arc_easy" in names
        # an explicitly requested task without data is an error that names it
        from nanochat.config import ConfigError
        with pytest.raises(ConfigError, match="smoltalk"):
            build_mixture(["smoltalk"], [], "train", data_dir=None, base_dir=env["NANOCHAT_BASE_DIR"], seed=0)
    finally:
        os.environ.pop("NANOCHAT_OFFLINE", None)
