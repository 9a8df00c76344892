"""HumanEval: 164 Python functions to complete, checked by running their unit tests in the sandbox.

Local: <data_dir>/humaneval/HumanEval.jsonl.gz.  Hub: openai/openai_humaneval (test only).
"""
from __future__ import annotations

import itertools
import re

from nanochat.execution import execute_code
from nanochat.tasks.common import Conversation, HubTask

_FENCE_RE = re.compile(r"```(?:python|py|Python)?\s*\n(.*?)```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (completions often drop them)."""
    lines = [line.strip() for line in prompt.splitlines()]
    head = itertools.takewhile(lambda s: not s or s.startswith(("import ", "from ", "#")), lines)  # to the code
    return "\n".join(s for s in head if s.startswith(("import ", "from ")))


class HumanEval(HubTask):
    splits = ("test",)

    def __init__(self, split: str = "test", timeout: float = 5.0, **kwargs):
        self.timeout = timeout
        super().__init__(split, "humaneval", ["humaneval/HumanEval.jsonl.gz", "humaneval/HumanEval.jsonl"],
                         ("openai/openai_humaneval", "openai_humaneval", "test"),
                         "put HumanEval.jsonl.gz under <shared data>/humaneval/ or allow hub downloads", **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"],
                "task_id": row.get("task_id", str(index))}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        imports = extract_imports(conversation["messages"][0]["content"])
        fenced = _FENCE_RE.search(completion)  # the code in the first fenced block, else the whole completion
        program = "\n\n".join([imports, fenced.group(1) if fenced else completion, conversation["test"],
                                f"check({conversation['entry_point']})\n"])
        return execute_code(program, timeout=self.timeout).success
