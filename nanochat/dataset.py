"""Pretraining corpora as parquet shards with a `text` column.

Sources (`data.source`):
  demo         built here, offline, from the Python standard library's docstrings and sources
  local        `data.path`: a dir or glob of parquet (`text` column), jsonl(.gz) (`text` field) or txt
  fineweb_edu  karpathy/fineweb-edu-100b-shuffle shards from Hugging Face (nanochat's seed data)
  climbmix     karpathy/climbmix-400b-shuffle shards (nanochat's later data)

Everything ends up as `list_shards(...) -> [Path]`; the loader reads row groups from those.
Remote shards are fetched on demand (`ensure_shard`) with retries, a lock per shard, a
`.partial` file resumed with HTTP Range, validation of the parquet footer, and a rename.
"""
from __future__ import annotations

import ast
import glob as globlib
import gzip
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.config import DataConfig

TEXT_COLUMN = "text"
ROW_GROUP_SIZE = 64          # docs per row group in shards we write: ranks stride over row groups
DEMO_VERSION = 1             # bump when the demo builder changes (new cache dir)
LOCAL_VERSION = 1


@dataclass(frozen=True)
class RemoteSource:
    base_url: str
    max_shard: int           # index of the last shard in the repo (nanochat pins it as val)


REMOTE_SOURCES = {
    "fineweb_edu": RemoteSource("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
    "climbmix": RemoteSource("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
}


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


# ---------------------------------------------------------------------- public API

def list_shards(data_cfg: DataConfig, base_dir: str | Path, split: str, download: bool = True) -> list[Path]:
    """Parquet files of `split` ("train" | "val"), building or downloading them as needed.

    Remote sources: all listed paths are returned, and `download=True` fetches them, except
    when `data.num_shards` is null ("as many as the run needs"): then only the first
    `data.download_workers` shards are fetched up front and readers fetch the rest lazily
    with `ensure_shard` (the loader and `iter_texts` do, prefetching the next shard).
    With `download=False` nothing is fetched.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: use 'train' or 'val'")
    base_dir = Path(base_dir).expanduser()
    source = data_cfg.source
    if source == "demo":
        return _demo_shards(data_cfg, base_dir, split)
    if source == "local":
        return _local_shards(data_cfg, base_dir, split)
    if source in REMOTE_SOURCES:
        indices = remote_shard_indices(data_cfg, split)
        paths = [remote_dir(data_cfg, base_dir) / shard_name(i) for i in indices]
        if download:
            lazy = data_cfg.num_shards is None and split == "train"
            download_shards(data_cfg, base_dir, indices[:max(1, data_cfg.download_workers)] if lazy else indices)
        return paths
    raise ValueError(f"data.source={source!r}: use one of demo, local, {', '.join(REMOTE_SOURCES)}")


def iter_texts(data_cfg: DataConfig, base_dir: str | Path, split: str = "train",
               max_chars: int | None = None, doc_cap: int | None = None) -> Iterator[str]:
    """Documents of a split in shard order, each cropped to `doc_cap` chars, `max_chars` in total.

    This is what the tokenizer trains on. Remote shards download lazily as the iteration
    reaches them (with the next few fetched in the background).
    """
    paths = list_shards(data_cfg, base_dir, split, download=False)
    remote = data_cfg.source in REMOTE_SOURCES
    seen = 0
    pool = ThreadPoolExecutor(max_workers=max(1, data_cfg.download_workers)) if remote else None
    try:
        pending = {}
        for i, path in enumerate(paths):
            if remote:
                # prefetch this shard and the next few in the background
                for j in range(i, min(len(paths), i + max(1, data_cfg.download_workers))):
                    if j not in pending:
                        pending[j] = pool.submit(ensure_shard, data_cfg, base_dir, paths[j])
                pending.pop(i).result()
            pf = open_shard(path)
            for rg in range(pf.num_row_groups):
                for text in pf.read_row_group(rg, columns=[TEXT_COLUMN]).column(0).to_pylist():
                    if text is None:
                        continue
                    if doc_cap is not None and len(text) > doc_cap:
                        text = text[:doc_cap]
                    if max_chars is not None and seen + len(text) > max_chars:
                        text = text[: max_chars - seen]
                    if text:
                        seen += len(text)
                        yield text
                    if max_chars is not None and seen >= max_chars:
                        return
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a parquet shard and check it has a string `text` column (clear error otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parquet shard {path} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for truncated/non-parquet files
        raise ValueError(f"{path} is not a readable parquet file ({e}); delete it and retry") from e
    names = pf.schema_arrow.names
    if TEXT_COLUMN not in names:
        raise ValueError(f"{path} has no '{TEXT_COLUMN}' column (columns: {names}); "
                         f"pretraining shards need a string column named '{TEXT_COLUMN}'")
    if not pa.types.is_string(pf.schema_arrow.field(TEXT_COLUMN).type) and \
            not pa.types.is_large_string(pf.schema_arrow.field(TEXT_COLUMN).type):
        raise ValueError(f"{path}: column '{TEXT_COLUMN}' has type {pf.schema_arrow.field(TEXT_COLUMN).type}, "
                         "expected string")
    return pf


def write_shard(path: Path, texts: list[str], row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Write one shard (nanochat's settings: zstd, no dictionary) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table = pa.table({TEXT_COLUMN: pa.array(texts, type=pa.string())})
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd",
                   use_dictionary=False, write_statistics=False)
    os.replace(tmp, path)


def _file_lock(path: Path, timeout: float = -1):
    from filelock import FileLock
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout)


def _split_docs(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic hold-out: every k-th document (k = 1/val_fraction) goes to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    if val_fraction == 0.0:
        return docs, []
    k = max(2, round(1.0 / val_fraction))
    train = [d for i, d in enumerate(docs) if i % k != k - 1]
    val = [d for i, d in enumerate(docs) if i % k == k - 1]
    return train, val


def _write_split_dir(out: Path, docs: list[str], val_fraction: float, manifest: dict,
                     shard_docs: int = 50_000) -> None:
    """Write train_XXXXX / val_XXXXX shards + manifest.json into a fresh dir, then rename it to `out`."""
    train, val = _split_docs(docs, val_fraction)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, items in (("train", train), ("val", val)):
        for k in range(0, len(items), shard_docs):
            write_shard(tmp / f"{split}_{k // shard_docs:05d}.parquet", items[k:k + shard_docs])
    manifest = dict(manifest, train_docs=len(train), val_docs=len(val),
                    train_chars=sum(map(len, train)), val_chars=sum(map(len, val)))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _split_files(d: Path, split: str, what: str) -> list[Path]:
    files = sorted(d.glob(f"{split}_*.parquet"))
    if not files:
        raise ValueError(f"{what} has no {split} documents (data.val_fraction may be 0 or the corpus "
                         f"too small to hold any out); see {d / 'manifest.json'}")
    return files


# ---------------------------------------------------------------------- demo corpus

def _stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__",
            "turtledemo", "pydoc_data"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def _module_docs(path: Path, root: Path, max_doc_chars: int = 6000) -> list[str]:
    """One module → documents: its docstrings as prose, and its source in top-level chunks."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    docs: list[str] = []
    # prose: module docstring, then class/function docstrings (English-ish text)
    parts = []
    mdoc = ast.get_docstring(tree)
    if mdoc:
        parts.append(f"{module}\n\n{mdoc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 40:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append(f"{kind} {module}.{node.name}\n\n{d}")
    docs.extend(_group(parts, max_doc_chars, sep="\n\n"))
    # code: split at top-level statements, grouped up to max_doc_chars (long ones cut at lines)
    lines = source.splitlines(keepends=True)
    starts = sorted({n.lineno - 1 - len(getattr(n, "decorator_list", []) or []) for n in tree.body} | {0})
    chunks = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]
    pieces = []
    for c in chunks:
        while len(c) > max_doc_chars:
            cut = c.rfind("\n", 0, max_doc_chars) + 1 or max_doc_chars
            pieces.append(c[:cut])
            c = c[cut:]
        if c.strip():
            pieces.append(c)
    docs.extend(f"# {module}\n{g}" for g in _group(pieces, max_doc_chars, sep=""))
    return docs


def _group(parts: list[str], limit: int, sep: str) -> list[str]:
    out, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(sep) + len(p) > limit:
            out.append(cur)
            cur = ""
        cur = p if not cur else cur + sep + p
    if cur:
        out.append(cur)
    return out


def build_demo_docs(demo_chars: int) -> list[str]:
    """Deterministic documents (same list for the same Python version), `demo_chars` chars in total."""
    if demo_chars <= 0:
        raise ValueError(f"data.demo_chars={demo_chars}: must be positive")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files()
    random.Random(1337).shuffle(files)  # interleave packages, so a small corpus is still diverse
    docs: list[str] = []
    total = 0
    for f in files:
        for doc in _module_docs(f, root):
            if total + len(doc) >= demo_chars:
                docs.append(doc[: demo_chars - total])
                return docs
            docs.append(doc)
            total += len(doc)
    return docs  # the whole stdlib is smaller than asked: use all of it


def _demo_shards(data_cfg: DataConfig, base_dir: Path, split: str) -> list[Path]:
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = f"py{pyver}_c{data_cfg.demo_chars}_v{data_cfg.val_fraction}_b{DEMO_VERSION}"
    out = base_dir / "data" / "demo" / key
    if not (out / "manifest.json").is_file():
        with _file_lock(out.with_name(out.name + ".lock")):  # ranks/jobs build it once
            if not (out / "manifest.json").is_file():
                t0 = time.time()
                docs = build_demo_docs(data_cfg.demo_chars)
                _write_split_dir(out, docs, data_cfg.val_fraction,
                                 {"source": "demo", "python": sys.version.split()[0],
                                  "demo_chars": data_cfg.demo_chars, "build_seconds": round(time.time() - t0, 2)})
    return _split_files(out, split, f"demo corpus {out}")


# ---------------------------------------------------------------------- local files

_LOCAL_EXTS = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".txt", ".txt.gz")


def _local_files(path_spec: str | None) -> list[Path]:
    if not path_spec:
        raise ValueError("data.path is not set: data=local needs data.path=<dir or glob of "
                         "parquet/jsonl/txt files>")
    p = Path(path_spec).expanduser()
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(_LOCAL_EXTS)]
        where = f"directory {p}"
    elif p.is_file():
        files = [p]
        where = f"file {p}"
    else:
        files = [Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file()]
        if not files and not any(ch in str(path_spec) for ch in "*?["):
            raise FileNotFoundError(f"data.path={path_spec!r} does not exist (give a dir, a file or a glob)")
        where = f"glob {path_spec!r}"
    bad = [f for f in files if not f.name.endswith(_LOCAL_EXTS)]
    if bad:
        raise ValueError(f"data.path={path_spec!r}: unsupported file {bad[0]} "
                         f"(supported: {', '.join(_LOCAL_EXTS)})")
    if not files:
        raise ValueError(f"data.path={path_spec!r}: no {'/'.join(_LOCAL_EXTS)} files in {where}")
    return sorted(f.resolve() for f in files)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _read_local_docs(path: Path, txt_doc_chars: int = 4000) -> list[str]:
    """Documents of one local file. A txt file is cut into ~txt_doc_chars docs at blank lines."""
    name = path.name
    if name.endswith(".parquet"):
        pf = open_shard(path)
        return [t for t in pf.read(columns=[TEXT_COLUMN]).column(0).to_pylist() if t]
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        docs = []
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON lines ({e})") from e
                if not isinstance(row, dict) or not isinstance(row.get(TEXT_COLUMN), str):
                    raise ValueError(f"{path}:{lineno}: each line needs a string '{TEXT_COLUMN}' field "
                                     f"(got keys {list(row) if isinstance(row, dict) else type(row).__name__})")
                if row[TEXT_COLUMN]:
                    docs.append(row[TEXT_COLUMN])
        return docs
    with _open_text(path) as f:
        text = f.read()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    return _group(paragraphs, txt_doc_chars, sep="\n\n")


