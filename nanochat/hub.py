"""Downloads from the Hugging Face hub (and plain URLs), through `huggingface_hub`.

One place for every download of the project: pretraining shards (`nanochat.dataset`), task data
(`nanochat.tasks.common`), the CORE eval bundle (`nanochat.core_eval`), the word list and the
identity conversations. The library does the transport and the cache: HF_TOKEN (gated/private
repos), HF_HOME / HF_HUB_CACHE (one cache shared with every other tool), HF_HUB_OFFLINE,
HF_ENDPOINT (mirrors; tests point it at a local server), a lock per file, resumed transfers and
atomic renames. What is left here is what the library does not do:

- read those variables at call time (huggingface_hub reads them once, at import), so a process
  that sets them later (a test, a launcher) is obeyed too; NANOCHAT_OFFLINE=1 also means offline;
- retry transient failures (5xx, dropped connections) with backoff, and check each file with a
  caller's validator (a parquet footer), re-downloading a file that fails it;
- turn the library's exceptions into one `HubError` that names the repo, the file and the fix;
- plain (non-hub) URLs: the same library transport into a cache dir, under a lock, renamed atomically.

Importing this module imports no huggingface_hub (dry runs and --help stay fast).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

REPO_TYPE = "dataset"  # everything nanochat fetches from the hub is a dataset repo
Validator = Callable[[Path], None]  # raises (ValueError/OSError) when a downloaded file is unusable


class HubError(RuntimeError):
    """A download failed for good; the message names what was asked for and how to fix it."""


# ----------------------------------------------------------------------------- environment

def offline() -> bool:
    """No network: HF_HUB_OFFLINE=1 (the hub's own switch) or NANOCHAT_OFFLINE=1."""
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on")
               for n in ("HF_HUB_OFFLINE", "NANOCHAT_OFFLINE"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir() -> Path:
    """The hub cache, as huggingface_hub resolves it: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _common_kwargs() -> dict:
    # token None lets the library fall back to the token saved by `hf auth login`
    return dict(repo_type=REPO_TYPE, cache_dir=str(cache_dir()), endpoint=endpoint(),
                token=os.environ.get("HF_TOKEN") or None)


def repo_cache_dir(repo_id: str) -> Path:
    """The hub cache's folder of a dataset repo (its documented layout: blobs/ refs/ snapshots/)."""
    return cache_dir() / f"datasets--{repo_id.replace('/', '--')}"


def snapshot_dir(repo_id: str, commit: str) -> Path:
    """Where the hub cache keeps the files of `repo_id` at `commit`."""
    return repo_cache_dir(repo_id) / "snapshots" / commit


# ----------------------------------------------------------------------------- errors

_OFFLINE_FIX = ("Fix: run once with network access (e.g. `python -m nanochat.dataset` for shards), point "
                "HF_HUB_CACHE/HF_HOME at a cache that has it, or unset HF_HUB_OFFLINE/NANOCHAT_OFFLINE")


def _classify(e: BaseException, what: str) -> tuple[bool, HubError]:
    """The library's exception → (worth another try, a HubError saying what failed and what to set).

    Worth another try: server errors, rate limits, dropped/refused connections, short bodies, and a
    hub that was unreachable while the cache had nothing (unless offline mode is on).
    """
    from huggingface_hub import errors as E
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, E.GatedRepoError) or status == 401 or status == 403:
        return False, HubError(f"{what}: HTTP {status or 401}, the repo is gated or private and the request was "
                               "not authorized. Fix: accept its terms on the hub page and set HF_TOKEN=<your "
                               "token> (or run `hf auth login`)")
    if isinstance(e, E.RepositoryNotFoundError):
        return False, HubError(f"{what}: no such dataset repo on {endpoint()}. Fix: check the repo name "
                               "(data.repo, the task source) and HF_ENDPOINT")
    if isinstance(e, E.RevisionNotFoundError):
        return False, HubError(f"{what}: no such revision. Fix: check data.revision (a branch, tag or commit)")
    if isinstance(e, E.RemoteEntryNotFoundError):
        return False, HubError(f"{what}: the file is not in the repo. Fix: check the file name / data.max_shard")
    if isinstance(e, E.LocalEntryNotFoundError) and offline():
        return False, HubError(f"{what}: not in the hub cache {cache_dir()} and offline mode is on. {_OFFLINE_FIX}")
    if status is not None:
        transient = status >= 500 or status in (408, 429)
    else:
        transient = isinstance(e, (E.LocalEntryNotFoundError, OSError, ValueError, ConnectionError, TimeoutError)) \
            or "httpx" in type(e).__module__
    why = f"HTTP {status}" if status is not None else type(e).__name__
    return transient, HubError(f"{what}: {why}: {str(e)[:300]}. Fix: check the network, the URL and "
                               f"HF_ENDPOINT={endpoint()}")


def _with_retries(fn: Callable[[], Path], what: str, attempts: int, backoff: float) -> Path:
    for attempt in range(1, attempts + 1):  # attempts >= 1: the last one raises
        try:
            return fn()
        except Exception as e:  # classified: permanent ones are raised at once
            transient, err = _classify(e, what)
            if not transient or attempt == attempts:
                raise (HubError(f"{err} (gave up after {attempts} attempts)") if transient else err) from e
            wait = backoff * 2 ** (attempt - 1)
            print(f"{what}: attempt {attempt}/{attempts} failed ({type(e).__name__}: {str(e)[:200]}); "
                  f"retrying in {wait:.1f}s", file=sys.stderr, flush=True)
            time.sleep(wait)


# ----------------------------------------------------------------------------- repos

def resolve(repo_id: str, revision: str = "main") -> tuple[str, list[str]]:
    """(commit sha, every file path) of a dataset repo at `revision`: one API call."""
    from huggingface_hub import HfApi
    if offline():
        raise HubError(f"listing dataset {repo_id}@{revision} needs the network and offline mode is on. "
                       f"{_OFFLINE_FIX}")

    def call() -> tuple[str, list[str]]:
        api = HfApi(endpoint=endpoint(), token=os.environ.get("HF_TOKEN") or None)
        info = api.dataset_info(repo_id, revision=revision)
        return info.sha, sorted(s.rfilename for s in (info.siblings or []))

    commit, files = _with_retries(call, f"dataset {repo_id}@{revision}", attempts=4, backoff=1.0)
    # note in the cache which commit `revision` named (refs/<revision>, as hf_hub_download does for a
    # branch): files fetched by commit then still resolve offline by branch name, for any tool
    ref = repo_cache_dir(repo_id) / "refs" / revision
    if revision != commit and (not ref.is_file() or ref.read_text() != commit):
        from nanochat.common import atomic_write_text
        atomic_write_text(ref, commit)
    return commit, files


def download(repo_id: str, filename: str, revision: str = "main", *, validate: Validator | None = None,
             attempts: int = 5, backoff: float = 0.5) -> Path:
    """One file of a dataset repo, from the hub cache or downloaded into it; its local path.

    Offline mode answers from the cache or raises a HubError naming the cache and the fix.
    A file that fails `validate` is removed from the cache and downloaded again.
    """
    from huggingface_hub import hf_hub_download
    what = f"{repo_id}/{filename}@{revision}"

    def call() -> Path:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline(),
                                    **_common_kwargs()))
        if validate is not None:
            try:
                validate(path)
            except Exception as e:
                for p in {path, path.resolve()}:  # out of the cache: the snapshot link and the blob behind it
                    p.unlink(missing_ok=True)
                raise OSError(f"downloaded {what} is unusable ({e})") from e
        return path

    return _with_retries(call, what, attempts, backoff)


