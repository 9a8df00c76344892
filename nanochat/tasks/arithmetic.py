"""Synthetic arithmetic with the calculator tool: fully offline chat data with a checkable answer.

"What is 37 + 48?" → <|python_start|>37+48<|python_end|><|output_start|>85<|output_end|> #### 85

The model must learn to copy the numbers and the operator into a tool call and to copy
the tool's output after '####' (the engine computes the output at inference time). The
problems are a pure function of (split, index); a problem is in the test split iff a hash
of it says so, so train and test never share a problem.
"""
from __future__ import annotations

from nanochat.tasks.common import Conversation, Synthetic

TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}", "{a} {op} {b} = ?",
             "What do you get for {a} {op} {b}?"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class Arithmetic(Synthetic):
    def __init__(self, split: str = "train", size: int = 1000, max_value: int = 999, ops: str = "+-*",
                 style: str = "tool", data_dir=None, base_dir=None, **kwargs):
        super().__init__(split, size, **kwargs)
        if not ops or set(ops) - set(OPS):
            raise ValueError(f"Arithmetic ops={ops!r}: use a string of {''.join(OPS)}")
        if max_value < 3:
            raise ValueError(f"Arithmetic max_value={max_value}: must be >= 3")
        if style not in ("tool", "plain"):
            raise ValueError(f"Arithmetic style={style!r}: use 'tool' (calculator call) or 'plain' (answer only)")
        self.max_value, self.ops, self.style = max_value, ops, style

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        while True:  # rejection-sample into the right split (~10% test, so a few draws at most)
            a, b = rng.randint(0, self.max_value), rng.randint(0, self.max_value)
            op = rng.choice(self.ops)
            if self.in_test(f"{a}{op}{b}") == (self.split == "test"):
                break
        answer = OPS[op](a, b)
        question = rng.choice(TEMPLATES).format(a=a, op=op, b=b)
        if self.style == "tool":
            content = [{"type": "python", "text": f"{a}{op}{b}"},
                       {"type": "python_output", "text": str(answer)},
                       {"type": "text", "text": f"\n\n#### {answer}"}]
        else:
            content = f"#### {answer}"
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": content}],
                "answer": answer}