def _local_shards(data_cfg: DataConfig, base_dir: Path, split: str) -> list[Path]:
    files = _local_files(data_cfg.path)
    if len(files) >= 2 and all(f.name.endswith(".parquet") for f in files):
        # a directory of parquet shards is used in place, nanochat's convention: the last is val
        for f in files:
            open_shard(f)
        return files[:-1] if split == "train" else files[-1:]
    # anything else is converted once into our own shards, cached by the files' identity
    ident = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([ident, data_cfg.val_fraction, LOCAL_VERSION]).encode()).hexdigest()[:16]
    out = base_dir / "data" / "local" / key
    if not (out / "manifest.json").is_file():
        with _file_lock(out.with_name(out.name + ".lock")):
            if not (out / "manifest.json").is_file():
                docs: list[str] = []
                for f in files:
                    docs.extend(_read_local_docs(f))
                if not docs:
                    raise ValueError(f"data.path={data_cfg.path!r}: the corpus is empty (no non-empty "
                                     f"'{TEXT_COLUMN}' in {len(files)} file(s))")
                _write_split_dir(out, docs, data_cfg.val_fraction,
                                 {"source": "local", "path": str(data_cfg.path), "files": [str(f) for f in files]})
    return _split_files(out, split, f"local corpus data.path={data_cfg.path!r}")


