"""Stage `eval`: evaluate a checkpoint, as a base model or as a chat model.

Base (`stage.mode=base`, or auto on a pretrain checkpoint): bits per byte on the train and
val splits of `data`, and CORE on the eval bundle (`paths.eval_bundle`, else the offline
copy under the shared data dir, else downloaded to <base_dir>/eval_bundle); tasks whose
files are missing are skipped and named. Writes core.csv next to result.json.

Chat (`stage.mode=chat`, or auto on a mid/sft/rl checkpoint): each task of `stage.tasks`
on its held-out split. Categorical tasks (ARC, MMLU) are scored from the logits of the
answer letters at the end of the prompt, in batches; generative ones (GSM8K, HumanEval,
spelling, arithmetic) by sampling with the Engine (tool use included). ChatCORE is the
mean over tasks of the centered accuracy (acc - chance) / (1 - chance), chance 0.25 for
4-way multiple choice and 0 for open answers.

Harness (`stage.harness.tasks=[...]` set): lm-evaluation-harness through our model instead of the above
(nanochat/harness.py); writes harness.json.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from nanochat import training as T
from nanochat.common import barrier, shared_data_dir
from nanochat.config import Config
from nanochat.tasks import CHANCE_ACCURACY, TaskDataError, make_task, parse_spec

DEFAULT_CHAT_TASKS = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee", "simplespelling",
                      "arithmetic"]


def _dist() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_all(values: list[float], device) -> list[float]:
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def task_key(spec: Any) -> str:
    return parse_spec(spec)[0]


# --------------------------------------------------------------------------- chat scoring

@torch.no_grad()
def score_categorical(model, tokenizer, task, indices: list[int], device, batch_size: int = 8) -> int:
    """Correct answers among `indices`: argmax over the answer letters' logits after the prompt."""
    limit = getattr(model, "rotary_len", None)
    correct = 0
    for b0 in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[b0:b0 + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        if limit:
            prompts = [p[-limit:] for p in prompts]
        L = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        logits = model(ids)  # (B, L, V); right padding: position len-1 only sees the prompt
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            letter_ids = []
            for letter in letters:
                enc = tokenizer.encode(letter)
                if len(enc) != 1:
                    raise ValueError(f"answer letter {letter!r} is {len(enc)} tokens in this tokenizer; "
                                     "categorical scoring needs single-token letters")
                letter_ids.append(enc[0])
            scores = logits[r, len(p) - 1, letter_ids]
            pred = letters[int(scores.argmax())]
            correct += bool(task.evaluate(conv, pred))
    return correct


@torch.no_grad()
def score_generative(model, tokenizer, task, indices: list[int], *, num_samples: int = 1,
                     max_new_tokens: int = 256, temperature: float = 0.0, top_k: Optional[int] = 50,
                     seed: int = 42) -> int:
    """Correct answers among `indices`: an example counts if any of its samples is right (pass@k)."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    limit = getattr(model, "rotary_len", None) or model.config.sequence_len
    correct = 0
    for i in indices:
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        budget = min(max_new_tokens, limit - len(prompt))
        if budget < 1:
            continue  # the prompt alone fills the model's positions: counted as wrong
        seqs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget,
                                        temperature=temperature, top_k=top_k, seed=seed + i)
        completions = [tokenizer.decode(s[len(prompt):]) for s in seqs]
        correct += any(bool(task.evaluate(conv, c)) for c in completions)
    return correct


def centered(accuracy: float, chance: float) -> float:
    return (accuracy - chance) / (1.0 - chance)


def evaluate_chat_tasks(model, tokenizer, specs: list, device, *, max_per_task: int = -1,
                        data_dir: Optional[str] = None, base_dir: Any = None,
                        log: Callable[[str], None] = print, batch_size: int = 8, num_samples: int = 1,
                        max_new_tokens: int = 256, temperature: float = 0.0, top_k: Optional[int] = 50,
                        seed: int = 42, required: bool = False) -> dict:
    """Score a chat model on each task spec (held-out split); ranks split the examples.

    Returns {"tasks": {name: {accuracy, correct, total, eval_type, chance, centered, seconds}},
             "chatcore": mean centered accuracy (None when no task ran), "skipped": {name: reason}}.
    A task whose data is missing is skipped (named in "skipped"), or raises with required=True.
    """
    rank, world = _dist()
    was_training = model.training
    model.eval()
    out: dict = {"tasks": {}, "skipped": {}}
    try:
        for spec in specs:
            name = task_key(spec)
            try:
                task = make_task(spec, "test", data_dir=data_dir, base_dir=str(base_dir) if base_dir else None)
            except (TaskDataError, OSError) as e:
                if required:
                    raise
                out["skipped"][name] = str(e)[:200]
                log(f"eval: skipping {name} (no data: {str(e)[:120]})")
                continue
            n = len(task) if max_per_task is None or max_per_task < 0 else min(len(task), max_per_task)
            indices = list(range(rank, n, world))
            t0 = time.time()
            if task.eval_type == "categorical":
                correct = score_categorical(model, tokenizer, task, indices, device, batch_size)
            else:
                correct = score_generative(model, tokenizer, task, indices, num_samples=num_samples,
                                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                           seed=seed)
            correct, total = _sum_all([correct, len(indices)], device)
            acc = correct / max(1.0, total)
            chance = CHANCE_ACCURACY.get(name, 0.25 if task.eval_type == "categorical" else 0.0)
            out["tasks"][name] = {"accuracy": acc, "correct": int(correct), "total": int(total),
                                  "eval_type": task.eval_type, "chance": chance, "centered": centered(acc, chance),
                                  "seconds": round(time.time() - t0, 2)}
    finally:
        model.train(was_training)
    tasks = out["tasks"]
    out["chatcore"] = sum(r["centered"] for r in tasks.values()) / len(tasks) if tasks else None
    out["chatcore_tasks"] = list(tasks)
    return out


# --------------------------------------------------------------------------- base scoring

def bundle_dir(cfg: Config, base_dir: Path) -> Path:
    """paths.eval_bundle, else the offline copy in the shared data dir, else the downloaded one."""
    from nanochat.core_eval import ensure_eval_bundle
    configured = cfg.paths.eval_bundle
    if not configured:
        shared = shared_data_dir(cfg.paths.shared_data)
        if shared is not None and (shared / "eval_bundle" / "core.yaml").exists():
            configured = str(shared / "eval_bundle")
    return ensure_eval_bundle(base_dir, configured)


def split_bpb(model, cfg: Config, tokenizer, token_bytes, split: str, batch: int, seq: int, tokens: int,
              rt: T.Runtime) -> float:
    from nanochat.dataloader import DataLoader
    from nanochat.loss_eval import evaluate_bpb
    loader = DataLoader(cfg.data, tokenizer, batch, seq, split, rt.rank, rt.world, rt.device, base_dir=rt.base_dir)
    try:
        with rt.autocast():
            return evaluate_bpb(model, loader, max(1, tokens // (batch * seq * rt.world)), token_bytes)
    finally:
        loader.close()


def run_base(cfg: Config, run_dir: Path, rt: T.Runtime, model, tokenizer, tok_name: str, log) -> dict:
    from nanochat.dataset import list_shards
    from nanochat.tokenizer import get_token_bytes
    st = cfg.stage
    plan = T.load_plan(run_dir)
    seq = min(plan.sequence_len, model.config.sequence_len)
    token_bytes = get_token_bytes(rt.base_dir, tok_name, rt.device)
    if rt.master:
        for split in ("train", "val"):
            list_shards(cfg.data, rt.base_dir, split)
    barrier()
    result: dict = {"mode": "base"}
    for split in ("train", "val"):
        bpb = split_bpb(model, cfg, tokenizer, token_bytes, split, plan.device_batch_size, seq, st.bpb_tokens, rt)
        result[f"{split}_bpb"] = bpb
        log(f"{split} bpb: {bpb:.4f}")
    if st.core:
        from nanochat.core_eval import core_summary, evaluate_core, write_core_csv
        try:
            bundle = bundle_dir(cfg, rt.base_dir)
        except Exception as e:
            if cfg.paths.eval_bundle:  # the user named a bundle: not finding it is an error
                raise
            # no local bundle and no network (an offline demo): report bpb, say why CORE is missing
            log(f"CORE skipped: no eval bundle ({type(e).__name__}: {e}); set paths.eval_bundle=<dir>")
            result.update(core=None, core_skipped=f"eval bundle unavailable: {e}")
            return result
        with rt.autocast():
            core = evaluate_core(model, tokenizer, bundle, rt.device, max_per_task=st.max_per_task,
                                 progress=rt.master)
        if rt.master:
            write_core_csv(core, run_dir / "core.csv")
        log(core_summary(core))
        result.update(core=core["core"], core_tasks_evaluated=core["tasks_evaluated"],
                      core_tasks_total=core["tasks_total"], core_tasks_skipped=core["tasks_skipped"],
                      core_results=core["results"], eval_bundle=str(bundle))
    return result


def run_chat(cfg: Config, run_dir: Path, rt: T.Runtime, model, tokenizer, log) -> dict:
    st = cfg.stage
    specs = list(st.tasks) if st.tasks else DEFAULT_CHAT_TASKS
    with rt.autocast():
        out = evaluate_chat_tasks(model, tokenizer, specs, rt.device, max_per_task=st.max_per_task,
                                  data_dir=cfg.paths.shared_data, base_dir=rt.base_dir, log=log,
                                  batch_size=st.batch_size, num_samples=st.num_samples,
                                  max_new_tokens=st.max_new_tokens, temperature=st.temperature, top_k=st.top_k,
                                  seed=cfg.run.seed, required=bool(st.tasks))
    for name, r in out["tasks"].items():
        log(f"{name:>15}: {r['accuracy']:.4f} ({r['correct']}/{r['total']}, chance {r['chance']})")
    if out["chatcore"] is not None:
        log(f"ChatCORE {out['chatcore']:.4f} over {len(out['tasks'])} tasks")
    if rt.master:
        lines = ["task,accuracy,centered,correct,total,chance"]
        lines += [f"{k},{r['accuracy']:.6f},{r['centered']:.6f},{r['correct']},{r['total']},{r['chance']}"
                  for k, r in out["tasks"].items()]
        if out["chatcore"] is not None:
            lines.append(f"ChatCORE,,{out['chatcore']:.6f},,{len(out['tasks'])},")
        from nanochat.common import atomic_write_text
        atomic_write_text(run_dir / "chat_eval.csv", "\n".join(lines) + "\n")
    return {"mode": "chat", "chatcore": out["chatcore"], "chatcore_tasks": out["chatcore_tasks"],
            "task_accuracy": {k: r["accuracy"] for k, r in out["tasks"].items()}, "tasks": out["tasks"],
            "skipped": out["skipped"]}



def resolve_mode(mode: str, source_stage: str) -> str:
    if mode not in ("auto", "base", "chat"):
        raise ValueError(f"stage.mode={mode!r}: use auto, base or chat")
    if mode != "auto":
        return mode
    return "base" if source_stage == "pretrain" else "chat"


def run(cfg: Config, run_dir: Path) -> dict:
    from nanochat.checkpoint import load_model_from_run
    from nanochat.tokenizer import get_tokenizer
    rt = T.setup_runtime(cfg)
    st = cfg.stage
    if not st.init_from:
        raise ValueError("stage.init_from: the eval stage needs a checkpoint (a run dir or `latest`)")
    t0 = time.time()
    model, meta = load_model_from_run(st.init_from, rt.device)
    source_stage = meta.get("stage", "pretrain")
    tok_name = (meta.get("config") or {}).get("data", {}).get("tokenizer") or cfg.data.tokenizer
    tokenizer = get_tokenizer(rt.base_dir, tok_name)
    log = print if rt.master else (lambda s: None)
    mode = "harness" if st.harness.tasks else resolve_mode(st.mode, source_stage)
    log(f"eval ({mode}) of {st.init_from} (a {source_stage} checkpoint at step {meta.get('step')})")
    if mode == "harness":                    # lm-evaluation-harness (nanochat/harness.py)
        from nanochat.harness import run_stage
        with rt.autocast():
            result = run_stage(model, tokenizer, st.harness, cfg.paths.shared_data, run_dir, rt.master, log)
    elif mode == "base":
        result = run_base(cfg, run_dir, rt, model, tokenizer, tok_name, log)
    else:
        result = run_chat(cfg, run_dir, rt, model, tokenizer, log)
    result.update(source=str(st.init_from), source_stage=source_stage, source_step=meta.get("step"),
                  eval_time_s=round(time.time() - t0, 2))
    return result
