"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn chat data for mid-training and SFT.

Hub only (it is not in the offline data); a local parquet/jsonl with a `messages` column works too.
"""
from __future__ import annotations

import os

from nanochat.tasks.common import Conversation, Task, local_or_hub
from nanochat.tasks.customjson import validate_messages


class SmolTalk(Task):
    def __init__(self, split: str = "train", data_dir: str | None = None, base_dir: str | None = None,
                 path: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split={split!r}: use train or test")
        self.rows = local_or_hub(f"smoltalk ({split})", path, data_dir,
                                 [f"smoltalk/{split}.parquet", f"smoltalk/{split}.jsonl"],
                                 ("HuggingFaceTB/smol-smoltalk", "default", split),
                                 "SmolTalk is only on the HF hub (HuggingFaceTB/smol-smoltalk); allow the download, "
                                 "or use the offline conversations instead (identity, customjson:<file>)")

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        messages = row["messages"] if isinstance(row, dict) else row
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return {"messages": validate_messages(messages, f"smoltalk row {index}")}
