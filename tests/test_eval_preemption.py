"""A stop signal in the middle of an evaluation is acted on between batches, not after the pass.

Slurm sends SIGKILL 30 s (KillWait) after SIGTERM. Each kind of long evaluation runs here on a
real model with far more work than it could finish; SIGTERM arrives mid-way and the process
must leave with exit 75 (preempted, resumable) well inside that bound. Two of them go through
`nanochat-run` end to end: an SFT run stopped in its validation pass checkpoints and reports
`preempted`; the chat eval stage reports `preempted` too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanochat.common import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
BOUND_S = 10.0  # well under Slurm's 30 s KillWait, with room for a loaded 2-core machine

CHILD = r'''
import sys, torch
from nanochat.lifecycle import STOP, EvalInterrupted
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
import os
kind = sys.argv[1]
torch.set_num_threads(1)
tok = get_tokenizer(os.environ["NANOCHAT_BASE_DIR"], "demo")
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
model.init_weights()
model.eval()
STOP.install()

def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(0, tok.get_vocab_size(), (2, 64), generator=g)
        yield x, x

print("READY", flush=True)
try:
    if kind == "val_bpb":
        from nanochat.loss_eval import evaluate_bpb
        evaluate_bpb(model, batches(), 10 ** 9, torch.ones(tok.get_vocab_size(), dtype=torch.int64))
    elif kind == "chat_val_loss":
        from nanochat.chat_data import BestFitChatLoader
        from nanochat.loss_eval import evaluate_bpb
        from nanochat.tasks import make_task
        evaluate_bpb(model, BestFitChatLoader(make_task("arithmetic:size=100000", "train"), tok, 2, 64), 10 ** 9, None)
    elif kind == "core":
        from nanochat.core_eval import evaluate_core
        evaluate_core(model, tok, sys.argv[2], torch.device("cpu"), max_per_task=-1)
    elif kind in ("chatcore", "chat_eval"):
        from nanochat.chat_eval import chatcore, evaluate_chat_tasks
        if kind == "chatcore":
            chatcore(model, tok, torch.device("cpu"), max_cat=-1, max_sample=10 ** 6)
        else:
            evaluate_chat_tasks(model, tok, ["arithmetic:size=100000"], torch.device("cpu"), max_new_tokens=32)
    elif kind == "rl_pass_at_k":
        from nanochat.stages.rl import pass_at_k
        from nanochat.tasks import make_task
        pass_at_k(model, tok, make_task("arithmetic:size=100000", "test"), 10 ** 6, 2, 16, 1.0, 50, 0,
                  torch.device("cpu"))
except EvalInterrupted:
    sys.exit(75)
sys.exit(0)
'''


def _env(base: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NANOCHAT_BASE_DIR=base, NANOCHAT_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _stop_when(proc: subprocess.Popen, marker: str, settle_s: float, timeout: float = 240) -> tuple[int, float, str]:
    """Send SIGTERM `settle_s` after `marker` appears on stdout; (exit code, seconds to exit, output)."""
    lines: list[str] = []
    seen = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while not seen.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
        pass
    assert seen.is_set(), f"{marker!r} never appeared:\n{''.join(lines)[-3000:]}"
    time.sleep(settle_s)
    assert proc.poll() is None, f"finished before the signal:\n{''.join(lines)[-3000:]}"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    dt = time.monotonic() - t0
    t.join(timeout=5)
    return rc, dt, "".join(lines)


KINDS = ["val_bpb", "chat_val_loss", "core", "chatcore", "chat_eval", "rl_pass_at_k"]


@pytest.mark.parametrize("kind", KINDS)
def test_stop_signal_mid_evaluation(kind, tiny_pretrained, tmp_path):
    env, _ = tiny_pretrained
    extra = []
    if kind in ("core", "chatcore"):
        shared = shared_data_dir()
        if shared is None or not (shared / "eval_bundle").is_dir():
            pytest.skip("../shared/data is absent: CORE / ChatCORE need its eval bundle and task files")
        extra = [str(shared / "eval_bundle")]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), kind, *extra], cwd=REPO, env=_env(env["NANOCHAT_BASE_DIR"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rc, dt, out = _stop_when(proc, "READY", settle_s=2.0)
    assert rc == 75, f"{kind}: exit {rc}\n{out[-3000:]}"
    assert dt < BOUND_S, f"{kind}: took {dt:.1f}s after SIGTERM"


@pytest.mark.slow
def test_sft_preempted_in_validation_checkpoints(stage_root):
    env, root, pre = stage_root
    run_dir = root / "sft_preempt"
    args = ["experiment=tiny", "model.depth=2", "stage=sft", f"stage.init_from={pre}",
            'stage.mixture=["arithmetic:size=200,max_value=20"]', "stage.num_iterations=4",
            "stage.eval_tokens=1000000000", "stage.eval_every=2", "stage.save_every=-1", f"run.root={root}",
            f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "launch.run", *args], cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rc, dt, out = _stop_when(proc, "validation:", settle_s=2.0)
    assert rc == 75, out[-3000:]
    assert dt < BOUND_S + 5, f"took {dt:.1f}s after SIGTERM"  # + the checkpoint write and launcher exit
    assert json.loads((run_dir / "status.json").read_text())["status"] == "preempted"
    assert (run_dir / "checkpoints" / "step_000000").is_dir()  # resumable: run.resume=auto picks it up
    assert "validation: " in out  # the pass announced itself


@pytest.mark.slow
def test_chat_eval_stage_preempted(stage_root):
    env, root, pre = stage_root
    run_dir = root / "eval_preempt"
    args = ["hardware=cpu", "data=demo", "stage=eval", f"stage.init_from={pre}", "stage.mode=chat",
            'stage.tasks=["arithmetic:size=100000"]', "stage.max_new_tokens=32", f"run.root={root}",
            f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "launch.run", *args], cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rc, dt, out = _stop_when(proc, "eval (chat)", settle_s=2.0)
    assert rc == 75, out[-3000:]
    assert dt < BOUND_S, f"took {dt:.1f}s after SIGTERM"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted" and status["during"] == "evaluation"
