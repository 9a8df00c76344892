"""Prefix cache: keys/values of prompts already prefilled, reused by prompts that start the same way.

A chat client re-sends the whole conversation every turn, so turn N+1's prompt starts with turn
N's prompt. The scheduler stores every completed prompt's keys/values here, and a new prompt
starts its prefill after the longest stored prefix instead of at token 0.

Storage is a pool of fixed-size blocks of `block` tokens (as vLLM's): block i of a prompt holds the
keys/values of tokens [16i, 16i + 16) and is found by (its parent block, its 16 tokens), so prompts
that share a beginning share its blocks, a new turn stores only its new blocks, and a lookup walks
the prompt block by block until the first miss (exact token comparison: no hash collisions). Only
whole blocks are kept. Blocks only ever hold prefill-computed keys/values (never decode-computed
ones), so a reused prefix is bitwise what prefilling it again would give.

Memory: the pool is allocated once, at the first insert, on the replica's device: `budget_bytes`
worth of blocks (pages are touched only as blocks fill). When it is full, the least recently used
block that no other block continues (a leaf) is evicted first. A budget under one block disables it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16):
        self.budget, self.block = budget_bytes, block
        self.k: Optional[torch.Tensor] = None   # (blocks, n_layer, n_kv_head, block, head_dim), made at the first insert
        self.v: Optional[torch.Tensor] = None
        self.index: dict[tuple[int, tuple[int, ...]], int] = {}   # (parent block or -1, its tokens) → block
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block → its index key
        self.children: dict[int, int] = {}                       # block → how many blocks continue it
        self.lru: OrderedDict[int, None] = OrderedDict()         # blocks in use, least recently used first
        self.free: list[int] = []
        self.block_bytes = 0
        self.hits = self.misses = self.evictions = self.reused_tokens = 0

    @property
    def used(self) -> int:
        return len(self.lru) * self.block_bytes

    def _blocks(self, tokens, limit: int):
        """The tokens of each whole block of tokens[:limit], in order."""
        B = self.block
        return [tuple(tokens[i:i + B]) for i in range(0, limit - B + 1, B)]

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        """The blocks holding the longest block-aligned prefix of `tokens` of at most `limit` tokens
        (len(result) * block tokens); read them with `read`."""
        if self.k is None:   # nothing stored yet, or off
            return []
        found = self._stored(self._blocks(tokens, min(limit, len(tokens))))
        if found:
            self.hits += 1
            self.reused_tokens += len(found) * self.block
        else:
            self.misses += 1
        return found

    def _stored(self, chunks: list[tuple[int, ...]]) -> list[int]:
        """The blocks that hold the leading `chunks` of a prompt (as many as are stored), marked used."""
        found, parent = [], -1
        for chunk in chunks:
            bid = self.index.get((parent, chunk))
            if bid is None:
                break
            found.append(bid)
            self.lru.move_to_end(bid)   # parents before children: a leaf is never older than its parent
            parent = bid
        return found

    def read(self, blocks: list[int], k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Copy `blocks` (at least one) into k_out/v_out (n_layer, n_kv_head, len(blocks) * block, head_dim) views."""
        idx = torch.tensor(blocks, device=self.k.device)
        for pool, out in ((self.k, k_out), (self.v, v_out)):
            out.unflatten(2, (len(blocks), self.block)).copy_(pool[idx].permute(1, 2, 0, 3, 4))

    def insert(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> int:
        """Store the whole blocks of a prompt whose keys/values are k, v (n_layer, n_kv_head, len, head_dim);
        blocks already stored are shared. Returns how many blocks were added."""
        if self.k is None and not self._allocate(k):   # off: not even one block fits the budget
            return 0
        chunks = self._blocks(tokens, len(tokens))
        path = self._stored(chunks)                # the stored part: a prefix of the prompt's blocks
        parent, new = (path[-1] if path else -1), []
        for chunk in chunks[len(path):]:
            bid = self._take(protect=path + new)
            if bid is None:                        # the pool is smaller than this prompt: keep what fits
                break
            key = (parent, chunk)
            self.index[key], self.key_of[bid], self.children[bid] = bid, key, 0
            if parent >= 0:
                self.children[parent] += 1
            self.lru[bid] = None
            new.append(bid)
            parent = bid
        if new:
            start, B = len(path) * self.block, self.block
            idx = torch.tensor(new, device=self.k.device)
            for pool, src in ((self.k, k), (self.v, v)):
                pool[idx] = src[:, :, start:start + len(new) * B].unflatten(2, (len(new), B)).permute(2, 0, 1, 3, 4)
        return len(new)

    def _allocate(self, like: torch.Tensor) -> bool:
        L, H, _, D = like.shape
        self.block_bytes = 2 * L * H * self.block * D * like.element_size()
        n = self.budget // self.block_bytes
        if n == 0:
            self.budget = 0       # not even one block fits: off
            return False
        self.k = torch.empty(n, L, H, self.block, D, dtype=like.dtype, device=like.device)
        self.v = torch.empty_like(self.k)
        self.free = list(range(n - 1, -1, -1))
        return True

    def _take(self, protect: list[int]) -> Optional[int]:
        """A free block, evicting the least recently used leaf if none is free (never one in `protect`)."""
        if self.free:
            return self.free.pop()
        keep = set(protect)
        victim = next((b for b in self.lru if self.children[b] == 0 and b not in keep), None)
        if victim is None:
            return None
        del self.lru[victim]
        parent, _ = key = self.key_of.pop(victim)
        del self.index[key], self.children[victim]
        if parent >= 0:
            self.children[parent] -= 1
        self.evictions += 1
        return victim

    def stats(self) -> dict:
        return {"blocks": len(self.lru), "bytes": self.used, "budget_bytes": self.budget, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "reused_tokens": self.reused_tokens}
