"""The precision policy: one object says which dtype each part of training runs in.

    master weights      fp32 (the model is built and kept in fp32; autocast casts per op), but for
                        the embedding tables with hardware.embedding_dtype=bfloat16 (below)
    matmuls             bf16 under autocast on CUDA (fp16 on GPUs without bf16), fp32 on CPU/MPS
    logits, softcap, CE fp32 (gpt.py upcasts the lm_head output before the softcap; cross_entropy
                        is on autocast's fp32 list)
    optimizer states    fp32 (they are allocated like the fp32 master params; bf16 embeddings' in bf16)
    embeddings          hardware.embedding_dtype=bfloat16 (CUDA with bf16 compute only): wte and the
                        value embeddings stored in bf16, as nanochat 92d63d4 keeps them, so their
                        weights, gradients and AdamW state take half the memory (~6 GiB on a modern
                        d26, what lets it fit a 24 GB card); the lookup is upcast, the residual stays fp32
    loss scaling        a GradScaler only for fp16 (bf16 has fp32's exponent range; fp32 needs none)
    fp8 (model.fp8)     training matmuls of the Linear layers nanochat 92d63d4's base_train converts
                        (`fp8_filter`), through torchao.float8 (tensorwise or rowwise dynamic scaling);
                        the weights stay fp32 parameters, so checkpoints, eval, serve and export never
                        see fp8; evaluation runs with the layers swapped back (`fp8_disabled`)

Build it once per process with `Precision.resolve(device_type, hardware.dtype)`; every stage uses
`policy.autocast()` around forward passes and `policy.grad_scaler()` for the backward/step.
CPU always resolves to fp32: bf16 matmuls are ~100x slower than fp32 on CPUs without AMX. The
plain constructor (`Precision("cpu", torch.bfloat16)`) bypasses that rule on purpose, so tests can
exercise the autocast and loss-scaling logic on a CPU.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterator, Optional

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASTER_DTYPE = torch.float32
OPTIMIZER_STATE_DTYPE = torch.float32


@dataclass(frozen=True)
class Precision:
    device_type: str                     # cuda | cpu | mps
    compute_dtype: torch.dtype = torch.float32   # what autocast runs matmuls in (fp32 = no autocast)
    embedding_dtype: torch.dtype = torch.float32  # how wte and the value embeddings are stored
    notes: tuple = field(default=(), compare=False)   # why the request was changed, if it was

    @classmethod
    def resolve(cls, device_type: str, requested: str, bf16_supported: Optional[bool] = None,
                embeddings: str = "float32") -> "Precision":
        """The policy for `requested` (hardware.dtype) and `embeddings` (hardware.embedding_dtype) on
        `device_type`, after the hardware rules.

        bf16_supported: None → ask the GPU (tests pass False to see the fp16 fallback).
        """
        for key, value in (("hardware.dtype", requested), ("hardware.embedding_dtype", embeddings)):
            if value not in DTYPES:
                raise ValueError(f"{key}={value!r}: use one of {', '.join(DTYPES)}")
        want, emb = DTYPES[requested], DTYPES[embeddings]
        notes = []
        if device_type != "cuda":
            notes += [f"{want} requested on {device_type}: running fp32"] if want != torch.float32 else []
            want = torch.float32
        elif want == torch.bfloat16:
            if bf16_supported is None:   # native bf16 (Ampere and newer); never emulated support
                bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
            if not bf16_supported:
                want = torch.float16
                notes.append("this GPU has no bf16: fp16 autocast with loss scaling")
        if emb != torch.float32 and (emb != torch.bfloat16 or want != torch.bfloat16):
            notes.append(f"{emb} embeddings need bf16 compute on CUDA: fp32 embeddings")
            emb = torch.float32
        return cls(device_type, want, emb, tuple(notes))

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
        return torch.autocast(self.device_type, dtype=self.compute_dtype) if self.autocast_enabled else nullcontext()

    def grad_scaler(self, **kwargs: Any) -> torch.amp.GradScaler:
        """Enabled only for fp16; disabled, its scale/step/update are plain pass-throughs.

        Use: scaler.scale(loss).backward(); scaler.step(opt) (unscales first and skips the step if
        any grad is inf/nan); scaler.update(). Single process only: with several ranks the per-rank
        inf checks could disagree, so launch/validate.py refuses fp16 with world_size > 1.
        kwargs go to torch.amp.GradScaler (init_scale, growth_interval, ...).
        """
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler, **kwargs)

    def cast_embeddings(self, model: nn.Module) -> None:
        """Store the embedding tables (GPT.param_groups' embedding + value_embed) in embedding_dtype.
        Call before the optimizer is built: the gradients and AdamW state follow the parameter's dtype."""
        if self.embedding_dtype != MASTER_DTYPE:
            for p in _embedding_params(model):
                p.data = p.data.to(self.embedding_dtype)

    # ---------------------------------------------------------------- checks
    def check_master_weights(self, model: torch.nn.Module) -> None:
        """Raise if a floating-point parameter is not fp32 (someone called model.half()/bfloat16()),
        the embedding tables excepted when they are stored in embedding_dtype."""
        emb = {id(p) for p in _embedding_params(model)}
        bad = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != MASTER_DTYPE
               and not (id(p) in emb and p.dtype == self.embedding_dtype)]
        if bad:
            raise TypeError(f"master weights must be {MASTER_DTYPE}; {len(bad)} parameters are not "
                            f"(first: {bad[0]}). Keep the model fp32: the precision policy casts per op.")

    def check_optimizer_states(self, optimizer: Any) -> None:
        """Raise if a floating-point optimizer state tensor is not fp32 (bf16 embeddings': their dtype)."""
        for p, state in optimizer.state.items():
            want = p.dtype if p.dtype == self.embedding_dtype else OPTIMIZER_STATE_DTYPE
            for k, v in state.items():
                if torch.is_tensor(v) and v.is_floating_point() and v.dtype != want and k != "step":
                    raise TypeError(f"optimizer state {k!r} is {v.dtype}, expected {want}")

    def describe(self) -> str:
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        scaler = " + GradScaler" if self.needs_grad_scaler else ""
        mode = f"{self.name} autocast" if self.autocast_enabled else "fp32 (no autocast)"
        emb = " (bf16 embeddings)" if self.embedding_dtype == torch.bfloat16 else ""
        return f"{self.device_type} {mode}{scaler}, fp32 master weights{emb}/logits/optimizer{extra}"


