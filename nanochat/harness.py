"""lm-evaluation-harness on our own model: an lm-eval model class over GPT (scoring) and the Engine
(generation), and task definitions that read local data.

    run_stage(model, tokenizer, harness_cfg, shared_data, run_dir, master, log) → result.json's part
    (harness.json: {"results", "lm_eval_version", ...})

`NanochatLM` (registered in lm-eval as `nanochat`) answers lm-eval's three request types with our model:
- loglikelihood: lm-eval's TemplateLM splits (context, continuation) into tokens; we prepend <|bos|> (every
  nanochat document starts with it; the exported tokenizer.json does the same, so `--model hf` on an
  export sees the same ids), left-truncate to the model's sequence_len and score batches of requests
  (sorted by length, right-padded: a causal model never sees the padding of a row).
- loglikelihood_rolling: lm-eval's disjoint rolling windows of sequence_len, summed.
- generate_until: requests with the same generation settings are batched through the Engine
  (nanochat/engine.py: a row per prompt, one KV cache, its sampler and tool use); a row stops at
  <|assistant_end|>, <|bos|>, one of the request's `until` strings, or max_gen_toks.
Between batches the preemption flag (nanochat/lifecycle.py) is checked: a stop signal raises EvalInterrupted
as in every long evaluation (the eval stage exits 75 and is rerun, not resumed).

Tasks (`LOCAL_TASKS`) are lm-eval task configs equal to lm-eval's own arc_easy / arc_challenge / gsm8k yaml
(and mmlu as a group of its 57 subjects, humaneval graded in our sandbox, nanochat/execution.py, instead of
`evaluate`'s code_eval), except that `custom_dataset` reads the local copies in `data_dir` (../shared/data:
arc/, mmlu/cais_mmlu/, gsm8k/, humaneval/) instead of downloading.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Optional


class HarnessError(ValueError):
    """A harness task that cannot run here (unknown, or its local data is missing); the message says which."""


# ----------------------------------------------------------------------------- local data

def _jsonl(path: Path) -> list[dict]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(splits: dict[str, list[dict]]):
    import datasets
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def load_arc(data_dir: str, subset: str, **_: Any):
    d = Path(data_dir) / "arc" / subset
    return _dataset({s: _jsonl(d / f"{s}.jsonl") for s in ("train", "validation", "test")})


def load_gsm8k(data_dir: str, **_: Any):
    d = Path(data_dir) / "gsm8k"
    return _dataset({s: _jsonl(d / f"{s}.jsonl") for s in ("train", "test")})


def _mmlu_rows(path: Path, subject: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [{"question": r["question"], "subject": subject,
                 "choices": [r["choice0"], r["choice1"], r["choice2"], r["choice3"]], "answer": int(r["answer"])}
                for r in csv.DictReader(f)]


def load_mmlu_subject(data_dir: str, subject: str, **_: Any):
    d = Path(data_dir) / "mmlu" / "cais_mmlu"
    return _dataset({s: _mmlu_rows(d / s / f"{subject}_{s}.csv", subject) for s in ("test", "dev")})


def load_humaneval(data_dir: str, **_: Any):
    return _dataset({"test": _jsonl(Path(data_dir) / "humaneval" / "HumanEval.jsonl.gz")})


def humaneval_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's humaneval filter: the prompt followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_1(references: list[str], predictions: list[list[str]], **_: Any) -> float:
    """1.0 when the first completion passes the task's tests, run in our sandbox (nanochat/execution.py)
    instead of lm-eval's `evaluate` code_eval metric (which downloads its script)."""
    from nanochat.execution import execute_code
    return float(execute_code(predictions[0][0] + "\n\n" + references[0] + "\n", timeout=10.0).success)


# ----------------------------------------------------------------------------- task configs