def snapshot(repo_id: str, patterns: list[str], revision: str = "main") -> list[Path]:
    """The files of a repo matching `patterns` (fnmatch globs), via snapshot_download (cached, parallel)."""
    from huggingface_hub import snapshot_download
    root = _with_retries(lambda: Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                        local_files_only=offline(), **_common_kwargs())),
                         f"{repo_id}@{revision} files {patterns}", attempts=4, backoff=1.0)
    import fnmatch
    return [p for p in sorted(root.rglob("*"))
            if p.is_file() and any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in patterns)]


# ----------------------------------------------------------------------------- URLs

def parse_hub_url(url: str) -> tuple[str, str, str] | None:
    """(repo_id, revision, filename) of a dataset file named by `hf://datasets/<owner>/<name>[@rev]/<file>`
    or by a `<endpoint>/datasets/<owner>/<name>/resolve/<rev>/<file>` URL; None for any other URL."""
    if url.startswith("hf://datasets/"):
        parts = url[len("hf://datasets/"):].split("/")
        if len(parts) < 3:
            raise HubError(f"{url!r}: an hf:// file reference is hf://datasets/<owner>/<name>[@revision]/<file>")
        name, _, rev = parts[1].partition("@")
        return f"{parts[0]}/{name}", unquote(rev) or "main", "/".join(parts[2:])
    u = urlsplit(url)
    parts = u.path.strip("/").split("/")
    hub_hosts = {urlsplit(endpoint()).netloc, "huggingface.co", "hf.co"}
    if u.netloc in hub_hosts and len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
        return f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
    return None


def fetch_url(url: str, cache: str | os.PathLike, *, validate: Validator | None = None,
              attempts: int = 5, backoff: float = 1.0) -> Path:
    """A file named by URL: hub files go through `download` (the hub cache); any other URL is fetched
    once into `cache`/<hash of url>/<name> by the hub library's HTTP transport, under a file lock,
    validated, then renamed into place (readers never see half a file)."""
    if (ref := parse_hub_url(url)) is not None:
        repo_id, revision, filename = ref
        return download(repo_id, filename, revision, validate=validate, attempts=attempts, backoff=backoff)
    name = Path(urlsplit(url).path).name or "download"
    dest = Path(cache).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if dest.is_file():
        return dest
    if offline():
        raise HubError(f"{url}: not downloaded yet ({dest} is missing) and offline mode is on. Fix: put the "
                       "file there, or unset HF_HUB_OFFLINE/NANOCHAT_OFFLINE")
    from filelock import FileLock
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / ".lock")):
        if dest.is_file():  # another process finished it while we waited for the lock
            return dest
        return _with_retries(lambda: _fetch_once(url, dest, validate), url, attempts, backoff)


def _fetch_once(url: str, dest: Path, validate: Validator | None) -> Path:
    from huggingface_hub.file_download import http_get
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.incomplete")
    try:
        with open(tmp, "wb") as f:
            http_get(url, f, displayed_filename=dest.name)  # resumes a dropped connection with Range
        if validate is not None:
            validate(tmp)
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)
