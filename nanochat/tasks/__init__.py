"""Chat tasks: conversations for mid-training / SFT / RL, and their graders for evaluation.

Stages name tasks by string through `make_task`:

    make_task("gsm8k", "train")                      GSM8K
    make_task("arc_easy", "test"), "arc_challenge"   ARC
    make_task("mmlu", "test")                        MMLU (all subjects); split "train" = auxiliary_train
    make_task("mmlu_aux", "train")                   MMLU auxiliary_train (other splits → MMLU all/<split>)
    make_task("humaneval", "test")                   HumanEval (graded in the sandbox)
    make_task("smoltalk", "train")                   SmolTalk (hub only)
    make_task("spellingbee", "train", size=2000)     synthetic, from the word list
    make_task("simplespelling", "train")
    make_task("arithmetic", "train", max_value=99)   synthetic, fully offline, uses the calculator tool
    make_task("identity", "train")                   nanochat's identity conversations
    make_task("customjson:/path/file.jsonl", "train")
    make_task("hub:HuggingFaceTB/smol-smoltalk:default:train", "train")   any hub dataset of conversations
    make_task("spellingbee:size=200,style=tool", "test")   inline keyword arguments
    make_task({"name": "arithmetic", "size": 500}, "train") a mapping from a config list

Names are case-insensitive and '-' = '_' ("ARC-Easy" works). Split "val"/"validation" maps to the
task's held-out split. Every task also accepts start/stop/step (a sliced view).
"""
from __future__ import annotations

import ast
import difflib
from typing import Callable, Mapping

from nanochat.tasks.arc import ARC
from nanochat.tasks.arithmetic import Arithmetic
from nanochat.tasks.common import (Conversation, Task, TaskDataError, TaskMixture, TaskSequence, answers_match,
                                   assistant_text, extract_answer, render_mc)
from nanochat.tasks.conversations import (CustomJSON, HubConversations, SmolTalk, identity_conversations,
                                          parse_hub_source)
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.spellingbee import SimpleSpelling, SpellingBee

__all__ = ["Task", "TaskMixture", "TaskSequence", "TaskDataError", "Conversation", "render_mc", "extract_answer",
           "answers_match", "assistant_text", "ARC", "MMLU", "GSM8K", "HumanEval", "SmolTalk", "SpellingBee",
           "SimpleSpelling", "CustomJSON", "HubConversations", "Arithmetic", "make_task", "TASK_NAMES"]


def _held_out(split: str, have: tuple[str, ...]) -> str:
    """Map generic split names onto the ones a dataset has."""
    held_out = ["validation", "test"] if split in ("val", "validation", "test", "dev") else []
    found = next((s for s in [split, *held_out] if s in have), None)
    if found is None:
        raise ValueError(f"split={split!r}: this task has splits {have}")
    return found


def _builder(cls: type[Task], **fixed) -> Callable[..., Task]:
    """A builder: `cls` on its own split for the stage's (`_held_out` onto `cls.splits`), with `fixed` options."""
    return lambda split, **kw: cls(split=_held_out(split, cls.splits), **fixed, **kw)


def _mmlu(split: str, **kw):
    if split == "train":
        return MMLU(subset="auxiliary_train", split="train", **kw)
    return MMLU(subset="all", split="validation" if split == "val" else split, **kw)


_BUILDERS: dict[str, Callable[..., Task]] = {
    "arc_easy": _builder(ARC, subset="ARC-Easy"),
    "arc_challenge": _builder(ARC, subset="ARC-Challenge"),
    "mmlu": _mmlu, "mmlu_aux": _mmlu, "mmlu_auxiliary_train": _mmlu,
    "gsm8k": _builder(GSM8K),
    "humaneval": _builder(HumanEval),
    "smoltalk": _builder(SmolTalk),
    "spellingbee": _builder(SpellingBee),
    "simplespelling": _builder(SimpleSpelling),
    "arithmetic": _builder(Arithmetic),
    "identity": lambda split, **kw: identity_conversations(**kw),
    "customjson": lambda split, **kw: CustomJSON(**kw),
    # a split written in the source wins; else the stage's, with "val" meaning the test split
    "hub": lambda split, source_split=None, **kw: HubConversations(
        split=source_split or ("test" if split in ("val", "validation") else split), **kw),
}
TASK_NAMES = tuple(_BUILDERS)

def normalize_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def parse_spec(spec: str | Mapping) -> tuple[str, dict]:
    """'name', 'name:k=v,k=v', 'customjson:<path>' or {'name': ..., **kwargs} → (name, kwargs)."""
    if isinstance(spec, Mapping):
        kw = dict(spec)
        name = kw.pop("name", None) or kw.pop("task", None)
        if not name:
            raise ValueError(f"task spec {dict(spec)!r}: a mapping needs a 'name' key, e.g. {{name: gsm8k}}")
        return normalize_name(str(name)), kw
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task spec {spec!r}: use a task name such as 'gsm8k' (known: {', '.join(TASK_NAMES)})")
    name, sep, arg = spec.partition(":")
    name = normalize_name(name)
    if not sep:
        return name, {}
    if name == "customjson":
        return name, {"path": arg}
    if name == "hub":
        return name, parse_hub_source(arg)
    kw = {}
    for item in arg.split(","):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"task spec {spec!r}: options after ':' are key=value pairs, e.g. 'spellingbee:size=200'")
        try:
            kw[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):  # a bare word: the text itself
            kw[k.strip()] = v.strip()
    return name, kw


def make_task(spec: str | Mapping, split: str, data_dir: str | None = None, base_dir: str | None = None,
              **kw) -> Task:
    """Build a task from its name (see the module docstring). data_dir: offline data root
    (default nanochat.common.shared_data_dir()); base_dir: where hub downloads are cached."""
    name, spec_kw = parse_spec(spec)
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, TASK_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown task {name!r}: {hint}known tasks: {', '.join(TASK_NAMES)}, customjson:<path>, "
                         "hub:<owner>/<name>[:config][:split]")
    kwargs = {**spec_kw, **kw}
    if name == "customjson" and "path" not in kwargs:
        raise ValueError("task 'customjson' needs a file: 'customjson:/path/to/file.jsonl'")
    if name == "hub" and not kwargs.get("repo"):
        raise ValueError("task 'hub' needs a dataset: 'hub:<owner>/<name>[:config][:split]'")
    if name != "customjson":  # the others find their data under data_dir, or download into base_dir
        kwargs.update(data_dir=data_dir, base_dir=base_dir)
    try:
        return _BUILDERS[name](split, **kwargs)
    except TypeError as e:
        raise ValueError(f"task {name!r}: bad options {sorted(kwargs)} ({e})") from e
