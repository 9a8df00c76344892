"""The planned GPU training step rehearsed on fake tensors: memory per rank, FLOPs, ZeRO-2 traffic.

`run.simulate=true` (and plan-time memory planning) calls `rehearse(cfg, plan)`: the pretraining
step of the plan — its model (fp8 layers converted as the run converts them), the precision
policy's autocast dtype, the MuonAdamW optimizer ZeRO-2-sharded at the planned world size (this
process is rank 0 of a fake process group), `grad_accum_steps` micro-batches per optimizer step,
activation checkpointing — at the planned shapes, on torch's FakeTensorMode: shapes, dtypes and
storages exist, memory and arithmetic do not. Two optimizer steps run, so the second peaks with
gradients and optimizer state resident. Counted along the way:

  memory   torch.distributed._tools.mem_tracker.MemTracker: the per-rank peak and its split
           (parameters, gradients, optimizer state, activations, temporaries) at that moment
  FLOPs    torch.utils.flop_counter.FlopCounterMode over one micro-batch's forward + backward,
           per token, against plan.flops_per_token (attention counted at each layer's window, as
           the windowed GPU kernel computes it)
  traffic  bytes the optimizer reduce-scatters and all-gathers per step, and their time over
           hardware.interconnect_gb_s (ring: each rank moves (W−1)/W of each buffer)

Fake tensors on CPU, not CUDA: this torch is built without CUDA, and autograd on a fake cuda
tensor aborts the process (it asks for a CUDA stream guard). So the step runs on fake CPU tensors
with the GPU's dtypes (CPU autocast in the planned bf16/fp16), taking the GPU's code paths where ours
differ by device (no CPU fused loss; Muon orthogonalizes in bf16 as on CUDA). `DIFFERENCES` lists
what still differs. Nothing of the simulated size is ever allocated; the result says the
simulator's own peak RSS.

`python -m nanochat.simulate '<json>'` runs it in its own process (the launcher stays torch-free):
the request is {"config": <resolved config tree>, "plan": <plan dict>}; the last line is the result.
"""
from __future__ import annotations

import bisect
import functools
import json
import resource
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

from nanochat.batch_size import GIB, HEADROOM   # a planned device batch must fit this fraction, as the probe's

MAX_FAKE_WORLD = 65536   # ranks the fake process group is asked to stand for (the sharding math is per rank)
CATEGORIES = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Optstate": "optimizer",
              "Activation": "activations", "Temp": "temporaries", "Other": "other"}
COMPILE_NOTE = {
    False: "eager, as hardware.compile=false runs (a compiled step keeps as much activation memory or less)",
    True: "torch.compile as AOTAutograd's min-cut partition (what inductor saves for backward), each block's "
          "graphs run op by op: inductor's fusion of forward/backward temporaries is not modelled",
}
DIFFERENCES = (
    "fake CPU tensors with the GPU's dtypes (this torch has no CUDA; autograd on fake cuda tensors aborts)",
    "attention: CPU flash SDPA (a dense window mask on S layers) for the GPU's flash/flex kernel: the same "
    "saved tensors (q, k, v, out, logsumexp); FLOPs counted at each layer's window",
    "no caching-allocator rounding or fragmentation: the fit check keeps 10% of the GPU free for them",
)


@contextmanager
def fake_world(world: int) -> Iterator[None]:
    """This process as rank 0 of `world` ranks on torch's fake process group (collectives do nothing)."""
    import torch.distributed as dist
    if world <= 1 or dist.is_initialized():
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def count_traffic(out: dict) -> Iterator[None]:
    """Add the bytes of every reduce-scatter / all-gather (the full buffer) to out[...] while active."""
    from unittest import mock
    import torch.distributed as dist
    names = {"reduce_scatter_tensor": "reduce_scatter_bytes", "reduce_scatter_single": "reduce_scatter_bytes",
             "all_gather_into_tensor": "all_gather_bytes", "all_gather_single": "all_gather_bytes"}

    def counted(name: str, orig):   # each takes (output, input): the full buffer is the input of a
        big = 1 if "reduce" in name else 0   # reduce-scatter, the output of an all-gather

        def call(*args, **kwargs):
            out[names[name]] += args[big].numel() * args[big].element_size()
            return orig(*args, **kwargs)
        return call
    with ExitStack() as stack:
        for k in names:
            if hasattr(dist, k):
                stack.enter_context(mock.patch.object(dist, k, counted(k, getattr(dist, k))))
        yield


def _sdpa_cpu_flops() -> dict:
    """FlopCounterMode formulas for CPU flash SDPA (torch registers only the CUDA kernels'): every query
    against all T keys, 2 matmuls forward and 4 backward, as torch counts the CUDA kernels."""
    import torch
    aten = torch.ops.aten

    def fwd(q, k, *a, **kw):   # shapes of (query, key, value, ...)
        return 4 * q[0] * q[1] * q[2] * k[2] * q[3]
    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,   # backward: (grad_out, query, key, ...)
            aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, *a, **kw: 2 * fwd(q, k)}


