"""Pretraining corpora as parquet shards with a `text` column.

Sources (`data.source`; `mixture`: several of these by weight, nanochat/mixture.py):
  demo         built here, offline, from the Python standard library's docstrings and sources
  local        `data.path`: a dir or glob of parquet (`text` column), jsonl(.gz) (`text` field) or txt
  fineweb_edu  karpathy/fineweb-edu-100b-shuffle on the Hugging Face hub (nanochat's seed data)
  climbmix     karpathy/climbmix-400b-shuffle (nanochat's later data)
  hub          any `data.repo=<owner>/<name>` dataset repo of parquet shards

Everything ends up as `list_shards(...) -> [Path]`; the loader reads row groups from those.
Hub shards live in the hub cache (HF_HUB_CACHE) and come through `nanochat.hub`
(huggingface_hub: locks, resumed transfers, HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT). Kept
here: nanochat's val-shard pin (the last parquet file of the repo, or data.val_shard), a
pinned listing per repo and revision, parquet footer validation, and fetching ahead
(`ensure_shard` for the shard being read, the next one in the background).
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import hub
from nanochat.common import atomic_write_bytes, atomic_write_json
from nanochat.config import DataConfig

TEXT_COLUMN = "text"
ROW_GROUP_SIZE = 64          # docs per row group in shards we write: ranks stride over row groups
SHARD_DOCS = 50_000          # docs per shard of a corpus we convert (demo, local)
DEMO_VERSION = 1             # bump when the demo builder changes (new cache dir)
LOCAL_VERSION = 1


@dataclass(frozen=True)
class RemoteSource:
    repo: str | None         # hub dataset repo; None → data.repo must name one
    max_shard: int | None    # index of the last shard (nanochat pins it as val); None → the last file


REMOTE_SOURCES = {
    "fineweb_edu": RemoteSource("karpathy/fineweb-edu-100b-shuffle", 1822),
    "climbmix": RemoteSource("karpathy/climbmix-400b-shuffle", 6542),
    "hub": RemoteSource(None, None),  # any data.repo=<owner>/<name> of parquet shards
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
    if source == "mixture":  # every source's files (building or fetching them); loaders read each alone
        from nanochat.mixture import source_configs
        return [p for c in source_configs(data_cfg).values() for p in list_shards(c, base_dir, split, download)]
    if source in REMOTE_SOURCES:
        return _remote_shards(data_cfg, base_dir, split, download)
    if source not in ("demo", "local"):
        raise ValueError(f"data.source={source!r}: use one of demo, local, {', '.join(REMOTE_SOURCES)}")
    return (_demo_shards if source == "demo" else _local_shards)(data_cfg, base_dir, split)


def iter_texts(data_cfg: DataConfig, base_dir: str | Path, split: str = "train",
               max_chars: int | None = None, doc_cap: int | None = None) -> Iterator[str]:
    """Documents of a split in shard order, each cropped to `doc_cap` chars, `max_chars` in total.

    This is what the tokenizer trains on. Remote shards download lazily as the iteration
    reaches them (with the next few fetched in the background).
    """
    if data_cfg.source == "mixture":
        from nanochat.mixture import iter_mixed_texts
        yield from iter_mixed_texts(data_cfg, base_dir, split, max_chars, doc_cap)
        return
    seen = 0
    for _, path in shards_on_disk(data_cfg, base_dir, list_shards(data_cfg, base_dir, split, download=False)):
        pf = open_shard(path)
        for text in (t for rg in range(pf.num_row_groups) for t in read_texts(pf, rg) if t is not None):
            text = text[:doc_cap][:None if max_chars is None else max_chars - seen]  # None: uncut
            if text:
                seen += len(text)
                yield text
            if max_chars is not None and seen >= max_chars:
                return


def shards_on_disk(data_cfg: DataConfig, base_dir: str | Path, paths: list[Path], first: int = 0,
                   ahead: int | None = None) -> Iterator[tuple[int, Path]]:
    """(index, path) of paths[first:] in order, each once it is on disk: remote shards are fetched in
    the background, `ahead` shards at a time (default data.download_workers) from the one being read."""
    if data_cfg.source not in REMOTE_SOURCES:
        yield from enumerate(paths[first:], first)
        return
    ahead = max(1, data_cfg.download_workers if ahead is None else ahead)
    pool, pending = ThreadPoolExecutor(max_workers=ahead), {}
    try:
        for i in range(first, len(paths)):
            for j in range(i, min(len(paths), i + ahead)):
                if j not in pending:
                    pending[j] = pool.submit(ensure_shard, data_cfg, base_dir, paths[j])
            yield i, pending.pop(i).result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def read_texts(pf: pq.ParquetFile, row_group: int) -> list[str | None]:
    """The `text` column of one row group of a shard (opened with `open_shard`)."""
    return pf.read_row_group(row_group, columns=[TEXT_COLUMN]).column(0).to_pylist()


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
    kind = pf.schema_arrow.field(TEXT_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column '{TEXT_COLUMN}' has type {kind}, expected string")
    return pf


def write_shard(path: Path, texts: list[str], row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Write one shard (nanochat's settings: zstd, no dictionary) atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({TEXT_COLUMN: pa.array(texts, type=pa.string())}), sink, row_group_size=row_group_size,
                   compression="zstd", use_dictionary=False, write_statistics=False)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _built_split(out: Path, split: str, what: str, val_fraction: float,
                 build: Callable[[], tuple[list[str], dict]]) -> list[Path]:
    """The `split` shards of a corpus converted once into `out`: `build()` gives (documents, manifest);
    every k-th document (k = 1/val_fraction) is held out for val. Ranks and jobs wait on a lock while
    the first one writes train_XXXXX / val_XXXXX shards + manifest.json into a fresh dir, renamed to `out`."""
    from filelock import FileLock
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out / "manifest.json").is_file():
        with FileLock(str(out.with_name(out.name + ".lock"))):
            if not (out / "manifest.json").is_file():
                docs, manifest = build()
                k = max(2, round(1.0 / val_fraction)) if val_fraction else len(docs) + 1  # 0: none held out
                parts = {"train": [d for i, d in enumerate(docs) if i % k != k - 1],
                         "val": [d for i, d in enumerate(docs) if i % k == k - 1]}
                tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for name, items in parts.items():
                    for j in range(0, len(items), SHARD_DOCS):
                        write_shard(tmp / f"{name}_{j // SHARD_DOCS:05d}.parquet", items[j:j + SHARD_DOCS])
                manifest.update(train_docs=len(parts["train"]), val_docs=len(parts["val"]),
                                train_chars=sum(map(len, parts["train"])), val_chars=sum(map(len, parts["val"])))
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
    files = sorted(out.glob(f"{split}_*.parquet"))
    if not files:
        raise ValueError(f"{what} has no {split} documents (data.val_fraction may be 0 or the corpus "
                         f"too small to hold any out); see {out / 'manifest.json'}")
    return files


# ---------------------------------------------------------------------- demo corpus

def _module_docs(path: Path, root: Path, max_doc_chars: int = 6000) -> list[str]:
    """One module → documents: its docstrings as prose, and its source in top-level chunks."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    # prose: module docstring, then class/function docstrings (English-ish text)
    parts = [f"{module}\n\n{mdoc}"] if (mdoc := ast.get_docstring(tree)) else []
    parts += [f"{'class' if isinstance(n, ast.ClassDef) else 'def'} {module}.{n.name}\n\n{d}" for n in ast.walk(tree)
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              and (d := ast.get_docstring(n)) and len(d) > 40]
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
    return _group(parts, max_doc_chars, "\n\n") + [f"# {module}\n{g}" for g in _group(pieces, max_doc_chars, "")]


