"""Bits per byte: a validation loss that does not depend on the tokenizer.

Mean cross-entropy per token changes when the vocabulary changes (a bigger vocab packs more
text into each token), so comparing runs with different tokenizers on loss is meaningless.
Dividing the summed loss (in nats) by the number of UTF-8 bytes those tokens stand for, and
converting nats to bits, gives a number that is comparable across tokenizers.

Special tokens (BOS, chat markers) have byte length 0 in `token_bytes`: they are not text, so
both their loss and their (zero) bytes are left out. Targets of -1 (ignore_index) are skipped.
"""
from __future__ import annotations

import math
from contextlib import closing
from typing import Iterable, Optional

import torch

from nanochat.common import is_rank0
from nanochat.lifecycle import EvalProgress


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 steps: int, token_bytes: Optional[torch.Tensor], label: str = "bpb") -> float:
    """Bits per byte of `model` over the first `steps` (x, y) batches of `batches`.

    `model(x, y, loss_reduction="none")` must return the per-token fp32 losses (ignore_index -1).
    `token_bytes[id]` is the UTF-8 length of token `id` (0 for special tokens). With
    token_bytes=None it is the mean loss in nats per target token instead (the chat stages'
    validation loss: there the trained tokens are the assistant's, chat markers included).
    Under torch.distributed every rank evaluates its own batches and the sums are all-reduced,
    so every rank returns the same number. Rank 0 prints a `label` progress line every few seconds.
    """
    if steps < 1:
        raise ValueError(f"evaluate_bpb: steps={steps}; it must be at least 1")
    it = iter(batches)
    total_nats = total_count = 0   # tensors on the batches' device from the first batch on (no sync per batch)
    progress = EvalProgress(label, steps, print if is_rank0() else None)
    for step in range(steps):
        progress.step(step)  # between batches: the stop check (a preemption does not wait), a line every 10 s
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(f"evaluate_bpb: the batch iterator ran out after {step} of {steps} steps; "
                             f"lower the number of eval tokens or give it more data") from None
        acc_dtype = torch.float32 if y.device.type == "mps" else torch.float64  # mps has no fp64
        losses = model(x, y, loss_reduction="none").reshape(-1).float()
        y = y.reshape(-1)
        valid = y >= 0
        if token_bytes is not None:
            token_bytes = token_bytes.to(y.device)   # copied on the first batch, a no-op after
        count = valid.long() if token_bytes is None else token_bytes[y.clamp(min=0)] * valid
        # where() rather than a product: an ignored position may carry a nan/inf loss
        total_nats = total_nats + torch.where(count > 0, losses, torch.zeros_like(losses)).sum(dtype=acc_dtype)
        total_count = total_count + count.sum(dtype=torch.int64)
    from nanochat.training import dist_sum
    total_nats, total_count = dist_sum(total_nats), dist_sum(total_count)
    n = int(total_count.item())
    if n == 0:
        raise ValueError("evaluate_bpb: the evaluated targets cover 0 bytes (all special or ignored tokens); "
                         "check token_bytes and the validation data")
    return float(total_nats.item()) / (n if token_bytes is None else math.log(2) * n)


def split_bpb(model: torch.nn.Module, data, rt, tokenizer, token_bytes: torch.Tensor, split: str, batch: int, seq: int,
              tokens: int) -> float:
    """Bits per byte on about `tokens` tokens of `data`'s `split` (train | val) over all ranks, in the
    compute dtype with fp8 matmuls off (as nanochat evaluates). `data` is a config.DataConfig, `rt`
    training.Runtime."""
    from nanochat.dataloader import DataLoader
    from nanochat.precision import fp8_disabled
    loader = DataLoader(data, tokenizer, batch, seq, split, rt.rank, rt.world, rt.device, base_dir=rt.base_dir)
    with closing(loader), rt.autocast(), fp8_disabled(model):
        return evaluate_bpb(model, loader, max(1, tokens // (batch * seq * rt.world)), token_bytes)
