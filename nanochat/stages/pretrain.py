"""Stage `pretrain`: next-token training of a fresh GPT on a text corpus.

Driven only by the run dir's frozen `resolved_config.yaml` and `plan.json`, over the one loop
(nanochat/loop.py). Checkpoints hold model, optimizer shard, loader position and RNG per rank,
so a resumed run continues with exactly the batches and updates an uninterrupted run would have made.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from nanochat.batch_size import explain_oom
from nanochat.config import Config, TrainStageConfig
from nanochat import mixture
from nanochat.plan import param_breakdown
from nanochat.results import PretrainResult
from nanochat.stage_plan import train_plan
from nanochat.stages import Stage
from nanochat.tokenizer import get_token_bytes, get_tokenizer

if TYPE_CHECKING:  # torch and what imports it load in the worker only: the launcher imports this module
    from nanochat import training as T

SAMPLE_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]


class SlotLoader:
    """One loader per micro-batch slot: slot j of rank r reads data shard r + world·j of world·accum.

    So the global batch of a step is the same documents whatever the split between ranks and
    gradient accumulation: 2 ranks × accum 1 sees exactly what 1 rank × accum 2 sees.
    """

    def __init__(self, cfg: Config, plan, rt: T.Runtime, tokenizer, state: Optional[dict]):
        from nanochat.dataloader import DataLoader
        slots = plan.grad_accum_steps
        states = (state or {}).get("slots") or [None] * slots
        if len(states) != slots:
            raise ValueError(f"checkpoint loader state has {len(states)} slots, this run needs {slots}; "
                             "resume with the same total_batch_size / device_batch_size / world size")
        self.loaders = [DataLoader(cfg.data, tokenizer, plan.device_batch_size, plan.sequence_len, "train",
                                   rt.rank + rt.world * j, rt.world * slots, rt.device, base_dir=rt.base_dir,
                                   state=states[j], seed=cfg.run.seed) for j in range(slots)]
        self.turns = itertools.cycle(self.loaders)

    def __next__(self):
        """The next slot's batch: a step's grad_accum micro-batches come from slots 0, 1, ... in turn."""
        return next(next(self.turns))

    def state_dict(self) -> dict:
        return {"slots": [l.state_dict() for l in self.loaders]}

    def close(self) -> None:
        for l in self.loaders:
            l.close()


def run(cfg: Config, run_dir: Path) -> PretrainResult:
    import torch
    from nanochat import loop as L, training as T
    from nanochat.loss_eval import split_bpb
    from nanochat.precision import convert_fp8, fp8_disabled
    loop = L.Loop(cfg, run_dir)
    rt, plan, st = loop.rt, loop.plan, cfg.stage
    tokenizer = get_tokenizer(rt.base_dir, cfg.data.tokenizer)
    if tokenizer.get_vocab_size() > plan.model.padded_vocab_size:
        raise ValueError(f"model.vocab_size={plan.model.vocab_size} is smaller than the tokenizer "
                         f"{cfg.data.tokenizer!r} ({tokenizer.get_vocab_size()} tokens); set model.vocab_size=null")
    token_bytes = get_token_bytes(rt.base_dir, cfg.data.tokenizer, rt.device)
    T.prepare_corpus(cfg, rt)

    def fp8(model) -> None:   # before the optimizer and compile, as nanochat; the weights stay fp32 Parameters
        fp8_names = convert_fp8(model, cfg.model.fp8, emulate=cfg.model.fp8_emulate)
        loop.log(f"fp8 ({cfg.model.fp8}{', emulated' if cfg.model.fp8_emulate else ''}): "
                 f"{len(fp8_names)} Linear layers converted")
    model, optimizer, loader_state = loop.build(fp8 if cfg.model.fp8 else None)
    train_loader = SlotLoader(cfg, plan, rt, tokenizer, loader_state)
    train_model = torch.compile(model, dynamic=False) if cfg.hardware.compile else model
    scaler = rt.precision.grad_scaler()  # a no-op unless fp16 on CUDA

    def step(_: int) -> L.StepOut:
        with explain_oom(plan.device_batch_size, plan.grad_accum_steps, run_dir):  # OOM → which batch to try
            loss = T.train_step(train_model, optimizer, train_loader, plan, rt, scaler)
        return L.StepOut(loss, plan.total_batch_size)

    def core(_: int) -> dict:
        from nanochat.core_eval import ensure_eval_bundle, evaluate_core
        bundle = ensure_eval_bundle(rt.base_dir, cfg.paths.eval_bundle)
        with rt.autocast(), fp8_disabled(model):
            out = evaluate_core(model, tokenizer, bundle, rt.device, max_per_task=st.core_max_per_task)
        loop.tracker.print(f"CORE over {out['tasks_evaluated']} tasks")
        return {"core": out["core"]}

    def sample(_: int) -> dict:  # greedy continuations of SAMPLE_PROMPTS, printed
        with fp8_disabled(model):
            for prompt in SAMPLE_PROMPTS:
                ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
                gen = list(model.generate(ids, max_tokens=24, temperature=0.0))
                loop.tracker.print(f"  sample: {prompt + tokenizer.decode(gen)!r}")
        return {}

    def val(_: int) -> dict:  # a mixture: each source's val split (val/bpb/<source>), the total weighted by it
        by_source, bpb = mixture.val_bpb(cfg.data, lambda data, n: split_bpb(
            model, data, rt, tokenizer, token_bytes, "val", plan.device_batch_size, plan.sequence_len, n),
            st.eval_tokens or plan.eval_tokens)
        return {"val/bpb": bpb, **{f"val/bpb/{k}": v for k, v in by_source.items()}}

    evals = [L.Evaluation("val_bpb", val, every=st.eval_every)]
    if rt.master:
        evals.append(L.Evaluation("samples", sample, every=st.sample_every, last=st.sample_every > 0))
    # CORE skips step 0, as nanochat does: with core_every > horizon it runs once, at the end
    evals.append(L.Evaluation("core", core, every=st.core_every, first=False, last=st.core_every > 0))
    header = (f"params {plan.num_params:,} | {plan.total_batch_size:,} tokens/step = {plan.device_batch_size}×"
              f"{plan.sequence_len}×{rt.world}×{plan.grad_accum_steps} | {plan.num_iterations} steps")
    try:
        loop.run(step, evals, train_loader.state_dict, header=header, val_key="val/bpb",
                 flops_per_token=plan.flops_per_token)
    finally:
        train_loader.close()
    s = loop.state
    mixed = cfg.data.source == "mixture"
    return loop.result(PretrainResult, final_val_bpb=s.val_last, best_val_bpb=s.val_best, first_val_bpb=s.val_first,
                       params=param_breakdown(plan.model), flops_per_token=plan.flops_per_token,
                       flops=float(plan.flops_per_token) * s.tokens_seen, target_flops=st.target_flops,
                       core=s.evals.get("core", {}).get("core"), mixture=mixture.weights(cfg.data) if mixed else {},
                       val_bpb_by_source={k.split("/")[-1]: v for k, v in s.evals.get("val_bpb", {}).items()
                                          if k.startswith("val/bpb/")})


# --------------------------------------------------------------------------- the declaration

STAGE = Stage("pretrain", schema=TrainStageConfig, planner=train_plan, worker=run, headline="final_val_bpb",
              result=PretrainResult)
