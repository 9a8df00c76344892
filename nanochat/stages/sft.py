"""Stage `sft`: supervised fine-tuning on conversations.

From a modern source (nanochat 92d63d4's chat_sft, straight from the base model): token rows
packed best-fit from whole conversations, batch / sequence length / LRs inherited from the
source run, optional optimizer warm start (`stage.load_optimizer`), ChatCORE during training.
From a seed source (Dec 2025): `examples_per_step` whole conversations per step, LRs × 0.02.
The rules are nanochat/chat_plan.py's `sft_plan`; the loop is nanochat/chat_train.py's.
"""
from __future__ import annotations

from pathlib import Path

from nanochat.config import Config


def run(cfg: Config, run_dir: Path) -> dict:
    from nanochat.chat_train import ChatRun, train_chat
    return train_chat(ChatRun(cfg, run_dir))
