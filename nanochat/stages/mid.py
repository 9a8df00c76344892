"""Stage `mid`: mid-training on a conversation mixture, packed into a token stream.

Conversations (chat, multiple choice, tool use, spelling, arithmetic) are rendered with the
chat template and concatenated into one stream that fills rows of `sequence_len`, as in
pretraining, except that only assistant tokens are trained on. Its plan (LRs and batch
inherited from the pretrain run, horizon from `num_epochs`) is nanochat/chat_plan.py's
`mid_plan`; the loop is nanochat/chat_train.py's.
"""
from __future__ import annotations

from pathlib import Path

from nanochat.chat_plan import mid_plan
from nanochat.config import ChatStageConfig, Config
from nanochat.results import ChatResult
from nanochat.stages import Stage


def run(cfg: Config, run_dir: Path) -> ChatResult:
    from nanochat.chat_train import train_chat  # torch inside: the launcher imports this module
    return train_chat(cfg, run_dir)


# --------------------------------------------------------------------------- the declaration

STAGE = Stage("mid", schema=ChatStageConfig, planner=mid_plan, worker=run, sources=("pretrain",),
              headline="final_val_loss", result=ChatResult)
