"""Prefix cache: keys/values of prompts already prefilled, reused by prompts that start the same way.

A chat client re-sends the whole conversation every turn, so turn N+1's prompt starts with turn
N's prompt. The scheduler stores every completed prompt's keys/values here (an entry), and a new
prompt starts its prefill after the longest stored prefix instead of at token 0.

Matching is by blocks of `block` tokens, as vLLM does: the index maps the hash of every
block-aligned prefix of an entry (tokens[:16], tokens[:32], ...) to the entry, so a lookup walks
the prompt's block prefixes and stops at the first miss. Entries only ever hold prefill-computed
keys/values (never decode-computed ones), so a reused prefix is bitwise what prefilling it again
would give.

Memory: entries live on the replica's device; `budget_bytes` bounds their total size and the
least recently used entries are evicted first. A budget of 0 disables the cache.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Entry:
    tokens: tuple[int, ...]
    k: torch.Tensor                    # (n_layer, n_kv_head, len, head_dim)
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16):
        if budget_bytes < 0 or block < 1:
            raise ValueError(f"PrefixCache(budget_bytes={budget_bytes}, block={block}): need budget >= 0, block >= 1")
        self.budget, self.block = budget_bytes, block
        self.entries: OrderedDict[int, Entry] = OrderedDict()   # id → entry, least recently used first
        self.index: dict[int, int] = {}                          # hash(block-aligned prefix) → entry id
        self.used = 0
        self._next = 0
        self.hits = self.misses = self.evictions = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def _prefix_keys(self, tokens) -> list[tuple[int, int]]:
        """(hash of tokens[:n], n) for every block-aligned n."""
        return [(hash(tuple(tokens[:n])), n) for n in range(self.block, len(tokens) + 1, self.block)]

    def lookup(self, tokens: list[int], limit: int) -> tuple[Optional[Entry], int]:
        """The entry holding the longest block-aligned prefix of `tokens` of at most `limit` tokens, and its length."""
        best: tuple[Optional[Entry], int] = (None, 0)
        if not self.enabled:
            return best
        eid_of = {}
        for key, n in self._prefix_keys(tokens[:limit]):
            eid = self.index.get(key)
            entry = self.entries.get(eid) if eid is not None else None
            if entry is None or list(entry.tokens[:n]) != tokens[:n]:   # a miss, or a hash collision
                break
            best, eid_of[id(entry)] = (entry, n), eid
        entry, n = best
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            self.reused_tokens += n
            self.entries.move_to_end(eid_of[id(entry)])
        return best

    def insert(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> bool:
        """Store a prompt's keys/values (copied); evict least recently used entries to stay in budget."""
        if not self.enabled or len(tokens) < self.block:
            return False
        entry = Entry(tuple(tokens), k.clone(), v.clone())
        if entry.nbytes > self.budget:
            return False
        while self.used + entry.nbytes > self.budget:
            self._evict()
        eid, self._next = self._next, self._next + 1
        self.entries[eid] = entry
        self.used += entry.nbytes
        for key, _ in self._prefix_keys(tokens):
            self.index[key] = eid          # newest entry wins a shared prefix
        return True

    def _evict(self) -> None:
        eid, entry = self.entries.popitem(last=False)
        self.used -= entry.nbytes
        self.evictions += 1
        for key, _ in self._prefix_keys(entry.tokens):
            if self.index.get(key) == eid:   # else a newer entry holds this prefix and keeps the key
                del self.index[key]

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.used, "budget_bytes": self.budget, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "reused_tokens": self.reused_tokens}
