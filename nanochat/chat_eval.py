"""Scoring a chat model on tasks: categorical (answer-letter logits) and generative (sampling).

Used by the eval stage (chat mode) and by the chat training stages (end-of-stage scores,
ChatCORE during training). ChatCORE is the mean over tasks of the centered accuracy
(acc - chance) / (1 - chance). Every loop checks for a stop signal between batches
(nanochat.lifecycle.check_stop), so a preemption is acted on within a batch.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import rank_world
from nanochat.lifecycle import EvalProgress
from nanochat.tasks import TaskDataError, make_task, parse_spec

DEFAULT_CHAT_TASKS = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee", "simplespelling",
                      "arithmetic"]


# --------------------------------------------------------------------------- chat scoring

@torch.no_grad()
def score_categorical(model, tokenizer, task, indices: list[int], device, batch_size: int = 8,
                      progress: Optional[EvalProgress] = None) -> int:
    """Correct answers among `indices`: argmax over the answer letters' logits after the prompt."""
    progress = progress or EvalProgress("categorical", len(indices), None)  # no lines: the stop check alone
    correct = 0
    for b0 in range(0, len(indices), batch_size):
        progress.step(b0)   # between batches: EvalInterrupted on a stop signal
        convs = [task[i] for i in indices[b0:b0 + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-model.rotary_len:] for c in convs]
        ids = pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True).to(device)
        logits = model(ids)  # (B, L, V); right padding: position len-1 only sees the prompt
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            letter_ids = [tokenizer.encode(letter) for letter in letters]
            for letter, enc in zip(letters, letter_ids):
                if len(enc) != 1:
                    raise ValueError(f"answer letter {letter!r} is {len(enc)} tokens in this tokenizer; "
                                     "categorical scoring needs single-token letters")
            scores = logits[r, len(p) - 1, [enc[0] for enc in letter_ids]]
            correct += bool(task.evaluate(conv, letters[int(scores.argmax())]))
    return correct


@torch.no_grad()
def score_generative(model, tokenizer, task, indices: list[int], *, num_samples: int = 1,
                     max_new_tokens: int = 256, temperature: float = 0.0, top_k: Optional[int] = 50,
                     seed: int = 42, progress: Optional[EvalProgress] = None) -> int:
    """Correct answers among `indices`: an example counts if any of its samples is right (pass@k)."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    progress = progress or EvalProgress("generative", len(indices), None)  # no lines: the stop check alone
    correct = 0
    for n, i in enumerate(indices):
        progress.step(n)
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        budget = min(max_new_tokens, model.rotary_len - len(prompt))
        if budget < 1:
            continue  # the prompt alone fills the model's positions: counted as wrong
        seqs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget,
                                        temperature=temperature, top_k=top_k, seed=seed + i)
        correct += any(bool(task.evaluate(conv, tokenizer.decode(s[len(prompt):]))) for s in seqs)
    return correct


def evaluate_chat_tasks(model, tokenizer, specs: list, device, *, max_per_task: int | dict[str, int] = -1,
                        data_dir: Optional[str] = None, base_dir: Any = None,
                        log: Callable[[str], None] = print, batch_size: int = 8, num_samples: int = 1,
                        max_new_tokens: int = 256, temperature: float = 0.0, top_k: Optional[int] = 50,
                        seed: int = 42, required: bool = False) -> dict:
    """Score a chat model on each task spec (held-out split); ranks split the examples. `max_per_task`
    caps the examples of every task, or of each task by name (a dict); -1 = all.

    Returns {"tasks": {name: {accuracy, correct, total, eval_type, chance, centered, seconds}},
             "chatcore": mean centered accuracy (None when no task ran), "skipped": {name: reason}}.
    A task whose data is missing is skipped (named in "skipped"), or raises with required=True.
    """
    from nanochat.training import dist_sum
    rank, world = rank_world()
    was_training = model.training
    model.eval()
    out: dict = {"tasks": {}, "skipped": {}}
    try:
        for spec in specs:
            name = parse_spec(spec)[0]
            cap = max_per_task.get(name, -1) if isinstance(max_per_task, dict) else max_per_task
            try:
                task = make_task(spec, "test", data_dir=data_dir, base_dir=str(base_dir) if base_dir else None)
            except (TaskDataError, OSError) as e:
                if required:
                    raise
                out["skipped"][name] = str(e)[:200]
                log(f"eval: skipping {name} (no data: {str(e)[:120]})")
                continue
            n = len(task) if cap is None or cap < 0 else min(len(task), cap)
            indices = list(range(rank, n, world))
            t0 = time.time()
            progress = EvalProgress(name, len(indices), log)  # a line every 10 s, and the stop check
            if task.eval_type == "categorical":
                correct = score_categorical(model, tokenizer, task, indices, device, batch_size, progress)
            else:
                correct = score_generative(model, tokenizer, task, indices, num_samples=num_samples,
                                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                           seed=seed, progress=progress)
            sums = torch.tensor([correct, len(indices)], dtype=torch.float64, device=device)
            correct, total = dist_sum(sums).tolist()
            acc = correct / max(1.0, total)
            chance = 0.25 if task.eval_type == "categorical" else 0.0   # guessing: 4-way choice, open answers
            out["tasks"][name] = {"accuracy": acc, "correct": int(correct), "total": int(total),
                                  "eval_type": task.eval_type, "chance": chance,
                                  "centered": (acc - chance) / (1.0 - chance), "seconds": round(time.time() - t0, 2)}
    finally:
        model.train(was_training)
    tasks = out["tasks"]
    return {**out, "chatcore": sum(r["centered"] for r in tasks.values()) / len(tasks) if tasks else None,
            "chatcore_tasks": list(tasks)}


CHATCORE_TASKS = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"]  # as 92d63d4's chat_sft


def chatcore(model, tokenizer, device, *, max_cat: int = -1, max_sample: int = 24, data_dir: Optional[str] = None,
             base_dir: Any = None, log: Callable[[str], None] = print, batch_size: int = 8, seed: int = 42) -> dict:
    """ChatCORE during training: categorical tasks capped at max_cat, generative at max_sample problems."""
    caps = {spec: max_cat if spec in ("arc_easy", "arc_challenge", "mmlu") else max_sample for spec in CHATCORE_TASKS}
    return evaluate_chat_tasks(model, tokenizer, CHATCORE_TASKS, device, max_per_task=caps, data_dir=data_dir,
                               base_dir=base_dir, log=log, batch_size=batch_size, seed=seed, max_new_tokens=256)
