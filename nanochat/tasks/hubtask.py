"""Conversations from any hub dataset: the task source `hub:<owner>/<name>[:config][:split]`.

The dataset needs a column of conversations (default `messages`: a list of {role, content},
SmolTalk's schema). Its parquet files come through the same path as every hub task
(`hub_split`: the hub's parquet export, cached, then datasets.load_dataset("parquet")); a local
copy can be given with `path=` (json/jsonl/parquet/csv), which is read first.
"""
from __future__ import annotations

import os
from typing import Sequence

from nanochat.tasks.common import Conversation, Task, TaskDataError, local_or_hub
from nanochat.tasks.customjson import validate_messages


def parse_hub_source(arg: str) -> dict:
    """'<owner>/<name>[:config][:split]' → {"repo", "config", "source_split"} (missing parts → None)."""
    parts = arg.split(":")
    if not parts[0] or parts[0].count("/") != 1 or len(parts) > 3:
        raise ValueError(f"task source 'hub:{arg}': use hub:<owner>/<name>[:config][:split], "
                         "e.g. hub:HuggingFaceTB/smol-smoltalk:default:train")
    parts += [None] * (3 - len(parts))
    return {"repo": parts[0], "config": parts[1] or None, "source_split": parts[2] or None}


class HubConversations(Task):
    def __init__(self, repo: str, config: str | None = None, split: str = "train", column: str = "messages",
                 path: str | os.PathLike | None = None, data_dir: str | None = None, base_dir: str | None = None,
                 local: Sequence[str] = (), label: str | None = None, how_to: str | None = None, **kwargs):
        """`local`: files under the shared data dir tried before the hub; `label`, `how_to`: for errors."""
        super().__init__(**kwargs)
        self.repo, self.config, self.split, self.column = repo, config or "default", split, column
        self.label = label or f"hub:{repo}:{self.config}:{split}"
        self.rows = local_or_hub(self.label, path, data_dir, local, (repo, self.config, split), how_to or (
            "check the repo/config/split names, set HF_TOKEN for a gated dataset, or pass a local copy with "
            "path=<file>"))
        names = list(getattr(self.rows, "column_names", None) or (self.rows[0].keys() if len(self.rows) else []))
        if column not in names:
            raise TaskDataError(f"{self.label} has no {column!r} column (columns: {names}); "
                                f"pass column=<name of the conversations column>")

    def get_example(self, index: int) -> Conversation:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index][self.column]]
        return {"messages": validate_messages(messages, f"{self.label} row {index}")}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        raise NotImplementedError(f"hub:{self.repo} conversations are training data; they have no grader")
