"""Stage `sft`: supervised fine-tuning on conversations.

From a modern source (nanochat 92d63d4's chat_sft, straight from the base model): token rows
packed best-fit from whole conversations, batch / sequence length / LRs inherited from the
source run, optional optimizer warm start (`stage.load_optimizer`), ChatCORE during training.
From a seed source (Dec 2025): `examples_per_step` whole conversations per step, LRs × 0.02.
The rules are nanochat/chat_plan.py's `sft_plan`; the loop is nanochat/chat_train.py's.
"""
from __future__ import annotations

from pathlib import Path

from nanochat.chat_plan import sft_plan
from nanochat.config import ChatStageConfig, Config
from nanochat.results import ChatResult
from nanochat.stages import Stage


def run(cfg: Config, run_dir: Path) -> ChatResult:
    from nanochat.chat_train import train_chat  # torch inside: the launcher imports this module
    return train_chat(cfg, run_dir)


# --------------------------------------------------------------------------- the declaration

# latest: a seed model starts from its mid run (Dec 2025), a modern one from its pretrain run (92d63d4's chat_sft)
STAGE = Stage("sft", schema=ChatStageConfig, planner=sft_plan, worker=run, sources=("pretrain", "mid"),
              default_source={"seed": "mid", "modern": "pretrain"}, headline="final_val_loss",
              result=ChatResult)
