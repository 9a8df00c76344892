"""Pieces every training stage (pretrain, mid, sft, rl) shares.

Runtime setup from the config, the optimizer from the frozen plan, schedules as
functions of the step, and throughput accounting. The loop itself (the model, resume,
evaluations, saving, preemption, logging, the result) is nanochat/loop.py.
"""
from __future__ import annotations

import functools
import timeit
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from nanochat.common import barrier, distributed, get_base_dir, init_distributed, read_json
from nanochat.config import Config
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer, lr_multiplier, muon_momentum, weight_decay_at
from nanochat.plan import Plan
from nanochat.precision import Precision

@dataclass
class Runtime:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    precision: Precision             # autocast dtype, loss scaling (nanochat/precision.py)
    base_dir: Path

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return self.precision.autocast()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def setup_runtime(cfg: Config) -> Runtime:
    hw = cfg.hardware
    rank, local_rank, world, device = init_distributed(hw.device, hw.backend, hw.num_threads, hw.dist_timeout_s)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = Precision.resolve(device.type, hw.dtype, embeddings=hw.embedding_dtype)
    return Runtime(rank, local_rank, world, device, precision, get_base_dir(cfg.paths.base_dir))


def prepare_corpus(cfg: Config, rt: Runtime) -> None:
    """Build / download the corpus's train and val shards once (rank 0), before the other ranks look for them."""
    if rt.master:
        from nanochat.dataset import list_shards
        for split in ("train", "val"):
            list_shards(cfg.data, rt.base_dir, split)
    barrier()


def load_plan(run_dir: Path) -> Plan:
    return Plan.from_dict(read_json(Path(run_dir) / "plan.json"))


def gpt_config(plan: Plan) -> GPTConfig:
    return GPTConfig(**plan.model.gpt_config_kwargs())


def make_optimizer(model: GPT, plan: Plan, cfg: Config, rt: Runtime):
    """The plan's optimizer: its LRs, Muon weight decay, recipe (plan.optim) and grad clip, sharded over ranks."""
    st = cfg.stage
    return build_optimizer(model, embedding_lr=plan.embedding_lr, unembedding_lr=plan.unembedding_lr,
                           matrix_lr=plan.matrix_lr, scalar_lr=plan.scalar_lr, weight_decay=plan.weight_decay,
                           adam_betas=(st.adam_beta1, st.adam_beta2), settings=plan.optim,
                           world_size=rt.world, rank=rt.rank,
                           grad_clip=plan.grad_clip)  # clips the global (rank-averaged) norm inside step()


def apply_schedules(optimizer: Any, step: int, plan: Plan) -> float:
    """Set this step's LR, Muon momentum and weight decay on every group; returns the LR multiplier."""
    mult = lr_multiplier(step, plan.num_iterations, plan.warmup_steps, plan.warmdown_steps, plan.final_lr_frac)
    mom = muon_momentum(step, plan.muon_momentum_start, plan.muon_momentum_end, plan.muon_momentum_steps,
                        plan.muon_momentum_final, plan.warmdown_steps, plan.num_iterations)
    wd = weight_decay_at(step, plan.num_iterations, plan.weight_decay, plan.weight_decay_schedule)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * mult
        if g["kind"] == "muon":
            g["momentum"] = mom
            g["weight_decay"] = wd
    return mult


def train_step(model, optimizer, batches: Iterator, plan, rt: Runtime, scaler: Any = None) -> float:
    """One optimizer step over plan.grad_accum_steps micro-batches of `batches`; the mean loss over ranks.

    The caller sets this step's schedules first (training.apply_schedules). `scaler` is the
    precision's GradScaler (fp16 on CUDA); None steps the optimizer directly.
    """
    accum = plan.grad_accum_steps
    loss_sum = torch.zeros((), device=rt.device)
    for _ in range(accum):
        x, y = next(batches)
        with rt.autocast():
            loss = model(x, y)
        loss_sum += loss.detach()
        (scaler.scale(loss / accum) if scaler is not None else loss / accum).backward()
    if scaler is not None:
        scaler.step(optimizer)  # unscales first, skips the step on inf/nan grads (fp16)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (dist_sum(loss_sum) / (accum * rt.world)).item()


def dist_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; x itself is unchanged); x when not distributed."""
    if dist := distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# --------------------------------------------------------------------------- throughput

@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The MFU denominator: a GPU's dense bf16 peak (halved in fp32), or on CPU this machine's fp32
    matmul throughput with the current thread count: best of a few square GEMMs, as
    bench/train_step.py measures it, so the stage's MFU and the benchmark's are comparable."""
    if device.type == "cuda":
        from nanochat.gpus import bf16_peak_flops  # dense bf16 table with sources
        peak = bf16_peak_flops(torch.cuda.get_device_name(device)) or 312e12
        return peak if dtype != torch.float32 else peak / 2
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.mm(a, b)
    torch.mm(a, b, out=c)  # warm up (thread pool, caches) before timing
    return 2 * n ** 3 / min(timeit.repeat(lambda: torch.mm(a, b, out=c), number=1, repeat=8))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