def count_flops(counter, model) -> float:
    """The counter's total with each window layer's attention at min(window, T) keys per query, as the
    GPU's windowed kernel computes it (the dense-mask CPU kernel computes all T)."""
    counts, T, ops = counter.get_flop_counts(), model.config.sequence_len, tuple(_sdpa_cpu_flops())
    total = counter.get_total_flops()
    for i, span in enumerate(model.config.attention_spans()):   # its CPU flash SDPA ops, forward and backward
        attn = sum(counts.get(f"GPT.transformer.h.{i}", {}).get(op, 0) for op in ops)
        total -= attn * (1 - min(span, T) / T)
    return total


@contextmanager
def compiled_blocks(model) -> Iterator[None]:
    """Run each Block as torch.compile would keep it: AOTAutograd traces the block's forward and
    backward and the min-cut partitioner (inductor's) chooses what forward saves for backward; the
    partitioned graphs then run op by op. One trace per kind of block (window, value embedding),
    shared by the blocks of that kind through their own parameters."""
    from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition
    from torch.nn.utils.stateless import _reparametrize_module
    boxed = lambda gm, _: make_boxed_func(gm)   # noqa: E731 (run the traced graph as is)
    kinds: dict = {}
    for block, window in zip(model.transformer.h, model.windows):
        names = [n for n, _ in block.named_parameters()]
        has_ve = block.attn.ve_gate is not None
        if (window, has_ve) not in kinds:
            def fn(params, x, ve, rope, mask, _b=block, _n=names, _w=window):
                masks = {"backend": "sdpa"} if mask is None else {"backend": "sdpa", _w: mask}
                with _reparametrize_module(_b, dict(zip(_n, params))):   # what functional_call does, but
                    return type(_b).forward(_b, x, ve, rope, _w, None, masks)   # past the forward patched below
            kinds[(window, has_ve)] = aot_function(fn, fw_compiler=boxed, bw_compiler=boxed,
                                                   partition_fn=min_cut_rematerialization_partition)
        cf, params = kinds[(window, has_ve)], list(block.parameters())

        def forward(x, ve, rope, window, kv_cache, masks, _cf=cf, _p=params):
            return _cf(_p, x, ve, rope, masks.get(window))
        block.forward = forward    # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        for block in model.transformer.h:
            del block.forward


def train_step(model, optimizer, batches, precision, plan, step: int, before_micro=None) -> float:
    """One optimizer step as pretraining runs it: this step's schedules, then the training loop's own step
    (nanochat/training.py train_step) over `batches`, calling before_micro() ahead of each."""
    import dataclasses
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from nanochat import training as T

    def feed():
        for b in batches:
            if before_micro is not None:
                before_micro()
            yield b
    T.apply_schedules(optimizer, step, plan)
    rt = T.Runtime(0, 0, plan.world_size, next(model.parameters()).device, precision, Path("."))
    try:
        return T.train_step(model, optimizer, feed(), dataclasses.replace(plan, grad_accum_steps=len(batches)), rt)
    except DataDependentOutputException:   # fake tensors: the step ran; only the mean loss's value was asked for
        return float("nan")


