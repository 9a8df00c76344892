"""Remote shards over real HTTP: a server on 127.0.0.1 that fails, truncates, and honours Range."""
from __future__ import annotations

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.config import DataConfig
from nanochat.dataset import download_file, ensure_shard, list_shards, remote_dir, shard_name
from nanochat.dataloader import DataLoader
from nanochat.tokenizer import train_tokenizer

N_SHARDS = 5  # shard_00000 .. shard_00004; the last is the pinned val shard


def _shard_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    texts = [f"shard {i} document {j}: " + "lorem ipsum dolor sit amet " * 40 for j in range(200)]
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=32, compression="none")  # ~200 KB
    return buf.getvalue()


class ShardServer:
    """Serves shard_XXXXX.parquet; per-file behaviour scripted by the test."""

    def __init__(self):
        self.files = {shard_name(i): _shard_bytes(i) for i in range(N_SHARDS)}
        self.fail_times: Counter = Counter()      # name → answer 500 this many more times
        self.truncate_times: Counter = Counter()  # name → send half the body (full Content-Length)
        self.always_truncated: set[str] = set()   # name → a truncated file with a matching length
        self.gets: Counter = Counter()
        self.ranges: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    server.gets[name] += 1
                    if name not in server.files:
                        self.send_error(404)
                        return
                    if server.fail_times[name] > 0:
                        server.fail_times[name] -= 1
                        self.send_error(500, "scripted failure")
                        return
                    cut = server.truncate_times[name] > 0
                    if cut:
                        server.truncate_times[name] -= 1
                body = server.files[name]
                if name in server.always_truncated:
                    body = body[: len(body) // 2]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    server.ranges.append((name, rng))
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if cut:  # the connection drops half way
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets/shards/resolve/main"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with ShardServer() as s:
        yield s


def _cfg(server, **kw) -> DataConfig:
    kw.setdefault("download_workers", 3)
    return DataConfig(name="fw", source="fineweb_edu", base_url=server.url, max_shard=N_SHARDS - 1, **kw)


def test_download_train_and_pinned_val(server, tmp_path):
    cfg = _cfg(server, num_shards=3)
    train = list_shards(cfg, tmp_path, "train")
    val = list_shards(cfg, tmp_path, "val")
    assert [p.name for p in train] == [shard_name(i) for i in range(3)]
    assert [p.name for p in val] == [shard_name(4)]
    for p in train + val:
        assert p.read_bytes() == server.files[p.name]
    assert not list(remote_dir(cfg, tmp_path).glob("*.partial"))
    # resumable: a second call finds everything on disk and makes no request
    before = sum(server.gets.values())
    list_shards(cfg, tmp_path, "train")
    assert sum(server.gets.values()) == before
    # a pinned val shard elsewhere is excluded from train
    cfg2 = _cfg(server, num_shards=4, val_shard=1)
    assert [p.name for p in list_shards(cfg2, tmp_path, "train", download=False)] == \
        [shard_name(i) for i in (0, 2, 3, 4)]
    # num_shards=null ("as many as needed"): the first download_workers shards now, the rest lazily
    lazy_base = tmp_path / "lazy"
    paths = list_shards(_cfg(server, download_workers=2), lazy_base, "train")
    assert [p.name for p in paths] == [shard_name(i) for i in range(4)]
    assert [p.is_file() for p in paths] == [True, True, False, False]
    with pytest.raises(ValueError, match="data.num_shards=5"):
        list_shards(_cfg(server, num_shards=5), tmp_path, "train", download=False)


def test_fails_twice_then_succeeds(server, tmp_path):
    name = shard_name(1)
    server.fail_times[name] = 2
    path = download_file(f"{server.url}/{name}", tmp_path / name, attempts=4, backoff=0.01)
    assert path.read_bytes() == server.files[name]
    assert server.gets[name] == 3


def test_truncated_body_is_resumed_with_range(server, tmp_path):
    name = shard_name(2)
    server.truncate_times[name] = 1
    path = download_file(f"{server.url}/{name}", tmp_path / name, attempts=3, backoff=0.01)
    assert path.read_bytes() == server.files[name]
    assert server.gets[name] == 2
    assert len(server.ranges) == 1 and server.ranges[0][0] == name  # continued, not restarted


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    name = shard_name(0)
    full = server.files[name]
    (tmp_path / (name + ".partial")).write_bytes(full[:1000])
    path = download_file(f"{server.url}/{name}", tmp_path / name, attempts=2, backoff=0.01)
    assert path.read_bytes() == full
    assert server.ranges == [(name, "bytes=1000-")]


def test_always_truncated_fails_cleanly(server, tmp_path):
    name = shard_name(3)
    server.always_truncated.add(name)
    with pytest.raises(RuntimeError, match=f"failed to download .*{name} after 3 attempts.*not a valid parquet"):
        download_file(f"{server.url}/{name}", tmp_path / name, attempts=3, backoff=0.01)
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".partial")).exists()
    with pytest.raises(RuntimeError, match="404"):
        download_file(f"{server.url}/shard_09999.parquet", tmp_path / "x.parquet", attempts=1)


def test_concurrent_fetchers_download_once(server, tmp_path):
    """Ranks/jobs racing for the same shard: the file lock makes it one GET."""
    cfg = _cfg(server)
    path = remote_dir(cfg, tmp_path) / shard_name(0)
    errors = []

    def fetch():
        try:
            ensure_shard(cfg, tmp_path, path)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert server.gets[shard_name(0)] == 1
    assert path.read_bytes() == server.files[shard_name(0)]


def test_loader_downloads_lazily_with_retries(server, tmp_path):
    cfg = _cfg(server, num_shards=3)
    server.fail_times[shard_name(0)] = 2  # the first shard fails twice (real backoff: 0.5 s + 1 s)
    tok = train_tokenizer(iter(["shard document lorem ipsum dolor sit amet"] * 50), 300)
    loader = DataLoader(cfg, tok, batch_size=2, seq_len=64, split="train", base_dir=tmp_path)
    assert not any(remote_dir(cfg, tmp_path).glob("*.parquet"))  # nothing fetched before iterating
    x, y = next(loader)
    assert x.shape == (2, 64)
    assert tok.decode(x[0].tolist()).startswith("<|bos|>shard 0 document 0:")
    loader.close()
    assert (remote_dir(cfg, tmp_path) / shard_name(0)).is_file()
    assert server.gets[shard_name(0)] == 3


def _fetch_in_process(cfg, base, path):
    ensure_shard(cfg, base, path)


def test_concurrent_processes_download_once(server, tmp_path):
    """Separate processes (ranks, sweep jobs) racing for one shard: still one GET."""
    import multiprocessing as mp
    cfg = _cfg(server)
    path = remote_dir(cfg, tmp_path) / shard_name(1)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_fetch_in_process, args=(cfg, tmp_path, path)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert server.gets[shard_name(1)] == 1
    assert path.read_bytes() == server.files[shard_name(1)]