_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def _arc(name: str, subset: str, data_dir: str) -> dict:
    return {"task": name, "custom_dataset": load_arc, "dataset_kwargs": {"data_dir": data_dir, "subset": subset},
            "output_type": "multiple_choice", "training_split": "train", "validation_split": "validation",
            "test_split": "test", "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
            "metric_list": _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def _gsm8k(data_dir: str) -> dict:
    return {"task": "gsm8k", "custom_dataset": load_gsm8k, "dataset_kwargs": {"data_dir": data_dir},
            "output_type": "generate_until", "training_split": "train", "fewshot_split": "train",
            "test_split": "test", "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False,
                             "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
            "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                  "temperature": 0.0},
            "repeats": 1, "num_fewshot": 5,
            "filter_list": [
                {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                    {"function": "take_first"}]},
                {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                         "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                        {"function": "take_first"}]}],
            "metadata": {"version": 3.0}}


def _humaneval(data_dir: str) -> dict:
    return {"task": "humaneval", "custom_dataset": load_humaneval, "dataset_kwargs": {"data_dir": data_dir},
            "unsafe_code": True, "output_type": "generate_until", "test_split": "test", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{test}}\ncheck({{entry_point}})",
            "metric_list": [{"metric": pass_at_1, "aggregation": "mean", "higher_is_better": True}],
            "generation_kwargs": {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 1024,
                                  "do_sample": False},
            "repeats": 1, "num_fewshot": 0,
            "filter_list": [{"name": "create_test", "filter": [{"function": "custom",
                                                                 "filter_fn": humaneval_programs}]}],
            "metadata": {"version": 1.0}}


def _mmlu(data_dir: str) -> dict:
    tests = (Path(data_dir) / "mmlu" / "cais_mmlu" / "test").glob("*_test.csv")
    subjects = sorted(p.name[:-len("_test.csv")] for p in tests)
    tasks = [{"task": f"mmlu_{s}", "custom_dataset": load_mmlu_subject,
              "dataset_kwargs": {"data_dir": data_dir, "subject": s}, "test_split": "test", "fewshot_split": "dev",
              "fewshot_config": {"sampler": "first_n"}, "output_type": "multiple_choice",
              "description": f"The following are multiple choice questions (with answers) about "
                             f"{s.replace('_', ' ')}.\n\n",
              "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                             "D. {{choices[3]}}\nAnswer:",
              "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer", "metric_list": _ACC,
              "metadata": {"version": 1.0}} for s in subjects]
    return {"group": "mmlu", "task": tasks, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2}}


# task name → (its config for a data_dir, the path under data_dir that must exist)
LOCAL_TASKS: dict[str, tuple[Callable[[str], dict], str]] = {
    "arc_easy": (lambda d: _arc("arc_easy", "ARC-Easy", d), "arc/ARC-Easy/test.jsonl"),
    "arc_challenge": (lambda d: _arc("arc_challenge", "ARC-Challenge", d), "arc/ARC-Challenge/test.jsonl"),
    "gsm8k": (_gsm8k, "gsm8k/test.jsonl"),
    "mmlu": (_mmlu, "mmlu/cais_mmlu/test"),
    "humaneval": (_humaneval, "humaneval/HumanEval.jsonl.gz"),
}


def resolve_data_dir(data_dir: Optional[str], shared_data: Optional[str]) -> Optional[str]:
    """stage.harness.data_dir, else the shared data dir (paths.shared_data or ../shared/data)."""
    from nanochat.common import shared_data_dir
    found = data_dir or shared_data_dir(shared_data)
    return str(found) if found else None


def task_configs(names: list[str], data_dir: Optional[str]) -> list[dict]:
    """lm-eval config dicts for `names`, checked against the local data first (no torch, no lm_eval)."""
    if unknown := [n for n in names if n not in LOCAL_TASKS]:
        raise HarnessError(f"stage.harness.tasks: {unknown} have no local definition here; "
                           f"use some of {sorted(LOCAL_TASKS)}")
    if data_dir is None:
        raise HarnessError("stage.harness.data_dir: no local task data found (../shared/data is absent); "
                           "point stage.harness.data_dir at a folder with arc/, mmlu/, gsm8k/")
    for n in names:
        if not (need := Path(data_dir) / LOCAL_TASKS[n][1]).exists():
            raise HarnessError(f"stage.harness.tasks: {n} needs {need}, which is missing; "
                               f"set stage.harness.data_dir to a folder that has it")
    return [LOCAL_TASKS[n][0](str(data_dir)) for n in names]


