"""Task base classes, the multiple-choice prompt, and data loading (local files or the HF hub).

A task is a list of conversations:
    {"messages": [{"role": "user", "content": str},
                  {"role": "assistant", "content": str | [{"type": "text"|"python"|"python_output", "text": str}, ...]},
                  ...], ...task-specific fields}
Slicing (start/stop/step) is applied by the base class so every task gets `task[i]`,
`len(task)` and views like "the first 500 test questions" for free.

Data loading: each task first looks for the offline copy (the ../shared/data layout, or a
path the caller gives), then goes to the Hugging Face hub: the parquet files of a
(dataset, config, split) from the hub's parquet export, fetched by huggingface_hub into the
hub cache (HF_HOME / HF_HUB_CACHE; HF_TOKEN, HF_ENDPOINT honoured). Both are read by one
function, `load_files` = datasets.load_dataset("json" | "csv" | "parquet" | "text",
data_files=...) (MMLU's per-subject csv files: the csv module). Set NANOCHAT_OFFLINE=1 (or
HF_HUB_OFFLINE=1) to never touch the network: the hub cache still answers.
"""
from __future__ import annotations

import os
import random
import re
import zlib
from pathlib import Path
from typing import Any, Sequence

from nanochat import hub
from nanochat.common import get_base_dir, shared_data_dir

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

    # subclasses set or implement these
    eval_type = "generative"   # or 'categorical': the answer is one of `conversation['letters']`
    rows: Sequence = ()        # a task's examples as read (HubTask), unless it counts its own

    def num_examples(self) -> int:
        """Number of examples before slicing."""
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        """The conversation at a physical (unsliced) index."""
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, completion: str) -> bool | int:
        """Is `completion` (the assistant's text) a correct answer to `conversation`? (graded tasks)"""
        raise NotImplementedError(f"{type(self).__name__} conversations are training data; they have no grader")

    def reward(self, conversation: Conversation, completion: str) -> float:
        """RL reward; by default 1.0 for a correct answer and 0.0 otherwise."""
        return float(self.evaluate(conversation, completion))

    # slicing
    def indices(self) -> range:
        """The physical indices of the sliced view."""
        return range(self.num_examples())[self.start:self.stop:self.step]

    def __len__(self) -> int:
        return len(self.indices())

    def __getitem__(self, index: int) -> Conversation:
        """The example at `index` of the sliced view; IndexError past the end (which also ends `for ex in task`)."""
        view = self.indices()
        if not -len(view) <= index < len(view):
            raise IndexError(f"{type(self).__name__} index {index} out of range (len {len(view)})")
        return self.get_example(view[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


class TaskMixture(Task):
    """Several tasks shuffled together deterministically; list a task twice to oversample it."""

    def __init__(self, tasks: Sequence[Task], seed: int | None = 42, **kwargs):
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        self.tasks = list(tasks)
        self.index_map = [(ti, li) for ti, t in enumerate(self.tasks) for li in range(len(t))]
        if seed is not None:
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
        return self.tasks[self.index_map[self.indices()[index]][0]]

    def evaluate(self, conversation: Conversation, completion: str) -> bool | int:
        noun = type(self).__name__.removeprefix("Task").lower()
        raise TypeError(f"evaluate through the sub-task: {noun}.task_of(i).evaluate(...)")


class TaskSequence(TaskMixture):
    """Tasks one after another (curricula, or concatenating splits): a mixture in order."""

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(tasks, seed=None, **kwargs)


class Synthetic(Task):
    """`size` examples, each a pure function of (split, index): drawn by a seeded RNG (other seeds for test),
    with train and test kept apart by a hash (`in_test`). Graded by the number after '####'."""
    test_every = 10                # one item in ten (by hash) is held out for test
    test_seed_offset = 10_000_000  # test examples come from other seeds
    splits = ("train", "test")

    def __init__(self, split: str = "train", size: int = 1000, **kwargs):
        super().__init__(**kwargs)
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__} split={split!r}: use train or test")
        self.split, self.size = split, size

    @classmethod
    def in_test(cls, key: str) -> bool:
        return zlib.crc32(key.encode()) % cls.test_every == 0

    def rng(self, index: int) -> random.Random:
        return random.Random(index + (self.test_seed_offset if self.split == "test" else 0))

    def num_examples(self) -> int:
        return self.size

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return answers_match(extract_answer(completion), str(conversation["answer"]))


# ----------------------------------------------------------------------------- helpers for tasks

def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice prompt. The letter comes *after* each choice ("- Paris=A"): a small
    model then sees the content before it has to produce the letter, which helps it tie the two."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


class MultipleChoice(Task):
    """A task whose answer is one of the example's `letters`, graded by exact match."""
    eval_type = "categorical"

    @staticmethod
    def example(question: str, letters: Sequence[str], choices: Sequence[str], answer: str, **fields) -> Conversation:
        """The conversation: the prompt (render_mc), the answer letter, `fields`, and the letters."""
        return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                             {"role": "assistant", "content": answer}], **fields, "letters": list(letters)}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


