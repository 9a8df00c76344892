"""The GPT model: nanochat's seed architecture, with every later improvement as a toggle.

Seed (default, Dec 2025 nanochat): token embedding → RMSNorm → blocks → RMSNorm → lm_head.
Each block is pre-norm attention + pre-norm ReLU² MLP (4× hidden). Attention uses RoPE (no
learned positions), QK RMSNorm, GQA through `n_kv_head`. Embedding and lm_head are untied,
RMSNorm has no parameters, there are no biases, logits are soft-capped (`softcap·tanh(z/softcap)`)
and computed in fp32. Output projections start at zero.

Toggles (each off in the seed generation, on in the modern one):
  value_embeds    per-layer value embeddings (ResFormer) mixed into V through an input-dependent gate
                  3·sigmoid(W·x[:12]) per KV head, on layers with `layer_idx % 2 == (n_layer - 1) % 2`
  window_pattern  e.g. "SSSL": tiled over layers; an S layer sees `short_window` tokens to its left
                  plus itself (default ceil(seq/4/128)·128, nanochat's FlashAttention tile rounding),
                  an L layer `long_window` (None = unlimited); the last layer is always L
  resid_lambdas   learned per-layer scale on the residual stream entering each block
  x0_lambdas      learned per-layer mix of the first (normed) embedding x0 into each block's input
  smear           mixes the previous token's embedding into each position (gate from 24 channels)
  backout         subtracts a learned multiple of the residual after block n_layer//2 before the final norm
  qk_scale        multiplies q and k after QK norm (1.2 → sharper attention)
  pad_vocab_to    pads embedding/lm_head rows to a multiple (logits are sliced back to vocab_size)
  rope_base       RoPE base frequency
  init_style      "seed" or "modern" (nanochat mid 2026: wte std 0.8, c_fc at 0.4× the bound)
  rope_bf16       RoPE tables rounded to bf16 (on in the seed generation: nanochat d575940 kept them in bf16)

The modern toggles together are nanochat 92d63d4's model (Jul 2026) exactly, up to the RoPE layout:
nanochat rotates the two halves of each head, we rotate interleaved pairs; nanochat/interop.py
permutes the rows of c_q/c_k at the boundary.

The parameter layout (every tensor's shape, per optimizer role) is written down torch-free in
nanochat/shapes.py (`param_counts`), which tests/test_shapes.py checks against this module.

Build with `build_model(config, device, seed)` (meta-device construction, then init).

CPU speed (bench/train_step.py): eager fp32 training uses a fused, chunked lm_head + softcap +
cross-entropy (`linear_softcap_cross_entropy`), lean autograd Functions for RMSNorm and ReLU², RoPE
as one complex multiply (interleaved pairs), one GEMM for q/k/v, and qk_scale folded into SDPA's
scale. Under torch.compile or on GPU the plain ops are used (same math).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.attention import cached_attention, cached_window, causal_attention, resolve_backend, window_mask
from nanochat.shapes import SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS, flops_per_token, has_value_embed
from nanochat.shapes import attention_spans as shape_spans, left_windows as shape_windows

VE_GATE_SCALE = 3.0     # the value-embedding gate is VE_GATE_SCALE·sigmoid(.), in (0, 3)
INIT_STYLES = ("seed", "modern")


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    softcap: float = 15.0             # 0 disables the logit soft cap
    rope_base: float = 10000.0
    value_embeds: bool = False
    window_pattern: str = "L"         # tiled over layers; the last layer is always L
    short_window: Optional[int] = None  # tokens left of the query an S layer sees; None → default_short_window
    long_window: Optional[int] = None   # tokens left of the query an L layer sees; None → unlimited
    resid_lambdas: bool = False
    x0_lambdas: bool = False
    smear: bool = False
    backout: bool = False
    qk_scale: float = 1.0
    pad_vocab_to: int = 1
    init_style: str = "seed"
    rope_bf16: bool = False           # round the RoPE cos/sin tables to bf16 (nanochat Dec 2025 did, on every device)

    def __post_init__(self) -> None:
        def bad(field: str, fix: str) -> ValueError:
            return ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: {fix}")
        for f in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to"):
            if int(getattr(self, f)) < 1:
                raise bad(f, "must be a positive integer")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise bad("n_kv_head", f"must divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise bad("n_head", f"head_dim = n_embd/n_head = {self.head_dim} must be even for RoPE")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise bad("window_pattern", "use a string of S (short window) and L (full context), e.g. SSSL")
        for f, unset in (("short_window", "ceil(seq/4/128)·128"), ("long_window", "unlimited")):
            if getattr(self, f) is not None and getattr(self, f) < 0:
                raise bad(f, f"must be >= 0 tokens to the left (or null for {unset})")
        if self.init_style not in INIT_STYLES:
            raise bad("init_style", f"use one of {INIT_STYLES}")
        for toggle, channels in (("value_embeds", VE_GATE_CHANNELS), ("smear", SMEAR_GATE_CHANNELS)):
            if getattr(self, toggle) and self.n_embd < channels:
                raise bad("n_embd", f"{toggle} needs n_embd >= {channels}")
        if self.softcap < 0:
            raise bad("softcap", "must be >= 0 (0 disables it)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def max_positions(self) -> int:
        """Positions the RoPE table covers (10× the training length leaves room for long generations)."""
        return 10 * self.sequence_len

    left_windows = shape_windows     # tokens left of the query per layer (None = unlimited)
    attention_spans = shape_spans    # keys per query for the FLOP count

    def window_sizes(self) -> list[int]:
        """Keys each layer attends to, the query itself included (left window + 1).

        An unlimited layer gets `max_positions`, every position the model can reach, so a window
        >= the number of keys always means plain causal attention.
        """
        return [self.max_positions if w is None else min(w + 1, self.max_positions) for w in self.left_windows()]


# ----------------------------------------------------------------------------- helpers

def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(x²) + eps) over the last dim, keepdim."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps))


class _RMSNorm(torch.autograd.Function):
    """Parameter-free RMSNorm with a lean backward (2 passes forward, 3 backward).

    y = x·rstd, rstd = 1/sqrt(mean(x²) + eps); dx = rstd·(g − y·mean(g·y)).
    """

    @staticmethod
    def forward(ctx, x, eps: float):
        rstd = _rstd(x, eps)
        y = x * rstd
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        y, rstd = ctx.saved_tensors
        m = torch.linalg.vecdot(g, y, dim=-1).unsqueeze(-1).div_(y.size(-1))
        return torch.addcmul(g, y, m, value=-1.0).mul_(rstd), None


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (eps = dtype's machine epsilon, as F.rms_norm)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        eps = torch.finfo(x.dtype).eps
        # inference runs the same ops without the autograd Function's overhead
        return _RMSNorm.apply(x, eps) if torch.is_grad_enabled() else x * _rstd(x, eps)
    return F.rms_norm(x, (x.size(-1),))


class _ReluSquared(torch.autograd.Function):
    """relu(h)² saving relu(h) only: backward is 2·relu(h)·g (no separate threshold pass)."""

    @staticmethod
    def forward(ctx, h):
        r = torch.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return torch.mul(g, r).mul_(2.0)


def relu_squared(h: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():   # inference: no autograd Function overhead
        return F.relu(h).square()
    return _ReluSquared.apply(h)


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None, bf16: bool = False) -> torch.Tensor:
    """RoPE table (seq_len, head_dim // 2, 2) fp32 holding (cos, sin) of position·frequency.

    bf16=True rounds the values to bf16 (kept in fp32 storage): nanochat Dec 2025's tables.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    table = torch.stack([freqs.cos(), freqs.sin()], dim=-1)
    return table.bfloat16().float() if bf16 else table


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by position·freq_i.

    rope (B|1, T, 1, D/2, 2) from `rotary_tables`. Eager fp32 runs as one complex multiply (one pass
    forward and backward instead of seven); other dtypes and torch.compile (inductor has no complex
    codegen, and fuses the real form anyway) use the real form.
    """
    xp = x.unflatten(-1, (-1, 2))
    if x.dtype == torch.float32 and rope.dtype == torch.float32 and not torch.compiler.is_compiling():
        return torch.view_as_real(torch.view_as_complex(xp) * torch.view_as_complex(rope)).flatten(-2)
    cos, sin = rope[..., 0].to(x.dtype), rope[..., 1].to(x.dtype)
    x1, x2 = xp[..., 0], xp[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- fused lm_head + loss

class _LinearSoftcapCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of softcap·tanh(x @ W.T / softcap), ignore_index=-1, fused and chunked.

    The unfused path materializes (N, V) logits and streams them through memory ~15 times
    (matmul out, /cap, tanh, ·cap, log_softmax, nll, and as many backward). Here small chunks of
    rows go through the elementwise work while they sit in cache, and the gradient is computed
    in the forward pass (the loss is a scalar, so backward only rescales it by grad_output).
    The gradient w.r.t. the logits of a block of rows lands in one buffer, so dx and dW come
    from a few large GEMMs instead of many skinny ones.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, softcap: float, chunk: int, block_bytes: int, mm_rows: int):
        N, V = x.size(0), weight.size(0)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != -1
        n_valid = valid.sum()
        any_ignored = not bool(valid.all())
        tgt = targets.clamp(min=0).unsqueeze(1)
        capped = softcap > 0
        # fold 1/cap into the (small) input: (x/cap) @ Wᵀ = z/cap, ready for tanh
        xs = x * (1.0 / softcap) if capped else x
        row_loss = torch.empty(N, dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if need_grad else None
        dw = torch.zeros_like(weight) if need_grad else None
        chunk = max(1, min(chunk, N))
        mm_rows = max(chunk, mm_rows // chunk * chunk)                       # rows per logits GEMM
        R = max(mm_rows, min(N, block_bytes // (4 * V) // mm_rows * mm_rows))  # rows per dx/dW GEMM
        blk_buf = torch.empty(min(R, N), V, dtype=torch.float32, device=x.device)
        e_buf = torch.empty(chunk, V, dtype=torch.float32, device=x.device)
        minus_one = torch.full((chunk, 1), -1.0, dtype=torch.float32, device=x.device)
        for b0 in range(0, N, R):
            b1 = min(N, b0 + R)
            blk = blk_buf[:b1 - b0]
            for m0 in range(b0, b1, mm_rows):
                m1 = min(b1, m0 + mm_rows)
                torch.mm(xs[m0:m1], weight.t(), out=blk[m0 - b0:m1 - b0])
                for i0 in range(m0, m1, chunk):                # elementwise work on cache-sized rows
                    i1 = min(m1, i0 + chunk)
                    z = blk[i0 - b0:i1 - b0]
                    tc = tgt[i0:i1]
                    # e: the logits, then their softmax, then its gradient (uncapped: in z's own rows);
                    # capped, z keeps t = tanh(z/cap) for the gradient, and |logit| <= cap
                    e = torch.mul(z.tanh_(), softcap, out=e_buf[:i1 - i0]) if capped else z
                    s_t = e.gather(1, tc).squeeze(1)
                    if capped:
                        sumexp = e.exp_().sum(1)               # safe without max-shift: e <= exp(cap)
                        lse = sumexp.log()
                    else:
                        lse = torch.logsumexp(z, dim=1)
                        z.sub_(lse.unsqueeze(1)).exp_()        # softmax
                    torch.sub(lse, s_t, out=row_loss[i0:i1])
                    if not need_grad:
                        continue
                    if capped:
                        e.mul_(sumexp.reciprocal_().unsqueeze(1))  # softmax
                    e.scatter_add_(1, tc, minus_one[:i1 - i0])
                    if any_ignored:
                        e.mul_(valid[i0:i1].unsqueeze(1))
                    if capped:
                        z.mul_(z)
                        torch.addcmul(e, e, z, value=-1.0, out=z)  # dlogit = dcapped·(1 - tanh²)
            if need_grad:
                torch.mm(blk, weight, out=dx[b0:b1])
                dw.addmm_(blk.t(), x[b0:b1])
        if any_ignored:
            row_loss.mul_(valid)
        loss = row_loss.sum() / n_valid
        if need_grad:
            ctx.save_for_backward(dx, dw, n_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return dx * scale, dw * scale, None, None, None, None, None


def linear_softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 softcap: float, chunk: int = 32, block_bytes: int = 64 << 20,
                                 mm_rows: int = 512) -> torch.Tensor:
    """Fused `F.cross_entropy(softcap·tanh((x @ weight.T)/softcap), targets, ignore_index=-1)` (mean).

    x (N, d) fp32, weight (V, d), targets (N,) long. chunk: rows per elementwise pass (keep
    chunk·V·8 bytes within L2); mm_rows: rows per logits GEMM (skinny GEMMs are slow);
    block_bytes: size of the logit-gradient buffer that feeds the dx/dW GEMMs.
    """
    return _LinearSoftcapCrossEntropy.apply(x, weight, targets, softcap, chunk, block_bytes, mm_rows)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated key/value cache for batched inference.

    Layout: `k`, `v` of shape (n_layer, B, n_kv_head, max_len, head_dim); `pos` (B,) long = how many
    tokens each row holds. `last_x` (B, n_embd) keeps each row's last normed embedding (smear needs it).

    Use:
        cache = KVCache.for_model(model, batch_size=1, max_len=L)
        logits = model(prompt_ids, kv_cache=cache)        # prefill (B, T): rows advance by T
        big = KVCache.for_model(model, batch_size=N, max_len=L)
        big.copy_rows_from(cache, src_row=0)              # N completions of one prompt
        logits = model(next_ids[:, None], kv_cache=big)   # decode one token per row
    Rows may sit at different positions (e.g. prompts of different lengths prefilled one by one and
    copied in with `copy_rows_from(src, src_row, dst_rows=[i])`); every forward appends the same
    number of tokens T to every row, at positions pos[b] .. pos[b]+T-1.
    `model(...)` advances `pos` itself.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, num_layers: int,
                 n_embd: int, device=None, dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.last_x = torch.zeros(batch_size, n_embd, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len
        self.min_keys = 0   # forwards attend over at least this many slots (serving pads the key length)

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_len: int) -> "KVCache":
        c, w = model.config, model.lm_head.weight
        return cls(batch_size, c.n_kv_head, max_len, c.head_dim, c.n_layer, c.n_embd, w.device, w.dtype)

    def rows(self, n: int, min_keys: int = 0) -> "KVCache":
        """The first n rows as a KVCache of views: a forward on it writes into this cache and attends
        over at least `min_keys` slots (serving runs a step on the rows in use)."""
        view = copy.copy(self)
        view.k, view.v, view.pos, view.last_x = self.k[:, :n], self.v[:, :n], self.pos[:n], self.last_x[:n]
        view.batch_size, view.min_keys = n, min_keys
        return view

    def copy_rows_from(self, src: "KVCache", src_row: int = 0, dst_rows=None) -> None:
        """Copy row `src_row` of `src` (a cache of the same model) into `dst_rows` (None: all): keys, values, pos."""
        rows = list(range(self.batch_size) if dst_rows is None else dst_rows)
        n = int(src.pos[src_row])
        if n > self.max_len:
            raise ValueError(f"KVCache.copy_rows_from: source holds {n} tokens > max_len={self.max_len}")
        if len(rows) == 1:   # a slice, not an index list: a serving step copies one row at a time
            rows = slice(rows[0], rows[0] + 1)
        self.k[:, rows, :, :n] = src.k[:, src_row:src_row + 1, :, :n]
        self.v[:, rows, :, :n] = src.v[:, src_row:src_row + 1, :, :n]
        self.pos[rows] = n
        self.last_x[rows] = src.last_x[src_row].clone()   # src may be this cache (row compaction): no aliasing


@dataclass
class Ragged:
    """The real tokens of a padded (B, width) cached forward as one flat row, idx (1, N) (serving's prefill):
    token i < len(row) sits at (row[i], col[i]), position kv_cache.pos[row[i]] + col[i]; the rest pad N.
    The linear layers (nearly all the work) then run over N rows, not B·width; attention runs on the
    padded batch (queries scattered in, outputs gathered back), so each token's output is bitwise the
    padded forward's wherever the linear layers are row-invariant (nanochat/packed.py). As after a padded
    forward, smear's kv_cache.last_x of a row shorter than the width is its caller's to set."""
    row: torch.Tensor   # (n,) long
    col: torch.Tensor   # (n,) long
    width: int


# ----------------------------------------------------------------------------- modules

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.qk_scale = layer_idx, config.qk_scale
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, kvd = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kvd, bias=False)
        self.c_v = nn.Linear(d, kvd, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ve_gate = (nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False)
                        if config.value_embeds and has_value_embed(layer_idx, config.n_layer) else None)
        self.c_qkv = None   # one prepacked q/k/v product for inference (nanochat/packed.py)

    def forward(self, x, ve, rope, window: int, kv_cache: Optional[KVCache], attn_mask):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if self.c_qkv is not None:
            qkv = self.c_qkv(x)
        elif type(self.c_q) is nn.Linear:
            # one matmul for q, k, v (same math as three Linears; fewer, larger GEMMs)
            qkv = F.linear(x, torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight]))
        else:   # converted layers (fp8, precision.convert_fp8) do their own matmul
            qkv = torch.cat([self.c_q(x), self.c_k(x), self.c_v(x)], dim=-1)
        qk, v = qkv.view(B, T, H + 2 * Hkv, D).split([H + Hkv, Hkv], dim=2)
        if ve is not None:
            gate = VE_GATE_SCALE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        # RoPE, then QK norm (nanochat's order; bf16 tables do not keep the RMS)
        q, k = norm(apply_rotary(qk, rope)).split([H, Hkv], dim=2)
        # qk_scale multiplies q and k, i.e. the attention logits by qk_scale²: fold it into SDPA's scale
        scale = self.qk_scale ** 2 / math.sqrt(D)
        if kv_cache is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            y = causal_attention(q, k, v, window, scale, attn_mask["backend"], attn_mask.get(window))
            return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))
        positions, S, li, rg = attn_mask["positions"], attn_mask["S"], self.layer_idx, attn_mask.get("ragged")
        if rg is None:   # advanced indices (rows, positions) around a slice put (B, T) first: assign in (B, T, H, D)
            at = (torch.arange(B, device=q.device).unsqueeze(1), positions)
        else:            # the real tokens go to their rows and positions; the queries into the padded batch
            n, at = rg.row.numel(), (rg.row, attn_mask["token_positions"])
            k, v, real = k[0, :n], v[0, :n], q[0, :n]
            q = q.new_zeros(positions.size(0), rg.width, H, D)
            q[rg.row, rg.col] = real
        kv_cache.k[li][at[0], :, at[1]] = k.to(kv_cache.k.dtype)
        kv_cache.v[li][at[0], :, at[1]] = v.to(kv_cache.v.dtype)
        y = cached_attention(q.transpose(1, 2), kv_cache.k[li, :, :, :S], kv_cache.v[li, :, :, :S], positions,
                             window, scale, attn_mask["slots"][window]).transpose(1, 2)
        if rg is not None:   # back to the flat row; the padding tokens get zeros
            y = torch.cat([y[rg.row, rg.col], y.new_zeros(T - n, H, D)]).unsqueeze(0)
        return self.c_proj(y.reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, rope, window, kv_cache, attn_mask):
        x = x + self.attn(norm(x), ve, rope, window, kv_cache, attn_mask)
        return x + self.mlp(norm(x))


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialised, like every other parameter here (init_weights sets them all).
    nn.Embedding's own normal_ init, run on the meta device, imports torch._dynamo: ~2 s of start-up
    on a small CPU for every process that builds a model."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class GPT(nn.Module):
    attn_backend = "auto"   # hardware.attention: auto | sdpa | flex | flash (nanochat/attention.py)
    # model.activation_checkpointing: "full" keeps only each block's input in training and recomputes
    # the block in backward (same values: the block is deterministic and draws no random numbers)
    activation_checkpointing = "none"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V, d, L = config.padded_vocab_size, config.n_embd, config.n_layer
        kvd = config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": _embedding(V, d),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = nn.Linear(d, V, bias=False)
        self.value_embeds = nn.ModuleDict({
            str(i): _embedding(V, kvd) for i in range(L) if config.value_embeds and has_value_embed(i, L)
        })
        self.resid_lambdas = nn.Parameter(torch.empty(L)) if config.resid_lambdas else None
        self.x0_lambdas = nn.Parameter(torch.empty(L)) if config.x0_lambdas else None
        self.smear_gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.empty(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.empty(1)) if config.backout else None
        self.windows = config.window_sizes()
        # RoPE tables over max_positions, non-persistent (computed by init_weights / init_rotary, never in
        # checkpoints). Left empty here: on the meta device that would import torch._dynamo (seconds of start-up)
        self.rotary_len = config.max_positions
        self.register_buffer("rope", torch.empty(self.rotary_len, config.head_dim // 2, 2), persistent=False)
        self._mask_cache: dict = {}
        self.fused_loss = True       # chunked lm_head+softcap+CE on CPU (see _LinearSoftcapCrossEntropy)
        self.loss_chunk = 32

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic given torch's RNG state. Call after `to_empty` (meta construction).

        Follows nanochat's init_weights (same distributions, in the same order of RNG draws);
        init_style "modern" adds 92d63d4's wte std 0.8 and c_fc at 0.4× the uniform bound.
        """
        c = self.config
        modern = c.init_style == "modern"
        s = 3 ** 0.5 * c.n_embd ** -0.5   # uniform(-s, s) has std 1/sqrt(d)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8 if modern else 1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        fc_bound = s * (0.4 if modern else 1.0)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -fc_bound, fc_bound)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # per-layer scalars: stronger residual and more x0 in early layers, decaying linearly with depth
        frac = [i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]
        if self.resid_lambdas is not None:
            self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * f for f in frac]))
        if self.x0_lambdas is not None:
            self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * f for f in frac]))
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(0.2)
        if self.smear_gate is not None:
            self.smear_lambda.zero_()                        # no smearing at start
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                # small positive weights: the gate starts slightly above its neutral 3·sigmoid(0) = 1.5
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        self.init_rotary()

    @torch.no_grad()
    def init_rotary(self) -> None:
        """(Re)compute the RoPE buffers on the model's device (needed after to_empty)."""
        self.rope = rotary_tables(self.rotary_len, self.config.head_dim, self.config.rope_base,
                                  device=self.lm_head.weight.device, bf16=self.config.rope_bf16)
        self._mask_cache = {}

    # ------------------------------------------------------------------ counts
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Transformer block matrices (incl. value-embedding gates) + lm_head."""
        return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()

    def estimate_flops(self) -> int:
        """Training FLOPs per token: 6·(params − embedding tables − scalars) + attention 12·H·hd·T_eff per
        layer, nanochat 92d63d4's count (shapes.flops_per_token; T_eff = min(left window, sequence_len))."""
        return flops_per_token(self.config)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Which optimizer gets what: "matrix" → Muon; the rest → AdamW at their own LRs.

        Keys: matrix (block weights incl. VE gates), embedding (wte), value_embed, lm_head,
        resid_scalar (resid_lambdas), x0_scalar (x0_lambdas), gate_scalar (smear gate + lambda,
        backout lambda): nanochat 92d63d4's setup_optimizer groups.
        """
        groups = {name: [p for p in params if p is not None] for name, params in {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": [self.transformer.wte.weight],
            "value_embed": [ve.weight for ve in self.value_embeds.values()],
            "lm_head": [self.lm_head.weight],
            "resid_scalar": [self.resid_lambdas],   # the optional ones: absent toggles are None
            "x0_scalar": [self.x0_lambdas],
            "gate_scalar": [getattr(self.smear_gate, "weight", None), self.smear_lambda, self.backout_lambda],
        }.items()}
        assert sum(map(len, groups.values())) == len(list(self.parameters())), "param_groups misses a parameter"
        return groups

    # ------------------------------------------------------------------ forward
    def _attention_inputs(self, T: int, device: torch.device, kv_cache: Optional[KVCache],
                          ragged: Optional[Ragged] = None) -> tuple[torch.Tensor, dict]:
        """The RoPE rows and the masks of this forward, one per distinct window (the layers with that
        window share it). Without a cache nanochat/attention.py picks the kernel, and only the sdpa
        backend needs dense window masks (kept per T/window/device); cached inference puts each row's
        new tokens at pos[b] + t (ragged: the flat row's tokens at their (row, col), see Ragged)."""
        if kv_cache is None:
            if T > self.rotary_len:
                raise ValueError(f"sequence of {T} tokens exceeds the RoPE table ({self.rotary_len})")
            masks = {"backend": resolve_backend(self.attn_backend, device.type)}
            for w in {w for w in self.windows if w < T and masks["backend"] == "sdpa"}:
                key = (T, w, str(device))
                if key not in self._mask_cache:
                    self._mask_cache[key] = window_mask(T, w, device)
                masks[w] = self._mask_cache[key]
            return self.rope[None, :T, None], masks
        N, T = T, ragged.width if ragged is not None else T
        positions = kv_cache.pos.unsqueeze(1) + torch.arange(T, device=kv_cache.pos.device)   # (B, T)
        last = int(positions.max())
        S = max(last + 1, kv_cache.min_keys)   # slots past a row's position are masked
        if S > kv_cache.max_len:
            raise ValueError(f"KVCache overflow: need {S} positions, cache max_len={kv_cache.max_len}")
        if last >= self.rotary_len:
            raise ValueError(f"position {last} exceeds the RoPE table ({self.rotary_len})")
        first = int(positions.min())   # per-row window masks
        slots = {w: cached_window(positions, w, S, first) for w in set(self.windows)}
        masks = {"positions": positions, "S": S, "slots": slots}
        if ragged is None:
            return self.rope[positions].unsqueeze(2), masks
        tokens = positions[ragged.row, ragged.col]   # (n,); the padding tokens take position 0
        masks.update(ragged=ragged, token_positions=tokens)
        return self.rope[F.pad(tokens, (0, N - tokens.numel()))][None, :, None], masks

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, loss_reduction: str = "mean",
                logits_at: Optional[torch.Tensor] = None, ragged: Optional[Ragged] = None):
        """logits_at (B,) or (B, k): only each row's logits at those indices of T (B, k, V), e.g. a
        prefill's last real token; the lm_head then skips the other positions. ragged (with a kv_cache):
        idx is a flat row (see Ragged), and logits_at holds indices into it, a row of them per output row."""
        B, T = idx.shape
        c = self.config
        rope, masks = self._attention_inputs(T, idx.device, kv_cache, ragged)
        x = self.embed(idx)
        if self.smear_gate is not None:
            x = self._smear(x, kv_cache, ragged)
        x0 = x
        recompute = self.activation_checkpointing == "full" and kv_cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x
            if self.x0_lambdas is not None:
                x = x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            args = (x, ve, rope, self.windows[i], kv_cache, masks)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            if i == c.n_layer // 2:   # nanochat keeps the residual right after this block for backout
                x_mid = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda * x_mid
        x = norm(x)
        if kv_cache is not None:
            kv_cache.pos += T if ragged is None else torch.bincount(ragged.row, minlength=kv_cache.batch_size)
        if logits_at is not None:   # ragged: indices into the flat row
            x = x[0, logits_at] if ragged is not None else x[torch.arange(B, device=x.device).unsqueeze(1), logits_at.reshape(B, -1)]

        V = c.vocab_size
        W = self.lm_head.weight[:V] if V != c.padded_vocab_size else self.lm_head.weight
        if type(self.lm_head) is not nn.Linear:   # converted (fp8): its own matmul over the padded rows
            logits = self.lm_head(x)[..., :V].float()
        elif (targets is not None and loss_reduction == "mean" and self.fused_loss and x.device.type == "cpu"
              and x.dtype == torch.float32 and not torch.compiler.is_compiling()):
            # CPU fp32 eager only: on GPU the elementwise passes are cheap, and compile fuses them itself
            return linear_softcap_cross_entropy(x.reshape(B * T, -1), W, targets.reshape(-1),
                                                c.softcap, self.loss_chunk)
        else:
            logits = F.linear(x, W).float()
        if c.softcap > 0:
            logits = c.softcap * torch.tanh(logits / c.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The normed token embeddings; also what a KV cache keeps of a row's last token (smear)."""
        return norm(self.transformer.wte(idx).float())   # bf16-stored tables (precision.py): fp32 residual

    def _smear(self, x: torch.Tensor, kv_cache: Optional[KVCache], ragged: Optional[Ragged] = None) -> torch.Tensor:
        """x[t] += λ·sigmoid(gate(x[t, :24]))·x[t-1]; position 0 of a sequence has no predecessor."""
        if ragged is not None:   # on the padded batch (cheap: elementwise), then back to the flat row
            n, pad = ragged.row.numel(), x.new_zeros(kv_cache.batch_size, ragged.width, x.size(-1))
            pad[ragged.row, ragged.col] = x[0, :n]
            return torch.cat([self._smear(pad, kv_cache)[ragged.row, ragged.col], x[0, n:]]).unsqueeze(0)
        g = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))   # (B, T, 1)
        if kv_cache is None:
            return torch.cat([x[:, :1], x[:, 1:] + g[:, 1:] * x[:, :-1]], dim=1)
        prev = torch.cat([kv_cache.last_x.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)
        has_prev = (kv_cache.pos.unsqueeze(1) + torch.arange(x.size(1), device=x.device)) > 0   # (B, T)
        kv_cache.last_x.copy_(x[:, -1])
        return x + (g * has_prev.unsqueeze(-1)) * prev

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: int = 42):
        """Simple single-row streaming generation with the KV cache (yields token ids). Its own sampling,
        not engine.py's: the Hugging Face export ships this module without the engine."""
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        cache = KVCache.for_model(self, 1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self(ids, kv_cache=cache)[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            ids = (torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng) if temperature > 0
                   else torch.argmax(logits, dim=-1, keepdim=True))
            yield int(ids.item())


def build_model(config: GPTConfig, device, seed: int) -> GPT:
    """Construct on the meta device (no memory, no init cost), materialize on `device`, init."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model