def config_hash(cfg: Any) -> str:
    """sha256 of a task's config as lm-eval reports it (functions by qualified name)."""
    default = lambda o: getattr(o, "__qualname__", None) or repr(o)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=default).encode()).hexdigest()


# ----------------------------------------------------------------------------- the model class

@functools.cache
def make_lm_class():
    """Build (once) and register the lm-eval model class; lm_eval is imported only when asked for."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence
    import lm_eval.models  # noqa: F401  (fills lm-eval's registry first: it only does so while empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from nanochat.engine import Engine
    from nanochat.lifecycle import check_stop

    class _NanochatLM(TemplateLM):
        """lm-eval's view of our GPT + tokenizer (see the module docstring)."""

        def __init__(self, model=None, tokenizer=None, batch_size: int = 16, max_gen_toks: int = 256,
                     add_bos_token: bool = True, run_dir: Optional[str] = None, device: str = "cpu", **_: Any):
            super().__init__()
            if model is None:                   # lm-eval's model_args: run_dir=...
                from nanochat.chat_cli import load
                model, tokenizer, _ = load(run_dir, device)
            self.model, self.tok = model.eval(), tokenizer
            self.batch_size_ = int(batch_size)
            self.max_gen_toks = int(max_gen_toks)
            self.add_bos_token = add_bos_token
            self.bos = tokenizer.get_bos_token_id()
            self.engine = Engine(self.model, tokenizer)

        # -- lm-eval's interface
        @property
        def eot_token_id(self) -> int:
            return self.tok.encode_special("<|assistant_end|>")

        @property
        def prefix_token_id(self) -> int:
            return self.bos

        @property
        def max_length(self) -> int:
            return int(self.model.config.sequence_len)

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kw) -> list[int]:
            ids = self.tok.encode(string)
            bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
            return [self.bos] + ids if bos else ids   # encode() never makes the <|bos|> id itself

        @torch.inference_mode()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
            L = self.max_length    # the last L + 1 tokens: L inputs predict the L after the first
            items = [(i, (ctx + cont)[-(L + 1):-1], len(cont)) for i, (_, ctx, cont) in enumerate(requests)]
            order = sorted(range(len(items)), key=lambda j: -len(items[j][1]))
            out: list[Optional[tuple[float, bool]]] = [None] * len(items)
            for b0 in range(0, len(order), self.batch_size_):
                batch = [items[j] for j in order[b0:b0 + self.batch_size_]]
                idx = pad_sequence([torch.tensor(inp, dtype=torch.long) for _, inp, _ in batch], batch_first=True)
                logp = F.log_softmax(self.model(idx.to(self.model.lm_head.weight.device)).float(), dim=-1)
                for r, (i, inp, n) in enumerate(batch):
                    cont = torch.tensor(requests[i][2][-n:] if n else [], dtype=torch.long, device=logp.device)
                    rows = logp[r, len(inp) - n:len(inp)]
                    greedy = bool((rows.argmax(-1) == cont).all())
                    out[i] = (float(rows.gather(1, cont[:, None]).sum()), greedy)
                check_stop()   # EvalInterrupted: the eval stage exits 75 (preempted, rerun it)
            return out   # type: ignore[return-value]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in [r.args for r in requests]:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok.encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)]
                scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                out.append(sum(s for s, _ in scores))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[Optional[str]] = [None] * len(requests)
            args = [r.args for r in requests]
            # a batch shares its generation settings (lm-eval gives a task's requests the same ones)
            key = lambda j: json.dumps(args[j][1], sort_keys=True, default=str)
            order = sorted(range(len(args)), key=lambda j: (key(j), -len(args[j][0])))
            for _, same in itertools.groupby(order, key):
                same = list(same)
                kw = args[same[0]][1]
                until = [kw["until"]] if isinstance(kw.get("until"), str) else list(kw.get("until") or [])
                max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
                temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                for b0 in range(0, len(same), self.batch_size_):
                    # prompts may run past sequence_len (few-shot): keep what the RoPE table reaches with the answer
                    prompts = {j: self.tok_encode(args[j][0])[-max(1, self.model.rotary_len - max_new):]
                               for j in same[b0:b0 + self.batch_size_]}
                    seqs, _ = self.engine.generate_batch(list(prompts.values()), max_tokens=max_new,
                                                         temperature=temp, seed=1234, stop=until)
                    for (j, p), seq in zip(prompts.items(), seqs):
                        out[j] = self.tok.decode(seq[len(p):])
                        for x in filter(None, until):
                            out[j] = out[j].split(x)[0]
                    check_stop()   # EvalInterrupted: the eval stage exits 75 (preempted, rerun it)
            return out   # type: ignore[return-value]

    return register_model("nanochat")(_NanochatLM)


