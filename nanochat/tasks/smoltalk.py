"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn chat data for mid-training and SFT.

Hub only (it is not in the offline data); a local parquet/jsonl with a `messages` column works too.
"""
from __future__ import annotations

import os
from pathlib import Path

from nanochat.tasks.common import Conversation, Task, hf_parquet_files, load_rows, read_jsonl, \
    read_parquet_rows, resolve_data_dir
from nanochat.tasks.customjson import validate_messages


class SmolTalk(Task):
    def __init__(self, split: str = "train", data_dir: str | None = None, base_dir: str | None = None,
                 path: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split={split!r}: use train or test")

        def read(p: Path):
            return read_parquet_rows([p]) if p.suffix == ".parquet" else read_jsonl(p)

        def local():
            if path is not None:
                return read(Path(path))
            root = resolve_data_dir(data_dir)
            if root is None:
                return None
            for name in (f"smoltalk/{split}.parquet", f"smoltalk/{split}.jsonl"):
                if (root / name).exists():
                    return read(root / name)
            return None

        def hub():
            return read_parquet_rows(hf_parquet_files("HuggingFaceTB/smol-smoltalk", "default", split, base_dir))

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
