"""Task base classes, the multiple-choice prompt, and data loading (local files or the HF hub).

A task is a list of conversations:
    {"messages": [{"role": "user", "content": str},
                  {"role": "assistant", "content": str | [{"type": "text"|"python"|"python_output", "text": str}, ...]},
                  ...], ...task-specific fields}
Slicing (start/stop/step) is applied by the base class so every task gets `task[i]`,
`len(task)` and views like "the first 500 test questions" for free.

Data loading: each task first looks for the offline copy (the ../shared/data layout, or a
path the caller gives), then for a cached hub download under <base_dir>/hf/, and only
then downloads from the Hugging Face hub: the dataset viewer lists the auto-converted
parquet files of a (dataset, config, split), which are fetched with retries and written
atomically. No `datasets` package needed. Set NANOCHAT_OFFLINE=1 (or HF_HUB_OFFLINE=1) to
never touch the network.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from nanochat.common import atomic_write_bytes, get_base_dir, shared_data_dir

Conversation = dict[str, Any]


class TaskDataError(RuntimeError):
    """A task's data is nowhere to be found; the message says where it was looked for and how to get it."""


# ----------------------------------------------------------------------------- Task

class Task:
    """A lazily indexed dataset of conversations, viewed through start:stop:step."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"{type(self).__name__}: bad slice start={start} stop={stop} step={step}; "
                             "need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    # subclasses implement these
    @property
    def eval_type(self) -> str:
        """'categorical' (answer is one of `conversation['letters']`) or 'generative' (sample and check)."""
        raise NotImplementedError

    def num_examples(self) -> int:
        """Number of examples before slicing."""
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        """The conversation at a physical (unsliced) index."""
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, completion: str) -> bool | int:
        """Is `completion` (the assistant's text) a correct answer to `conversation`?"""
        raise NotImplementedError

    def reward(self, conversation: Conversation, completion: str) -> float:
        """RL reward; by default 1.0 for a correct answer and 0.0 otherwise."""
        return float(self.evaluate(conversation, completion))

    # slicing
    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index: int) -> Conversation:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range (len {n})")
        return self.get_example(self.start + index * self.step)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


