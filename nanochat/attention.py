"""Causal self-attention kernels: which backend runs, and the call itself.

Backends (q, k, v in SDPA layout (B, H, T, D); k/v may have fewer heads: GQA):
  sdpa   torch's scaled_dot_product_attention. Full-context layers use `is_causal` (flash /
         memory-efficient kernels on GPU); sliding-window layers pass a dense (T, T) boolean mask,
         which costs full attention. Fine on CPU, so "auto" never picks it on a GPU with windows.
  flex   FlexAttention with a block mask: blocks outside the window are skipped, so an S layer
         costs ~window/T of a full one. Compiled (torch.compile) on GPU: eager flex is an unfused
         reference that materializes the scores. Full-context layers still go to SDPA's flash kernel.
         On CPU torch has no flex backward: there flex runs inference only and training uses the
         dense mask (same math; CPU attention cost is dominated by the matmuls anyway).
  flash  the flash-attention package (FA3 `flash_attn_interface` on Hopper, else FA2 `flash_attn`)
         with its native `window_size`; bf16/fp16 only, so fp32 calls go to flex instead.

`resolve_backend("auto", device_type)` → flash if installed on CUDA, else flex on CUDA, else sdpa.
`reference_attention` is the plain softmax math the tests and bench/gpu_check.py compare against.

The KV-cache path (`cached_attention`) uses an explicit per-row mask for every backend: SDPA for a
prefill, plain products for a decode step (one query per row; row-invariant, see there). Its cost
is reading the cache, and only the keys a window can see are read (the cache is sliced to the union
of the rows' windows).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex", "flash")
CHOICES = ("auto",) + BACKENDS


# ----------------------------------------------------------------------------- choice

@functools.lru_cache(maxsize=None)
def _flash_func() -> Optional[Callable]:
    """The installed flash-attention function (FA3 first), or None."""
    for module in ("flash_attn_interface", "flash_attn"):   # FA3 (Hopper), FA2 (Ampere+)
        with contextlib.suppress(ImportError):
            return importlib.import_module(module).flash_attn_func
    return None


def available_backends(device_type: str) -> list[str]:
    """Backends that can run on this machine for `device_type` (cpu | cuda | mps)."""
    out = ["sdpa"]
    if device_type in ("cpu", "cuda"):   # FlexAttention: every torch with SDPA's enable_gqa (2.5+) has it
        out.append("flex")
    if device_type == "cuda" and _flash_func() is not None:
        out.append("flash")
    return out


_RESOLVED: dict = {}


def resolve_backend(preference: str, device_type: str) -> str:
    """Map hardware.attention (auto | sdpa | flex | flash) to a backend that exists here (memoized:
    the model calls this every forward, also under torch.compile). auto: flash, else flex on CUDA;
    sdpa elsewhere."""
    key = (preference, device_type)
    if key not in _RESOLVED:
        if preference not in CHOICES:
            raise ValueError(f"hardware.attention={preference!r}: use one of {', '.join(CHOICES)}")
        have = available_backends(device_type)
        if preference != "auto" and preference not in have:
            fix = "pip install flash-attn (CUDA only)" if preference == "flash" else "use hardware.attention=auto"
            raise ValueError(f"hardware.attention={preference!r} is not available on {device_type} "
                             f"(available: {', '.join(have)}); {fix}")
        _RESOLVED[key] = preference if preference != "auto" else have[-1] if device_type == "cuda" else "sdpa"
    return _RESOLVED[key]


# ----------------------------------------------------------------------------- masks

def window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(T, T) bool: query i sees keys j with i - window < j <= i (window counts the query itself)."""
    i = torch.arange(T, device=device)
    diff = i.unsqueeze(1) - i.unsqueeze(0)
    return (diff >= 0) & (diff < window)


_BLOCK_MASKS: dict = {}


def block_mask(T: int, window: int, device) -> "torch.nn.attention.flex_attention.BlockMask":
    """FlexAttention block mask of a causal sliding window of `window` keys (cached per T/window/device)."""
    key = (T, window, str(device))
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        # built eagerly once; a compiled model then reads it from the cache. torch.compiler.disable
        # is applied here, not as a decorator: it imports torch._dynamo (~2 s on a small CPU), which
        # every process that imports this module would otherwise pay
        _BLOCK_MASKS[key] = torch.compiler.disable(create_block_mask)(sliding, B=None, H=None, Q_LEN=T,
                                                                      KV_LEN=T, device=device)
    return _BLOCK_MASKS[key]