def rehearse(cfg, plan, *, fake: bool = True, device_batch_size: Optional[int] = None,
             compile_blocks: Optional[bool] = None) -> dict:
    """Run the planned step (`fake`: on fake tensors) and return the figures (module docstring).

    The tracked step runs min(grad_accum, 2) micro-batches: the peak does not grow after the second,
    whose backward adds into resident gradients. device_batch_size overrides the plan's.
    compile_blocks: keep what torch.compile keeps (`compiled_blocks`); default hardware.compile.
    """
    from unittest import mock
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode
    from nanochat import optim, training as T
    from nanochat.gpt import GPT, build_model
    from nanochat.precision import Precision, convert_fp8
    t0 = time.perf_counter()
    hw = cfg.hardware
    compile_blocks = hw.compile if compile_blocks is None else compile_blocks
    B = device_batch_size or plan.device_batch_size
    seq = plan.sequence_len
    accum = plan.total_batch_size // (B * seq * plan.world_size)
    micro = min(max(accum, 1), 2)
    planned = Precision.resolve(hw.device, hw.dtype, bf16_supported=True,   # as a GPU with bf16 runs it
                                embeddings=hw.embedding_dtype)
    precision = Precision("cpu", planned.compute_dtype, planned.embedding_dtype)   # the GPU's dtypes, on CPU
    traffic = {"reduce_scatter_bytes": 0, "all_gather_bytes": 0}
    with ExitStack() as stack:
        stack.enter_context(fake_world(plan.world_size))
        if hw.device == "cuda":   # take the GPU's branch where ours differ: Muon orthogonalizes in bf16 there
            stack.enter_context(mock.patch.object(optim, "orthogonalize",
                                                  functools.partial(optim.orthogonalize, dtype=torch.bfloat16)))
        if fake:
            stack.enter_context(FakeTensorMode())
        # fake: built straight on fake tensors (a meta model cannot be swapped onto them); init is
        # a no-op there, so only the real run (the validation) pays for it
        model = GPT(T.gpt_config(plan)) if fake else build_model(T.gpt_config(plan), "cpu", cfg.run.seed)
        model.init_rotary()
        model.fused_loss = False          # the GPU's loss path (the CPU fused loss reads data)
        model.activation_checkpointing = cfg.model.activation_checkpointing
        if plan.fp8:
            convert_fp8(model, plan.fp8, emulate=cfg.model.fp8_emulate)
        precision.cast_embeddings(model)
        rt = T.Runtime(0, 0, plan.world_size, torch.device("cpu"), precision, Path("."))
        optimizer = T.make_optimizer(model, plan, cfg, rt)
        gen = torch.Generator().manual_seed(0)
        V = plan.model.vocab_size

        def batch():
            x = torch.empty(B, seq + 1, dtype=torch.long) if fake else torch.randint(0, V, (B, seq + 1), generator=gen)
            return x[:, :-1], x[:, 1:]
        flops = FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_flops())
        with flops:   # one micro-batch's forward + backward, eager (outside the step: it is per token)
            with precision.autocast():
                loss = model(*batch())
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        if compile_blocks:
            stack.enter_context(compiled_blocks(model))
        # step 0 creates the optimizer state (and traces the compiled blocks) untracked; the tracked
        # step 1 then peaks with parameters, gradients and optimizer state resident
        losses = [train_step(model, optimizer, [batch()], precision, plan, 0)]
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker, count_traffic(traffic):   # the bytes of the tracked step
            losses.append(train_step(model, optimizer, [batch() for _ in range(micro)], precision, plan, 1,
                                     tracker.reset_mod_stats))
        peak = tracker.get_tracker_snapshot("peak")
    snap = next(iter(peak.values()), {})   # the one device's
    split = {CATEGORIES.get(getattr(k, "value", k), str(k)): v / GIB for k, v in snap.items()
             if getattr(k, "value", k) != "Total"}
    W = plan.world_size
    bw, mem = getattr(hw, "interconnect_gb_s", None), getattr(hw, "gpu_memory_gb", None)
    peak_gib = snap.get("Total", 0) / GIB
    moved = (traffic["reduce_scatter_bytes"] + traffic["all_gather_bytes"]) * (W - 1) / W   # ring: per rank
    return {"peak_memory_gib": peak_gib, "memory_gib": split, "gpu_memory_gib": mem,
            "flops_per_token_counted": count_flops(flops, model) / (B * seq),
            "flops_per_token_plan": plan.flops_per_token, "world_size": W, "device_batch_size": B,
            "grad_accum_steps": accum, "micro_steps_run": micro, "sequence_len": seq, "dtype": precision.name,
            "fp8": plan.fp8, "activation_checkpointing": cfg.model.activation_checkpointing, **traffic,
            "interconnect_gb_s": bw, "comm_seconds_per_step": moved / (bw * 1e9) if bw and W > 1 else 0.0,
            "compiled": compile_blocks, "fake": fake,
            "simulator_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "seconds": time.perf_counter() - t0,
            "differences": (list(DIFFERENCES) + [COMPILE_NOTE[bool(compile_blocks)]]) if fake else [],
            **({} if fake else {"losses": [float(x) for x in losses]}),
            "fits": None if not mem else peak_gib <= HEADROOM * mem}


# --------------------------------------------------------------------------- planning

def rehearsable(cfg) -> bool:
    """Whether the stage trains by next-token batches (pretrain, mid, sft): what a rehearsal and the
    memory floor model. Torch-free."""
    from nanochat.config import RLStageConfig, TrainStageConfig
    return isinstance(cfg.stage, TrainStageConfig) and not isinstance(cfg.stage, RLStageConfig)


def check_request(cfg, what: str = "run.simulate") -> None:
    """Bad input for a rehearsal → ConfigError naming the key and the fix (torch-free, for the launcher)."""
    from nanochat.config import ConfigError
    hw = cfg.hardware
    if not rehearsable(cfg):
        raise ConfigError(what, True, "use it with a stage that trains by next-token batches: stage=pretrain, "
                          "mid or sft", f"stage {cfg.stage.name} has no training step to rehearse")
    if hw.device == "cuda" and not hw.gpu_memory_gb:
        raise ConfigError("hardware.gpu_memory_gb", hw.gpu_memory_gb, "set it to one GPU's memory in GiB, e.g. "
                          "hardware.gpu_memory_gb=80 (H100), 40 (A100 40GB) or 24 (hardware=1gpu_24gb)",
                          f"hardware={hw.name} does not say how much memory its GPU has")
    world = hw.nproc_per_node * hw.nnodes
    if world < 1 or world > MAX_FAKE_WORLD:
        raise ConfigError("hardware.nproc_per_node", hw.nproc_per_node, f"use 1..{MAX_FAKE_WORLD} ranks in all "
                          f"(hardware.nproc_per_node × hardware.nnodes)", f"the fake process group cannot form a "
                          f"world of {world} ranks")