class TaskMixture(Task):
    """Several tasks shuffled together deterministically; list a task twice to oversample it."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index_map = [(ti, li) for ti, t in enumerate(self.tasks) for li in range(len(t))]
        random.Random(seed).shuffle(self.index_map)

    @property
    def eval_type(self) -> str:
        types = {t.eval_type for t in self.tasks}
        if len(types) != 1:
            raise ValueError("a TaskMixture of categorical and generative tasks has no single eval_type")
        return types.pop()

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> Conversation:
        ti, li = self.index_map[index]
        return self.tasks[ti][li]

    def task_of(self, index: int) -> Task:
        """The sub-task that example `index` (sliced view) came from: evaluate/reward through it."""
        ti, _ = self.index_map[self.start + index * self.step]
        return self.tasks[ti]

    def evaluate(self, conversation: Conversation, completion: str) -> bool | int:
        raise TypeError("evaluate through the sub-task: mixture.task_of(i).evaluate(...)")


class TaskSequence(Task):
    """Tasks one after another (curricula, or concatenating splits)."""

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.offsets = []
        total = 0
        for t in self.tasks:
            self.offsets.append(total)
            total += len(t)
        self.total = total

    @property
    def eval_type(self) -> str:
        return TaskMixture.eval_type.fget(self)  # same rule

    def num_examples(self) -> int:
        return self.total

    def _locate(self, index: int) -> tuple[int, int]:
        for ti in range(len(self.tasks) - 1, -1, -1):
            if index >= self.offsets[ti]:
                return ti, index - self.offsets[ti]
        raise IndexError(index)

    def get_example(self, index: int) -> Conversation:
        ti, li = self._locate(index)
        return self.tasks[ti][li]

    def task_of(self, index: int) -> Task:
        return self.tasks[self._locate(self.start + index * self.step)[0]]

    def evaluate(self, conversation: Conversation, completion: str) -> bool | int:
        raise TypeError("evaluate through the sub-task: sequence.task_of(i).evaluate(...)")


# ----------------------------------------------------------------------------- helpers for tasks

def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice prompt. The letter comes *after* each choice ("- Paris=A"): a small
    model then sees the content before it has to produce the letter, which helps it tie the two."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


_ANSWER_RE = re.compile(r"####\s*(-?[$0-9.,]+)")


def extract_answer(text: str) -> str | None:
    """The final numeric answer written after '####' (GSM8K convention), normalized; None if absent."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    ans = matches[-1].replace(",", "").replace("$", "").rstrip(".")
    return ans or None


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Compare two extracted answers as numbers when both parse (so 18 == 18.0), else as text."""
    if pred is None or ref is None:
        return False
    try:
        return abs(float(pred) - float(ref)) < 1e-6
    except ValueError:
        return pred == ref


def assistant_text(message_content: str | list) -> str:
    """Flatten assistant content (str or parts) to the text the model would see."""
    if isinstance(message_content, str):
        return message_content
    return "".join(part["text"] for part in message_content)


# ----------------------------------------------------------------------------- local files

def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The offline data root: an explicit dir, else nanochat.common.shared_data_dir()."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        return p if p.is_dir() else None
    return shared_data_dir()


def open_text(path: str | os.PathLike):
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def read_csv_rows(path: str | os.PathLike, header: bool) -> list[list[str]]:
    with open_text(path) as f:
        rows = list(csv.reader(f))
    return rows[1:] if header else rows


def read_parquet_rows(paths: Sequence[str | os.PathLike]) -> list[dict]:
    import pyarrow.parquet as pq
    rows: list[dict] = []
    for p in paths:
        rows.extend(pq.read_table(p).to_pylist())
    return rows


# ----------------------------------------------------------------------------- hub downloads

DATASETS_SERVER = "https://datasets-server.huggingface.co"
RETRY_BACKOFF = 2.0  # seconds before the first retry; doubles each time


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("NANOCHAT_OFFLINE", "HF_HUB_OFFLINE"))


def _hf_headers() -> dict:
    token = os.environ.get("HF_TOKEN")  # only needed for gated datasets; none of ours are
    return {"Authorization": f"Bearer {token}"} if token else {}


def http_get(url: str, retries: int = 4, timeout: float = 60.0, backoff: float | None = None,
             headers: dict | None = None) -> bytes:
    """GET with retries and exponential backoff; 4xx other than 429 fail at once."""
    import requests
    backoff = RETRY_BACKOFF if backoff is None else backoff
    last: Exception | None = None
    for attempt in range(retries):
        try:
            r = requests.get(url, timeout=timeout, headers=headers or {})
            if r.status_code == 200:
                return r.content
            if 400 <= r.status_code < 500 and r.status_code != 429:
                raise TaskDataError(f"GET {url} → HTTP {r.status_code}: {r.text[:200]}")
            last = RuntimeError(f"HTTP {r.status_code}")
        except TaskDataError:
            raise
        except requests.RequestException as e:
            last = e
            if "NameResolutionError" in str(e) or "Name or service not known" in str(e):
                break  # no DNS: offline machine, retrying will not help
        if attempt + 1 < retries:
            time.sleep(backoff * (2 ** attempt))
    raise TaskDataError(f"GET {url} failed: {last}")


def download_file(url: str, dest: str | os.PathLike, **kwargs) -> Path:
    """Download once to `dest` (atomic: a partial download is never visible under that name)."""
    dest = Path(dest)
    if not dest.exists():
        atomic_write_bytes(dest, http_get(url, **kwargs))
    return dest


def hf_parquet_files(dataset: str, config: str, split: str, base_dir: str | os.PathLike | None = None,
                     server: str | None = None) -> list[Path]:
    """Local paths of the auto-converted parquet files of a hub dataset split, downloaded on first use.

    Cached under <base_dir>/hf/<dataset>/<config>/<split>/ with a `files.json` manifest written
    last, so an interrupted download is simply redone.
    """
    cache = get_base_dir(base_dir) / "hf" / dataset.replace("/", "__") / config / split
    manifest = cache / "files.json"
    if manifest.exists():
        names = json.loads(manifest.read_text())
        if all((cache / n).exists() for n in names):
            return [cache / n for n in names]
    if hub_offline():
        raise TaskDataError(f"{dataset} ({config}/{split}) is not cached in {cache} and NANOCHAT_OFFLINE is set")
    server = (server or os.environ.get("NANOCHAT_HF_DATASETS_SERVER") or DATASETS_SERVER).rstrip("/")
    listing = json.loads(http_get(f"{server}/parquet?dataset={dataset}", headers=_hf_headers()))
    entries = [e for e in listing.get("parquet_files", []) if e.get("config") == config and e.get("split") == split]
    if not entries:
        have = sorted({(e.get("config"), e.get("split")) for e in listing.get("parquet_files", [])})
        raise TaskDataError(f"hub dataset {dataset} has no parquet files for config={config!r} split={split!r}; "
                            f"available: {have}")
    names = []
    for i, e in enumerate(entries):
        name = f"{i:04d}_{e.get('filename') or 'data.parquet'}"
        download_file(e["url"], cache / name, headers=_hf_headers())
        names.append(name)
    atomic_write_bytes(manifest, json.dumps(names).encode())
    return [cache / n for n in names]


def load_rows(task: str, local: Callable[[], list | None], hub: Callable[[], list] | None, how_to: str) -> list:
    """Local first, then the hub; a clear TaskDataError naming the task if neither works."""
    rows = local()
    if rows is not None:
        return rows
    if hub is None:
        raise TaskDataError(f"no data for task {task!r}: {how_to}")
    try:
        return hub()
    except (TaskDataError, OSError) as e:
        raise TaskDataError(f"no data for task {task!r}: not found locally and the hub download failed ({e}). "
                            f"{how_to}") from e
