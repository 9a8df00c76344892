"""MMLU: 57 subjects of 4-way multiple choice. `auxiliary_train` (~100k rows) is used in mid-training.

Local (<data_dir>/mmlu/):
  cais_mmlu/{test,dev}/<subject>_{split}.csv       header question,choice0..3,answer(int)
  hendrycks_test_2020/val/<subject>_val.csv         no header, answer letter (the only local `validation`)
  auxiliary_train: any of mmlu/auxiliary_train.{jsonl,jsonl.gz,parquet} if you place one there
Hub: cais/mmlu, config `all` (test/validation/dev) or `auxiliary_train` (train).
"""
from __future__ import annotations

import csv
import itertools

from nanochat.tasks.common import Conversation, HubTask, MultipleChoice, resolve_data_dir

LETTERS = ("A", "B", "C", "D")
SUBSETS = ("all", "auxiliary_train")
LOCAL_DIRS = {"test": "cais_mmlu/test", "dev": "cais_mmlu/dev", "validation": "hendrycks_test_2020/val"}


class MMLU(MultipleChoice, HubTask):
    splits = None  # they depend on the subset: checked here

    def __init__(self, subset: str = "all", split: str = "test", **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"MMLU subset={subset!r}: use one of {SUBSETS}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError(f"MMLU auxiliary_train has only split='train' (got {split!r})")
        if subset == "all" and split not in ("test", "validation", "dev"):
            raise ValueError(f"MMLU split={split!r}: use test, validation or dev (or subset='auxiliary_train')")
        self.subset = subset
        aux = subset == "auxiliary_train"
        super().__init__(split, f"mmlu ({subset}/{split})",
                         [f"mmlu/auxiliary_train.{e}" for e in ("jsonl", "jsonl.gz", "parquet")] if aux else [],
                         ("cais/mmlu", subset, split),
                         "MMLU auxiliary_train is only on the hub (cais/mmlu); place "
                         "<shared data>/mmlu/auxiliary_train.jsonl or allow hub downloads" if aux else
                         "put the MMLU csv files under <shared data>/mmlu/ or allow hub downloads", **kwargs)

    def read_local(self, data_dir: str | None, names: list[str]) -> list[dict] | None:
        """auxiliary_train: one of the files `names`; the others: <subject>_<split>.csv files, read by the csv
        module as text (the choices hold numbers and words like "None" that must stay the text they are)."""
        root = resolve_data_dir(data_dir)
        if self.subset == "auxiliary_train" or root is None:
            return super().read_local(data_dir, names)
        d = root / "mmlu" / LOCAL_DIRS[self.split]
        if not d.is_dir():
            return None
        rows = []
        for f in sorted(d.glob(f"*_{d.name}.csv")):
            with open(f, newline="", encoding="utf-8") as fh:
                for q, *choices, answer in itertools.islice(csv.reader(fh), int(self.split != "validation"), None):
                    answer = answer.strip()
                    rows.append({"question": q, "choices": choices, "subject": f.name.removesuffix(f"_{d.name}.csv"),
                                 "answer": int(answer) if answer.isdigit() else LETTERS.index(answer)})
        return rows

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        row = row.get("train", row)  # the hub's auxiliary_train nests each row under "train"
        if len(row["choices"]) != 4 or not 0 <= int(row["answer"]) < 4:
            raise ValueError(f"MMLU row {index}: need 4 choices and answer in 0..3, got {row}")
        return self.example(row["question"], LETTERS, row["choices"], LETTERS[int(row["answer"])],
                            subject=row.get("subject", ""))
