"""Conversations from a JSONL file: one conversation per line, either a JSON array of messages
or an object {"messages": [...]}. Roles must alternate user/assistant (an optional system
message may come first); assistant content may be a string or a list of parts.

nanochat's identity conversations use this: `customjson:<path>` or the `identity` task
(<data_dir>/sft/identity_conversations.jsonl, else downloaded once to <base_dir>/downloads/).
"""
from __future__ import annotations

import json
import os

from nanochat.tasks.common import Conversation, Task, TaskDataError, load_files, local_or_url
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
