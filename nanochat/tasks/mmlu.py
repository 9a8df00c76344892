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

from nanochat.tasks.common import Conversation, Task, hf_parquet_files, load_rows, read_csv_rows, read_jsonl, \
    read_parquet_rows, render_mc, resolve_data_dir

LETTERS = ("A", "B", "C", "D")
SUBSETS = ("all", "auxiliary_train")


def _row(question: str, choices: list[str], answer: int, subject: str) -> dict:
    return {"question": question, "choices": list(choices), "answer": int(answer), "subject": subject}


def _read_local(root: Path, subset: str, split: str) -> list[dict] | None:
    base = root / "mmlu"
    if subset == "auxiliary_train":
        for name in ("auxiliary_train.jsonl", "auxiliary_train.jsonl.gz", "auxiliary_train.parquet"):
            f = base / name
            if f.exists():
                rows = read_parquet_rows([f]) if f.suffix == ".parquet" else read_jsonl(f)
                return [r.get("train", r) for r in rows]
        return None
    if split in ("test", "dev") and (base / "cais_mmlu" / split).is_dir():
        d = base / "cais_mmlu" / split
        rows = []
        for f in sorted(d.glob(f"*_{split}.csv")):
            subject = f.name[: -len(f"_{split}.csv")]
            for r in read_csv_rows(f, header=True):
                rows.append(_row(r[0], r[1:5], int(r[5]), subject))
        return rows
    if split == "validation" and (base / "hendrycks_test_2020" / "val").is_dir():
        d = base / "hendrycks_test_2020" / "val"
        rows = []
        for f in sorted(d.glob("*_val.csv")):
            subject = f.name[: -len("_val.csv")]
            for r in read_csv_rows(f, header=False):
                rows.append(_row(r[0], r[1:5], LETTERS.index(r[5].strip()), subject))
        return rows
    return None


class MMLU(Task):
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
                p = Path(path)
                rows = read_parquet_rows([p]) if p.suffix == ".parquet" else read_jsonl(p)
                return [r.get("train", r) for r in rows]
            root = resolve_data_dir(data_dir)
            return _read_local(root, subset, split) if root else None

        def hub():
            rows = read_parquet_rows(hf_parquet_files("cais/mmlu", subset, split, base_dir))
            return [r.get("train", r) for r in rows]  # auxiliary_train nests each row under "train"

        self.rows = load_rows(f"mmlu ({subset}/{split})", local, hub,
                              "MMLU auxiliary_train is only on the hub (cais/mmlu); place "
                              "<shared data>/mmlu/auxiliary_train.jsonl or allow hub downloads"
                              if subset == "auxiliary_train" else
                              "put the MMLU csv files under <shared data>/mmlu/ or allow hub downloads")

    @property
    def eval_type(self) -> str:
        return "categorical"

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        if len(row["choices"]) != 4 or not 0 <= int(row["answer"]) < 4:
            raise ValueError(f"MMLU row {index}: need 4 choices and answer in 0..3, got {row}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
                {"role": "assistant", "content": LETTERS[int(row["answer"])]},
            ],
            "subject": row.get("subject", ""),
            "letters": list(LETTERS),
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
