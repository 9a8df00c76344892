"""The depth dial: every derived number of a run, in pure Python (no torch import).

`make_plan(cfg)` turns the validated config into a `Plan`: model shape, analytic
parameter and FLOP counts, batch and gradient accumulation, horizon, learning rates
and schedule lengths. The launcher prints it (`run.dry_run=true`), freezes it as
`plan.json`, and the workers build the model and optimizer from it, so the numbers a
user sees before a run are the numbers the run uses.

Two generations of nanochat's rules (see DESIGN.md section 4):
- seed (Dec 2025): n_embd = 64·depth, ~128-wide heads, 20 tokens/param of all params,
  AdamW LRs × (d/768)^-0.5, warmdown the last 20% to 0.
- modern (mid 2026): head_dim 128, width rounded up to a multiple of 128, 12 tokens per
  scaling param, batch size from a power law in the token budget, LR × sqrt(B/B_REF),
  weight decay 0.28·sqrt(B/B_REF)·(D_REF/D) on a cosine, 40 warmup steps, warmdown 65%.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from nanochat.config import Config, ConfigError, ModelConfig, TrainStageConfig

# Generation defaults for every "null means derive" knob.
GENERATIONS: dict[str, dict[str, Any]] = {
    "seed": dict(
        vocab_size=65536, rope_base=10000.0, value_embeds=False, window_pattern="L",
        resid_lambdas=False, x0_lambdas=False, smear=False, backout=False, qk_scale=1.0,
        pad_vocab_to=1, init_style="seed", rope_bf16=True, target_param_data_ratio=20.0, total_batch_size=524288,
        embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
        weight_decay=0.0, weight_decay_schedule="constant",
        warmup_ratio=0.0, warmup_steps=None, warmdown_ratio=0.2, final_lr_frac=0.0,
    ),
    "modern": dict(
        vocab_size=32768, rope_base=100000.0, value_embeds=True, window_pattern="SSSL",
        resid_lambdas=True, x0_lambdas=True, smear=True, backout=True, qk_scale=1.2,
        pad_vocab_to=64, init_style="modern", rope_bf16=False, target_param_data_ratio=12.0, total_batch_size=None,  # auto
        embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
        weight_decay=0.28, weight_decay_schedule="cosine",
        warmup_ratio=None, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05,
    ),
}
MODERN_REF_DEPTH = 12          # the modern rules are calibrated at d12 ...
MODERN_B_REF = 2 ** 19         # ... with this many tokens per step
MODERN_BATCH_EXPONENT = 0.383  # B ∝ D^0.383
MUON_MOMENTUM = (0.85, 0.95, 300)  # start, end, ramp steps
DEFAULT_DEVICE_BATCH = 32
VE_GATE_CHANNELS = 12       # nanochat 92d63d4: the value-embedding gate reads 12 channels
SMEAR_GATE_CHANNELS = 24


def default_short_window(sequence_len: int) -> int:
    """nanochat's short window (tokens left of the query): seq/4 rounded up to the 128 tile."""
    return -(-sequence_len // 4 // 128) * 128


@dataclass
class ModelShape:
    depth: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    sequence_len: int
    softcap: float
    rope_base: float
    value_embeds: bool
    window_pattern: str
    short_window: int
    resid_lambdas: bool
    x0_lambdas: bool
    smear: bool
    backout: bool
    qk_scale: float
    pad_vocab_to: int
    long_window: Optional[int] = None   # tokens left of the query an L layer sees; None = unlimited
    init_style: str = "seed"
    rope_bf16: bool = False             # RoPE tables rounded to bf16 (nanochat Dec 2025)

    def gpt_config_kwargs(self) -> dict:
        """Keyword arguments for nanochat.gpt.GPTConfig."""
        return dict(
            sequence_len=self.sequence_len, vocab_size=self.vocab_size, n_layer=self.n_layer,
            n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd, softcap=self.softcap,
            rope_base=self.rope_base, value_embeds=self.value_embeds,
            window_pattern=self.window_pattern, short_window=self.short_window,
            resid_lambdas=self.resid_lambdas, x0_lambdas=self.x0_lambdas, smear=self.smear,
            backout=self.backout, qk_scale=self.qk_scale, pad_vocab_to=self.pad_vocab_to,
            long_window=self.long_window, init_style=self.init_style, rope_bf16=self.rope_bf16,
        )


@dataclass
class Plan:
    generation: str
    model: ModelShape
    num_params: int
    num_embedding_params: int       # lookup tables (token + value embeddings): no matmul FLOPs
    num_scaling_params: int         # block matrices + lm_head
    flops_per_token: int
    world_size: int
    device_batch_size: int
    sequence_len: int
    total_batch_size: int           # tokens per optimizer step
    grad_accum_steps: int
    num_iterations: int
    horizon_source: str             # num_iterations | target_flops | target_param_data_ratio | none
    total_tokens: int
    total_flops: float
    tokens_per_param: float
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    weight_decay: float
    weight_decay_schedule: str
    lr_scale_dmodel: float          # (d/768)^-0.5 applied to AdamW groups
    lr_scale_batch: float           # sqrt(B/B_REF) (modern) or 1
    warmup_steps: int
    warmdown_steps: int
    final_lr_frac: float
    muon_momentum_start: float
    muon_momentum_end: float
    muon_momentum_steps: int
    notes: list = field(default_factory=list)
    device_batch_probe: Optional[dict] = None  # hardware.device_batch_size=auto: the probe's trials
    eval_tokens: Optional[int] = None          # validation tokens per pass
    source: Optional[str] = None               # the run this stage starts from (init_from)
    inherited: dict = field(default_factory=dict)  # plan key → where its value came from (source run)
    stage: dict = field(default_factory=dict)  # stage-specific derived values (mixture, packing, ...)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["model"] = ModelShape(**d["model"])
        return cls(**d)


# --------------------------------------------------------------------------- model shape

def _pick_heads(n_embd: int, head_dim: int) -> int:
    """Head count near n_embd/head_dim that divides n_embd with an even head size (RoPE)."""
    want = max(1, math.ceil(n_embd / head_dim))
    if n_embd % want == 0 and (n_embd // want) % 2 == 0:
        return want
    valid = [h for h in range(1, n_embd + 1) if n_embd % h == 0 and (n_embd // h) % 2 == 0]
    return min(valid, key=lambda h: (abs(n_embd / h - head_dim), -h))


def _default(value: Any, generation: str, key: str) -> Any:
    return GENERATIONS[generation][key] if value is None else value


def model_shape(m: ModelConfig, vocab_size: Optional[int] = None) -> ModelShape:
    """Depth (plus optional explicit overrides) → the full architecture."""
    gen = m.generation
    depth = m.depth
    if m.n_embd is not None:
        n_embd = m.n_embd
    elif gen == "modern":
        n_embd = math.ceil(depth * m.aspect_ratio / m.head_dim) * m.head_dim
    else:
        n_embd = depth * m.aspect_ratio
    n_head = m.n_head if m.n_head is not None else _pick_heads(n_embd, m.head_dim)
    if n_embd % n_head:
        raise ConfigError("model.n_head", n_head, f"choose a head count that divides n_embd={n_embd}",
                          "does not divide the width")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ConfigError("model.n_head", n_head, f"head_dim={head_dim} must be even for RoPE; pick another n_head",
                          "odd head size")
    n_kv_head = m.n_kv_head if m.n_kv_head is not None else n_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ConfigError("model.n_kv_head", n_kv_head,
                          f"use a divisor of n_head={n_head} (GQA groups query heads evenly)", "invalid GQA")
    vocab = m.vocab_size or vocab_size or GENERATIONS[gen]["vocab_size"]
    pad = _default(m.pad_vocab_to, gen, "pad_vocab_to")
    padded = math.ceil(vocab / pad) * pad
    pattern = _default(m.window_pattern, gen, "window_pattern").upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ConfigError("model.window_pattern", pattern, "use a string of S (short) and L (long), e.g. SSSL",
                          "invalid window pattern")
    short = m.short_window if m.short_window is not None else default_short_window(m.sequence_len)
    # nanochat's modern L layers are FlashAttention windows of sequence_len tokens to the left;
    # the seed generation had no windows at all
    long = m.sequence_len if gen == "modern" else None
    return ModelShape(
        depth=depth, n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
        head_dim=head_dim, vocab_size=vocab, padded_vocab_size=padded, sequence_len=m.sequence_len,
        softcap=m.softcap, rope_base=float(_default(m.rope_base, gen, "rope_base")),
        value_embeds=bool(_default(m.value_embeds, gen, "value_embeds")), window_pattern=pattern,
        short_window=short, resid_lambdas=bool(_default(m.resid_lambdas, gen, "resid_lambdas")),
        x0_lambdas=bool(_default(m.x0_lambdas, gen, "x0_lambdas")), smear=bool(_default(m.smear, gen, "smear")),
        backout=bool(_default(m.backout, gen, "backout")), qk_scale=float(_default(m.qk_scale, gen, "qk_scale")),
        pad_vocab_to=pad, long_window=long, init_style=GENERATIONS[gen]["init_style"],
        rope_bf16=GENERATIONS[gen]["rope_bf16"],
    )


def layer_windows(s: ModelShape) -> list[int]:
    """Keys per query for the FLOP count, per layer: min(tokens to the left, sequence_len).

    The pattern tiles over layers and the last layer is always L (as nanochat's estimate_flops).
    """
    long = s.sequence_len if s.long_window is None else min(s.long_window, s.sequence_len)
    wins = []
    for i in range(s.n_layer):
        ch = s.window_pattern[i % len(s.window_pattern)]
        wins.append(long if ch == "L" else min(s.short_window, s.sequence_len))
    wins[-1] = long
    return wins


def has_value_embed(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def param_counts(s: ModelShape) -> dict[str, int]:
    """Analytic parameter counts by kind (must equal the built nanochat.gpt.GPT)."""
    d, V, L = s.n_embd, s.padded_vocab_size, s.n_layer
    kvd = s.n_kv_head * s.head_dim
    per_layer = d * d + 2 * d * kvd + d * d + 8 * d * d  # q, k, v, proj, mlp fc + proj
    matrices = L * per_layer
    wte = V * d
    lm_head = d * V
    n_ve = sum(has_value_embed(i, L) for i in range(L)) if s.value_embeds else 0
    value_embeds = n_ve * V * kvd
    gates = n_ve * VE_GATE_CHANNELS * s.n_kv_head
    scalars = (L if s.resid_lambdas else 0) + (L if s.x0_lambdas else 0) + (1 if s.backout else 0)
    smear = (SMEAR_GATE_CHANNELS + 1) if s.smear else 0
    total = wte + matrices + lm_head + value_embeds + gates + scalars + smear
    return dict(total=total, wte=wte, value_embeds=value_embeds, matrices=matrices, lm_head=lm_head,
                gates=gates, scalars=scalars + smear, embedding=wte + value_embeds,
                scaling=matrices + lm_head + gates)  # gates live in the blocks


def param_breakdown(s: ModelShape) -> dict[str, int]:
    """Parameters by role, as scaling-law studies count them (recorded in pretrain's result.json).

    wte (token embedding), value_embeds, lm_head, matrices (everything inside the transformer
    blocks, value-embedding gates included), scalars (lambdas, smear, backout: outside the blocks),
    total; and the two other counts a fit may use: non_embedding = total − lookup tables, and
    matmul = matrices + lm_head (nanochat's "scaling params": the weights every token multiplies).
    """
    c = param_counts(s)
    matrices = c["matrices"] + c["gates"]
    out = dict(wte=c["wte"], value_embeds=c["value_embeds"], lm_head=c["lm_head"], matrices=matrices,
               scalars=c["scalars"], total=c["total"])
    out["non_embedding"] = c["total"] - c["wte"] - c["value_embeds"]
    out["matmul"] = matrices + c["lm_head"]
    return out


def flops_per_token(s: ModelShape) -> int:
    """6·(N − lookup tables − scalars) + attention 12·H·head_dim·window summed over layers.

    Scalars (resid/x0 lambdas, smear gate + lambda, backout) do no matmul: nanochat leaves them out.
    """
    counts = param_counts(s)
    dense = counts["total"] - counts["embedding"] - counts["scalars"]
    attn = sum(12 * s.n_head * s.head_dim * w for w in layer_windows(s))
    return 6 * dense + attn


# --------------------------------------------------------------------------- batch + horizon

def modern_auto_batch(scaling_params: int, ref_scaling_params: int) -> int:
    """B = 2^round(log2(B_REF · (D/D_REF)^0.383)); with a fixed tokens/param ratio D/D_REF = N/N_REF."""
    ratio = scaling_params / ref_scaling_params
    return 2 ** round(math.log2(MODERN_B_REF * ratio ** MODERN_BATCH_EXPONENT))


def _ref_shape(s: ModelShape, m: ModelConfig) -> ModelShape:
    ref_cfg = ModelConfig(**{**asdict(m), "depth": MODERN_REF_DEPTH, "n_embd": None, "n_head": None,
                             "n_kv_head": None})
    return model_shape(ref_cfg, s.vocab_size)


def valid_device_batches(total: int, seq_len: int, world: int, limit: int = 1024) -> list[int]:
    return [b for b in range(1, limit + 1) if total % (b * seq_len * world) == 0]


def grad_accum(total: int, device_batch: int, seq_len: int, world: int) -> int:
    per_step = device_batch * seq_len * world
    if total % per_step:
        valid = valid_device_batches(total, seq_len, world)
        hint = f"use hardware.device_batch_size in {valid[-6:]}" if valid else \
            f"make stage.total_batch_size a multiple of sequence_len × world = {seq_len * world}"
        raise ConfigError(
            "stage.total_batch_size", total,
            f"{hint} (total_batch_size must be a multiple of device_batch_size × sequence_len × world)",
            f"does not divide into device_batch_size={device_batch} × sequence_len={seq_len} × "
            f"world_size={world} = {per_step} tokens per micro-step")
    return total // per_step


def power_of_two_batches(total: int, seq_len: int, world: int) -> list[int]:
    """Power-of-two device batches whose micro-step divides `total` tokens, largest first."""
    per = seq_len * world
    if total % per:
        return []
    most = total // per          # grad_accum 1
    out, b = [], 1
    while b <= most and most % b == 0:
        out.append(b)
        b *= 2
    return out[::-1]


def _table_batch(cfg: Config, depth: int) -> int:
    table = {int(k): int(v) for k, v in (cfg.hardware.device_batch_table or {}).items()}
    fits = [k for k in table if k >= depth]
    return table[min(fits)] if fits else (table[max(table)] if table else DEFAULT_DEVICE_BATCH)


def _device_batch(cfg: Config, depth: int) -> int:
    hw = cfg.hardware
    if hw.device_batch_size is not None and hw.device_batch_size != "auto":
        return hw.device_batch_size
    return _table_batch(cfg, depth)


def auto_batch_candidates(cfg: Config, total: int, seq: int, world: int) -> list[int]:
    """What hardware.device_batch_size=auto may pick (largest first); a ConfigError if nothing can."""
    cands = power_of_two_batches(total, seq, world)
    if not cands:
        raise ConfigError("hardware.device_batch_size", "auto",
                          f"make stage.total_batch_size a multiple of sequence_len × world = {seq * world}, "
                          "or set hardware.device_batch_size to an integer",
                          f"no power-of-two device batch divides total_batch_size={total}")
    return cands


def make_plan(cfg: Config, vocab_size: Optional[int] = None, probe: Optional[dict] = None) -> Plan:
    """All derived numbers for `cfg`; `vocab_size` is the tokenizer's when model.vocab_size is null.

    probe: the result of nanochat.batch_size.find_device_batch when hardware.device_batch_size=auto
    (the launcher runs it on a real run); without it an auto plan shows a placeholder from the table.
    """
    m = cfg.model
    gen = m.generation
    g = GENERATIONS[gen]
    shape = model_shape(m, vocab_size)
    counts = param_counts(shape)
    fpt = flops_per_token(shape)
    world = cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    st = cfg.stage if isinstance(cfg.stage, TrainStageConfig) else TrainStageConfig(name=cfg.stage.name)
    seq = st.max_seq_len or shape.sequence_len
    notes: list[str] = []

    ratio = st.target_param_data_ratio if st.target_param_data_ratio is not None else g["target_param_data_ratio"]
    # The token budget scales with all params (seed) or with the scaling params (modern).
    budget_params = counts["total"] if gen == "seed" else counts["scaling"]

    if st.total_batch_size is not None:
        total = st.total_batch_size
    elif gen == "modern":
        total = modern_auto_batch(counts["scaling"], param_counts(_ref_shape(shape, m))["scaling"])
        notes.append(f"auto batch: 2^{int(math.log2(total))} tokens")
    else:
        total = g["total_batch_size"]

    dbs = _device_batch(cfg, m.depth)
    if cfg.hardware.device_batch_size == "auto":
        cands = auto_batch_candidates(cfg, total, seq, world)
        if probe is not None:
            dbs = int(probe["device_batch_size"])
            notes.append(f"device_batch_size auto → {dbs} (probe: {probe_summary(probe)})")
        else:
            dbs = next((b for b in cands if b <= dbs), cands[-1])
            notes.append(f"device_batch_size auto: probed on a real run (candidates {cands}); "
                         f"{dbs} shown until then")
    if dbs * seq * world > total:  # tiny runs: shrink the micro-batch instead of failing
        valid = valid_device_batches(total, seq, world, limit=dbs)
        if valid:
            notes.append(f"device_batch_size {dbs} → {valid[-1]} to fit total_batch_size={total}")
            dbs = valid[-1]
    accum = grad_accum(total, dbs, seq, world)

    if st.num_iterations is not None and st.num_iterations > 0:
        steps, source = st.num_iterations, "num_iterations"
    elif st.target_flops is not None and st.target_flops > 0:
        steps, source = round(st.target_flops / (fpt * total)), "target_flops"
    elif ratio and ratio > 0:
        steps, source = int(ratio * budget_params // total), "target_param_data_ratio"
    else:
        raise ConfigError("stage.num_iterations", st.num_iterations,
                          "set stage.num_iterations, stage.target_flops or stage.target_param_data_ratio",
                          "no training horizon")

    dscale = (shape.n_embd / 768) ** -0.5
    bscale = math.sqrt(total / MODERN_B_REF) if gen == "modern" else 1.0
    def lr(key: str, adam: bool) -> float:
        v = getattr(st, key)
        return v if v is not None else g[key] * (dscale if adam else 1.0) * bscale

    wd = st.weight_decay
    if wd is None:
        wd = g["weight_decay"]
        if gen == "modern":
            ref_tokens = ratio * param_counts(_ref_shape(shape, m))["scaling"]
            wd = wd * bscale * (ref_tokens / max(1.0, ratio * counts["scaling"]))

    warmup_ratio = st.warmup_ratio if st.warmup_ratio is not None else g["warmup_ratio"]
    if st.warmup_steps is not None:
        warmup = st.warmup_steps
    elif warmup_ratio is not None:
        warmup = round(warmup_ratio * steps)
    else:
        warmup = g["warmup_steps"] or 0
    warmup = min(warmup, steps)
    wd_ratio = st.warmdown_ratio if st.warmdown_ratio is not None else g["warmdown_ratio"]
    warmdown = min(round(wd_ratio * steps), steps - warmup)
    final = st.final_lr_frac if st.final_lr_frac is not None else g["final_lr_frac"]

    return Plan(
        generation=gen, model=shape, num_params=counts["total"], num_embedding_params=counts["embedding"],
        num_scaling_params=counts["scaling"], flops_per_token=fpt, world_size=world,
        device_batch_size=dbs, sequence_len=seq, total_batch_size=total, grad_accum_steps=accum,
        num_iterations=steps, horizon_source=source, total_tokens=steps * total,
        total_flops=float(fpt) * total * steps, tokens_per_param=steps * total / counts["total"],
        embedding_lr=lr("embedding_lr", True), unembedding_lr=lr("unembedding_lr", True),
        matrix_lr=lr("matrix_lr", False), scalar_lr=lr("scalar_lr", False),
        weight_decay=wd, weight_decay_schedule=g["weight_decay_schedule"],
        lr_scale_dmodel=dscale, lr_scale_batch=bscale, warmup_steps=warmup, warmdown_steps=warmdown,
        final_lr_frac=final, muon_momentum_start=MUON_MOMENTUM[0], muon_momentum_end=MUON_MOMENTUM[1],
        muon_momentum_steps=MUON_MOMENTUM[2], notes=notes,
        device_batch_probe=probe if cfg.hardware.device_batch_size == "auto" else None,
        eval_tokens=getattr(st, "eval_tokens", None),
    )


def probe_summary(probe: dict) -> str:
    """'64 OOM, 32 fits (11.2 GiB peak)' from a probe result."""
    parts = []
    for t in probe.get("trials", []):
        if t["fits"]:
            peak = f" ({t['peak_gib']:.2f} GiB peak)" if t.get("peak_gib") is not None else ""
            parts.append(f"{t['batch']} fits{peak}")
        else:
            parts.append(f"{t['batch']} {t['reason']}")
    return ", ".join(parts)


def plan_rows(p: Plan) -> list[tuple[str, str]]:
    """(name, value) rows for the dry-run table."""
    s = p.model
    def n(x: float) -> str:
        return f"{x:,.0f}" if abs(x) < 1e15 else f"{x:.3e}"
    rows = [
        ("generation", p.generation),
        ("depth / width / heads", f"{s.depth} / {s.n_embd} / {s.n_head}×{s.head_dim} (kv {s.n_kv_head})"),
        ("vocab (padded)", f"{s.vocab_size:,} ({s.padded_vocab_size:,})"),
        ("sequence_len", str(p.sequence_len)),
        ("window pattern", s.window_pattern),
        ("toggles", ", ".join(k for k in ("value_embeds", "resid_lambdas", "x0_lambdas", "smear", "backout")
                               if getattr(s, k)) or "none"),
        ("params", n(p.num_params)),
        ("scaling params", n(p.num_scaling_params)),
        ("FLOPs / token", n(p.flops_per_token)),
        ("world size", str(p.world_size)),
        ("batch: device × seq × world × accum", f"{p.device_batch_size} × {p.sequence_len} × {p.world_size} × "
                                                 f"{p.grad_accum_steps} = {p.total_batch_size:,} tokens"),
        ("iterations", f"{p.num_iterations:,} (from {p.horizon_source})"),
        ("tokens", n(p.total_tokens)),
        ("tokens / param", f"{p.tokens_per_param:.2f}"),
        ("total FLOPs", f"{p.total_flops:.3e}"),
        ("LR embed / unembed / matrix / scalar",
         f"{p.embedding_lr:.4g} / {p.unembedding_lr:.4g} / {p.matrix_lr:.4g} / {p.scalar_lr:.4g}"),
        ("weight decay", f"{p.weight_decay:.4g} ({p.weight_decay_schedule})"),
        ("warmup / warmdown steps", f"{p.warmup_steps} / {p.warmdown_steps} → {p.final_lr_frac}"),
    ]
    rows += [("note", x) for x in p.notes]
    return rows
