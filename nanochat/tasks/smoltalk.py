"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn chat data for mid-training and SFT.

Hub only (it is not in the offline data); a local parquet/jsonl with a `messages` column works too.
"""
from __future__ import annotations

from nanochat.tasks.hubtask import HubConversations


class SmolTalk(HubConversations):
    splits = ("train", "test")

    def __init__(self, split: str = "train", **kwargs):
        super().__init__("HuggingFaceTB/smol-smoltalk", "default", split,
                         local=[f"smoltalk/{split}.parquet", f"smoltalk/{split}.jsonl"], label=f"smoltalk ({split})",
                         how_to="SmolTalk is only on the HF hub (HuggingFaceTB/smol-smoltalk); allow the download, "
                                "or use the offline conversations instead (identity, customjson:<file>)", **kwargs)