def fit_device_batch(cfg, plan, candidates: list[int], budget_gib: float) -> dict:
    """The largest of `candidates` whose simulated peak fits HEADROOM × budget_gib (the peak grows with
    the batch, so a bisection: about log2(len) rehearsals). Returns the probe-shaped result the plan
    records ({'device_batch_size': None} when even the smallest does not fit)."""
    cands = sorted(candidates)
    trials: dict[int, dict] = {}

    def too_big(b: int) -> bool:
        r = rehearse(cfg, plan, device_batch_size=b)
        ok = r["peak_memory_gib"] <= HEADROOM * budget_gib
        trials[b] = {"batch": b, "fits": ok, "peak_gib": r["peak_memory_gib"], "reason": "" if ok else
                     f"simulated {r['peak_memory_gib']:.1f} GiB > {HEADROOM:.0%} of {budget_gib:g}"}
        return not ok
    n_fit = bisect.bisect_left(cands, True, key=too_big)   # the candidates below the first too big
    return {"device_batch_size": cands[n_fit - 1] if n_fit else None,
            "trials": [trials[b] for b in sorted(trials, reverse=True)],
            "device": f"simulated ({budget_gib:g} GiB GPU)", "budget_gib": budget_gib, "headroom": HEADROOM}


def memory_rows(r: dict) -> list[tuple[str, str]]:
    """The dry run's / run.simulate's memory table: (name, value) rows."""
    g = r["memory_gib"]
    mem = r.get("gpu_memory_gib")
    fit = "" if not mem else (f" of {mem:g} GiB: " + ("fits" if r["fits"] else "DOES NOT FIT") +
                              f" the {HEADROOM:.0%} budget ({HEADROOM * mem:.1f} GiB)")
    rows = [("simulated peak / rank", f"{r['peak_memory_gib']:.2f} GiB{fit}")]
    rows += [(f"  {k}", f"{g.get(k, 0):.2f} GiB") for k in ("params", "grads", "optimizer", "activations",
                                                            "temporaries") if k in g]
    ratio = r["flops_per_token_counted"] / max(1, r["flops_per_token_plan"])
    recompute = ", block recomputation included" if r["activation_checkpointing"] != "none" else ""
    rows.append(("FLOPs / token counted", f"{r['flops_per_token_counted']:,.0f} ({ratio:.4f} × plan{recompute})"))
    W = r["world_size"]
    if W > 1:
        t = f" → {r['comm_seconds_per_step'] * 1e3:.1f} ms at {r['interconnect_gb_s']:g} GB/s" \
            if r.get("interconnect_gb_s") else ""
        rows.append(("ZeRO-2 traffic / step", f"reduce-scatter {r['reduce_scatter_bytes'] / 1e9:.2f} GB, all-gather "
                                               f"{r['all_gather_bytes'] / 1e9:.2f} GB{t}"))
    rows.append(("rehearsed", f"{r['device_batch_size']} × {r['sequence_len']} per micro-step × accum "
                              f"{r['grad_accum_steps']} × {W} ranks, {r['dtype']}, fp8 {r['fp8'] or 'off'}, "
                              f"checkpointing {r['activation_checkpointing']}, "
                              f"{'compiled' if r.get('compiled') else 'eager'}"))
    rows.append(("simulator", f"{r['seconds']:.0f} s, its own peak RSS {r['simulator_rss_gib']:.2f} GiB"))
    rows += [("differs from the GPU", d) for d in r.get("differences", [])]
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m nanochat.simulate '<json>'`: {"config": tree, "plan": plan dict, "mode": "step" | "fit",
    "candidates": [...], "print": bool}; prints the memory table (print) and the result as the last line."""
    from nanochat.config import config_from_dict
    from nanochat.plan import Plan
    req = json.loads((argv or sys.argv[1:])[0])
    cfg, plan = config_from_dict(req["config"]), Plan.from_dict(req["plan"])
    if req.get("mode") == "fit":
        out = fit_device_batch(cfg, plan, req["candidates"], cfg.hardware.gpu_memory_gb)
    else:
        out = rehearse(cfg, plan)
        if req.get("print"):
            for k, v in memory_rows(out):
                print(f"{k:>24}  {v}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
