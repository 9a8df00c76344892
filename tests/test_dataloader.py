"""The distributed loader: packing, exact resume, rank disjointness, epochs, errors."""
from __future__ import annotations

import gc
import json
import threading

import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import shared_data_dir
from nanochat.config import DataConfig
from nanochat.dataloader import DataLoader
from nanochat.dataset import iter_texts, list_shards, write_shard
from nanochat.tokenizer import train_tokenizer

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data (offline public datasets) is absent")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("base")


@pytest.fixture(scope="module")
def demo_cfg():
    return DataConfig(demo_chars=300_000, val_fraction=0.05)


@pytest.fixture(scope="module")
def tok(base, demo_cfg):
    return train_tokenizer(iter_texts(demo_cfg, base, "train"), 1024)


def _cfg(demo_cfg, **kw) -> DataConfig:
    d = dict(demo_cfg.__dict__)
    d.update(kw)
    return DataConfig(**d)


def _take(loader, n):
    return [tuple(t.clone() for t in next(loader)) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _rank_docs(tok, cfg, base, split, rank, world, epochs=1):
    """The (position, tokens) stream a rank reads: the unit both packings consume."""
    dl = DataLoader(cfg, tok, 1, 8, split, rank=rank, world_size=world, base_dir=base, max_epochs=epochs)
    return list(dl._pipe.iter_docs(None, inclusive=True, stop=threading.Event()))


# ---------------------------------------------------------------------- stream packing

def test_stream_batches_are_the_token_stream(tok, demo_cfg, base):
    B, T = 3, 64
    dl = DataLoader(demo_cfg, tok, B, T, "train", base_dir=base)
    batches = _take(dl, 5)
    dl.close()
    x, y = batches[0]
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    # the expected stream, computed independently: BOS + tokens of each document, in order
    stream = []
    for text in iter_texts(demo_cfg, base, "train"):
        stream += [tok.get_bos_token_id()] + tok.encode(text)
        if len(stream) > 5 * B * T + 1:
            break
    for k, (x, y) in enumerate(batches):
        window = torch.tensor(stream[k * B * T: (k + 1) * B * T + 1])
        assert torch.equal(x.flatten(), window[:-1]) and torch.equal(y.flatten(), window[1:])


@pytest.mark.parametrize("packing", ["stream", "bestfit"])
@pytest.mark.parametrize("cut", [1, 7])
def test_exact_resume(tok, demo_cfg, base, packing, cut):
    cfg = _cfg(demo_cfg, packing=packing)
    kw = dict(batch_size=4, seq_len=96, split="train", base_dir=base, buffer_size=64)
    ref = DataLoader(cfg, tok, **kw)
    before = _take(ref, cut)
    state = json.loads(json.dumps(ref.state_dict()))  # must survive JSON (checkpoint files)
    after = _take(ref, 12)
    ref.close()
    resumed = DataLoader(cfg, tok, state=state, **kw)
    assert _same(_take(resumed, 12), after)
    # resume twice in a row (checkpoint, resume, checkpoint, resume)
    state2 = resumed.state_dict()
    tail = _take(resumed, 3)
    resumed.load_state_dict(state2)
    assert _same(_take(resumed, 3), tail)
    resumed.close()
    assert before  # the reference really advanced before the snapshot


@pytest.mark.parametrize("packing", ["stream", "bestfit"])
def test_exact_resume_across_epochs_two_ranks(tok, base, packing, tmp_path):
    # a tiny corpus: 30 docs, so a few batches wrap around several epochs
    texts = [f"doc {i}: " + "the cat sat on the mat " * (5 + i % 7) for i in range(30)]
    write_shard(tmp_path / "a.parquet", texts[:20], row_group_size=4)
    write_shard(tmp_path / "b.parquet", texts[20:], row_group_size=4)
    cfg = DataConfig(name="tiny", source="local", path=str(tmp_path / "*.parquet"), packing=packing)
    for rank in (0, 1):
        kw = dict(batch_size=2, seq_len=32, split="train", rank=rank, world_size=2, base_dir=base, buffer_size=8)
        ref = DataLoader(cfg, tok, **kw)
        _take(ref, 30)
        state = ref.state_dict()
        assert state["epoch"] >= 1  # we are past the first epoch
        after = _take(ref, 10)
        ref.close()
        assert _same(_take(DataLoader(cfg, tok, state=state, **kw), 10), after)


def test_state_mismatch_is_refused(tok, demo_cfg, base):
    dl = DataLoader(demo_cfg, tok, 2, 32, "train", base_dir=base)
    next(dl)
    state = dl.state_dict()
    dl.close()
    with pytest.raises(ValueError, match="world_size=1 but this loader has world_size=2"):
        DataLoader(demo_cfg, tok, 2, 32, "train", rank=0, world_size=2, base_dir=base, state=state)
    with pytest.raises(ValueError, match="packing='stream' but this loader has packing='bestfit'"):
        DataLoader(_cfg(demo_cfg, packing="bestfit"), tok, 2, 32, "train", base_dir=base, state=state)
    bad = dict(state, head=[0, "shard_99999.parquet", 0, 0])
    with pytest.raises(ValueError, match="shard_99999.parquet"):
        DataLoader(demo_cfg, tok, 2, 32, "train", base_dir=base, state=bad)


# ---------------------------------------------------------------------- ranks, epochs

@needs_shared
@pytest.mark.parametrize("split", ["train", "val"])
def test_two_ranks_read_disjoint_documents_covering_the_split(tok, base, split):
    cfg = DataConfig(name="c4cc", source="local", path=str(SHARED / "pretrain" / "parquet"))
    r0 = _rank_docs(tok, cfg, base, split, 0, 2)
    r1 = _rank_docs(tok, cfg, base, split, 1, 2)
    p0, p1 = {p for p, _ in r0}, {p for p, _ in r1}
    assert not p0 & p1
    # every non-empty document is read exactly once per epoch (the CC shard has 27 empty texts)
    n_docs = sum(1 for p in list_shards(cfg, base, split) for t in pq.read_table(p).column(0).to_pylist() if t)
    assert len(p0 | p1) == n_docs
    assert abs(len(p0) - len(p1)) <= 128  # balanced to within a row group
    assert all(toks[0] == tok.get_bos_token_id() for _, toks in r0[:50])


def test_fewer_row_groups_than_ranks_strides_documents(tok, demo_cfg, base):
    # the demo val split is a single row group: 3 ranks must still split it by document
    parts = [_rank_docs(tok, demo_cfg, base, "val", r, 3) for r in range(3)]
    sets = [{p for p, _ in part} for part in parts]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    n_docs = sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(demo_cfg, base, "val"))
    assert sum(map(len, sets)) == n_docs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packing", ["stream", "bestfit"])
