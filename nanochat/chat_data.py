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

from typing import Any, Optional

import torch

from nanochat.tasks.common import Task


class PackedChatLoader:
    """Rendered conversations packed back to back into (B, T) rows; targets -1 off the assistant.

    Rank r reads conversations r, r+world, ... of the mixture (epochs repeat it). The state
    (cursor, epoch, leftover tokens) makes resume exact. A batch with no trained target
    (possible with very long user turns) is skipped, so the loss is never 0/0.
    """

    def __init__(self, task: Task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world: int = 1,
                 device: Any = "cpu", state: Optional[dict] = None):
        self.task, self.tok = task, tokenizer
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world
        self.device = torch.device(device)
        self.max_tokens = max(2048, seq_len + 1)
        self.cursor, self.epoch = rank, 0
        self.ids: list[int] = []
        self.mask: list[int] = []
        if len(task) == 0:
            raise ValueError("PackedChatLoader: the task mixture is empty")
        if state is not None:
            self.cursor, self.epoch = state["cursor"], state["epoch"]
            self.ids, self.mask = list(state["ids"]), list(state["mask"])

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "ids": list(self.ids), "mask": list(self.mask)}

    def _next_conversation(self) -> None:
        if self.cursor >= len(self.task):
            self.epoch += 1
            self.cursor = self.rank % len(self.task)
        ids, mask = self.tok.render_conversation(self.task[self.cursor], max_tokens=self.max_tokens)
        self.cursor += self.world
        self.ids.extend(ids)
        self.mask.extend(mask)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1
        while True:
            while len(self.ids) < need:
                self._next_conversation()
            ids = torch.tensor(self.ids[:need], dtype=torch.long)
            mask = torch.tensor(self.mask[1:need], dtype=torch.bool)
            # keep the last token: it is the next batch's first input (one continuous stream)
            del self.ids[:need - 1], self.mask[:need - 1]
            if mask.any():
                break
        x = ids[:-1].view(self.B, self.T)
        y = torch.where(mask, ids[1:], -1).view(self.B, self.T)
        return x.to(self.device), y.to(self.device)


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


class BestFitChatLoader:
    """nanochat 92d63d4's BOS-aligned best-fit packing of whole conversations into (B, T) rows.

    Each row holds T + 1 tokens: take the longest buffered conversation that fits the room
    left, until none fits; then pad the rest with BOS (targets -1). One difference from
    nanochat: a conversation is rendered at most T + 1 tokens long (truncated), so it always
    fits an empty row; nanochat's would never fit and pad rows forever.
    """

    def __init__(self, task: Task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world: int = 1,
                 device: Any = "cpu", state: Optional[dict] = None, buffer_size: int = 100):
        if len(task) == 0:
            raise ValueError("BestFitChatLoader: the task mixture is empty")
        self.task, self.tok = task, tokenizer
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.epoch, self.consumed = rank, 0, 0
        self.buffer: list[tuple[list[int], list[int]]] = []
        if state is not None:
            self.cursor, self.epoch, self.consumed = state["cursor"], state["epoch"], state["consumed"]
            self.buffer = [(list(i), list(m)) for i, m in state["buffer"]]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed,
                "buffer": [[i, m] for i, m in self.buffer]}

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            if self.cursor >= len(self.task):
                self.epoch += 1
                self.cursor %= len(self.task)
            ids, mask = self.tok.render_conversation(self.task[self.cursor], max_tokens=self.T + 1)
            self.buffer.append((ids, mask))
            self.cursor += self.world

    def next_rows(self) -> tuple[list[list[int]], list[list[int]]]:
        """B rows of T + 1 token ids and their loss masks (padding: BOS, mask 0)."""
        cap = self.T + 1
        rows, masks = [], []
        for _ in range(self.B):
            row: list[int] = []
            mrow: list[int] = []
            while len(row) < cap:
                self._refill()
                room = cap - len(row)
                best = max((i for i, (c, _) in enumerate(self.buffer) if len(c) <= room),
                           key=lambda i: (len(self.buffer[i][0]), -i), default=-1)
                if best < 0:
                    row += [self.bos] * room
                    mrow += [0] * room
                    break
                ids, mask = self.buffer.pop(best)
                row += ids
                mrow += mask
                self.consumed += self.world
            rows.append(row)
            masks.append(mrow)
        return rows, masks

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            rows, masks = self.next_rows()
            ids = torch.tensor(rows, dtype=torch.long)
            keep = torch.tensor(masks, dtype=torch.bool)[:, 1:]
            if keep.any():
                break
        x = ids[:, :-1]
        y = torch.where(keep, ids[:, 1:], -1)
        return x.contiguous().to(self.device), y.contiguous().to(self.device)


LOADERS = {"stream": PackedChatLoader, "pad": PaddedChatLoader, "bestfit": BestFitChatLoader}
