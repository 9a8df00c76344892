"""Corpora: the offline demo corpus, local files (parquet/jsonl/txt), clear errors."""
from __future__ import annotations

import gzip
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import shared_data_dir
from nanochat.config import DataConfig
from nanochat.dataset import build_demo_docs, iter_texts, list_shards, open_shard

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data (offline public datasets) is absent")


def _texts(paths):
    return [t for p in paths for t in pq.read_table(p, columns=["text"]).column(0).to_pylist()]


# ---------------------------------------------------------------------- demo

def test_demo_corpus_deterministic_sized_and_split(tmp_path):
    cfg = DataConfig(demo_chars=300_000, val_fraction=0.1)
    a_train, a_val = list_shards(cfg, tmp_path / "a", "train"), list_shards(cfg, tmp_path / "a", "val")
    b_train = list_shards(cfg, tmp_path / "b", "train")  # built again from scratch elsewhere
    ta, va = _texts(a_train), _texts(a_val)
    assert ta == _texts(b_train)
    assert sum(map(len, ta)) + sum(map(len, va)) == 300_000  # exactly demo_chars
    assert 0.05 < len(va) / (len(ta) + len(va)) < 0.15
    assert not set(ta) & set(va)
    # real Python text: docstrings (prose) and source code
    joined = "\n".join(ta)
    assert "def " in joined and "import " in joined and "return" in joined
    pf = pq.ParquetFile(a_train[0])
    assert pf.num_row_groups >= 2  # several row groups, so ranks can stride over them
    manifest = json.loads((a_train[0].parent / "manifest.json").read_text())
    assert manifest["train_docs"] == len(ta) and manifest["val_docs"] == len(va)


def test_demo_docs_prefix_property():
    # a bigger corpus starts with the same documents as a smaller one (fixed file order)
    small, big = build_demo_docs(50_000), build_demo_docs(120_000)
    assert big[:len(small) - 1] == small[:-1]
    assert big[len(small) - 1].startswith(small[-1])
    with pytest.raises(ValueError, match="demo_chars"):
        build_demo_docs(0)


def test_iter_texts_caps(tmp_path):
    cfg = DataConfig(demo_chars=200_000)
    docs = list(iter_texts(cfg, tmp_path, "train", doc_cap=500))
    assert max(map(len, docs)) == 500
    capped = list(iter_texts(cfg, tmp_path, "train", max_chars=12_345, doc_cap=1000))
    assert sum(map(len, capped)) == 12_345
    assert capped == [d[:1000] for d in iter_texts(cfg, tmp_path, "train")][:len(capped) - 1] + [capped[-1]]


# ---------------------------------------------------------------------- local

@needs_shared
def test_local_parquet_dir_used_in_place():
    d = SHARED / "pretrain" / "parquet"
    cfg = DataConfig(name="c4cc", source="local", path=str(d))
    train, val = list_shards(cfg, "/nonexistent-base-not-needed", "train"), list_shards(cfg, "/x", "val")
    assert [p.name for p in train] == ["shard_00000.parquet"] and [p.name for p in val] == ["shard_00001.parquet"]
    assert len(_texts(train)) == 1000 and len(_texts(val)) == 697


@needs_shared
def test_local_jsonl_gz_and_txt_and_glob(tmp_path):
    pre = SHARED / "pretrain"
    cfg = DataConfig(name="c4", source="local", path=str(pre / "c4-sample.00000-of-00001.json.gz"), val_fraction=0.1)
    train, val = _texts(list_shards(cfg, tmp_path, "train")), _texts(list_shards(cfg, tmp_path, "val"))
    assert len(train) + len(val) == 1000 and len(val) == 100
    with gzip.open(pre / "c4-sample.00000-of-00001.json.gz", "rt") as f:
        first = json.loads(f.readline())["text"]
    assert train[0] == first

    cfg = DataConfig(name="sh", source="local", path=str(pre / "tinyshakespeare.txt"))
    docs = _texts(list_shards(cfg, tmp_path, "train")) + _texts(list_shards(cfg, tmp_path, "val"))
    assert len(docs) > 100 and max(map(len, docs)) < 10_000  # one file cut at blank lines into docs
    assert docs[0].startswith("First Citizen:")
    assert sum(map(len, docs)) > 0.97 * len((pre / "tinyshakespeare.txt").read_text())

    # a glob mixing formats
    (tmp_path / "mix").mkdir()
    shutil.copy(pre / "tinyshakespeare.txt", tmp_path / "mix" / "a.txt")
    (tmp_path / "mix" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    cfg = DataConfig(name="mix", source="local", path=str(tmp_path / "mix" / "*"), val_fraction=0.0)
    docs = _texts(list_shards(cfg, tmp_path, "train"))
    assert "doc 49" in docs and docs[0].startswith("First Citizen:")
    with pytest.raises(ValueError, match="no val documents"):
        list_shards(cfg, tmp_path, "val")


def test_local_conversion_cached_and_invalidated(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(40)))
    cfg = DataConfig(name="c", source="local", path=str(src))
    p1 = list_shards(cfg, tmp_path / "base", "train")
    assert list_shards(cfg, tmp_path / "base", "train") == p1  # cached
    src.write_text("\n".join(json.dumps({"text": f"changed {i}"}) for i in range(40)))
    p2 = list_shards(cfg, tmp_path / "base", "train")
    assert p2 != p1 and _texts(p2)[0] == "changed 0"


def test_local_errors(tmp_path):
    base = tmp_path / "base"

    def shards(path, **kw):
        return list_shards(DataConfig(name="x", source="local", path=path, **kw), base, "train")

    with pytest.raises(ValueError, match="data.path is not set"):
        shards(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .*files"):
        shards(str(tmp_path / "empty"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="corpus is empty"):
        shards(str(tmp_path / "blank.jsonl"))
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="string 'text' field"):
        shards(str(tmp_path / "notext.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        shards(str(tmp_path / "bad.jsonl"))
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        shards(str(tmp_path / "nocol.parquet"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file"):
        shards(str(tmp_path / "x.csv"))
    (tmp_path / "trunc.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable parquet"):
        open_shard(tmp_path / "trunc.parquet")
    with pytest.raises(ValueError, match="val_fraction"):
        (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
        shards(str(tmp_path / "ok.jsonl"), val_fraction=1.5)
    with pytest.raises(ValueError, match="split="):
        list_shards(DataConfig(), base, "test")
    with pytest.raises(ValueError, match="data.source"):
        list_shards(DataConfig(source="hf"), base, "train")
