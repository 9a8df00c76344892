"""Our training step vs nanochat 92d63d4's own model and optimizer, under the same simulator.

    python bench/simulate_vs_nanochat.py /path/to/nanochat-92d63d4 [nanochat-run overrides...]

The path is a checkout of karpathy/nanochat at 92d63d4 (never part of this repo), e.g.
    git --git-dir=<nanochat clone>/.git archive 92d63d4 | tar -x -C /work/nanochat-ref
Both run at the record recipe (experiment=speedrun: d24, 16 × 2048 tokens per rank, fp8 tensorwise,
8 ranks, grad accumulation 4) on fake tensors as rank 0 of a fake 8-rank group: nanochat's GPT
(bf16 embeddings and activations, no autocast, its own fp8 Linear), its MuonAdamW distributed path
(reduce-scatter / all-gather), base_train's micro-step loop; ours as `run.simulate=true` runs it.
Both eager (nanochat's @torch.compile'd optimizer kernels run eagerly: TORCHDYNAMO_DISABLE=1).
Prints the peak per rank and its split for each; the last line is JSON.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]


def nanochat_step(plan, micro: int, S, fp8_filter) -> dict:
    """Two of nanochat's optimizer steps on fake tensors (the second tracked), as base_train runs them.
    S: our nanochat.simulate, fp8_filter: our copy of base_train's fp8_module_filter (nanochat.precision);
    both imported before nanochat's package takes the name. The caller puts `ref` first on sys.path."""
    os.environ["NANOCHAT_DTYPE"] = "bfloat16"      # its COMPUTE_DTYPE on an H100
    import torch
    import torch.nn as nn
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    gpt = importlib.import_module("nanochat.gpt")   # nanochat's: `ref` is first on sys.path
    fp8 = importlib.import_module("nanochat.fp8")
    s = plan.model
    B, T = plan.device_batch_size, plan.sequence_len
    traffic = {"reduce_scatter_bytes": 0, "all_gather_bytes": 0}
    with S.fake_world(plan.world_size), FakeTensorMode():
        cfg = gpt.GPTConfig(sequence_len=T, vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head,
                            n_kv_head=s.n_kv_head, n_embd=s.n_embd, window_pattern=s.window_pattern)
        model = gpt.GPT(cfg)
        # init_weights casts the embeddings to bf16 with a module .to(), which fake parameters refuse (they
        # cannot be swapped); skip that branch (its fp16 rule) and cast them as it would, by assignment
        gpt.COMPUTE_DTYPE = torch.float16
        model.init_weights()
        gpt.COMPUTE_DTYPE = torch.bfloat16
        for emb in [model.transformer.wte, *model.value_embeds.values()]:
            emb.weight = nn.Parameter(emb.weight.detach().to(torch.bfloat16))
        model.cos, model.sin = model._precompute_rotary_embeddings(model.rotary_seq_len, s.n_embd // s.n_head)
        if plan.fp8:
            fp8.convert_to_float8_training(model, config=fp8.Float8LinearConfig.from_recipe_name(plan.fp8),
                                           module_filter_fn=fp8_filter)
        opt = model.setup_optimizer(weight_decay=plan.weight_decay)

        def step(n: int, before=lambda: None) -> None:
            for _ in range(n):
                before()
                x, y = torch.empty(B, T, dtype=torch.long), torch.empty(B, T, dtype=torch.long)   # as its loader
                loss = model(x, y)   # held through backward, as base_train holds it
                (loss / plan.grad_accum_steps).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        step(1)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker, S.count_traffic(traffic):
            step(micro, tracker.reset_mod_stats)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    split = {S.CATEGORIES.get(getattr(k, "value", k), str(k)): v / S.GIB for k, v in snap.items()
             if getattr(k, "value", k) != "Total"}
    return {"peak_memory_gib": snap["Total"] / S.GIB, "memory_gib": split, **traffic}


def main() -> None:
    if len(sys.argv) < 2 or not (Path(sys.argv[1]) / "nanochat" / "gpt.py").exists():
        sys.exit(__doc__)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    ref = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(ROOT))
    from launch.interop_cli import compose
    from nanochat.plan import make_plan
    from nanochat import simulate as S
    from nanochat.precision import fp8_filter
    cfg, _ = compose(["experiment=speedrun", "run.pipeline=null", *sys.argv[2:]])   # as nanochat-run composes
    plan = make_plan(cfg)
    micro = min(plan.grad_accum_steps, 2)
    t0 = time.perf_counter()
    out = {"ours_eager": S.rehearse(cfg, plan, compile_blocks=False)}
    # with ours set aside, `import nanochat` finds nanochat's package; both dicts are restored on exit
    with mock.patch.dict(sys.modules), mock.patch.object(sys, "path", [str(ref), *sys.path]):
        for m in [m for m in sys.modules if m == "nanochat" or m.startswith("nanochat.")]:
            del sys.modules[m]
        out["nanochat_eager"] = nanochat_step(plan, micro, S, fp8_filter)
    print(f"record recipe: d{plan.model.depth}, {plan.device_batch_size} × {plan.sequence_len} per rank, accum "
          f"{plan.grad_accum_steps}, {plan.world_size} ranks, fp8 {plan.fp8}; eager, fake tensors")
    for name, r in out.items():
        g = r["memory_gib"]
        print(f"  {name:15s} peak {r['peak_memory_gib']:6.2f} GiB = " +
              ", ".join(f"{k} {g.get(k, 0):.2f}" for k in "params grads optimizer activations temporaries".split()) +
              f" | reduce-scatter {r['reduce_scatter_bytes'] / 1e9:.2f} GB, "
              f"all-gather {r['all_gather_bytes'] / 1e9:.2f} GB")
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    print(json.dumps({k: {kk: v[kk] for kk in ("peak_memory_gib", "memory_gib", "reduce_scatter_bytes",
                                               "all_gather_bytes")} for k, v in out.items()}))


if __name__ == "__main__":
    main()
