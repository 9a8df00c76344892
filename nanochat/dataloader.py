"""Distributed pretraining loader: parquet row groups → tokens → (inputs, targets) batches.

Each rank reads disjoint documents: within every shard, rank r takes row groups
r, r+W, r+2W, ... (W = world size); a shard with fewer row groups than ranks is
split by document instead (doc i goes to rank i % W), so small val splits still
feed every rank. Documents are tokenized with BOS prepended in a background thread,
which also packs the batches, so `next()` in the training loop only dequeues.

Packing (`data.packing`):
  stream   concatenate documents, cut B·(T+1)-token windows (nanochat's seed loader):
           every token is used, rows may start mid-document
  bestfit  BOS-aligned best fit (nanochat's later loader): every row starts with a
           document; fill the row with the largest buffered doc that fits, crop the
           shortest only when none fits. No padding (100% utilization)

Exact resume: the state names documents by position (epoch, shard, row group, doc),
never by tokens, so it is small JSON. stream keeps (first doc still in the token
buffer, offset into it); bestfit keeps (last doc read, the docs waiting in the buffer).
A loader built from `state_dict()` yields exactly the batches the original would have.

Documents come from `_Pipeline.docs`: the pipeline itself for one corpus; for data=mixture,
`nanochat.mixture.MixedDocs` over one such pipeline per source (its positions, its resume state).
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from nanochat.common import get_base_dir
from nanochat.config import DataConfig
from nanochat.dataset import ensure_shard, list_shards, open_shard, read_texts, shards_on_disk

STATE_VERSION = 1
PREFETCH = 4  # batches the background thread prepares ahead
_END = object()

Pos = tuple  # (epoch, shard_index, row_group, doc_in_row_group)


class DataLoader:
    """Iterable of (inputs, targets) int64 tensors of shape (batch_size, seq_len) on `device`."""

    def __init__(self, data_cfg: DataConfig, tokenizer: Any, batch_size: int, seq_len: int,
                 split: str = "train", rank: int = 0, world_size: int = 1, device: Any = "cpu",
                 base_dir: str | Path | None = None, state: dict | None = None,
                 buffer_size: int = 1000, max_epochs: int | None = None, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: both must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if data_cfg.packing not in ("stream", "bestfit"):
            raise ValueError(f"data.packing={data_cfg.packing!r}: use stream or bestfit")
        base_dir = get_base_dir(None) if base_dir is None else Path(base_dir).expanduser()
        self._pipe = _Pipeline(data_cfg, tokenizer, batch_size, seq_len, split, rank, world_size, torch.device(device),
                               base_dir, buffer_size, max_epochs, seed)
        # what a saved state must match: exact resume needs the same stream of documents and rows
        self._identity = {"version": STATE_VERSION, "split": split, "rank": rank, "world_size": world_size,
                          "packing": data_cfg.packing, "batch_size": batch_size, "seq_len": seq_len,
                          "buffer_size": buffer_size, "vocab_size": tokenizer.get_vocab_size()}
        self._state: dict = self._convert({}, out=False)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self.batches_yielded = 0
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ public
    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:  # (re)start from the current state (a stopped loader has a fresh _stop)
            self._queue = queue.Queue(maxsize=PREFETCH)
            # the thread holds only the pipeline, never this object: an unreferenced loader is
            # garbage collected and its __del__ stops the thread
            self._thread = threading.Thread(target=self._pipe.produce, args=(self._state, self._stop, self._queue),
                                            name=f"dataloader-{self._pipe.split}-r{self._pipe.rank}", daemon=True)
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("data loader thread died without a result")
        if item is _END:
            self._queue.put(_END)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise RuntimeError(f"data loader ({self._pipe.split}, rank {self._pipe.rank}) failed: {item}") from item
        inputs, targets, self._state = item
        self.batches_yielded += 1
        return inputs.to(self._pipe.device, non_blocking=True), targets.to(self._pipe.device, non_blocking=True)

    def state_dict(self) -> dict:
        """JSON-serializable state after the last batch returned by `next()`."""
        return {**self._identity, "batches": self.batches_yielded, **self._convert(self._state, out=True)}

    def load_state_dict(self, d: dict) -> None:
        """Continue exactly after the batch at which `d` was taken (same rank/world/packing/shape)."""
        for k, v in self._identity.items():
            if d.get(k) != v:
                raise ValueError(f"data loader state has {k}={d.get(k)!r} but this loader has {k}={v!r}; "
                                 "exact resume needs the same split, rank, world size, packing, batch shape "
                                 "and tokenizer (or start the loader fresh)")
        self.close()
        self._state = self._convert(d, out=False)
        self.batches_yielded = int(d.get("batches", 0))

    def close(self) -> None:
        """Stop the background thread (idempotent). Iterating again restarts from the current state."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        self._thread, self._queue = None, None
        self._stop = threading.Event()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a loader whose __init__ failed has no _stop
            self._stop.set()

    # ------------------------------------------------------------------ state
    def _convert(self, st: dict, out: bool) -> dict:
        """The packer's state to its saved form (`out`) or back; {} → a fresh start. Positions hold shard
        indices internally; the saved state names shards by file name (buffered docs as references)."""
        docs = self._pipe.docs
        one, ref = ((docs.pos_out, lambda p: docs.pos_out(p, ref=True)) if out else (docs.pos_in, docs.pos_in))
        key = "head" if self._pipe.cfg.packing == "stream" else "after"
        res = {"epoch": int(st.get("epoch", 0)), key: None if st.get(key) is None else one(st[key])}
        if key == "head":  # stream: tokens of the head document already used
            res["offset"] = int(st.get("offset", 0))
        else:  # bestfit: the documents waiting in the buffer (a mixture's cursor only for `after`)
            res["buffer"] = [ref(p) for p in st.get("buffer", [])]
        return res


