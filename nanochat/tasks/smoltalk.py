"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn chat data for mid-training and SFT.

Hub only (it is not in the offline data); a local parquet/jsonl with a `messages` column works too.
"""
from __future__ import annotations

import os

from nanochat.tasks.common import Conversation, Task, hub_split, load_files, load_rows, resolve_data_dir
from nanochat.tasks.customjson import validate_messages


class SmolTalk(Task):
    def __init__(self, split: str = "train", data_dir: str | None = None, base_dir: str | None = None,
                 path: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split={split!r}: use train or test")

        def local():
            if path is not None:
                return load_files(path)
            root = resolve_data_dir(data_dir)
            if root is None:
                return None
            for name in (f"smoltalk/{split}.parquet", f"smoltalk/{split}.jsonl"):
                if (root / name).exists():
                    return load_files(root / name)
            return None

        def hub():
            return hub_split("HuggingFaceTB/smol-smoltalk", "default", split)

        self.rows = load_rows(f"smoltalk ({split})", local, hub,
                              "SmolTalk is only on the HF hub (HuggingFaceTB/smol-smoltalk); allow the download, "
                              "or use the offline conversations instead (identity, customjson:<file>)")

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        messages = row["messages"] if isinstance(row, dict) else row
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return {"messages": validate_messages(messages, f"smoltalk row {index}")}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        raise NotImplementedError("SmolTalk is training data; it has no grader")
