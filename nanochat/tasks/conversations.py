"""Tasks that are lists of conversations (training data, no grader): a JSONL file, or a hub dataset.

customjson:<path>: one conversation per line, either a JSON array of messages or an object
{"messages": [...]}. Roles must alternate user/assistant (an optional system message may come
first); assistant content may be a string or a list of parts. nanochat's identity conversations
use this: `customjson:<path>` or the `identity` task (<data_dir>/sft/identity_conversations.jsonl,
else downloaded once to <base_dir>/downloads/).

hub:<owner>/<name>[:config][:split]: the dataset needs a column of conversations (default
`messages`: a list of {role, content}, SmolTalk's schema). Its parquet files come through the
same path as every hub task (`hub_split`: the hub's parquet export, cached, then
datasets.load_dataset("parquet")); a local copy can be given with `path=` (json/jsonl/parquet/csv),
which is read first.

SmolTalk (HuggingFaceTB/smol-smoltalk) is such a dataset: general multi-turn chat data for mid-training
and SFT, hub only (it is not in the offline data); a local parquet/jsonl with a `messages` column works too.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from nanochat.tasks.common import Conversation, HubTask, Task, TaskDataError, load_files, local_or_url
from nanochat.tokenizer import check_messages

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


def validate_messages(messages, where: str) -> list[dict]:
    """`messages` if the tokenizer renders them (check_messages) and they hold a user and an assistant turn."""
    try:
        if len(check_messages({"messages": messages})) - (messages[0]["role"] == "system") < 2:
            raise ValueError("need at least one user and one assistant message")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return messages


class CustomJSON(Task):
    def __init__(self, path: str | os.PathLike, split: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(path):
            raise TaskDataError(f"customjson: file {path} does not exist; give a JSONL file of conversations")
        self.path = str(path)
        self.rows: list[list[dict]] = []  # each conversation's messages
        # lines through `datasets` (its text builder), parsed here: a line may be a JSON array, and
        # content may be a string in one message and a list of parts in the next, which no
        # Arrow schema holds
        for lineno, line in enumerate(load_files(path, kind="text")["text"], 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            messages = obj["messages"] if isinstance(obj, dict) and "messages" in obj else obj
            self.rows.append(validate_messages(messages, f"{path}:{lineno}"))

    def get_example(self, index: int) -> Conversation:
        return {"messages": self.rows[index]}


def identity_conversations(data_dir: str | None = None, base_dir: str | None = None, **kwargs) -> CustomJSON:
    """nanochat's synthetic identity conversations: the offline copy, else a download (cached)."""
    return CustomJSON(local_or_url(["sft/identity_conversations.jsonl"], data_dir, IDENTITY_URL, base_dir,
                                   "no data for task 'identity'", "Put identity_conversations.jsonl under "
                                   "<shared data>/sft/ or pass customjson:<file>"), **kwargs)


def parse_hub_source(arg: str) -> dict:
    """'<owner>/<name>[:config][:split]' → {"repo", "config", "source_split"} (missing parts → None)."""
    parts = arg.split(":")
    if not parts[0] or parts[0].count("/") != 1 or len(parts) > 3:
        raise ValueError(f"task source 'hub:{arg}': use hub:<owner>/<name>[:config][:split], "
                         "e.g. hub:HuggingFaceTB/smol-smoltalk:default:train")
    parts += [None] * (3 - len(parts))
    return {"repo": parts[0], "config": parts[1] or None, "source_split": parts[2] or None}


class HubConversations(HubTask):
    splits = None  # whatever the dataset has

    def __init__(self, repo: str, config: str | None = None, split: str = "train", column: str = "messages",
                 local: Sequence[str] = (), label: str | None = None, how_to: str | None = None, **kwargs):
        """`local`: files under the shared data dir tried before the hub; `label`, `how_to`: for errors."""
        self.repo, self.config, self.column = repo, config or "default", column
        self.label = label or f"hub:{repo}:{self.config}:{split}"
        super().__init__(split, self.label, local, (repo, self.config, split), how_to or (
            "check the repo/config/split names, set HF_TOKEN for a gated dataset, or pass a local copy with "
            "path=<file>"), **kwargs)
        if column not in self.rows.column_names:  # rows are a datasets.Dataset (a local file or the hub's)
            raise TaskDataError(f"{self.label} has no {column!r} column (columns: {self.rows.column_names}); "
                                f"pass column=<name of the conversations column>")

    def get_example(self, index: int) -> Conversation:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index][self.column]]
        return {"messages": validate_messages(messages, f"{self.label} row {index}")}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        raise NotImplementedError(f"hub:{self.repo} conversations are training data; they have no grader")


class SmolTalk(HubConversations):
    splits = ("train", "test")

    def __init__(self, split: str = "train", **kwargs):
        super().__init__("HuggingFaceTB/smol-smoltalk", "default", split,
                         local=[f"smoltalk/{split}.parquet", f"smoltalk/{split}.jsonl"], label=f"smoltalk ({split})",
                         how_to="SmolTalk is only on the HF hub (HuggingFaceTB/smol-smoltalk); allow the download, "
                                "or use the offline conversations instead (identity, customjson:<file>)", **kwargs)
