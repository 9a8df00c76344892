"""nanochat-chat against a real (tiny) checkpoint: one-shot, interactive clear/quit, --latest.

The streamed text of a greedy reply must equal the Engine's own greedy completion.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def run(env: dict, args: list[str], stdin: str | None = None, module: str = "nanochat.chat_cli",
        check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       input=stdin, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


@pytest.fixture(scope="module")
def chat_run(stage_root):
    env, root, _ = stage_root
    run(env, ["experiment=tiny", "model.depth=2", "stage=mid", "stage.init_from=latest", "stage.num_iterations=2",
              "stage.eval_every=-1", "stage.eval_tokens=1024", "stage.eval_tasks=[]",
              'stage.mixture=["arithmetic:size=50"]', f"run.root={root}"], module="launch.run")
    mid = sorted((root / "mid").glob("*/*/COMPLETED"))[-1].parent
    return env, root, mid


def test_one_shot_streams_the_engine_greedy_answer(chat_run):
    from nanochat.chat_cli import ChatSession, load
    from nanochat.engine import Engine
    env, _, mid = chat_run
    os.environ["NANOCHAT_BASE_DIR"] = env["NANOCHAT_BASE_DIR"]
    try:
        model, tok, meta = load(mid)
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR")
    assert meta["stage"] == "mid"
    from nanochat.packed import pack_for_inference
    pack_for_inference(model)   # as the CLI does
    session = ChatSession(model, tok, temperature=0.0, max_tokens=20)
    pieces = list(session.reply("What is 2 + 3?"))
    conv = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": ""}]}
    prompt = tok.render_for_completion(conv)
    seqs, _ = Engine(model, tok).generate_batch(prompt, max_tokens=20, temperature=0.0)
    assert "".join(pieces) == tok.decode(seqs[0][len(prompt):])
    assert len(pieces) > 1  # streamed, not returned in one piece
    # the session keeps the conversation: the next prompt starts with the previous turn
    assert session.tokens[:len(prompt)] == prompt

    out = run(env, [str(mid), "-p", "What is 2 + 3?", "-t", "0", "-m", "20"])
    assert out.stdout.strip() == "".join(pieces).strip()


def test_interactive_clear_and_quit(chat_run):
    env, root, _ = chat_run
    out = run(env, ["--latest", "--root", str(root), "-m", "8"], stdin="hello\nclear\nhi again\nquit\n")
    assert out.stdout.count("Assistant:") == 2
    assert "(conversation cleared)" in out.stdout
    assert "/mid/" in out.stdout.splitlines()[0]  # --latest found the chat run


def test_latest_without_runs_is_a_clear_error(tmp_path):
    out = run(dict(os.environ), ["--latest", "--root", str(tmp_path)], check=False)
    assert out.returncode == 2 and "no completed rl/sft/mid run" in out.stderr