def test_many_epochs_no_hang_and_finite_epochs_stop(tok, base, packing, tmp_path):
    write_shard(tmp_path / "one.parquet", [f"short doc {i}" for i in range(6)], row_group_size=2)
    cfg = DataConfig(name="t", source="local", path=str(tmp_path / "one.parquet"), val_fraction=0.0, packing=packing)
    dl = DataLoader(cfg, tok, 2, 16, "train", rank=1, world_size=2, base_dir=base, buffer_size=4)
    _take(dl, 50)  # ~3 docs per epoch for this rank: dozens of epochs
    assert dl.state_dict()["epoch"] > 5
    dl.close()
    finite = DataLoader(cfg, tok, 1, 8, "train", base_dir=base, max_epochs=2)
    n = sum(1 for _ in finite)
    assert 1 <= n < 100


def test_rank_without_documents_errors_instead_of_hanging(tok, base, tmp_path):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only one document"}) + "\n")
    cfg = DataConfig(name="one", source="local", path=str(tmp_path / "one.jsonl"), val_fraction=0.0)
    dl = DataLoader(cfg, tok, 1, 8, "train", rank=1, world_size=2, base_dir=base)
    with pytest.raises(RuntimeError, match="rank 1 of 2 gets no documents"):
        next(dl)


def test_unreferenced_loader_stops_its_thread(tok, demo_cfg, base):
    dl = DataLoader(demo_cfg, tok, 2, 32, "train", base_dir=base)
    next(dl)
    thread = dl._thread
    assert thread.is_alive()
    del dl
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_bad_arguments(tok, demo_cfg, base):
    with pytest.raises(ValueError, match="rank=2"):
        DataLoader(demo_cfg, tok, 1, 8, "train", rank=2, world_size=2, base_dir=base)
    with pytest.raises(ValueError, match="split="):
        DataLoader(demo_cfg, tok, 1, 8, "test", base_dir=base)
    with pytest.raises(ValueError, match="batch_size=0"):
        DataLoader(demo_cfg, tok, 0, 8, "train", base_dir=base)


# ---------------------------------------------------------------------- bestfit

def test_bestfit_rows_start_with_bos_and_use_whole_documents(tok, demo_cfg, base):
    cfg = _cfg(demo_cfg, packing="bestfit")
    B, T = 4, 256
    dl = DataLoader(cfg, tok, B, T, "train", base_dir=base, buffer_size=100)
    batches = _take(dl, 10)
    dl.close()
    bos = tok.get_bos_token_id()
    docs = {tuple([bos] + tok.encode(t)) for t in iter_texts(cfg, base, "train")}
    n_tokens = cropped_rows = 0
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows = torch.cat([x, y[:, -1:]], dim=1).tolist()  # the T+1 tokens of each row
        for row in rows:
            assert row[0] == bos  # every row starts at a document boundary
            n_tokens += len(row)
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            segments = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            # every segment but the last is a complete document; only the last may be cropped
            assert all(s in docs for s in segments[:-1])
            last = segments[-1]
            if last not in docs:
                cropped_rows += 1
                assert any(d[:len(last)] == last for d in docs)
    assert n_tokens == 10 * B * (T + 1)  # 100% utilization: no padding anywhere
    assert cropped_rows > 0  # demo docs are longer than a row, so crops do happen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packing", ["stream", "bestfit"])
def test_cuda_batches_match_cpu(tok, demo_cfg, base, packing):
    cfg = _cfg(demo_cfg, packing=packing)
    cpu = _take(DataLoader(cfg, tok, 2, 64, "train", base_dir=base), 3)
    gpu = _take(DataLoader(cfg, tok, 2, 64, "train", base_dir=base, device="cuda"), 3)
    assert all(x.device.type == "cuda" for pair in gpu for x in pair)
    assert _same(cpu, [(x.cpu(), y.cpu()) for x, y in gpu])