def _embedding_params(model: nn.Module) -> list[nn.Parameter]:
    groups = model.param_groups()
    return groups["embedding"] + groups["value_embed"]


# ----------------------------------------------------------------------------- fp8 (torchao.float8)

FP8_RECIPES = ("tensorwise", "rowwise")
FP8_MIN_DIM = 128   # nanochat 92d63d4's base_train: smaller layers gain nothing from fp8


def fp8_filter(mod: nn.Module, fqn: str = "") -> bool:
    """nanochat 92d63d4's rule: a Linear whose in/out features divide by 16 (the fp8 GEMM needs it)
    and whose smaller side is at least 128 (value-embedding and smear gates stay as they are)."""
    return (isinstance(mod, nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
            and min(mod.in_features, mod.out_features) >= FP8_MIN_DIM)


def fp8_supported(device: torch.device | str) -> bool:
    """fp8 matmuls (torch._scaled_mm): NVIDIA GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell)."""
    return torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def is_fp8(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Float8Linear"


def convert_fp8(model: nn.Module, recipe: str, emulate: bool = False) -> list[str]:
    """Swap the `fp8_filter` Linear layers for torchao Float8Linear (dynamic `recipe` scaling); returns
    their names. The Parameters are kept (same objects, fp32), so an optimizer built before or after
    sees the same tensors and state_dict() is unchanged. emulate: fp8 casts in plain PyTorch (CPU tests)."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8={recipe!r}: use one of {', '.join(FP8_RECIPES)}")
    import dataclasses
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training   # heavy: only when asked
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    names = [n for n, m in model.named_modules() if fp8_filter(m, n)]
    convert_to_float8_training(model, config=config, module_filter_fn=fp8_filter)
    return names


@contextmanager
def fp8_disabled(model: nn.Module) -> Iterator[None]:
    """Run the block with plain nn.Linear in place of every Float8Linear (sharing the weights), as
    nanochat evaluates in bf16; restores them afterwards. A no-op for a model without fp8."""
    swapped = []
    for parent in list(model.modules()):
        for attr, mod in list(parent.named_children()):
            if is_fp8(mod):
                plain = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
                plain.weight, plain.bias = mod.weight, mod.bias
                setattr(parent, attr, plain)
                swapped.append((parent, attr, mod))
    try:
        yield
    finally:
        for parent, attr, mod in swapped:
            setattr(parent, attr, mod)
