"""GSM8K: grade-school math word problems with calculator annotations.

The reference solutions carry `<<48/2=24>>` annotations. They become tool calls: a
`python` part with the expression and a `python_output` part with the result, so the
model learns to call the calculator (the engine evaluates the call at inference time).
The final answer follows '####'.

Local: <data_dir>/gsm8k/{train,test}.jsonl.  Hub: openai/gsm8k, config main.
"""
from __future__ import annotations

import re

from nanochat.tasks.common import Conversation, HubTask, answers_match, extract_answer

_CALL_RE = re.compile(r"(<<[^>]*>>)")


def solution_to_parts(answer: str) -> list[dict]:
    """Split a GSM8K solution into text / python / python_output parts."""
    parts = []
    for piece in filter(None, _CALL_RE.split(answer)):  # no empty text between two calls
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, _, result = inner.rpartition("=") if "=" in inner else (inner, "", "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(HubTask):
    def __init__(self, split: str = "test", subset: str = "main", **kwargs):
        super().__init__(split, f"gsm8k ({split})", [f"gsm8k/{split}.jsonl"] if subset == "main" else [],
                         ("openai/gsm8k", subset, split),
                         "put train.jsonl/test.jsonl under <shared data>/gsm8k/ or allow hub downloads", **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_to_parts(row["answer"])},
        ]}

    def reference_answer(self, conversation: Conversation) -> str | None:
        content = conversation["messages"][-1]["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        return extract_answer(text)

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return answers_match(extract_answer(completion), self.reference_answer(conversation))
