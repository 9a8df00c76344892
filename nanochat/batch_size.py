"""hardware.device_batch_size=auto: find the largest power-of-two device batch that fits.

Like Lightning's batch-size finder, each candidate runs the real thing for a moment: build the
model, two training steps (forward + backward + optimizer step, so grads and optimizer states are
resident when the second step peaks) on random tokens, under the run's precision policy. The
candidates are the powers of two whose micro-step divides the total batch (nanochat.plan), tried
largest first: an OOM comes back in milliseconds, so the search costs about one successful step.

A candidate fits when it runs without running out of memory inside HEADROOM × the budget (the
rest is room for allocator fragmentation, evals and the KV cache of sampling). The budget is the
GPU's memory (the RAM available on CPU), or `hardware.auto_batch_memory_gb`; the limit is enforced
(torch's per-process memory fraction on CUDA, an address-space limit on CPU), so the probe meets
real OOMs in both places. The CUDA trials also record their peak allocated memory.

The probe is eager: torch.compile needs less activation memory than eager, so a batch that fits
eagerly fits compiled. Single process: ZeRO-2 sharding only shrinks optimizer state per rank, so
the answer is conservative for multi-GPU runs too.

The launcher runs it as `python -m nanochat.batch_size '<request json>'` (its own process, so the
launcher stays torch-free and the training process starts with a clean CUDA allocator) and records
the result in plan.json (`device_batch_size`, `device_batch_probe`).
"""
from __future__ import annotations

import gc
import json
import resource
import sys
import time
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Optional

HEADROOM = 0.90          # a fitting probe may use at most this fraction of the budget
PROBE_STEPS = 2
GIB = 2 ** 30


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError with this text)."""
    import torch
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


@contextmanager
def explain_oom(device_batch_size: int, grad_accum_steps: int, run_dir: Optional[Any] = None) -> Iterator[None]:
    """Re-raise an out-of-memory error from the training step with the batch size to try next; on CUDA
    with a `run_dir`, torch's memory snapshot of the moment goes there and the message says where."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        advice = (f"out of memory at hardware.device_batch_size={device_batch_size}: try hardware.device_batch_size="
                  f"{device_batch_size // 2} (grad accumulation {grad_accum_steps} → {grad_accum_steps * 2}, same "
                  f"total batch), or hardware.device_batch_size=auto to probe the largest that fits"
                  if device_batch_size > 1 else "out of memory at hardware.device_batch_size=1: the model does not "
                  "fit on this device; use a shorter model.sequence_len, a smaller model, or more GPUs")
        where = memory_snapshot(run_dir) if run_dir is not None else None
        seen = f"\nmemory snapshot: {where} (drag it into https://pytorch.org/memory_viz)" if where else ""
        raise MemoryError(advice + seen + f"\n(original error: {e})") from e


def memory_history(on: bool) -> None:
    """Record CUDA allocations with their stacks, so an OOM's snapshot says what allocated each block
    (the tracker turns it on for the first steps, where OOMs happen, then off: it costs per allocation)."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Python stacks only: C++ unwinding on every allocation would slow those steps down
        torch.cuda.memory._record_memory_history(enabled="all" if on else None, stacks="python", max_entries=100_000)


def memory_snapshot(run_dir: Any) -> Optional[str]:
    """Write torch's CUDA memory snapshot (segments, blocks, recorded history) into the run dir."""
    import os
    import torch
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    path = f"{run_dir}/oom_memory_snapshot_rank{os.environ.get('RANK', '0')}.pickle"
    try:
        torch.cuda.memory._dump_snapshot(path)
    except Exception as e:  # never hide the OOM behind a failure to describe it
        return f"(not written: {type(e).__name__}: {e})"
    return path


# ----------------------------------------------------------------------------- the probe

