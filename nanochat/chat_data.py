"""Batches of rendered conversations for the chat stages; targets are -1 off the assistant's tokens.

Three packings (a plan names one: nanochat/chat_plan.py):
  stream   conversations back to back in one token stream cut into rows (seed mid-training)
  pad      one whole conversation per row, right-padded to the longest row (seed SFT)
  bestfit  rows of sequence_len + 1 tokens, each starting at a conversation's BOS, filled best-fit
           from a buffer of conversations and padded (never cropped) when none fits (nanochat
           92d63d4's chat_sft); padding is BOS with target -1
Every loader is rank-strided (rank r reads conversations r, r + world, ...) and has a
state_dict that makes resume exact.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from nanochat.tasks.common import Task


class _ChatLoader:
    """What the loaders share: rank r reads conversations r, r+world, ... of the mixture, epoch after
    epoch. The resume state is (cursor, epoch) plus the loader's own `state_defaults` keys."""
    state_defaults: dict = {}
    wrap_to_rank = True  # a new epoch restarts at this rank's first conversation (else at cursor % len)

    def __init__(self, task: Task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world: int = 1,
                 device: Any = "cpu", state: Optional[dict] = None):
        if len(task) == 0:
            raise ValueError(f"{type(self).__name__}: the task mixture is empty")
        self.task, self.tok = task, tokenizer
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world
        self.device = torch.device(device)
        state = {"cursor": rank, "epoch": 0, **self.state_defaults, **(state or {})}
        for k in ("cursor", "epoch", *self.state_defaults):
            setattr(self, k, copy.deepcopy(state[k]))

    def state_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in ("cursor", "epoch", *self.state_defaults)}

    def _render_next(self, max_tokens: int) -> tuple[list[int], list[int]]:
        """This rank's next conversation as (ids, mask)."""
        if self.cursor >= len(self.task):
            self.epoch += 1
            self.cursor = self.rank % len(self.task) if self.wrap_to_rank else self.cursor % len(self.task)
        ids, mask = self.tok.render_conversation(self.task[self.cursor], max_tokens=max_tokens)
        self.cursor += self.world
        return ids, mask

    def __iter__(self):
        return self


class PackedChatLoader(_ChatLoader):
    """Rendered conversations packed back to back into (B, T) rows; targets -1 off the assistant.

    The state (cursor, epoch, leftover tokens) makes resume exact. A batch with no trained target
    (possible with very long user turns) is skipped, so the loss is never 0/0.
    """
    state_defaults = {"ids": [], "mask": []}

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1
        while True:
            while len(self.ids) < need:
                ids, mask = self._render_next(max(2048, self.T + 1))
                self.ids.extend(ids)
                self.mask.extend(mask)
            ids = torch.tensor(self.ids[:need], dtype=torch.long)
            mask = torch.tensor(self.mask[1:need], dtype=torch.bool)
            # keep the last token: it is the next batch's first input (one continuous stream)
            del self.ids[:need - 1], self.mask[:need - 1]
            if mask.any():
                break
        y = torch.where(mask, ids[1:], -1).view(self.B, self.T)
        return ids[:-1].view(self.B, self.T).to(self.device), y.to(self.device)


class PaddedChatLoader(_ChatLoader):
    """(B, L) batches of whole conversations, L = the longest row (<= seq_len), rank-strided."""
    state_defaults = {"skipped": 0}

    def _next_row(self) -> tuple[list[int], list[int]]:
        for _ in range(len(self.task) + 1):
            ids, mask = self._render_next(self.T + 1)
            if any(mask[1:]):
                return ids, mask
            self.skipped += 1  # nothing to learn inside the window (the assistant starts too late)
        raise ValueError(f"no conversation of the mixture has an assistant token within sequence_len={self.T}; "
                         "raise model.sequence_len (or stage.max_seq_len)")

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.B)]
        L = max(len(ids) for ids, _ in rows) - 1
        pad = self.tok.encode_special("<|assistant_end|>")
        x = torch.tensor([ids[:-1] + [pad] * (L + 1 - len(ids)) for ids, _ in rows], dtype=torch.long)
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (L + 1 - len(ids))
                          for ids, mask in rows], dtype=torch.long)
        return x.to(self.device), y.to(self.device)


class BestFitChatLoader(_ChatLoader):
    """nanochat 92d63d4's BOS-aligned best-fit packing of whole conversations into (B, T) rows.

    Each row holds T + 1 tokens: take the longest buffered conversation that fits the room
    left, until none fits; then pad the rest with BOS (targets -1). One difference from
    nanochat: a conversation is rendered at most T + 1 tokens long (truncated), so it always
    fits an empty row; nanochat's would never fit and pad rows forever.
    """
    state_defaults = {"consumed": 0, "buffer": []}
    wrap_to_rank = False

    def __init__(self, *args, buffer_size: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer_size = buffer_size

    def next_rows(self) -> tuple[list[list[int]], list[list[int]]]:
        """B rows of T + 1 token ids and their loss masks (padding: BOS, mask 0)."""
        cap = self.T + 1
        rows, masks = [], []
        for _ in range(self.B):
            row, mrow = [], []
            while len(row) < cap:
                while len(self.buffer) < self.buffer_size:
                    self.buffer.append(self._render_next(cap))
                room = cap - len(row)
                best = max((i for i, (c, _) in enumerate(self.buffer) if len(c) <= room),
                           key=lambda i: (len(self.buffer[i][0]), -i), default=-1)
                if best < 0:
                    row += [self.tok.get_bos_token_id()] * room
                    mrow += [0] * room
                    break
                ids, mask = self.buffer.pop(best)
                row += ids
                mrow += mask
                self.consumed += self.world
            rows.append(row)
            masks.append(mrow)
        return rows, masks

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            rows, masks = self.next_rows()
            ids = torch.tensor(rows, dtype=torch.long)
            keep = torch.tensor(masks, dtype=torch.bool)[:, 1:]
            if keep.any():
                y = torch.where(keep, ids[:, 1:], -1)
                return ids[:, :-1].contiguous().to(self.device), y.contiguous().to(self.device)


LOADERS = {"stream": PackedChatLoader, "pad": PaddedChatLoader, "bestfit": BestFitChatLoader}
