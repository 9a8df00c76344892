"""Stage `sft`: supervised fine-tuning on whole conversations, one per row.

Each micro-batch holds `device_batch_size` conversations, right-padded to the longest
one; targets are -1 on padding and on everything but the assistant's tokens. A
conversation longer than `sequence_len + 1` tokens is truncated; one with no assistant
token left inside that window is skipped (and counted), so no row (and so no batch) is all
padding and the loss is never 0/0. The optimizer step normalizes by the trained tokens of
the whole step across micro-batches and ranks (see mid.train_chat).

Defaults follow nanochat's chat_sft: LRs of the source checkpoint × `init_lr_frac` 0.02,
linear decay to 0, 32 conversations per step, one epoch of the mixture.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from nanochat.config import Config
from nanochat.stages.mid import (ChatData, base_lrs, chat_stage_setup, effective_plan, eval_specs_for, train_chat,
                                 val_mixture)
from nanochat.tasks.common import Task

# nanochat SFT: ARC-Easy/Challenge train, GSM8K train, SmolTalk 10k, identity, spelling. Optional
# entries are skipped (with a note) when their data is missing, so the default works offline.
DEFAULT_SFT_MIXTURE = [
    ("arc_easy", True), ("arc_challenge", True), ("gsm8k", True), ("smoltalk:stop=10000", True),
    ("identity", True), ("simplespelling:size=300", False), ("spellingbee:size=300", False),
    ("arithmetic:size=300", False),
]
DEFAULT_EXAMPLES_PER_STEP = 32


class PaddedChatLoader:
    """(B, L) batches of whole conversations, L = the longest row (<= seq_len), rank-strided."""

    def __init__(self, task: Task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world: int = 1,
                 device: Any = "cpu", state: Optional[dict] = None):
        if len(task) == 0:
            raise ValueError("PaddedChatLoader: the task mixture is empty")
        self.task, self.tok = task, tokenizer
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world
        self.device = torch.device(device)
        self.pad = tokenizer.encode_special("<|assistant_end|>")
        self.cursor, self.epoch, self.skipped = rank, 0, 0
        if state is not None:
            self.cursor, self.epoch, self.skipped = state["cursor"], state["epoch"], state.get("skipped", 0)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "skipped": self.skipped}

    def _next_row(self) -> tuple[list[int], list[int]]:
        for _ in range(len(self.task) + 1):
            if self.cursor >= len(self.task):
                self.epoch += 1
                self.cursor = self.rank % len(self.task)
            ids, mask = self.tok.render_conversation(self.task[self.cursor], max_tokens=self.T + 1)
            self.cursor += self.world
            if any(mask[1:]):
                return ids, mask
            self.skipped += 1  # nothing to learn inside the window (the assistant starts too late)
        raise ValueError(f"no conversation of the mixture has an assistant token within sequence_len={self.T}; "
                         "raise model.sequence_len (or stage.max_seq_len)")

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.B)]
        L = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((self.B, L), self.pad, dtype=torch.long)
        y = torch.full((self.B, L), -1, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            t = torch.tensor(ids, dtype=torch.long)
            m = torch.tensor(mask[1:], dtype=torch.bool)
            x[r, :n] = t[:-1]
            y[r, :n] = torch.where(m, t[1:], -1)
        return x.to(self.device), y.to(self.device)


def sft_batch(plan_dbs: int, examples_per_step: int, world: int) -> tuple[int, int]:
    """(device batch, grad accum) with device_batch × world × accum == examples_per_step."""
    if examples_per_step % world:
        raise ValueError(f"stage.examples_per_step={examples_per_step} must be a multiple of the world size {world}")
    per_rank = examples_per_step // world
    dbs = max(d for d in range(1, min(plan_dbs, per_rank) + 1) if per_rank % d == 0)
    return dbs, per_rank // dbs


def run(cfg: Config, run_dir: Path) -> dict:
    rt, plan, st, meta, tokenizer, log, mixture, names = chat_stage_setup(cfg, run_dir, DEFAULT_SFT_MIXTURE)
    seq = plan.sequence_len
    examples = st.examples_per_step or DEFAULT_EXAMPLES_PER_STEP
    dbs, accum = sft_batch(plan.device_batch_size, examples, rt.world)
    if st.num_iterations:
        N, source = st.num_iterations, "num_iterations"
    else:
        N = max(1, math.ceil(st.num_epochs * len(mixture) / examples))
        source = f"{st.num_epochs} epoch(s) of {len(mixture):,} conversations"
    eplan = effective_plan(plan, cfg, meta, num_iterations=N, total_batch_size=examples * seq,
                           device_batch_size=dbs, grad_accum=accum,
                           lr_frac=st.init_lr_frac if st.init_lr_frac is not None else 0.02,
                           warmup_ratio=0.0, warmdown_ratio=1.0, momentum_ramp=False, horizon_source=source)
    val = val_mixture(names, data_dir=cfg.paths.shared_data, base_dir=rt.base_dir, seed=cfg.run.seed,
                      per_task=200, log=log)
    val_steps = max(1, st.eval_tokens // (dbs * seq * rt.world))
    data = ChatData(
        make_train=lambda state: PaddedChatLoader(mixture, tokenizer, dbs, seq, rt.rank, rt.world, rt.device, state),
        make_val=(lambda: PaddedChatLoader(val, tokenizer, dbs, seq, rt.rank, rt.world, rt.device)) if val else None,
        val_steps=val_steps, plan=eplan, eval_specs=eval_specs_for(cfg, names),
        info={"mixture": names, "conversations": len(mixture), "examples_per_step": examples},
        base_lrs=base_lrs(cfg, meta, plan))
    return train_chat(cfg, run_dir, rt, tokenizer, data)
