"""nanochat-import / nanochat-export: nanochat checkpoints in and out of our run dirs.

    nanochat-import SRC [--stage auto|pretrain|mid|sft|rl] [--step N] [--tag T] [key=value ...]
    nanochat-export RUN_DIR OUT_BASE_DIR [--step N] [--tag T]
    nanochat-export RUN_DIR OUT_DIR --format hf [--dtype float32|bfloat16] [--step N] [--force] [--remote-code]

Import: SRC is a nanochat checkpoint dir (base_checkpoints/<tag>, mid_checkpoints/<tag>,
chatsft_checkpoints/<tag>, chatrl_checkpoints/<tag>) or a nanochat base dir (then the newest
checkpoint of its latest stage). The result is a COMPLETED run dir of ours under run.root, composed
by Hydra like any nanochat-run (the trailing key=value overrides go to it, e.g. run.root=...,
paths.base_dir=...), with the model section from the checkpoint, and the tokenizer installed under
paths.base_dir as `nanochat-<sha12>`. Everything is read and checked before anything is written.

SRC may also be a Hugging Face transformers dir written by `nanochat-export --format hf` (model type
`nanochat` or our remote-code `nanochat_hydra`); `run.dir=...` names the run dir to create.

Export writes nanochat's layout under OUT_BASE_DIR (<stage>_checkpoints/<tag>/model_NNNNNN.pt +
meta_NNNNNN.json, tokenizer/), which nanochat's own scripts load; export then import is bitwise.

`--format hf` writes a transformers model dir instead (nanochat/hf/export.py: config.json, safetensors,
tokenizer.json + chat template, model card; remote code for what transformers' nanochat type cannot run).

The conversions themselves are nanochat/interop.py and nanochat/hf/; this module does the CLI and the config.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

from launch import rundir
from launch.run import compose
from nanochat.config import ConfigError, config_to_dict, load_config


def _fail(msg: str) -> int:
    print(f"[nanochat-interop] error: {msg}", file=sys.stderr, flush=True)
    return 2


# --------------------------------------------------------------------------- config

def model_overrides(kw: dict) -> list[str]:
    """Our model config for the imported GPT: every field explicit, so nothing re-derives differently."""
    o = {"generation": "modern" if kw["resid_lambdas"] else "seed", "depth": kw["n_layer"],
         **{k: kw[k] for k in ("n_embd", "n_head", "n_kv_head", "vocab_size", "sequence_len", "softcap", "rope_base",
                               "value_embeds", "window_pattern", "resid_lambdas", "x0_lambdas", "smear", "backout",
                               "qk_scale", "pad_vocab_to")},
         "head_dim": kw["n_embd"] // kw["n_head"]}
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in o.items()]


# --------------------------------------------------------------------------- import

def _install_tokenizer(tok, base_dir: Path, name: str) -> None:
    """Save our tokenizer artifact under <base_dir>/tokenizer/<name>/ (tmp dir + rename; reuse if equal)."""
    from nanochat.interop import InteropError
    from nanochat.tokenizer import Tokenizer, tokenizer_dir
    final = tokenizer_dir(base_dir, name)
    if final.exists():
        have = Tokenizer.load(final)
        if have.mergeable_ranks != tok.mergeable_ranks or have.pattern != tok.pattern:
            raise InteropError(f"{final} exists and holds a different tokenizer")
        return
    tmp = final.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp, extra_meta={"source": "nanochat-import"})
    tmp.replace(final)


def _read_nanochat(src: str, stage: str, step: Optional[int], tag: Optional[str]):
    """(kw, state, tokenizer, tokenizer name, stage, tag, step, record) of a nanochat checkpoint."""
    from nanochat import interop
    source = interop.locate(src, stage, step, tag)
    nc_meta = interop.load_meta(source.meta_path)
    kw, state = interop.from_nanochat(interop.load_state(source.model_path), nc_meta["model_config"])
    tok = interop.load_tokenizer(source.tokenizer_dir, kw["vocab_size"])
    files = {k: {"path": str(p), "sha256": interop.file_sha256(p)} for k, p in source.files().items()}
    record = {"source": str(src), "base_dir": str(source.base_dir), "stage": source.stage, "tag": source.tag,
              "step": source.step, "files": files,
              "nanochat_meta": {k: v for k, v in nc_meta.items() if k != "dataloader_state_dict"}}
    extra = {"nanochat_val_bpb": nc_meta["val_bpb"]} if isinstance(nc_meta.get("val_bpb"), (int, float)) else {}
    return (kw, state, tok, f"nanochat-{files['tokenizer']['sha256'][:12]}", source.stage, source.tag, source.step,
            record, str(source.ckpt_dir), extra)


def _read_hf(src: str, stage: str, step: Optional[int], tag: Optional[str]):
    """The same for a transformers dir (model type `nanochat` or our remote-code `nanochat_hydra`)."""
    from nanochat import interop
    from nanochat.hf.export import read_hf_dir
    hf_dir = Path(src).expanduser().resolve()
    kw, state, tok, config = read_hf_dir(hf_dir)
    rec = config.get("nanochat_hydra") or {}
    if stage == "auto":
        stage = rec.get("stage") if rec.get("stage") in interop.STAGE_DIRS else interop.STAGE_ORDER[0]  # base
    step = step if step is not None else int(rec.get("step", 0))
    files = {f: {"path": str(hf_dir / f), "sha256": interop.file_sha256(hf_dir / f)}
             for f in sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".json", ".safetensors"))}
    record = {"source": str(src), "stage": stage, "step": step, "model_type": config.get("model_type"), "files": files}
    return (kw, state, tok, f"hf-{files['tokenizer.json']['sha256'][:12]}", stage, tag or f"d{kw['n_layer']}", step,
            record, str(hf_dir), {})


def import_checkpoint(src: str, stage: str = "auto", step: Optional[int] = None, tag: Optional[str] = None,
                      overrides: Optional[list[str]] = None) -> Path:
    """Convert one nanochat checkpoint or transformers dir into a completed run dir of ours; returns it."""
    import torch
    from nanochat import interop
    from nanochat.checkpoint import save_checkpoint
    from nanochat.common import atomic_write_json, get_base_dir
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.hf.export import is_hf_dir
    from nanochat.lifecycle import mark_completed
    from nanochat.plan import make_plan
    from nanochat.loop import LoopState

    # ---- read and check everything first: nothing is written until all of it passed
    if stage not in ("auto", *interop.STAGE_DIRS):
        raise interop.InteropError(f"--stage={stage!r}: use auto or one of {list(interop.STAGE_DIRS)}")
    reader = _read_hf if is_hf_dir(src) else _read_nanochat
    kw, state, tok, tok_name, src_stage, src_tag, src_step, record, origin, extra = reader(src, stage, step, tag)
    user = list(overrides or [])
    ours = [f"stage={src_stage}", "stage.init_from=null", f"data.tokenizer={tok_name}"] + model_overrides(kw)
    if src_tag != f"d{kw['n_layer']}":
        ours.append(f"run.tag={src_tag}")
    cfg, composed = compose(ours + user)
    plan = make_plan(cfg)
    if plan.model.gpt_config_kwargs() != kw:
        diff = {k: (v, kw.get(k)) for k, v in plan.model.gpt_config_kwargs().items() if kw.get(k) != v}
        raise interop.InteropError(f"the composed model config does not reproduce the checkpoint's "
                                   f"architecture (ours, checkpoint): {diff}; drop the model.* overrides")
    with torch.device("meta"):
        model = GPT(GPTConfig(**kw))
    model.to_empty(device="cpu")
    model.init_rotary()
    model.load_state_dict(state, strict=True)
    record["generation"] = plan.generation
    run_dir = Path(cfg.run.dir).expanduser().resolve() if cfg.run.dir else None  # run.dir= names a new or empty one
    if run_dir is not None and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise interop.InteropError(f"run.dir={cfg.run.dir}: exists and is not empty; import into a new dir")

    # ---- write: the run dir is removed again if anything below fails
    base_dir = get_base_dir(cfg.paths.base_dir)
    run_dir = run_dir or rundir.new_run_dir(cfg).resolve()
    cfg = replace(cfg, run=replace(cfg.run, dir=str(run_dir)))
    composed["run"]["dir"] = str(run_dir)
    argv = ["nanochat-import", *sys.argv[1:]] if sys.argv and "nanochat-import" in sys.argv[0] else None
    try:
        _install_tokenizer(tok, base_dir, tok_name)
        meta = rundir.freeze(run_dir, cfg, plan.to_dict(), ours + user,
                             {"stage": src_stage, "model": "nanochat-import"}, composed, argv=argv)
        atomic_write_json(run_dir / "meta.json", {**meta, "nanochat_import": record})
        ckpt_meta = {"stage": src_stage, "model_config": kw,
                     "loop_state": vars(LoopState(step=src_step)), "config": config_to_dict(cfg),
                     "plan": plan.to_dict(), "world_size": 1, "nanochat_import": record}
        save_checkpoint(run_dir, src_step, model=model, optimizer=None, loader_state=None, meta=ckpt_meta)
        result = {"stage": src_stage, "step": src_step, "imported_from": origin,
                  "generation": plan.generation, "num_params": plan.num_params, **extra}
        mark_completed(run_dir, result)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def main_import(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nanochat-import", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="nanochat checkpoint dir (<stage>_checkpoints/<tag>) or nanochat base dir")
    ap.add_argument("--stage", default="auto", help="auto, or which stage of nanochat's the checkpoint "
                    "is (nanochat.interop.STAGE_DIRS; auto reads it from SRC)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--tag", default=None, help="nanochat model tag when SRC is a base dir (default: largest dN)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for our run, e.g. run.root=runs")
    args = ap.parse_args(argv)
    from nanochat.interop import InteropError
    try:
        run_dir = import_checkpoint(args.src, args.stage, args.step, args.tag, args.overrides)
    except (InteropError, ConfigError) as e:
        return _fail(str(e))
    print(f"[nanochat-import] {run_dir}")
    print(f"  chat:  nanochat-chat {run_dir}")
    print(f"  eval:  nanochat-run stage=eval stage.init_from={run_dir}")
    print(f"  sft:   nanochat-run stage=sft stage.init_from={run_dir}")
    return 0


# --------------------------------------------------------------------------- export

def export_run(run_dir: str | Path, out_base: str | Path, step: Optional[int] = None,
               tag: Optional[str] = None) -> Path:
    """Write a run's checkpoint (and tokenizer) in nanochat's layout; returns the checkpoint dir."""
    from nanochat import interop
    from nanochat.checkpoint import latest_checkpoint, load_meta, load_model_state, step_dir_name
    from nanochat.common import get_base_dir
    from nanochat.results import Result, load_result
    from nanochat.tokenizer import get_tokenizer
    run_dir, out_base = Path(run_dir).expanduser().resolve(), Path(out_base).expanduser().resolve()
    if not (run_dir / "resolved_config.yaml").is_file():
        raise interop.InteropError(f"{run_dir}: not a run dir of ours (no resolved_config.yaml)")
    cfg = load_config(str(run_dir / "resolved_config.yaml"))
    if cfg.stage.name not in interop.STAGE_DIRS:
        raise interop.InteropError(f"{run_dir} is a {cfg.stage.name!r} run; export a pretrain/mid/sft/rl run")
    ckpt = run_dir / "checkpoints" / step_dir_name(step) if step is not None else latest_checkpoint(run_dir)
    if ckpt is None or not ckpt.is_dir():
        raise interop.InteropError(f"{run_dir}: no checkpoint {'step ' + str(step) if step is not None else ''} "
                                   f"in checkpoints/")
    meta = load_meta(ckpt)
    model_config, state = interop.to_nanochat(load_model_state(ckpt), meta["model_config"])
    tok = get_tokenizer(get_base_dir(cfg.paths.base_dir), cfg.data.tokenizer)
    if tok.get_vocab_size() != model_config["vocab_size"]:
        raise interop.InteropError(f"tokenizer {cfg.data.tokenizer!r} has {tok.get_vocab_size()} tokens, the "
                                   f"model {model_config['vocab_size']}")
    ckpt_step = int(meta.get("step", 0))
    nc_meta = {"step": ckpt_step, "model_config": model_config,
               "user_config": {"depth": model_config["n_layer"], "max_seq_len": model_config["sequence_len"]},
               "max_seq_len": model_config["sequence_len"], "exported_from": str(run_dir)}
    result = load_result(run_dir) or Result()   # eval's val_bpb, pretrain's final_val_bpb (min_val_bpb: older runs)
    bpb = [v for v in map(result.get, ("val_bpb", "final_val_bpb", "min_val_bpb")) if isinstance(v, (int, float))]
    if bpb:
        nc_meta["val_bpb"] = bpb[0]
    tag = tag or rundir.run_tag(cfg)
    interop.check_free(out_base, cfg.stage.name, tag, ckpt_step)     # before writing anything
    interop.write_tokenizer(tok, out_base)
    return interop.write_checkpoint(out_base, cfg.stage.name, tag, ckpt_step, state, nc_meta)


def main_export(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nanochat-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run dir of ours with checkpoints (pretrain, mid, sft or rl)")
    ap.add_argument("out_dir", help="--format nanochat: nanochat base dir to write into (NANOCHAT_BASE_DIR); "
                                    "--format hf: the transformers model dir to create")
    ap.add_argument("--format", default="nanochat", help="nanochat (default) | hf (Hugging Face transformers)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--tag", default=None, help="nanochat model tag (default: the run's tag, e.g. d20)")
    ap.add_argument("--dtype", default="float32", help="hf: weights dtype, float32 (default) | bfloat16")
    ap.add_argument("--force", action="store_true", help="hf: replace a non-empty OUT_DIR")
    ap.add_argument("--remote-code", action="store_true",
                    help="hf: ship our model code (trust_remote_code) even when transformers' nanochat type fits; "
                         "exact for the seed generation's bf16 RoPE tables (automatic for the modern generation)")
    ap.add_argument("--max-shard-mb", type=int, default=5 * 1024,
                    help="hf: split model.safetensors into shards of at most this many MiB (default 5120)")
    args = ap.parse_args(argv)
    from nanochat.interop import InteropError
    if args.format not in ("nanochat", "hf"):
        return _fail(f"--format {args.format!r}: use nanochat or hf")
    try:
        if args.format == "hf":
            from nanochat.hf.export import export_run as export_hf
            out = export_hf(args.run_dir, args.out_dir, dtype=args.dtype, step=args.step, force=args.force,
                            remote_code=True if args.remote_code else None,
                            max_shard_bytes=args.max_shard_mb * 1024 * 1024)
        else:
            out = export_run(args.run_dir, args.out_dir, args.step, args.tag)
    except (InteropError, ConfigError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"[nanochat-export] {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_import())