# ---------------------------------------------------------------------- remote shards

def remote_source(data_cfg: DataConfig) -> RemoteSource:
    src = REMOTE_SOURCES[data_cfg.source]
    return RemoteSource(data_cfg.base_url or src.base_url,
                        data_cfg.max_shard if data_cfg.max_shard is not None else src.max_shard)


def remote_dir(data_cfg: DataConfig, base_dir: str | Path) -> Path:
    return Path(base_dir).expanduser() / "data" / data_cfg.source


def remote_shard_indices(data_cfg: DataConfig, split: str) -> list[int]:
    """val: the pinned shard (data.val_shard, default the last); train: the first num_shards others."""
    src = remote_source(data_cfg)
    val = data_cfg.val_shard if data_cfg.val_shard is not None else src.max_shard
    if not 0 <= val <= src.max_shard:
        raise ValueError(f"data.val_shard={val}: must be in [0, data.max_shard={src.max_shard}]")
    if split == "val":
        return [val]
    available = [i for i in range(src.max_shard + 1) if i != val]
    n = data_cfg.num_shards if data_cfg.num_shards is not None else len(available)
    if not 1 <= n <= len(available):
        raise ValueError(f"data.num_shards={n}: must be in [1, {len(available)}] for {data_cfg.source} "
                         f"(max_shard={src.max_shard}, one shard pinned for val)")
    return available[:n]


