"""CORE: the DCLM in-context-learning ensemble that nanochat reports for base models.

https://arxiv.org/abs/2406.11794 (DCLM). The bundle (core.yaml, eval_meta_data.csv,
eval_data/**.jsonl) lists 22 tasks of three kinds, all scored from one forward pass:

- multiple_choice: one prompt per choice (same context, different continuation); the
  choice with the lowest mean loss over its own tokens wins.
- schema: one prompt per context option (different context, same continuation); the option
  under which the shared continuation has the lowest mean loss wins.
- language_modeling: the greedy (argmax) prediction must reproduce every continuation token.

Each task's accuracy is centered on its random baseline, (acc - b) / (1 - b), so chance is 0 and
perfect is 1; CORE is the mean over the tasks evaluated. Tasks whose data file is missing (the
offline copy lacks squad and coqa) are skipped and named, and the result says how many tasks
the mean covers: a 20-task CORE is not nanochat's 22-task number.

Order and few-shot sampling follow nanochat: each task's examples are shuffled with a fixed seed
(1337), and item i gets `num_fewshot` examples drawn with random.Random(seed + i) from the other
items. One difference: the few-shot pool is the whole task, not only the first `max_per_task`
items, so small debug runs keep their full shot count (with max_per_task=-1 both agree).
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import atomic_write_text, rank_world
from nanochat.lifecycle import EvalProgress, check_stop

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
ORDER_SEED = 1337      # shuffles each task's items before `max_per_task` takes the first ones
FEWSHOT_SEED = 1234    # item i draws its shots with random.Random(FEWSHOT_SEED + i)


# ----------------------------------------------------------------------------- the bundle

def _bundle_ok(path: Path) -> bool:
    return (path / "core.yaml").is_file()


def ensure_eval_bundle(base_dir: str | os.PathLike, configured: str | None = None, *,
                       url: str = EVAL_BUNDLE_URL, retries: int = 5, backoff_s: float = 2.0) -> Path:
    """The CORE bundle dir: `configured` if it holds core.yaml, else <base_dir>/eval_bundle.

    `configured` may also name the bundle's zip: a URL, or a hub file
    `hf://datasets/<owner>/<name>[@revision]/<file>.zip`. A missing <base_dir>/eval_bundle is
    fetched through nanochat.hub (hub files into the hub cache, other URLs into
    <base_dir>/downloads/; locked, retried, checked to be a whole zip, renamed atomically) and
    unzipped into a temp dir that is renamed into place under a file lock, so concurrent
    ranks/jobs fetch it once and never see half a bundle.
    """
    if configured and "://" in configured:  # https://…/eval_bundle.zip or hf://datasets/<owner>/<name>/<file>.zip
        url, configured = configured, None
    if configured:
        path = Path(configured).expanduser()
        if _bundle_ok(path):
            return path
        print(f"paths.eval_bundle={configured!r} has no core.yaml; using <base_dir>/eval_bundle "
              f"(downloading it if needed)", file=sys.stderr, flush=True)
    base = Path(base_dir).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    target = base / "eval_bundle"
    if _bundle_ok(target):
        return target
    from filelock import FileLock
    from nanochat import hub
    with FileLock(str(base / ".eval_bundle.lock")):
        if _bundle_ok(target):  # another process finished it while we waited
            return target
        try:
            zip_path = hub.fetch_url(url, base / "downloads", validate=_check_zip, attempts=retries,
                                     backoff=backoff_s)
        except hub.HubError as e:
            raise RuntimeError(f"could not download the CORE eval bundle: {e}. Or download it yourself, unzip "
                               f"it and set paths.eval_bundle=<dir>") from e
        _extract_bundle(zip_path, target)
    return target


def _check_zip(path: Path) -> None:
    """A whole zip, every member's CRC right (a cut download fails here, and is fetched again)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path.name} is not a zip file")
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise ValueError(f"corrupt member {bad!r} in {path.name}")


