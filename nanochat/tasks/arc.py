"""ARC (AI2 Reasoning Challenge), Easy and Challenge: grade-school science multiple choice.

Local: <data_dir>/arc/ARC-Easy/{train,validation,test}.jsonl (the HF `allenai/ai2_arc` schema).
Hub: allenai/ai2_arc, config ARC-Easy | ARC-Challenge.
"""
from __future__ import annotations

import os

from nanochat.tasks.common import Conversation, MultipleChoice, local_or_hub

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(MultipleChoice):
    def __init__(self, subset: str = "ARC-Easy", split: str = "test", data_dir: str | None = None,
                 base_dir: str | None = None, path: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset={subset!r}: use one of {SUBSETS}")
        if split not in SPLITS:
            raise ValueError(f"ARC split={split!r}: use one of {SPLITS}")
        self.subset, self.split = subset, split
        self.rows = local_or_hub(f"arc ({subset}/{split})", path, data_dir, [f"arc/{subset}/{split}.jsonl"],
                                 ("allenai/ai2_arc", subset, split),
                                 "put the ARC jsonl files under <shared data>/arc/ or allow hub downloads")

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        letters = list(row["choices"]["label"])
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {row.get('id')}: answerKey {answer!r} not among labels {letters}")
        return self.example(row["question"], letters, row["choices"]["text"], answer)