def download_shards(data_cfg: DataConfig, base_dir: str | Path, indices: list[int]) -> list[Path]:
    """Fetch shards in parallel (data.download_workers threads); returns their paths."""
    d = remote_dir(data_cfg, base_dir)
    paths = [d / shard_name(i) for i in indices]
    with ThreadPoolExecutor(max_workers=max(1, data_cfg.download_workers)) as pool:
        list(pool.map(lambda p: ensure_shard(data_cfg, base_dir, p), paths))
    return paths


def ensure_shard(data_cfg: DataConfig, base_dir: str | Path, path: Path,
                 attempts: int = 5, backoff: float = 0.5) -> Path:
    """Make sure a remote shard is on disk (no-op for local files); download it if not."""
    path = Path(path)
    if path.is_file() or data_cfg.source not in REMOTE_SOURCES:
        return path
    url = f"{remote_source(data_cfg).base_url.rstrip('/')}/{path.name}"
    return download_file(url, path, attempts=attempts, backoff=backoff)


def download_file(url: str, path: Path, attempts: int = 5, backoff: float = 0.5,
                  timeout: float = 60.0) -> Path:
    """Download `url` to `path`, safely under concurrency and failures.

    - a file lock per target: several ranks/jobs never fetch the same shard twice
    - bytes go to `<name>.partial`; a retry resumes it with an HTTP Range request
    - the result must be a valid parquet file (a truncated body is caught by its footer)
    - then it is renamed into place; retries back off exponentially (backoff·2^k seconds)
    """
    import requests
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with _file_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            return path  # someone else finished it while we waited for the lock
        last_err: Exception | None = None
        for attempt in range(attempts):
            try:
                have = partial.stat().st_size if partial.exists() else 0
                headers = {"Range": f"bytes={have}-"} if have else {}
                with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
                    if r.status_code == 416:          # our partial is already complete (or bogus)
                        have = 0
                        partial.unlink(missing_ok=True)
                        raise IOError(f"HTTP 416 for range request on {url}")
                    r.raise_for_status()
                    mode = "ab" if (have and r.status_code == 206) else "wb"
                    with open(partial, mode) as f:
                        for chunk in r.iter_content(chunk_size=1 << 16):  # small: a cut loses little
                            f.write(chunk)
                try:
                    pq.ParquetFile(partial)
                except Exception as e:
                    partial.unlink(missing_ok=True)  # corrupt: start over on the next attempt
                    raise IOError(f"downloaded {url} is not a valid parquet file ({e})") from e
                os.replace(partial, path)
                return path
            except Exception as e:  # network errors, HTTP 5xx, truncation
                last_err = e
                if attempt + 1 < attempts:
                    time.sleep(backoff * (2 ** attempt))
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"failed to download {url} after {attempts} attempts: {last_err}. "
                           "Check the network or data.base_url") from last_err


def main(argv: list[str] | None = None) -> None:
    """`python -m nanochat.dataset -n 8 --source fineweb_edu`: pre-fetch shards (plus the val shard)."""
    import argparse
    from nanochat.common import get_base_dir
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("-n", "--num-shards", type=int, default=8)
    ap.add_argument("--source", default="fineweb_edu", choices=sorted(REMOTE_SOURCES))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--base-dir", default=None)
    a = ap.parse_args(argv)
    cfg = DataConfig(name=a.source, source=a.source, num_shards=a.num_shards, download_workers=a.workers)
    base = get_base_dir(a.base_dir)
    idx = remote_shard_indices(cfg, "train") + remote_shard_indices(cfg, "val")
    t0 = time.time()
    download_shards(cfg, base, idx)
    print(f"{len(idx)} shards in {remote_dir(cfg, base)} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