def _extract_bundle(zip_path: Path, target: Path) -> None:
    """Unzip into a temp dir next to `target`, find the dir with core.yaml, rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.extract-"))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)  # zipfile drops absolute paths and '..' parts
        roots = [tmp] + sorted(p for p in tmp.iterdir() if p.is_dir())
        root = next((p for p in roots if _bundle_ok(p)), None)
        if root is None:
            raise RuntimeError(f"{zip_path} has no core.yaml at its top level or one dir down; it is not "
                               f"a CORE eval bundle. Fix: point paths.eval_bundle at a valid bundle dir")
        if target.exists() and any(target.iterdir()):
            raise RuntimeError(f"{target} exists but has no core.yaml. Fix: remove it so the bundle can be "
                               f"unpacked there")
        os.replace(root, target)   # a dir renames onto an empty one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class TaskSpec:
    label: str
    task_type: str                 # multiple_choice | schema | language_modeling
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float         # percent, from eval_meta_data.csv
    data_path: Path

    @property
    def available(self) -> bool:
        return self.data_path.is_file()


def load_core_tasks(bundle_dir: str | os.PathLike) -> list[TaskSpec]:
    """Every task of core.yaml, in its order, with its random baseline.

    A task whose data file is missing is still listed (`spec.available` is False) so callers can
    name it as skipped; `evaluate_core` does that.
    """
    import yaml
    bundle = Path(bundle_dir).expanduser()
    if not _bundle_ok(bundle):
        raise FileNotFoundError(f"{bundle} has no core.yaml. Fix: set paths.eval_bundle to an unpacked CORE "
                                f"bundle, or leave it null to download one")
    with open(bundle / "core.yaml", encoding="utf-8") as f:
        tree = yaml.safe_load(f)
    meta = bundle / "eval_meta_data.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} is missing; the CORE bundle needs it for the random baselines")
    with open(meta, encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"].strip(): float(row["Random baseline"])
                     for row in csv.DictReader(f) if row.get("Eval Task") and row.get("Random baseline")}
    specs = []
    for i, t in enumerate((tree or {}).get("icl_tasks") or []):
        label = t.get("label")
        where = f"{bundle / 'core.yaml'}: icl_tasks[{i}]"
        if not label or "dataset_uri" not in t:
            raise ValueError(f"{where} needs a label and a dataset_uri")
        task_type = t.get("icl_task_type")
        if task_type not in TASK_TYPES:
            raise ValueError(f"{where} ({label}): icl_task_type={task_type!r}; use one of {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise ValueError(f"{label}: no 'Random baseline' row in {meta}; "
                             f"add one (percent) so the task can be centered")
        shots = t.get("num_fewshot", 0)
        shots = shots[0] if isinstance(shots, list) else shots
        specs.append(TaskSpec(label=label, task_type=task_type, num_fewshot=int(shots),
                              continuation_delimiter=t.get("continuation_delimiter", " "),
                              random_baseline=baselines[label],
                              data_path=bundle / "eval_data" / t["dataset_uri"]))
    if not specs:
        raise ValueError(f"{bundle / 'core.yaml'} lists no icl_tasks")
    return specs


def load_task_examples(spec: TaskSpec) -> list[dict]:
    with open(spec.data_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Chance maps to 0, perfect to 1. `random_baseline` is in percent, as in the bundle."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


# ----------------------------------------------------------------------------- prompts

def fewshot_indices(n: int, idx: int, k: int, seed: int = FEWSHOT_SEED) -> list[int]:
    """The k items shown before item `idx` (never itself), the same on every call and rank."""
    k = min(k, n - 1)
    return random.Random(seed + idx).sample([i for i in range(n) if i != idx], k) if k > 0 else []


def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """The full texts to score: one per choice (mc), per context option (schema), or
    [context only, context + continuation] (lm). Shots are separated by a blank line."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n"
                        for ex in fewshot)
        return [f"{shots}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        # contexts are stripped: trailing spaces would otherwise merge into the continuation's
        # first token and the context-only prompt would stop being a token prefix
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        head = f"{shots}{item['context'].strip()}{delimiter}"
        return [head.strip(), head + item["continuation"]]
    raise ValueError(f"task type {task_type!r}: use one of {', '.join(TASK_TYPES)}")


def scored_spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """(sequences, starts, ends): tokens[start:end] of each sequence is what gets scored.

    mc: after the common prefix (the choice). schema: the common suffix (the continuation).
    lm: the tokens after the context-only prompt (only the full prompt is forwarded).
    At least one token is always scored, and never the first one (it has no prediction).
    """
    if task_type == "multiple_choice":
        start = len(os.path.commonprefix(tokens))    # commonprefix compares any sequences, not only strings
        spans = [(t, start, len(t)) for t in tokens]
    elif task_type == "schema":
        suffix = len(os.path.commonprefix([t[::-1] for t in tokens]))
        spans = [(t, len(t) - suffix, len(t)) for t in tokens]
    else:  # language_modeling (render_prompts refuses any other type)
        without, with_ = tokens
        # normally `without` is a prefix of `with_`; if a merge crosses the boundary fall back to
        # the common prefix, so the span still covers all of the continuation
        start = len(without) if with_[:len(without)] == without else len(os.path.commonprefix([without, with_]))
        spans = [(with_, start, len(with_))]
    return [t for t, _, _ in spans], [max(1, min(s, e - 1)) for _, s, e in spans], [e for _, _, e in spans]


def crop_left(seqs: list[list[int]], starts: list[int], ends: list[int], max_len: int | None):
    """Keep the last `max_len` tokens of each sequence (the continuation is at the end)."""
    if not max_len:
        return seqs, starts, ends
    cuts = [max(0, len(t) - max_len) for t in seqs]
    return ([t[c:] for t, c in zip(seqs, cuts)], [max(1, s - c) for s, c in zip(starts, cuts)],
            [e - c for e, c in zip(ends, cuts)])


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_example(model, seqs: list[list[int]], starts: list[int], ends: list[int], task_type: str,
                  gold: Optional[int], pad_id: int, device) -> bool:
    """One forward over all of an example's sequences (right-padded with BOS: the padding comes
    after every scored token, so causal attention never lets it change a score)."""
    ids = pad_sequence([torch.tensor(t, dtype=torch.long) for t in seqs], batch_first=True,
                       padding_value=pad_id).to(device)
    logits = model(ids)
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1:e - 1].argmax(dim=-1), ids[0, s:e]))
    # logits at position p predict token p+1
    mean_losses = [F.cross_entropy(logits[i, s - 1:e - 1].float(), ids[i, s:e]).item()
                   for i, (s, e) in enumerate(zip(starts, ends))]
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == gold