def _group(parts: list[str], limit: int, sep: str) -> list[str]:
    """Non-empty `parts` joined by `sep` into groups of at most `limit` chars (a longer part alone)."""
    out: list[str] = []
    for p in parts:
        if out and len(out[-1]) + len(sep) + len(p) <= limit:
            out[-1] += sep + p
        else:
            out.append(p)
    return out


def build_demo_docs(demo_chars: int) -> list[str]:
    """Deterministic documents (same list for the same Python version), `demo_chars` chars in total."""
    if demo_chars <= 0:
        raise ValueError(f"data.demo_chars={demo_chars}: must be positive")
    # the standard library's .py files (no tests, no site-packages), in a fixed order
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__",
            "turtledemo", "pydoc_data"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    random.Random(1337).shuffle(files)  # interleave packages, so a small corpus is still diverse
    docs: list[str] = []
    total = 0
    for doc in (d for f in files for d in _module_docs(f, root)):  # all of it if the stdlib is smaller
        docs.append(doc[:demo_chars - total])
        total += len(docs[-1])
        if total >= demo_chars:
            break
    return docs


def _demo_shards(data_cfg: DataConfig, base_dir: Path, split: str) -> list[Path]:
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = base_dir / "data" / "demo" / f"py{pyver}_c{data_cfg.demo_chars}_v{data_cfg.val_fraction}_b{DEMO_VERSION}"

    def build() -> tuple[list[str], dict]:
        t0 = time.time()
        docs = build_demo_docs(data_cfg.demo_chars)
        return docs, {"source": "demo", "python": sys.version.split()[0], "demo_chars": data_cfg.demo_chars,
                      "build_seconds": round(time.time() - t0, 2)}

    return _built_split(out, split, f"demo corpus {out}", data_cfg.val_fraction, build)


