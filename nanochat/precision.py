"""The precision policy: one object says which dtype each part of training runs in.

    master weights      fp32 always (the model is built and kept in fp32; autocast casts per op)
    matmuls             bf16 under autocast on CUDA (fp16 on GPUs without bf16), fp32 on CPU/MPS
    logits, softcap, CE fp32 (gpt.py upcasts the lm_head output before the softcap; cross_entropy
                        is on autocast's fp32 list)
    optimizer states    fp32 (they are allocated like the fp32 master params)
    loss scaling        a GradScaler only for fp16 (bf16 has fp32's exponent range; fp32 needs none)

Build it once per process with `Precision.resolve(device_type, hardware.dtype)`; every stage uses
`policy.autocast()` around forward passes and `policy.grad_scaler()` for the backward/step.
CPU always resolves to fp32: bf16 matmuls are ~100x slower than fp32 on CPUs without AMX. The
plain constructor (`Precision("cpu", torch.bfloat16)`) bypasses that rule on purpose, so tests can
exercise the autocast and loss-scaling logic on a CPU.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterable, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASTER_DTYPE = torch.float32
LOGITS_DTYPE = torch.float32
OPTIMIZER_STATE_DTYPE = torch.float32


def to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"hardware.dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cuda_bf16_supported() -> bool:
    """True on GPUs with native bf16 (Ampere and newer); never emulated support."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class Precision:
    device_type: str                     # cuda | cpu | mps
    compute_dtype: torch.dtype = torch.float32   # what autocast runs matmuls in (fp32 = no autocast)
    notes: tuple = field(default=(), compare=False)   # why the request was changed, if it was

    @classmethod
    def resolve(cls, device_type: str, requested: torch.dtype | str,
                bf16_supported: Optional[bool] = None) -> "Precision":
        """The policy for `requested` (hardware.dtype) on `device_type`, after the hardware rules.

        bf16_supported: None → ask the GPU (tests pass False to see the fp16 fallback).
        """
        want = to_dtype(requested)
        if device_type != "cuda":
            notes = () if want == torch.float32 else (f"{want} requested on {device_type}: running fp32",)
            return cls(device_type, torch.float32, notes)
        if want == torch.bfloat16:
            ok = cuda_bf16_supported() if bf16_supported is None else bf16_supported
            if not ok:
                return cls("cuda", torch.float16, ("this GPU has no bf16: fp16 autocast with loss scaling",))
        return cls("cuda", want)

    # ---------------------------------------------------------------- what runs where
    @property
    def autocast_enabled(self) -> bool:
        return self.compute_dtype != torch.float32

    @property
    def needs_grad_scaler(self) -> bool:
        return self.compute_dtype == torch.float16

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.compute_dtype]

    def autocast(self) -> ContextManager:
        """Around forward passes (and the loss); backward runs outside it, as autocast wants."""
        if not self.autocast_enabled:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)

    def grad_scaler(self, **kwargs: Any) -> torch.amp.GradScaler:
        """Enabled only for fp16; disabled, its scale/step/update are plain pass-throughs.

        Use: scaler.scale(loss).backward(); scaler.step(opt) (unscales first and skips the step if
        any grad is inf/nan); scaler.update(). Single process only: with several ranks the per-rank
        inf checks could disagree, so launch/validate.py refuses fp16 with world_size > 1.
        kwargs go to torch.amp.GradScaler (init_scale, growth_interval, ...).
        """
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler, **kwargs)

    # ---------------------------------------------------------------- checks
    def check_master_weights(self, model: torch.nn.Module) -> None:
        """Raise if a floating-point parameter is not fp32 (someone called model.half()/bfloat16())."""
        bad = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != MASTER_DTYPE]
        if bad:
            raise TypeError(f"master weights must be {MASTER_DTYPE}; {len(bad)} parameters are not "
                            f"(first: {bad[0]}). Keep the model fp32: the precision policy casts per op.")

    def check_optimizer_states(self, optimizer: Any) -> None:
        """Raise if a floating-point optimizer state tensor is not fp32."""
        for state in _states(optimizer):
            for k, v in state.items():
                if torch.is_tensor(v) and v.is_floating_point() and v.dtype != OPTIMIZER_STATE_DTYPE:
                    raise TypeError(f"optimizer state {k!r} is {v.dtype}, expected {OPTIMIZER_STATE_DTYPE}")

    def describe(self) -> str:
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        scaler = " + GradScaler" if self.needs_grad_scaler else ""
        mode = f"{self.name} autocast" if self.autocast_enabled else "fp32 (no autocast)"
        return f"{self.device_type} {mode}{scaler}, fp32 master weights/logits/optimizer{extra}"


def _states(optimizer: Any) -> Iterable[dict]:
    return [s for s in optimizer.state.values() if isinstance(s, dict)]