class HubTask(Task):
    """A task whose rows are the file `path` if given, else its offline copy (`read_local`), else the hub split
    `hub_args` = (dataset, config, split); a TaskDataError naming the task (`label`) and `how_to` if neither."""
    splits: tuple[str, ...] | None = ("train", "test")  # the splits it has (None: whatever the dataset has)

    def __init__(self, split: str, label: str, names: Sequence[str], hub_args: tuple[str, str, str], how_to: str,
                 data_dir: str | None = None, base_dir: str | None = None, path: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if self.splits is not None and split not in self.splits:
            raise ValueError(f"{type(self).__name__} split={split!r}: use one of {self.splits}")
        self.split = split
        self.rows = load_files(path) if path is not None else self.read_local(data_dir, names)
        if self.rows is None:
            try:
                self.rows = hub_split(*hub_args)
            except (TaskDataError, hub.HubError, OSError) as e:
                raise TaskDataError(f"no data for task {label!r}: not found locally and the hub download failed "
                                    f"({e}). {how_to}") from e

    def read_local(self, data_dir: str | None, names: Sequence[str]) -> Sequence | None:
        """The offline copy: the first of `names` (paths under the shared data dir) that exists; None if none."""
        found = find_local(data_dir, names)
        return load_files(found) if found else None


_ANSWER_RE = re.compile(r"####\s*(-?[$0-9.,]+)")


def extract_answer(text: str) -> str | None:
    """The final numeric answer written after '####' (GSM8K convention), normalized; None if absent."""
    matches = _ANSWER_RE.findall(text)
    ans = matches[-1].replace(",", "").replace("$", "").rstrip(".") if matches else ""
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
    return message_content if isinstance(message_content, str) else "".join(p["text"] for p in message_content)


# ----------------------------------------------------------------------------- data through `datasets`

def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The offline data root: an explicit dir, else nanochat.common.shared_data_dir()."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        return p if p.is_dir() else None
    return shared_data_dir()


def load_files(files: str | os.PathLike | Sequence[str | os.PathLike], kind: str | None = None):
    """Local files as one `datasets.Dataset` (Arrow, memory-mapped), via datasets.load_dataset(kind,
    data_files=...): the one reader of task data, for offline copies and hub downloads alike.
    `kind` defaults to the first file's extension (.gz aside; text if unknown)."""
    import datasets  # heavy (≈1 s): imported only when a task really loads data
    flat = [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    if missing := [f for f in flat if not f.is_file()]:
        raise TaskDataError(f"{missing[0]} does not exist")
    kind = kind or {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(
        Path(flat[0].name.lower().removesuffix(".gz")).suffix, "text")
    datasets.logging.set_verbosity_error()  # no "Generating split" chatter for every task file
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind, data_files=[str(f) for f in flat], split="train")
    except Exception as e:  # the builders raise many kinds; name the file and keep the cause
        more = f" (+{len(flat) - 1} more)" if len(flat) > 1 else ""
        raise ValueError(f"{flat[0]}{more}: could not read it as {kind} with datasets.load_dataset "
                         f"({type(e).__name__}: {str(e)[:300]})") from e


# ----------------------------------------------------------------------------- the hub

PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet export of every dataset, config/split/*.parquet


def hub_split(dataset: str, config: str, split: str):
    """A (dataset, config, split) from the hub: its parquet files (the hub's parquet export, through
    the hub cache) loaded with `load_files`, the same reader as local copies."""
    patterns = [f"{config}/{split}/*.parquet", f"{config}/partial-{split}/*.parquet"]
    files = hub.snapshot(dataset, patterns, revision=PARQUET_REVISION)
    if not files:
        raise TaskDataError(f"hub dataset {dataset} has no parquet files for config={config!r} split={split!r} "
                            f"(looked for {' or '.join(patterns)} at revision {PARQUET_REVISION})")
    return load_files(files, kind="parquet")


def find_local(data_dir: str | None, names: Sequence[str]) -> Path | None:
    """The first of `names` (paths under the shared data dir) that exists."""
    root = resolve_data_dir(data_dir)
    return next((root / n for n in names if (root / n).exists()), None) if root else None


def local_or_url(names: Sequence[str], data_dir: str | None, url: str, base_dir: str | None, what: str,
                 how_to: str) -> Path:
    """A data file: the first of `names` under the shared data dir, else `url` fetched once into
    <base_dir>/downloads/; a TaskDataError saying `what` is missing and `how_to` get it otherwise."""
    found = find_local(data_dir, names)
    if found is not None:
        return found
    try:
        return hub.fetch_url(url, get_base_dir(base_dir) / "downloads")
    except hub.HubError as e:
        raise TaskDataError(f"{what}: {e}. {how_to}") from e
