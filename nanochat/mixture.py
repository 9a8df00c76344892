"""Pretraining on a weighted mixture of corpora: `data=mixture`.

    data.mixture: {web: {name: climbmix, weight: 0.8}, mine: {name: local, path: /data/x, weight: 0.2}}

Each source is one of the other data options (`name`) with that option's own keys and a
`weight`. Weights are normalised and are shares of the training tokens, so a sweep may vary one
(`-m data.mixture.code.weight=0.1,0.2`). A weight of 0 keeps a source out of training but still
evaluated (a held-out distribution).

Loading: a loader stream (slot j of rank r is stream r + world·j of world·accum, as for one
corpus) reads each source exactly as the one-corpus loader would read it alone, and takes the
next document from the source furthest behind its share of the tokens drawn so far, with a
jitter of at most one row, seeded by (run seed, split, stream): deterministic, the same stream
for any world size and accumulation, and within a row of the weights at every point. A small
source starts its next epoch on its own. Packing is unchanged. The saved position is every
source's last document plus the token counts, so resume is exact.

Also here: the config checks, the plan rows (tokens and epochs per source), the tokenizer's
text stream (characters by weight) and validation bpb per source with the weighted total.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
from pathlib import Path
from typing import Callable, Iterator

from nanochat.config import Config, ConfigError, DataConfig, _build

OPTIONS = ("demo", "fineweb_edu", "climbmix", "hub", "local")
SOURCE_KEYS = ("path", "repo", "revision", "num_shards", "max_shard", "val_shard", "download_workers",
               "demo_chars", "val_fraction")
# shared by every source: one tokenizer, one packing
INHERITED = ("tokenizer", "packing", "tokenizer_threads", "tokenizer_batch_size", "download_workers")
EXAMPLE = "data.mixture='{web: {name: demo, weight: 0.8}, mine: {name: local, path: /data/x, weight: 0.2}}'"


# --------------------------------------------------------------------------- config

def check_mixture(data: DataConfig) -> None:
    """ConfigError for a malformed mixture: no sources, an unknown option or key, a bad weight."""
    m = data.mixture
    if data.source != "mixture":
        raise ConfigError("data.mixture", m, "use data=mixture to train on a mixture, or drop data.mixture",
                          f"a mixture under data.source={data.source}")
    if not isinstance(m, dict) or not m:
        raise ConfigError("data.mixture", m, f"name the sources, e.g. {EXAMPLE}", "no sources")
    for src, entry in m.items():
        key = f"data.mixture.{src}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(src)):
            raise ConfigError(key, entry, "name sources with letters, digits, _ . - (they name metrics)", "bad name")
        if not isinstance(entry, dict):
            raise ConfigError(key, entry, "give {name: <data option>, weight: <w>, <option keys>}", "expected a mapping")
        if entry.get("name") not in OPTIONS:
            raise ConfigError(f"{key}.name", entry.get("name"), f"use one of: {', '.join(OPTIONS)}", "unknown data option")
        w = entry.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{key}.weight", w, "give each source a weight >= 0 (weights are normalised)",
                              "missing or negative weight")
        for k in entry:
            if k not in ("name", "weight") + SOURCE_KEYS:
                close = difflib.get_close_matches(k, SOURCE_KEYS, n=1)
                raise ConfigError(f"{key}.{k}", entry[k], f"did you mean {key}.{close[0]}?" if close else
                                  f"a source takes name, weight and: {', '.join(SOURCE_KEYS)}", "unknown source option")
    if sum(e["weight"] for e in m.values()) <= 0:
        raise ConfigError("data.mixture", {s: e["weight"] for s, e in m.items()},
                          "give at least one source a positive weight", "all weights are zero")
    source_configs(data)  # the option keys' types


def source_configs(data: DataConfig) -> dict[str, DataConfig]:
    """{source name: that source alone as a DataConfig} (tokenizer and packing from the mixture)."""
    inherited = {k: getattr(data, k) for k in INHERITED}
    return {str(src): _build(DataConfig, {**inherited, **{k: v for k, v in entry.items() if k in SOURCE_KEYS},
                                          "name": str(src), "source": entry["name"]}, f"data.mixture.{src}")
            for src, entry in data.mixture.items()}


def weights(data: DataConfig) -> dict[str, float]:
    total = sum(float(e["weight"]) for e in data.mixture.values())
    return {str(s): float(e["weight"]) / total for s, e in data.mixture.items()}


# --------------------------------------------------------------------------- the loader's documents

class MixedDocs:
    """The loader's documents for a mixture (dataloader._Pipeline.docs), drawn from one
    single-source pipeline per source (`subs`, in data.mixture order).

    A position is (source index, draws so far, tokens drawn per source, last position per source),
    all counted after the document; a buffered document is saved as (source, its position) only.
    """

    def __init__(self, data_cfg: DataConfig, subs: list, seq_len: int, split: str, rank: int, world_size: int,
                 seed: int):
        w = weights(data_cfg)  # in data.mixture order
        self.names, self.w, self.subs = list(w), list(w.values()), subs
        self.key = f"{seed}/{split}/{rank}/{world_size}"
        self.span = seq_len + 1  # jitter: one row of tokens
        # bestfit uses at most a row of a long document, and its crops report what they cut
        # (`cropped`): the counts are tokens in rows plus tokens waiting in the buffer
        self.cap = seq_len + 1 if data_cfg.packing == "bestfit" else None
        self.counts: list[int] = []

    def iter_docs(self, start: tuple | None, inclusive: bool, stop) -> Iterator[tuple[tuple, list[int]]]:
        K = len(self.subs)
        n, counts, lasts = (0, [0] * K, [None] * K) if start is None else (start[1], list(start[2]), list(start[3]))
        self.counts = counts  # set now (not at the first draw): a restored bestfit buffer may crop first
        return self._draw(start if start is not None and inclusive else None, n, counts, lasts, stop)

    def _draw(self, head: tuple | None, n: int, counts: list[int], lasts: list, stop) -> Iterator[tuple]:
        if head is not None:  # stream packing resumes at its head document
            yield head, self.subs[head[0]].read_docs([lasts[head[0]]])[0]
        its = [sub.iter_docs(q, inclusive=q is None, stop=stop) for q, sub in zip(lasts, self.subs)]
        live = [k for k in range(len(self.subs)) if self.w[k] > 0]
        while True:
            d = hashlib.shake_128(f"{self.key}/{n}".encode()).digest(4 * len(self.subs))  # jitter in [0, 1)
            u = [int.from_bytes(d[4 * k:4 * k + 4], "little") / 2 ** 32 for k in range(len(self.subs))]
            k = min(live, key=lambda k: (counts[k] + self.span * u[k]) / self.w[k])
            nxt = next(its[k], None)
            if nxt is None:  # finite epochs (max_epochs) or a stop: the first source to end ends the mixture
                return
            p, toks = nxt
            n += 1
            counts[k] += len(toks) if self.cap is None else min(len(toks), self.cap)
            lasts[k] = p
            yield (k, n, tuple(counts), tuple(lasts)), toks

    def cropped(self, p: tuple, length: int, kept: int) -> None:
        self.counts[p[0]] -= min(length, self.cap) - kept

    def cursor(self, p: tuple) -> tuple:
        return (p[0], p[1], tuple(self.counts), p[3])

    @staticmethod
    def _ref(p: tuple) -> tuple:
        return (p[0], p[3][p[0]]) if len(p) == 4 else p

    def read_docs(self, positions: list) -> list[list[int]]:
        refs = [self._ref(p) for p in positions]
        found = {}
        for k, sub in enumerate(self.subs):  # each source reads its own documents at once
            qs = [q for j, q in refs if j == k]
            found.update(zip([(k, q) for q in qs], sub.read_docs(qs)))
        return [found[r] for r in refs]

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"data loader state refers to source {name!r}, which is not in data.mixture "
                             f"({', '.join(self.names)}) any more")
        return self.names.index(name)

    def pos_out(self, p: tuple, ref: bool = False):
        if ref:
            k, q = self._ref(p)
            return [self.names[k], self.subs[k].pos_out(q)]
        k, n, counts, lasts = p
        return {"source": self.names[k], "n": n, "tokens": dict(zip(self.names, counts)),
                "after": {m: None if q is None else s.pos_out(q) for m, s, q in zip(self.names, self.subs, lasts)}}

    def pos_in(self, d):
        if isinstance(d, list):
            k = self._index(d[0])
            return (k, self.subs[k].pos_in(d[1]))
        for name in list(d["after"]) + [d["source"]]:
            self._index(name)
        lasts = tuple(None if d["after"].get(m) is None else s.pos_in(d["after"][m]) for m, s in zip(self.names, self.subs))
        return (self._index(d["source"]), int(d["n"]), tuple(int(d["tokens"].get(m, 0)) for m in self.names), lasts)

    def epoch_of(self, p: tuple) -> int:
        return self._ref(p)[1][0]


# --------------------------------------------------------------------------- tokenizer text

def iter_mixed_texts(data: DataConfig, base_dir, split: str, max_chars: int | None,
                     doc_cap: int | None) -> Iterator[str]:
    """Documents of all sources interleaved by weight in characters, up to max_chars; the first
    source to run out ends the stream (so the proportions hold over all of it)."""
    from nanochat.dataset import iter_texts
    cfgs, w = source_configs(data), weights(data)
    live = [s for s in cfgs if w[s] > 0]
    its = {s: iter_texts(cfgs[s], base_dir, split, doc_cap=doc_cap) for s in live}
    chars, total = dict.fromkeys(live, 0), 0
    while max_chars is None or total < max_chars:
        s = min(live, key=lambda s: chars[s] / w[s])
        text = next(its[s], None)
        if text is None:
            return
        text = text if max_chars is None else text[:max_chars - total]
        chars[s] += len(text)
        total += len(text)
        yield text


# --------------------------------------------------------------------------- plan

def _train_tokens(c: DataConfig, base_dir: Path, tokenizer, cap: int | None,
                  sample_bytes: int = 200_000) -> float | None:
    """≈ tokens of a source's train split, from its shards on disk (parquet metadata) at the bytes per
    token of a sample; None when nothing is on disk. Raises ValueError/FileNotFoundError without data.
    `cap`: bestfit uses at most a row (cap tokens) of a document, so a pass over the source yields less."""
    from nanochat.dataset import TEXT_COLUMN, list_shards, open_shard, read_texts
    for split in ("val", "train"):  # both must exist (val: per-source evaluation); size the train split
        paths = list_shards(c, base_dir, split, download=False)
    on_disk = [open_shard(p) for p in paths if p.is_file()]
    if not on_disk or tokenizer is None:
        return None
    col = on_disk[0].schema_arrow.names.index(TEXT_COLUMN)
    size = sum(md.row_group(g).column(col).total_uncompressed_size - 4 * md.row_group(g).num_rows  # 4: lengths
               for md in (pf.metadata for pf in on_disk) for g in range(md.num_row_groups))
    texts: list[str] = []
    for g in range(on_disk[0].num_row_groups):
        texts += [t for t in read_texts(on_disk[0], g) if t]
        if sum(len(t) for t in texts) >= sample_bytes:
            break
    lens = [len(t) + 1 for t in tokenizer.encode(texts)]  # + a BOS per document
    usable = sum(lens) if cap is None else sum(min(n, cap) for n in lens)
    return size * len(paths) / len(on_disk) * usable / max(1, sum(len(t.encode()) for t in texts))


def plan_rows(cfg: Config, train_tokens: int | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(rows, warnings) for the plan: each source's weight, tokens and epochs.

    Raises ConfigError before any run dir when a source has no data, or would repeat more than
    data.max_epochs. A hub source whose listing is not pinned yet has an unknown size (no network
    in a plan; the loader fetches on first use).
    """
    from nanochat.common import get_base_dir
    from nanochat.dataset import REMOTE_SOURCES, _manifest_path
    from nanochat.tokenizer import get_tokenizer
    base = get_base_dir(cfg.paths.base_dir)
    try:
        tok = get_tokenizer(base, cfg.data.tokenizer)
    except FileNotFoundError:
        tok = None
    w, rows, notes = weights(cfg.data), [], []
    for name, c in source_configs(cfg.data).items():
        key = f"data.mixture.{name}"
        try:
            pinned = c.source not in REMOTE_SOURCES or _manifest_path(c, base).is_file()
            cap = cfg.model.sequence_len + 1 if cfg.data.packing == "bestfit" else None
            src_tokens = _train_tokens(c, base, tok, cap) if pinned else None
        except (ValueError, FileNotFoundError) as e:
            sub = {"local": ".path", "hub": ".repo"}.get(c.source, "")
            raise ConfigError(key + sub, getattr(c, sub[1:]) if sub else c.source,
                              "point the source at a corpus with train and val documents", f"no data: {e}") from None
        row = " ".join(filter(None, [c.source, c.path or c.repo])) + f" · weight {w[name]:.3f}"
        if train_tokens is not None:
            row += f" · {round(w[name] * train_tokens):,} tokens"
        if src_tokens is None:
            row += " · source size unknown" + ("" if tok else f" (no tokenizer {cfg.data.tokenizer!r} yet)")
        else:
            row += f" · source ≈{src_tokens:,.0f} tokens" + (" (≤ a row per document)" if cap else "")
        if src_tokens and train_tokens is not None and w[name] > 0:
            epochs = w[name] * train_tokens / src_tokens
            row += f" = ≈{epochs:.2f} epochs"
            if cfg.data.max_epochs is not None and epochs > cfg.data.max_epochs:
                raise ConfigError(f"{key}.weight", cfg.data.mixture[name]["weight"],
                                  f"lower its weight, give it more data, train fewer tokens, or raise "
                                  f"data.max_epochs={cfg.data.max_epochs:g}",
                                  f"source {name} would repeat ≈{epochs:.1f} times (≈{src_tokens:,.0f} tokens)")
            if epochs > 1:
                notes.append(f"warning: source {name} repeats: ≈{epochs:.2f} epochs of it")
        rows.append((f"source {name}", row))
    return rows, notes


# --------------------------------------------------------------------------- evaluation

def val_bpb(data: DataConfig, evaluate: Callable[[DataConfig, int], float],
            tokens: int) -> tuple[dict[str, float], float]:
    """({source: val bpb on its own val split}, total). One corpus: ({}, its bpb). A mixture: each
    source gets an equal share of `tokens`; the total weighs the sources by the mixture weights."""
    if data.source != "mixture":
        return {}, evaluate(data, tokens)
    cfgs, w = source_configs(data), weights(data)
    by_source = {name: evaluate(c, max(1, tokens // len(cfgs))) for name, c in cfgs.items()}
    return by_source, sum(w[n] * by_source[n] for n in by_source)