# ----------------------------------------------------------------------------- running it

def run_stage(model, tokenizer, hcfg, shared_data: Optional[str], run_dir: Path, master: bool,
              log: Callable[[str], None] = print) -> dict:
    """The eval stage's harness mode: run on rank 0, write harness.json, return result.json's part."""
    from nanochat.common import atomic_write_json
    data_dir = resolve_data_dir(hcfg.data_dir, shared_data)
    configs = task_configs(list(hcfg.tasks), data_dir)    # fail early, on every rank, with the reason
    if not master:
        return {"mode": "harness"}
    import importlib.metadata as md
    import os
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm = make_lm_class()(model, tokenizer, batch_size=hcfg.batch_size, max_gen_toks=hcfg.max_gen_toks)
    res = evaluate(lm, configs, limit=hcfg.limit, num_fewshot=hcfg.num_fewshot)
    out = summarize(res, md.version("lm-eval"))
    atomic_write_json(Path(run_dir) / "harness.json", out)
    for task, m in out["results"].items():
        if not task.startswith("mmlu_"):
            log(f"{task:>15}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "sample_len"))
    main = {t: m for t, m in out["results"].items() if t in hcfg.tasks}
    headline = lambda m: m.get("acc,none", m.get("exact_match,strict-match", m.get("pass_at_1,create_test")))
    return {"mode": "harness", "harness": {**out, "results": main},
            "task_accuracy": {t: v for t, m in main.items() if (v := headline(m)) is not None}}


def evaluate(lm: Any, configs: list[dict], **kwargs: Any) -> dict:
    """simple_evaluate with only our task definitions registered (lm-eval's own, which download, are not
    indexed: a dict named like one of them would otherwise be merged into it). `lm` is an LM object or
    a registered model name (kwargs then carry model_args, e.g. for `hf`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    kwargs.setdefault("bootstrap_iters", 1000)
    return simple_evaluate(model=lm, tasks=[build_task(c) for c in configs],
                           task_manager=TaskManager(include_defaults=False), log_samples=False,
                           verbosity="WARNING", confirm_run_unsafe_code=True, **kwargs)


def build_task(cfg: dict):
    """An lm-eval Task (or Group of Tasks) from one of our config dicts."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.group import GroupConfig
    if "group" not in cfg:
        return ConfigurableTask(config=dict(cfg))
    group = Group.from_config(GroupConfig(group=cfg["group"], task=[c["task"] for c in cfg["task"]],
                                          aggregate_metric_list=cfg.get("aggregate_metric_list"),
                                          metadata=cfg.get("metadata")))
    for c in cfg["task"]:
        group.add(ConfigurableTask(config=dict(c)))
    return group


def summarize(res: dict, version: str) -> dict:
    """Each task's (and group's) metrics with stderr, lm-eval's version, each task's config hash."""
    results = {task: {k: float(v) if k != "sample_len" else int(v) for k, v in metrics.items()
                      if k != "alias" and isinstance(v, (int, float))} for task, metrics in res["results"].items()}
    return {"lm_eval_version": version, "results": results,
            "config_hash": {t: config_hash(c) for t, c in (res.get("configs") or {}).items()},
            "n_samples": res.get("n-samples", {}), "versions": res.get("versions", {})}
