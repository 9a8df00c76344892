"""ARC (AI2 Reasoning Challenge), Easy and Challenge: grade-school science multiple choice.

Local: <data_dir>/arc/ARC-Easy/{train,validation,test}.jsonl (the HF `allenai/ai2_arc` schema).
Hub: allenai/ai2_arc, config ARC-Easy | ARC-Challenge.
"""
from __future__ import annotations

from nanochat.tasks.common import Conversation, HubTask, MultipleChoice

SUBSETS = ("ARC-Easy", "ARC-Challenge")


class ARC(MultipleChoice, HubTask):
    splits = ("train", "validation", "test")

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset={subset!r}: use one of {SUBSETS}")
        self.subset = subset
        super().__init__(split, f"arc ({subset}/{split})", [f"arc/{subset}/{split}.jsonl"],
                         ("allenai/ai2_arc", subset, split),
                         "put the ARC jsonl files under <shared data>/arc/ or allow hub downloads", **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        letters = list(row["choices"]["label"])
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {row.get('id')}: answerKey {answer!r} not among labels {letters}")
        return self.example(row["question"], letters, row["choices"]["text"], answer)
