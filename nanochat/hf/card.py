"""The README.md model card of an export, written from the run dir (no network, no templates library).

It says what the model is (generation, architecture, parameter counts), how it was trained (the stage
lineage pretrain → … → this run, tokens, val bpb), how it scores (CORE / ChatCORE from eval runs of it,
when there are any), how to load it, and the frozen config. The license is left for the user.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from nanochat import results as R


def lineage(run_dir: Path, limit: int = 10) -> list[tuple[str, Path, R.Result]]:
    """(stage, run dir, its result) from the first ancestor (pretrain, an import) to run_dir."""
    from nanochat.config import load_config
    chain: list[tuple[str, Path, R.Result]] = []
    d: Optional[Path] = run_dir
    while d is not None and len(chain) < limit and (d / "resolved_config.yaml").is_file():
        cfg = load_config(str(d / "resolved_config.yaml"))
        chain.append((cfg.stage.name, d, R.load_result(d) or R.Result()))
        src = getattr(cfg.stage, "init_from", None)
        d = Path(src) if src and src != "latest" else None
    return list(reversed(chain))


def eval_results(run_dir: Path) -> list[R.EvalResult]:
    """The results of completed eval runs (under the same run root) whose init_from is run_dir."""
    root = run_dir.parents[2] if len(run_dir.parents) > 2 else run_dir.parent
    found = [R.load_result(p.parent) for p in sorted((root / "eval").glob("*/*/resolved_config.yaml"))
             if (p.parent / "COMPLETED").exists() and f"init_from: {run_dir}" in p.read_text(encoding="utf-8")]
    return [r for r in found if isinstance(r, R.EvalResult)]


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def model_card(run_dir: Path, cfg: Any, meta: dict, kw: dict, remote_code: bool, dtype: str) -> str:
    from nanochat.config import config_to_dict
    from nanochat.gpt import GPTConfig
    from nanochat.runs import read_file
    from nanochat.shapes import param_counts
    c = GPTConfig(**kw)
    plan = read_file(run_dir / "plan.json") or {}
    generation = plan.get("generation") or ("modern" if c.resid_lambdas else "seed")
    evals = eval_results(run_dir)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "license: other  # fill in", "tags: [nanochat, nanochat-hydra]", "---", "",
        f"# {run_dir.name}: a nanochat-hydra {generation}-generation model (d{c.n_layer})", "",
        f"Exported by `nanochat-export --format hf` from `{run_dir}` (step {meta.get('step')}, "
        f"stage {cfg.stage.name}), weights in {dtype}.", "",
        "## Architecture", "",
        f"- generation: **{generation}**; transformers model type: "
        + ("`nanochat_hydra` (remote code: this project's own model module ships in this folder)" if remote_code
           else "`nanochat` (transformers' NanoChatForCausalLM)"),
        f"- layers {c.n_layer}, width {c.n_embd}, heads {c.n_head} (KV heads {c.n_kv_head}, head dim {c.head_dim}), "
        f"vocab {c.vocab_size:,}, context {c.sequence_len}",
        f"- parameters: {param_counts(c)['total']:,} total",
        f"- RoPE base {c.rope_base:g}, logit soft cap {c.softcap:g}, QK norm, ReLU² MLP, untied embeddings",
    ]
    toggles = [t for t in ("value_embeds", "resid_lambdas", "x0_lambdas", "smear", "backout") if getattr(c, t)]
    if toggles or c.window_pattern != "L" or c.qk_scale != 1.0:
        lines.append(f"- modern toggles: {', '.join(toggles) or 'none'}; window pattern {c.window_pattern}; "
                     f"qk scale {c.qk_scale:g}")
    if c.rope_bf16 and not remote_code:
        lines.append("- note: training rounded the RoPE tables to bf16; transformers computes them in fp32, which "
                     "moves logits slightly (see the project README, 'Hugging Face ecosystem'); "
                     "`nanochat-export --remote-code` gives the exact model")
    lines += ["", "## Training", "", "| stage | run | tokens | val bpb | other |", "|---|---|---|---|---|"]
    for stage, d, r in lineage(run_dir):
        bpb = r.final_val_bpb if isinstance(r, R.PretrainResult) else getattr(r, "val_bpb", None)  # eval: val_bpb
        tokens = r.tokens_seen if isinstance(r, R.TrainResult) and r.tokens_seen is not None else ""
        other = {k: v for k in ("final_val_loss", "mean_reward", "core", "chatcore")
                 if (v := getattr(r, k, None)) is not None}
        lines.append(f"| {stage} | `{d.name}` | {_fmt(tokens)} | {_fmt(bpb) if bpb is not None else ''} "
                     f"| {', '.join(f'{k} {_fmt(v)}' for k, v in other.items())} |")
    if evals:
        lines += ["", "## Evaluation", ""]
        for r in evals:
            lines += [f"- {name}: {_fmt(value)}" for value, name in
                      ((r.core, "CORE"), (r.chatcore, "ChatCORE"), (r.val_bpb, "val bpb")) if value is not None]
            lines += [f"- {task}: {_fmt(acc)}" for task, acc in (r.task_accuracy or {}).items()]
            lines += [f"- lm-eval {task}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m.items())
                      for task, m in ((r.harness or {}).get("results") or {}).items()]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = AutoModelForCausalLM.from_pretrained(path{', trust_remote_code=True' if remote_code else ''})",
              "tok = AutoTokenizer.from_pretrained(path)",
              "msgs = [{'role': 'user', 'content': 'Why is the sky blue?'}]",
              "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
              "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
              "Generation stops at `<|assistant_end|>` or `<|bos|>` (generation_config.json). Tool calls are assistant",
              "content parts `{'type': 'python', 'text': ...}` and results `{'type': 'python_output', 'text': ...}`.", "",
              "## Frozen config", "", "```json", json.dumps(config_to_dict(cfg), indent=1, default=str), "```", "",
              "## License", "", "Fill in the license of this model before publishing it.", ""]
    return "\n".join(lines)