# ---------------------------------------------------------------------- local files

_LOCAL_EXTS = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".txt", ".txt.gz")


def _local_files(path_spec: str | None) -> list[Path]:
    if not path_spec:
        raise ValueError("data.path is not set: data=local needs data.path=<dir or glob of "
                         "parquet/jsonl/txt files>")
    p = Path(path_spec).expanduser()
    if p.is_dir():
        files, where = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(_LOCAL_EXTS)], f"directory {p}"
    elif p.is_file():
        files, where = [p], f"file {p}"
    else:
        files = [Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file()]
        where = f"glob {path_spec!r}"
        if not files and not any(ch in str(path_spec) for ch in "*?["):
            raise FileNotFoundError(f"data.path={path_spec!r} does not exist (give a dir, a file or a glob)")
    if bad := [f for f in files if not f.name.endswith(_LOCAL_EXTS)]:
        raise ValueError(f"data.path={path_spec!r}: unsupported file {bad[0]} "
                         f"(supported: {', '.join(_LOCAL_EXTS)})")
    if not files:
        raise ValueError(f"data.path={path_spec!r}: no {'/'.join(_LOCAL_EXTS)} files in {where}")
    return sorted(f.resolve() for f in files)


def _read_local_docs(path: Path, txt_doc_chars: int = 4000) -> list[str]:
    """Documents of one local file. A txt file is cut into ~txt_doc_chars docs at blank lines."""
    if path.name.endswith(".parquet"):
        return [t for t in open_shard(path).read(columns=[TEXT_COLUMN]).column(0).to_pylist() if t]
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        if not path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):  # txt
            return _group([p for p in f.read().split("\n\n") if p.strip()], txt_doc_chars, sep="\n\n")
        docs = []
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

    def build() -> tuple[list[str], dict]:
        docs = [d for f in files for d in _read_local_docs(f)]
        if not docs:
            raise ValueError(f"data.path={data_cfg.path!r}: the corpus is empty (no non-empty "
                             f"'{TEXT_COLUMN}' in {len(files)} file(s))")
        return docs, {"source": "local", "path": str(data_cfg.path), "files": [str(f) for f in files]}

    return _built_split(base_dir / "data" / "local" / key, split, f"local corpus data.path={data_cfg.path!r}",
                        data_cfg.val_fraction, build)


# ---------------------------------------------------------------------- remote shards (the hub)

def remote_repo(data_cfg: DataConfig) -> str:
    repo = data_cfg.repo or REMOTE_SOURCES[data_cfg.source].repo
    if not repo or "/" not in repo:
        raise ValueError(f"data.repo={repo!r}: data.source={data_cfg.source} needs a hub dataset repo "
                         "data.repo=<owner>/<name> of parquet shards with a 'text' column")
    return repo


def _manifest_path(data_cfg: DataConfig, base_dir: Path) -> Path:
    name = f"{remote_repo(data_cfg).replace('/', '--')}@{quote(data_cfg.revision, safe='')}.json"
    return Path(base_dir).expanduser() / "data" / "hub" / name


def remote_listing(data_cfg: DataConfig, base_dir: str | Path) -> tuple[str, list[str]]:
    """(commit, the repo's parquet files in sorted order), pinned on first use.

    The first call asks the hub (one API call) and writes the answer to
    <base_dir>/data/hub/<owner>--<name>@<revision>.json; later calls, other ranks and offline
    runs read it, so the shard list (and which shard is val) never moves under a project.
    Delete the file, or set data.revision, to follow a branch that moved.
    """
    manifest = _manifest_path(data_cfg, Path(base_dir))
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        return m["commit"], m["files"]
    repo, src = remote_repo(data_cfg), REMOTE_SOURCES[data_cfg.source]
    ref = hub.repo_cache_dir(repo) / "refs" / data_cfg.revision
    # offline: a named source (fineweb_edu, climbmix) on its own repo knows its file names, and the hub
    # cache knows the commit its branch pointed at (refs/<revision>), e.g. when another tool filled a
    # shared HF_HUB_CACHE. Any other repo (or source hub) needs its listing pinned.
    if hub.offline() and repo == src.repo and ref.is_file():
        top = data_cfg.max_shard if data_cfg.max_shard is not None else src.max_shard
        return ref.read_text().strip(), [shard_name(i) for i in range(top + 1)]
    commit, files = hub.resolve(repo, data_cfg.revision)
    shards = [f for f in files if f.endswith(".parquet")]
    if not shards:
        raise ValueError(f"data.repo={repo!r} (revision {data_cfg.revision}) has no .parquet files "
                         f"({len(files)} files); pretraining shards are parquet files with a '{TEXT_COLUMN}' column")
    atomic_write_json(manifest, {"repo": repo, "revision": data_cfg.revision, "commit": commit, "files": shards})
    return commit, shards


