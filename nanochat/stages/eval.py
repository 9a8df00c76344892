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
from typing import TYPE_CHECKING

from nanochat.common import atomic_write_text, shared_data_dir
from nanochat.config import Config, ConfigError, EvalStageConfig
from nanochat.results import EvalResult
from nanochat.stage_plan import model_plan
from nanochat.stages import Stage

if TYPE_CHECKING:  # torch and what imports it load in the worker only: the launcher imports this module
    from nanochat import training as T

# --------------------------------------------------------------------------- base scoring

def run_base(cfg: Config, run_dir: Path, rt: T.Runtime, model, tokenizer, tok_name: str, log) -> dict:
    from nanochat import training as T
    from nanochat.loss_eval import split_bpb
    from nanochat.tokenizer import get_token_bytes
    st = cfg.stage
    plan = T.load_plan(run_dir)
    seq = min(plan.sequence_len, model.config.sequence_len)
    token_bytes = get_token_bytes(rt.base_dir, tok_name, rt.device)
    T.prepare_corpus(cfg, rt)
    result: dict = {"mode": "base"}
    for split in ("train", "val"):
        bpb = split_bpb(model, cfg.data, rt, tokenizer, token_bytes, split, plan.device_batch_size, seq, st.bpb_tokens)
        result[f"{split}_bpb"] = bpb
        log(f"{split} bpb: {bpb:.4f}")
    if st.core:
        from nanochat.core_eval import core_summary, ensure_eval_bundle, evaluate_core, write_core_csv
        # paths.eval_bundle, else the offline copy in the shared data dir, else the downloaded one
        configured = cfg.paths.eval_bundle
        shared = shared_data_dir(cfg.paths.shared_data)
        if not configured and shared is not None and (shared / "eval_bundle" / "core.yaml").exists():
            configured = str(shared / "eval_bundle")
        try:
            bundle = ensure_eval_bundle(rt.base_dir, configured)
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
    from nanochat.chat_eval import DEFAULT_CHAT_TASKS, evaluate_chat_tasks
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
        atomic_write_text(run_dir / "chat_eval.csv", "\n".join(lines) + "\n")
    return {"mode": "chat", "chatcore": out["chatcore"], "chatcore_tasks": out["chatcore_tasks"],
            "task_accuracy": {k: r["accuracy"] for k, r in out["tasks"].items()}, "tasks": out["tasks"],
            "skipped": out["skipped"]}


def run(cfg: Config, run_dir: Path) -> EvalResult:
    from nanochat import training as T
    from nanochat.checkpoint import load_model_from_run
    from nanochat.tokenizer import get_tokenizer
    rt = T.setup_runtime(cfg)
    st = cfg.stage   # stage.init_from is a run dir: the launcher resolved it (launch/rundir.py resolve_source)
    t0 = time.time()
    model, meta = load_model_from_run(st.init_from, rt.device)
    source_stage = meta.get("stage", "pretrain")
    tok_name = (meta.get("config") or {}).get("data", {}).get("tokenizer") or cfg.data.tokenizer
    tokenizer = get_tokenizer(rt.base_dir, tok_name)
    log = print if rt.master else (lambda s: None)
    if st.mode not in ("auto", "base", "chat"):
        raise ValueError(f"stage.mode={st.mode!r}: use auto, base or chat")
    auto = "base" if source_stage == "pretrain" else "chat"
    mode = "harness" if st.harness.tasks else auto if st.mode == "auto" else st.mode
    log(f"eval ({mode}) of {st.init_from} (a {source_stage} checkpoint at step {meta.get('step')})")
    if mode == "harness":                    # lm-evaluation-harness (nanochat/harness.py)
        from nanochat.harness import run_stage
        with rt.autocast():
            result = run_stage(model, tokenizer, st.harness, cfg.paths.shared_data, run_dir, rt.master, log)
    elif mode == "base":
        result = run_base(cfg, run_dir, rt, model, tokenizer, tok_name, log)
    else:
        result = run_chat(cfg, run_dir, rt, model, tokenizer, log)
    return EvalResult(**result, source=str(st.init_from), source_stage=source_stage, source_step=meta.get("step"),
                      eval_time_s=round(time.time() - t0, 2))


# --------------------------------------------------------------------------- the declaration

def check_harness(cfg: Config) -> None:
    """stage.harness.tasks: known task names whose local data is there (before any run dir is made)."""
    if not cfg.stage.harness.tasks:
        return
    from nanochat.harness import HarnessError, resolve_data_dir, task_configs
    h = cfg.stage.harness
    try:
        task_configs(list(h.tasks), resolve_data_dir(h.data_dir, cfg.paths.shared_data))
    except HarnessError as e:
        raise ConfigError("stage.harness.tasks", list(h.tasks), str(e), "task cannot run here") from None
    if h.limit is not None and h.limit < 1:
        raise ConfigError("stage.harness.limit", h.limit, "use a positive number of examples, or null for all",
                          "out of range")


# latest: the newest run of these with this run's tag (stage.mode=auto: base for pretrain, else chat)
STAGE = Stage("eval", schema=EvalStageConfig, planner=model_plan, worker=run,
              sources=("rl", "sft", "mid", "pretrain"), headline="val_bpb", check=check_harness,
              result=EvalResult)