# ----------------------------------------------------------------------------- kernels

@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, window: int, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention
    bm = block_mask(q.size(-2), window, q.device)
    # on GPU always the compiled kernel (inside a compiled model dynamo traces it either way)
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=k.size(1) != q.size(1))


def _flash(q, k, v, window: int, scale: float) -> torch.Tensor:
    left = window - 1 if window < q.size(-2) else -1
    # flash takes (B, T, H, D); the transposes below are views of the projections' layout
    out = _flash_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                        causal=True, window_size=(left, 0))
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)   # some FA3 builds return (out, lse)


def supports_backward(backend: str, device_type: str) -> bool:
    """Whether `backend` runs its own backward kernel on `device_type` (flex on CPU: forward only)."""
    return not (backend == "flex" and device_type == "cpu")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                     backend: str = "sdpa", dense_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D), each query seeing `window` keys.

    window >= T means full causal attention. dense_mask: the (T, T) window mask for the sdpa
    backend (built by the caller once per forward); built here when not given.
    """
    T = q.size(-2)
    gqa = k.size(1) != q.size(1)
    # flex and flash are not autocast-aware (SDPA is): run them in autocast's dtype by hand
    dev = q.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    if backend == "flash" and dt in (torch.float16, torch.bfloat16):
        return _flash(q.to(dt), k.to(dt), v.to(dt), window, scale)
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend in ("flex", "flash") and not (dev == "cpu" and training):
        return _flex(q.to(dt), k.to(dt), v.to(dt), window, scale)   # flash in fp32 → flex
    # sdpa, or flex training on CPU (FlexAttention has no CPU backward): the dense window mask
    mask = window_mask(T, window, q.device) if dense_mask is None else dense_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def cached_window(positions: torch.Tensor, window: int, S: int,
                  min_position: Optional[int] = None) -> tuple[int, torch.Tensor]:
    """(lo, mask) for `cached_attention`: the first cache slot any row's window reaches, and the
    (B, 1, T, S - lo) bool mask of the slots each query sees. One per window per forward: every layer
    with that window shares it."""
    first = int(positions.min()) if min_position is None else min_position
    lo = max(0, first - window + 1)
    diff = positions.unsqueeze(-1) - torch.arange(lo, S, device=positions.device)   # (B, T, S - lo)
    return lo, ((diff >= 0) & (diff < window)).unsqueeze(1)


def cached_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, positions: torch.Tensor,
                     window: int, scale: float, slots: Optional[tuple[int, torch.Tensor]] = None) -> torch.Tensor:
    """Attention of new queries q (B, H, T, D) at `positions` (B, T) over the cache keys/vals (B, Hkv, S, D).

    Row b's query t sees cache slots j with positions[b, t] - window < j <= positions[b, t].
    Only the slots some row's window reaches are read (decode cost ~ window, not S).
    slots: `cached_window(...)` if the caller built it already (once per forward, not per layer: no
    device sync per layer).

    One query per row (a decode step) runs as plain products instead of SDPA: CPU SDPA splits a
    single query's keys across threads when there are few rows, so a row's rounding would depend on
    how many rows run with it; the products are row-wise the same for any number of rows (and
    faster at this size). Prefill (several queries) stays on SDPA.
    """
    S = keys.size(-2)
    lo, mask = slots if slots is not None else cached_window(positions, window, S)
    k, v = keys[:, :, lo:S].to(q.dtype), vals[:, :, lo:S].to(q.dtype)
    B, H, T, D = q.shape
    if T > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.size(1) != H)
    # decode: softmax(q·kᵀ·scale, masked)·v; the query heads sharing a kv head (GQA) go through one
    # product as rows of a (B, Hkv, H/Hkv, D) block
    qg = q.reshape(B, k.size(1), H // k.size(1), D)
    s = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))   # (B, Hkv, H/Hkv, S)
    return torch.matmul(torch.softmax(s, dim=-1), v).view(B, H, 1, D)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                        scale: Optional[float] = None) -> torch.Tensor:
    """The textbook math in fp64: softmax(q·kᵀ·scale + mask)·v, GQA by repeating kv heads."""
    T, D = q.size(-2), q.size(-1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k64, v64 = (t.double().repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    s = ((q.double() @ k64.transpose(-1, -2)) * scale).masked_fill(~window_mask(T, window, q.device), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v64).to(q.dtype)