def remote_shard_indices(data_cfg: DataConfig, split: str, n_files: int) -> list[int]:
    """val: the pinned shard (data.val_shard, default the last); train: the first num_shards others."""
    top = next(m for m in (data_cfg.max_shard, REMOTE_SOURCES[data_cfg.source].max_shard, n_files - 1) if m is not None)
    if not 0 <= top < n_files:
        raise ValueError(f"data.max_shard={top}: the repo {remote_repo(data_cfg)} has {n_files} parquet "
                         f"files (indices 0..{n_files - 1}); set data.max_shard within that range")
    val = data_cfg.val_shard if data_cfg.val_shard is not None else top
    if not 0 <= val <= top:
        raise ValueError(f"data.val_shard={val}: must be in [0, data.max_shard={top}]")
    if split == "val":
        return [val]
    available = [i for i in range(top + 1) if i != val]
    n = data_cfg.num_shards if data_cfg.num_shards is not None else len(available)
    if not 1 <= n <= len(available):
        raise ValueError(f"data.num_shards={n}: must be in [1, {len(available)}] for {data_cfg.source} "
                         f"(max_shard={top}, one shard pinned for val)")
    return available[:n]


def _remote_shards(data_cfg: DataConfig, base_dir: Path, split: str, download: bool) -> list[Path]:
    """The split's shards in the hub cache; `download` fetches them (a file whose parquet footer pyarrow
    cannot read, e.g. a truncated one, is fetched again)."""
    commit, files = remote_listing(data_cfg, base_dir)
    root = hub.snapshot_dir(remote_repo(data_cfg), commit)
    paths = [root / files[i] for i in remote_shard_indices(data_cfg, split, len(files))]
    if download:  # the missing ones, download_workers at a time, under one progress bar
        from huggingface_hub.utils import tqdm  # the hub's bars: HF_HUB_DISABLE_PROGRESS_BARS applies
        lazy = data_cfg.num_shards is None and split == "train"
        missing = [p for p in (paths[:max(1, data_cfg.download_workers)] if lazy else paths) if not p.is_file()]
        list(tqdm(shards_on_disk(data_cfg, base_dir, missing), desc=f"{data_cfg.source} {split} shards", unit="file",
                  total=len(missing), disable=len(missing) < 2))
    return paths


def download_shards(data_cfg: DataConfig, base_dir: str | Path, n_train: int) -> list[Path]:
    """The first `n_train` training shards and the val shard, in parallel with a progress bar."""
    cfg = replace(data_cfg, num_shards=n_train)
    return _remote_shards(cfg, Path(base_dir), "train", True) + _remote_shards(cfg, Path(base_dir), "val", True)


def ensure_shard(data_cfg: DataConfig, base_dir: str | Path, path: Path) -> Path:
    """Make sure a listed shard is on disk (no-op for local files and cached shards); fetch it if not."""
    if path.is_file() or data_cfg.source not in REMOTE_SOURCES:
        return path
    repo = remote_repo(data_cfg)
    commit, *name = path.relative_to(hub.repo_cache_dir(repo) / "snapshots").parts  # list_shards' <commit>/<file>
    return hub.download(repo, "/".join(name), commit, validate=pq.ParquetFile)


def main(argv: list[str] | None = None) -> None:
    """`python -m nanochat.dataset -n 8 --source fineweb_edu`: pre-fetch shards (plus the val shard)."""
    import argparse
    from nanochat.common import get_base_dir
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("-n", "--num-shards", type=int, default=8)
    ap.add_argument("--source", default="fineweb_edu", choices=sorted(REMOTE_SOURCES))
    ap.add_argument("--repo", default=None, help="hub dataset repo <owner>/<name> (needed for --source hub)")
    ap.add_argument("--revision", default="main")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--base-dir", default=None)
    a = ap.parse_args(argv)
    cfg = DataConfig(name=a.source, source=a.source, repo=a.repo, revision=a.revision, download_workers=a.workers)
    t0 = time.time()
    paths = download_shards(cfg, get_base_dir(a.base_dir), a.num_shards)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    dt = time.time() - t0
    print(f"{len(paths)} shards ({mb:.0f} MB) in {paths[0].parent} ({dt:.1f}s, {mb / max(dt, 1e-9):.1f} MB/s)")


if __name__ == "__main__":
    main()