@contextmanager
def memory_budget(device: Any, budget_bytes: Optional[int]) -> Iterator[None]:
    """Make allocations beyond `budget_bytes` fail for real while the block runs."""
    import torch
    if budget_bytes is None:
        yield
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
        restore = partial(torch.cuda.set_per_process_memory_fraction, 1.0, device)
    else:
        import psutil
        in_use = psutil.Process().memory_info().vms   # the address space in use now
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (in_use + budget_bytes, hard))
        restore = partial(resource.setrlimit, resource.RLIMIT_AS, (soft, hard))
    try:
        yield
    finally:
        restore()


def try_batch(gpt_kwargs: dict, batch: int, seq_len: int, device: Any, precision: Any,
              budget_bytes: Optional[int], activation_checkpointing: str = "none") -> dict:
    """Two training steps at `batch` within `budget_bytes` (None: no limit).

    Returns {'batch', 'fits', 'peak_gib' (CUDA only), 'reason', 'seconds'}.
    """
    import torch
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.optim import build_optimizer
    t0 = time.perf_counter()
    out: dict = {"batch": batch, "fits": False, "peak_gib": None, "reason": ""}
    model = opt = x = loss = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        with memory_budget(device, budget_bytes):
            model = build_model(GPTConfig(**gpt_kwargs), device, seed=0)
            model.activation_checkpointing = activation_checkpointing
            precision.cast_embeddings(model)
            opt = build_optimizer(model, embedding_lr=0.1, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.1,
                                  weight_decay=0.0)
            x = torch.randint(0, gpt_kwargs["vocab_size"], (batch, seq_len + 1), device=device)
            for _ in range(PROBE_STEPS):
                with precision.autocast():
                    loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                out["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
        out["fits"] = True
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        out["reason"] = "OOM"
    finally:
        del model, opt, x, loss
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - t0
    return out


def find_device_batch(gpt_kwargs: dict, seq_len: int, candidates: list[int], device: str = "cuda",
                      dtype: str = "bfloat16", memory_gb: Optional[float] = None,
                      embedding_dtype: str = "float32", activation_checkpointing: str = "none") -> dict:
    """Try `candidates` (largest first) until one fits; returns the result the plan records.

    {'device_batch_size', 'trials': [...], 'device', 'budget_gib', 'headroom'}; ValueError if none fits.
    """
    import torch
    from nanochat.common import pick_device
    from nanochat.precision import Precision
    device = pick_device(device)
    dev = torch.device(device if device != "cuda" else "cuda:0")
    precision = Precision.resolve(dev.type, dtype, embeddings=embedding_dtype)
    budget = int(memory_gb * GIB) if memory_gb else None
    if budget is None and dev.type == "cuda":   # the whole GPU: its memory is the limit anyway
        budget = torch.cuda.get_device_properties(dev).total_memory
    elif budget is None and dev.type == "cpu":  # the RAM available now
        import psutil
        budget = psutil.virtual_memory().available
    limit = int(HEADROOM * budget) if budget else None
    # warm up once outside the budget: thread pools and kernels load lazily and must not count
    try_batch(dict(gpt_kwargs, n_layer=1), 1, min(seq_len, 8), dev, precision, None, activation_checkpointing)
    trials = []
    for b in sorted(candidates, reverse=True):
        trials.append(try_batch(gpt_kwargs, b, seq_len, dev, precision, limit, activation_checkpointing))
        if trials[-1]["fits"]:
            break
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    result = {"device_batch_size": trials[-1]["batch"] if trials and trials[-1]["fits"] else None,
              "trials": trials, "device": name, "dtype": precision.name,
              "budget_gib": budget / GIB if budget else None, "headroom": HEADROOM}
    if result["device_batch_size"] is None:
        raise ValueError(f"hardware.device_batch_size=auto: even device batch {min(candidates)} does not fit "
                         f"({result['budget_gib']:.2f} GiB budget): {trials[-1]['reason']}. Fix: shorter "
                         f"model.sequence_len, a smaller model, more memory (hardware.auto_batch_memory_gb) or GPUs")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m nanochat.batch_size '<json request>'` (find_device_batch's keyword arguments, as
    launch/probe.py writes them): prints the result as the last JSON line."""
    try:
        res = find_device_batch(**json.loads((argv or sys.argv[1:])[0]))
    except ValueError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 2
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