class _Pipeline:
    """Everything the background thread needs (config, shards, tokenizer), without the loader."""

    def __init__(self, data_cfg: DataConfig, tokenizer: Any, batch_size: int, seq_len: int, split: str,
                 rank: int, world_size: int, device: torch.device, base_dir: Path, buffer_size: int,
                 max_epochs: int | None, seed: int = 0):
        self.cfg, self.tokenizer = data_cfg, tokenizer
        self.B, self.T = batch_size, seq_len
        self.split, self.rank, self.world = split, rank, world_size
        self.device, self.base_dir = device, base_dir
        self.buffer_size, self.max_epochs = buffer_size, max_epochs
        self.bos = tokenizer.get_bos_token_id()
        self.docs = self  # where documents come from: this corpus, or a mixture of single-corpus pipelines
        if data_cfg.source == "mixture":
            from nanochat.mixture import MixedDocs, source_configs
            subs = [_Pipeline(c, tokenizer, batch_size, seq_len, split, rank, world_size, device, base_dir,
                              buffer_size, max_epochs) for c in source_configs(data_cfg).values()]
            self.docs = MixedDocs(data_cfg, subs, seq_len, split, rank, world_size, seed)
            return
        self.paths = list_shards(data_cfg, base_dir, split, download=False)
        self.names = [p.name for p in self.paths]
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError(f"data source {data_cfg.name!r} has two shards with the same file name; "
                             "rename them (the loader state refers to shards by name)")

    # ------------------------------------------------------------------ positions in the saved state
    def pos_out(self, p: Pos, ref: bool = False) -> list:
        """A position as JSON, naming its shard by file name (`ref`: a buffered doc, same here)."""
        return [p[0], self.names[p[1]], p[2], p[3]]

    def pos_in(self, p: list) -> Pos:
        epoch, name, rg, doc = p
        if name not in self._index:
            raise ValueError(f"data loader state refers to shard {name!r}, which is not in the "
                             f"{self.split} split of data {self.cfg.name!r} any more")
        return (int(epoch), self._index[name], int(rg), int(doc))

    def epoch_of(self, p: Pos) -> int:
        return p[0]

    def cropped(self, p: Pos, length: int, kept: int) -> None:
        """bestfit kept `kept` of the `length` tokens of document `p` (a mixture counts what reaches rows)."""

    def cursor(self, p: Pos) -> Pos:
        """The resume position after document `p`, taken at a batch boundary."""
        return p

    # ------------------------------------------------------------------ documents
    def rank_units(self, pf) -> list[tuple[int, Sequence[int]]]:
        """(row group, doc indices) this rank owns in one shard."""
        rows = [pf.metadata.row_group(rg).num_rows for rg in range(pf.num_row_groups)]
        if len(rows) >= self.world:
            return [(rg, range(rows[rg])) for rg in range(self.rank, len(rows), self.world)]
        first = [0, *itertools.accumulate(rows)]  # fewer row groups than ranks: stride documents across the shard
        units = [(rg, [i for i in range(n) if (first[rg] + i) % self.world == self.rank]) for rg, n in enumerate(rows)]
        return [(rg, docs) for rg, docs in units if docs]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.cfg.tokenizer_threads)

    def iter_docs(self, start: Pos | None, inclusive: bool, stop: threading.Event) -> Iterator[tuple[Pos, list[int]]]:
        """(position, tokens) of this rank's documents in order, from `start` on, epoch after epoch."""
        start = start or (0, 0, 0, 0)
        epoch = start[0]
        nb = max(1, self.cfg.tokenizer_batch_size)
        while self.max_epochs is None or epoch < self.max_epochs:
            whole_epoch = epoch > start[0] or start[1:] == (0, 0, 0)
            got_any = False
            first = start[1] if epoch == start[0] else 0
            # a remote shard is fetched with the next one in the background, while this one is read
            for si, path in shards_on_disk(self.cfg, self.base_dir, self.paths, first, ahead=2):
                pf = open_shard(path)
                for rg, idx in self.rank_units(pf):
                    if stop.is_set():
                        return
                    if (epoch, si, rg) < start[:3]:
                        continue
                    texts = read_texts(pf, rg)
                    keep = [i for i in idx if texts[i]
                            and ((epoch, si, rg, i) > start or (inclusive and (epoch, si, rg, i) == start))]
                    for k in range(0, len(keep), nb):
                        chunk = keep[k:k + nb]
                        for i, toks in zip(chunk, self.encode([texts[i] for i in chunk])):
                            got_any = True
                            yield (epoch, si, rg, i), toks
            if whole_epoch and not got_any:
                raise ValueError(f"rank {self.rank} of {self.world} gets no documents from the {self.split} "
                                 f"split of data {self.cfg.name!r} ({len(self.paths)} shard(s)): the corpus "
                                 "is empty or too small for this many ranks")
            epoch += 1

    def read_docs(self, positions: list[Pos]) -> list[list[int]]:
        """Tokens of specific documents (restoring bestfit's buffer), in the order given."""
        found: dict[tuple[int, int, int], list[int]] = {}
        for si, rg in sorted({p[1:3] for p in positions}):  # each row group read once, its docs encoded at once
            texts = read_texts(open_shard(ensure_shard(self.cfg, self.base_dir, self.paths[si])), rg)
            uniq = sorted({p[3] for p in positions if p[1:3] == (si, rg)})
            found.update(zip([(si, rg, i) for i in uniq], self.encode([texts[i] for i in uniq])))
        return [found[p[1:]] for p in positions]

    # ------------------------------------------------------------------ packing
    def stream_batches(self, state: dict, stop: threading.Event) -> Iterator[tuple]:
        B, T = self.B, self.T
        need = B * T + 1
        docs = self.docs.iter_docs(state["head"], inclusive=True, stop=stop)
        buf: list[int] = []
        spans: deque = deque()  # [pos, tokens consumed from this doc, doc length] for docs in buf
        head, offset = state["head"], state["offset"]  # a restored state: skip what its head doc used
        while True:
            while len(buf) < need:
                if (nxt := next(docs, None)) is None:
                    return
                pos, toks = nxt
                if head is not None and pos != head:
                    raise ValueError(f"cannot resume: document {head} is gone from the data "
                                     "(did the shards change since the checkpoint?)")
                toks = toks[offset:]
                spans.append([pos, offset, offset + len(toks)])
                buf.extend(toks)
                head, offset = None, 0
            arr = torch.tensor(buf[:need], dtype=torch.long)
            del buf[:B * T]
            n = B * T
            while spans[0][2] - spans[0][1] <= n:  # documents this batch used up
                n -= spans[0][2] - spans[0][1]
                spans.popleft()
            spans[0][1] += n
            new_state = {"epoch": self.docs.epoch_of(spans[0][0]), "head": spans[0][0], "offset": spans[0][1]}
            # separate storage for inputs and targets: in-place edits of one must not touch the other
            yield arr[:-1].view(B, T).clone(), arr[1:].view(B, T).clone(), new_state

    def bestfit_batches(self, state: dict, stop: threading.Event) -> Iterator[tuple]:
        B, T = self.B, self.T
        cap = T + 1
        # the buffer, (length, arrival, position, tokens) kept sorted: best fit and shortest are bisections
        buf: list[tuple[int, int, Pos, list[int]]] = []
        arrivals = itertools.count()
        for pos, toks in zip(state["buffer"], self.docs.read_docs(state["buffer"])):
            bisect.insort(buf, (len(toks), next(arrivals), pos, toks))
        # a fresh start includes the first document (position (0, 0, 0, 0) is a document, not "before" one)
        docs = self.docs.iter_docs(state["after"], inclusive=state["after"] is None, stop=stop)
        last = state["after"]
        while True:
            rows = np.empty((B, cap), dtype=np.int64)
            for r in range(B):
                filled = 0
                while filled < cap:
                    for last, toks in itertools.islice(docs, max(0, self.buffer_size - len(buf))):  # refill
                        bisect.insort(buf, (len(toks), next(arrivals), last, toks))
                    if not buf:
                        return  # finite epochs ran out: drop the partial batch
                    remaining = cap - filled
                    j = bisect.bisect_right(buf, (remaining, float("inf"))) - 1
                    if j >= 0:  # largest doc that fits; among equal lengths the earliest
                        toks = buf.pop(bisect.bisect_left(buf, (buf[j][0], -1)))[3]
                        rows[r, filled:filled + len(toks)] = toks
                        filled += len(toks)
                    else:       # nothing fits: crop the shortest to fill the row exactly
                        _, _, pos, toks = buf.pop(0)
                        rows[r, filled:] = toks[:remaining]
                        self.docs.cropped(pos, len(toks), remaining)
                        filled = cap
            new_state = {"epoch": self.docs.epoch_of(last) if last else 0,
                         "after": self.docs.cursor(last) if last else None,
                         "buffer": [e[2] for e in sorted(buf, key=lambda e: e[1])]}  # in arrival order
            t = torch.from_numpy(rows)
            yield t[:, :-1], t[:, 1:], new_state

    def produce(self, state: dict, stop: threading.Event, q: queue.Queue) -> None:
        """Thread body: run the packer from `state`, queue (inputs, targets, state after)."""
        gen = self.stream_batches if self.cfg.packing == "stream" else self.bestfit_batches
        pin = self.device.type == "cuda"

        def put(item) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    q.put(item, timeout=0.1)
                    return True
            return False

        try:
            for inputs, targets, new_state in gen(state, stop):
                inputs, targets = inputs.contiguous(), targets.contiguous()
                if pin:
                    inputs, targets = inputs.pin_memory(), targets.pin_memory()
                if not put((inputs, targets, new_state)):
                    return
            put(_END)
        except BaseException as e:  # surfaced in the training thread by __next__
            put(e)
