"""Pretraining shards from the hub, over real HTTP: huggingface_hub against a local hub server
(tests/hub_server.py, pointed at with HF_ENDPOINT) that serves real parquet shards, cuts
connections, fails on cue and refuses gated repos without a token."""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub_server import HubServer
from nanochat import hub
from nanochat.config import DataConfig
from nanochat.dataloader import DataLoader
from nanochat.dataset import ensure_shard, list_shards, remote_listing, shard_name
from nanochat.tokenizer import train_tokenizer

N_SHARDS = 5  # shard_00000 .. shard_00004; the last is the pinned val shard
REPO = "someone/shards"


def _shard_bytes(i: int, docs: int = 200) -> bytes:
    buf = io.BytesIO()
    texts = [f"shard {i} document {j}: " + "lorem ipsum dolor sit amet " * 40 for j in range(docs)]
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=32, compression="none")  # ~220 KB
    return buf.getvalue()


SHARDS = {shard_name(i): _shard_bytes(i) for i in range(N_SHARDS)}


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A hub with one public shard repo, and this process pointed at it with an empty cache."""
    with HubServer(token="hf_test_token") as s:
        s.commit = s.add_repo(REPO, SHARDS)
        monkeypatch.setenv("HF_ENDPOINT", s.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "NANOCHAT_OFFLINE", "NANOCHAT_BASE_DIR"):
            monkeypatch.delenv(var, raising=False)
        yield s


def _cfg(**kw) -> DataConfig:
    kw.setdefault("download_workers", 3)
    kw.setdefault("repo", REPO)
    return DataConfig(name="shards", source="hub", **kw)


def test_download_train_and_pinned_val(server, tmp_path):
    base = tmp_path / "base"
    train = list_shards(_cfg(num_shards=3), base, "train")
    val = list_shards(_cfg(num_shards=3), base, "val")
    assert [p.name for p in train] == [shard_name(i) for i in range(3)]
    assert [p.name for p in val] == [shard_name(4)]  # the last file of the repo is val
    for p in train + val:  # in the hub cache, at the commit the hub answered
        assert p.parent == hub.snapshot_dir(REPO, server.commit) and p.read_bytes() == SHARDS[p.name]
    assert not list((tmp_path / "hub_cache").rglob("*.incomplete"))
    # the listing is pinned: a second call finds everything on disk and makes no request at all
    manifest = json.loads(next((base / "data" / "hub").glob("*.json")).read_text())
    assert manifest["commit"] == server.commit and manifest["files"] == sorted(SHARDS)
    before = len(server.requests)
    assert list_shards(_cfg(num_shards=3), base, "train") == train
    assert len(server.requests) == before
    # a pinned val shard elsewhere is excluded from train
    assert [p.name for p in list_shards(_cfg(num_shards=4, val_shard=1), base, "train", download=False)] == \
        [shard_name(i) for i in (0, 2, 3, 4)]
    # num_shards=null ("as many as needed"): the first download_workers shards now, the rest lazily
    lazy = list_shards(_cfg(download_workers=2), tmp_path / "lazy", "train")
    assert [p.is_file() for p in lazy] == [True, True, True, False]  # shard 2 was already cached
    with pytest.raises(ValueError, match="data.num_shards=5"):
        list_shards(_cfg(num_shards=5), base, "train", download=False)
    # a named source on another repo: its max_shard must fit the repo
    with pytest.raises(ValueError, match=r"data.max_shard=1822: .* has 5 parquet files"):
        list_shards(DataConfig(name="fw", source="fineweb_edu", repo=REPO), tmp_path / "fw", "train")
    assert len(list_shards(DataConfig(name="fw", source="fineweb_edu", repo=REPO, max_shard=4, num_shards=1),
                           tmp_path / "fw2", "train")) == 1
    with pytest.raises(ValueError, match="data.repo=None"):
        list_shards(DataConfig(name="h", source="hub"), base, "train")


def test_resumed_download_cut_halfway(server, monkeypatch):
    """The connection drops half way through a shard: the library resumes it with a Range request."""
    import huggingface_hub.constants as hf_constants
    # the client hands bytes to disk in DOWNLOAD_CHUNK_SIZE pieces (10 MB); with 64 KB pieces a
    # 220 KB shard cut at half has whole chunks on disk to resume from, as a big shard would
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    name = shard_name(2)
    server.cut_once.add(name)
    path = hub.download(REPO, name)
    assert path.read_bytes() == SHARDS[name]
    ranges = [r for m, p, r in server.requests if m == "GET" and p.endswith(name)]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:].rstrip("-")) > 0
    assert len(ranges) == 2  # continued, not restarted


def test_server_errors_are_retried_and_a_bad_footer_is_refetched(server, tmp_path):
    name = shard_name(1)
    server.fail_times[name] = 2  # 503 twice, then the file
    assert ensure_shard(_cfg(), tmp_path, list_shards(_cfg(num_shards=2), tmp_path, "train", download=False)[1]) \
        .read_bytes() == SHARDS[name]
    assert server.gets(name) == 3
    # a file with the right length but no parquet footer: dropped from the cache and fetched again
    bad = dict(SHARDS, **{name: b"x" * len(SHARDS[name])})
    server.add_repo("someone/broken", bad)
    with pytest.raises(hub.HubError, match=r"someone/broken/shard_00001.parquet.*unusable.*gave up after 2"):
        hub.download("someone/broken", name, validate=lambda p: pq.ParquetFile(p), attempts=2, backoff=0.01)
    assert server.gets(f"broken/resolve/main/{name}") == 2
    repo_cache = tmp_path / "hub_cache" / "datasets--someone--broken"
    assert not [p for p in repo_cache.rglob("*") if p.is_file() and "blobs" in p.parts]


def test_gated_repo_needs_hf_token(server, monkeypatch, tmp_path):
    server.add_repo("someone/gated", SHARDS, gated=True)
    cfg = _cfg(repo="someone/gated", num_shards=1)
    with pytest.raises(hub.HubError, match=r"someone/gated.*HTTP 401.*HF_TOKEN"):
        list_shards(cfg, tmp_path, "train")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(hub.HubError, match="HTTP 401"):
        hub.download("someone/gated", shard_name(0))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    [path] = list_shards(cfg, tmp_path, "train")
    assert path.read_bytes() == SHARDS[shard_name(0)]


def test_offline_answers_from_the_cache_and_fails_clearly_on_a_miss(server, monkeypatch, tmp_path):
    cfg = _cfg(num_shards=2)
    online = list_shards(cfg, tmp_path, "train")
    server.__exit__()  # the hub is gone: anything that still works comes from disk
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert list_shards(cfg, tmp_path, "train") == online
    assert remote_listing(cfg, tmp_path)[0] == server.commit
    missing = list_shards(_cfg(num_shards=3), tmp_path, "train", download=False)[2]
    with pytest.raises(hub.HubError, match=r"shard_00002.parquet.*not in the hub cache .*offline mode.*Fix"):
        ensure_shard(cfg, tmp_path, missing)
    with pytest.raises(hub.HubError, match=r"someone/other.*offline mode is on"):  # no listing pinned yet
        list_shards(_cfg(repo="someone/other"), tmp_path, "train")


def test_named_source_offline_from_a_shared_cache_without_a_pinned_listing(server, monkeypatch, tmp_path):
    """Another machine/tool filled HF_HUB_CACHE: fineweb_edu knows its file names, the cache its commit."""
    commit = server.add_repo("karpathy/fineweb-edu-100b-shuffle", SHARDS)
    cfg = DataConfig(name="fw", source="fineweb_edu", max_shard=N_SHARDS - 1, num_shards=2)
    online = list_shards(cfg, tmp_path / "machine_a", "train") + list_shards(cfg, tmp_path / "machine_a", "val")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fresh = tmp_path / "machine_b"  # no pinned listing here
    assert list_shards(cfg, fresh, "train") + list_shards(cfg, fresh, "val") == online
    assert online[0].parent.name == commit


def _fetch_in_process(cfg, base, path):
    ensure_shard(cfg, base, path)


def test_three_processes_racing_for_one_shard_download_it_once(server, tmp_path):
    cfg = _cfg()
    path = list_shards(cfg, tmp_path, "train", download=False)[1]
    ctx = mp.get_context("fork")  # the children inherit HF_ENDPOINT / HF_HUB_CACHE
    procs = [ctx.Process(target=_fetch_in_process, args=(cfg, tmp_path, path)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert server.gets(shard_name(1)) == 1  # one GET; the others waited on the lock and found the blob
    assert path.read_bytes() == SHARDS[shard_name(1)]


def test_loader_fetches_ahead_of_the_shard_it_reads(server, tmp_path):
    cfg = _cfg(num_shards=3)
    server.fail_times[shard_name(0)] = 1  # the first shard fails once (real backoff: 0.5 s)
    tok = train_tokenizer(iter(["shard document lorem ipsum dolor sit amet"] * 50), 300)
    loader = DataLoader(cfg, tok, batch_size=2, seq_len=64, split="train", base_dir=tmp_path)
    paths = list_shards(cfg, tmp_path, "train", download=False)
    assert not any(p.is_file() for p in paths)  # nothing fetched before iterating
    x, _ = next(loader)
    assert x.shape == (2, 64)
    assert tok.decode(x[0].tolist()).startswith("<|bos|>shard 0 document 0:")
    # shard 1 is fetched ahead in the background while shard 0 is read (wait for it, no timing asserted)
    for _ in range(600):
        if paths[1].is_file():
            break
        time.sleep(0.1)
    loader.close()
    assert paths[0].is_file() and server.gets(shard_name(0)) == 2
    assert paths[1].is_file() and server.gets(shard_name(1)) == 1 and not paths[2].is_file()
