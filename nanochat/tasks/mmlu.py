"""MMLU: 57 subjects of 4-way multiple choice. `auxiliary_train` (~100k rows) is used in mid-training.

Local (<data_dir>/mmlu/):
  cais_mmlu/{test,dev}/<subject>_{split}.csv       header question,choice0..3,answer(int)
  hendrycks_test_2020/val/<subject>_val.csv         no header, answer letter (the only local `validation`)
  auxiliary_train: any of mmlu/auxiliary_train.{jsonl,parquet,csv} if you place one there
Hub: cais/mmlu, config `all` (test/validation/dev) or `auxiliary_train` (train).
"""
from __future__ import annotations

import os
from pathlib import Path

from nanochat.tasks.common import Conversation, MultipleChoice, hub_split, load_files, load_rows, resolve_data_dir

LETTERS = ("A", "B", "C", "D")
SUBSETS = ("all", "auxiliary_train")
# the csv files hold numbers and words like "None" as choices: keep every cell as the text it is
_CSV = dict(column_names=["question", "c0", "c1", "c2", "c3", "answer"], keep_default_na=False, na_filter=False)


def _read_subject_csvs(d: Path, split: str, header: bool) -> list[dict]:
    """<subject>_<split>.csv files → rows tagged with their subject (one datasets split per file)."""
    files = {f.name[: -len(f"_{split}.csv")]: f for f in sorted(d.glob(f"*_{split}.csv"))}
    if not files:
        return []
    from datasets import Features, Value
    cols = _CSV["column_names"]
    features = Features({c: Value("string") for c in cols})
    parts = load_files(files, kind="csv", features=features, header=0 if header else None, **_CSV)
    rows = []
    for subject in files:
        c = parts[subject].to_dict()  # columnar: far faster than iterating rows
        for q, *choices, answer in zip(*(c[k] for k in cols)):
            answer = answer.strip()
            rows.append({"question": q, "choices": choices,
                         "answer": int(answer) if answer.isdigit() else LETTERS.index(answer), "subject": subject})
    return rows


def _read_local(root: Path, subset: str, split: str) -> list[dict] | None:
    base = root / "mmlu"
    if subset == "auxiliary_train":
        found = next((base / f"auxiliary_train.{e}" for e in ("jsonl", "jsonl.gz", "parquet")
                      if (base / f"auxiliary_train.{e}").exists()), None)
        return load_files(found) if found else None
    if split in ("test", "dev") and (base / "cais_mmlu" / split).is_dir():
        return _read_subject_csvs(base / "cais_mmlu" / split, split, header=True)
    if split == "validation" and (base / "hendrycks_test_2020" / "val").is_dir():
        return _read_subject_csvs(base / "hendrycks_test_2020" / "val", "val", header=False)
    return None


class MMLU(MultipleChoice):
    def __init__(self, subset: str = "all", split: str = "test", data_dir: str | None = None,
                 base_dir: str | None = None, path: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"MMLU subset={subset!r}: use one of {SUBSETS}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError(f"MMLU auxiliary_train has only split='train' (got {split!r})")
        if subset == "all" and split not in ("test", "validation", "dev"):
            raise ValueError(f"MMLU split={split!r}: use test, validation or dev (or subset='auxiliary_train')")
        self.subset, self.split = subset, split

        def local():
            if path is not None:
                return load_files(path)
            root = resolve_data_dir(data_dir)
            return _read_local(root, subset, split) if root else None

        self.rows = load_rows(f"mmlu ({subset}/{split})", local, lambda: hub_split("cais/mmlu", subset, split),
                              "MMLU auxiliary_train is only on the hub (cais/mmlu); place "
                              "<shared data>/mmlu/auxiliary_train.jsonl or allow hub downloads"
                              if subset == "auxiliary_train" else
                              "put the MMLU csv files under <shared data>/mmlu/ or allow hub downloads")

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        row = row.get("train", row)  # the hub's auxiliary_train nests each row under "train"
        if len(row["choices"]) != 4 or not 0 <= int(row["answer"]) < 4:
            raise ValueError(f"MMLU row {index}: need 4 choices and answer in 0..3, got {row}")
        return self.example(row["question"], LETTERS, row["choices"], LETTERS[int(row["answer"])],
                            subject=row.get("subject", ""))
