"""Conversations from any hub dataset: the task source `hub:<owner>/<name>[:config][:split]`.

The dataset needs a column of conversations (default `messages`: a list of {role, content},
SmolTalk's schema). Its parquet files come through the same path as every hub task
(`hub_split`: the hub's parquet export, cached, then datasets.load_dataset("parquet")); a local
copy can be given with `path=` (json/jsonl/parquet/csv), which is read first.
"""
from __future__ import annotations

from typing import Sequence

from nanochat.tasks.common import Conversation, HubTask, TaskDataError
from nanochat.tasks.customjson import validate_messages


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