def prepare_example(tokenizer, spec: TaskSpec, pool: list[dict], idx: int, max_len: Optional[int]):
    """Prompts → token sequences and scored spans for item `idx` of the (ordered) pool."""
    item = pool[idx]
    shots = [pool[i] for i in fewshot_indices(len(pool), idx, spec.num_fewshot)]
    prompts = render_prompts(spec.task_type, item, spec.continuation_delimiter, shots)
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    seqs, starts, ends = scored_spans(spec.task_type, tokens)
    return crop_left(seqs, starts, ends, max_len)


def task_order(examples: list[dict]) -> list[dict]:
    """The evaluation order: shuffled with a fixed seed (the files are sorted by category)."""
    pool = list(examples)
    random.Random(ORDER_SEED).shuffle(pool)
    return pool


def num_evaluated(n: int, max_per_task: int) -> int:
    return n if max_per_task is None or max_per_task < 0 else min(n, max_per_task)


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, tokenizer, task_spec: TaskSpec, examples: list[dict],
                  device, max_per_task: int = -1, on_example: Optional[Callable[[], None]] = None) -> float:
    """Accuracy of `model` on one task (the first `max_per_task` items of the seeded order; -1 = all).

    Under torch.distributed, rank r takes items r, r+W, ... and the per-item results are
    all-reduced, so every rank returns the same accuracy.
    """
    pool = task_order(examples)
    n = num_evaluated(len(pool), max_per_task)
    if n == 0:
        raise ValueError(f"{task_spec.label}: no examples to evaluate (file {task_spec.data_path})")
    rank, world = rank_world()
    correct = torch.zeros(n, dtype=torch.float32, device=device)
    for idx in range(rank, n, world):
        check_stop()  # a preemption is acted on between examples, not after the whole task
        seqs, starts, ends = prepare_example(tokenizer, task_spec, pool, idx, model.config.sequence_len)
        correct[idx] = float(score_example(model, seqs, starts, ends, task_spec.task_type, pool[idx].get("gold"),
                                           tokenizer.get_bos_token_id(), device))
        if on_example is not None:
            on_example()
    if world > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def evaluate_core(model: torch.nn.Module, tokenizer, bundle_dir: str | os.PathLike, device,
                  max_per_task: int = -1, tasks: Optional[list[str]] = None,
                  progress: bool = True) -> dict:
    """Evaluate every available CORE task; returns
    {"core", "tasks_evaluated", "tasks_total", "tasks_skipped", "results": {label: {...}}}.

    `tasks` restricts to those labels. `progress`: progress lines on rank 0 (every 10 s), or none.
    """
    specs = load_core_tasks(bundle_dir)
    if tasks is not None:
        if unknown := [t for t in tasks if t not in {s.label for s in specs}]:
            raise ValueError(f"unknown CORE task(s) {unknown}; valid labels: {', '.join(s.label for s in specs)}")
        specs = [s for s in specs if s.label in set(tasks)]
    skipped = [s.label for s in specs if not s.available]
    todo = [(s, load_task_examples(s)) for s in specs if s.available]
    if not todo:
        raise FileNotFoundError(f"none of the CORE tasks has its data file under {Path(bundle_dir) / 'eval_data'} "
                                f"(skipped: {', '.join(skipped)})")
    rank, world = rank_world()
    total = sum(len(range(rank, num_evaluated(len(ex), max_per_task), world)) for _, ex in todo)

    was_training = model.training
    model.eval()
    # progress lines in the training loop's format (a line every 10 s), on rank 0 when asked
    lines = EvalProgress("CORE", total, print if rank == 0 and progress else None)
    count = itertools.count(1)
    results = {}
    try:
        for spec, examples in todo:
            lines.label = f"CORE {spec.label}"
            acc = evaluate_task(model, tokenizer, spec, examples, device, max_per_task,
                                on_example=lambda: lines.step(next(count)))
            results[spec.label] = {"accuracy": acc, "centered": centered_accuracy(acc, spec.random_baseline),
                                   "num_examples": num_evaluated(len(examples), max_per_task),
                                   "random_baseline": spec.random_baseline}
    finally:
        model.train(was_training)
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "tasks_evaluated": len(results), "tasks_total": len(specs),
            "tasks_skipped": skipped, "results": results}


def core_summary(out: dict) -> str:
    """One line that says what the CORE number covers."""
    s = f"CORE {out['core']:.4f} over {out['tasks_evaluated']} of {out['tasks_total']} tasks"
    if out["tasks_skipped"]:
        s += f" (skipped, data missing: {', '.join(out['tasks_skipped'])})"
    return s


def write_core_csv(results: dict, path: str | os.PathLike) -> None:
    """Per-task CSV (task, accuracy, centered, num_examples, random_baseline) plus a CORE row.

    `results` is what `evaluate_core` returned; skipped tasks get a row with empty numbers.
    """
    lines = ["task,accuracy,centered,num_examples,random_baseline"]
    lines += [f"{k},{r['accuracy']:.6f},{r['centered']:.6f},{r['num_examples']},{r.get('random_baseline', '')}"
              for k, r in results["results"].items()]
    lines += [f"{label},,,0," for label in results.get("tasks_skipped", [])]
    lines.append(f"CORE,,{results['core']:.6f},{results['tasks_evaluated']},")
    atomic_write_text(path, "\n".join(lines) + "\n")
