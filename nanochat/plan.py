"""The depth dial: every derived number of a run, in pure Python (no torch import).

`make_plan(cfg)` turns the validated config into a `Plan`: model shape, analytic
parameter and FLOP counts, batch and gradient accumulation, horizon, learning rates
and schedule lengths. The launcher prints it (`run.dry_run=true`), freezes it as
`plan.json`, and the workers build the model and optimizer from it, so the numbers a
user sees before a run are the numbers the run uses.

Two generations of nanochat's rules (tests/test_plan.py pins their published numbers):
- seed (Dec 2025): n_embd = 64·depth, ~128-wide heads, 20 tokens/param of all params,
  AdamW LRs × (d/768)^-0.5, warmdown the last 20% to 0.
- modern (mid 2026): head_dim 128, width rounded up to a multiple of 128, 12 tokens per
  scaling param, batch size from a power law in the token budget, LR × sqrt(B/B_REF),
  weight decay 0.28·sqrt(B/B_REF)·(D_REF/D) on a cosine, 40 warmup steps, warmdown 65%.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from nanochat.config import Config, ConfigError, ModelConfig, TrainStageConfig
from nanochat.shapes import (SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS, default_short_window,
                             flops_per_token, has_value_embed, param_counts)

# Generation defaults for every "null means derive" knob.
GENERATIONS: dict[str, dict[str, Any]] = {
    "seed": dict(
        vocab_size=65536, rope_base=10000.0, value_embeds=False, window_pattern="L",
        resid_lambdas=False, x0_lambdas=False, smear=False, backout=False, qk_scale=1.0,
        pad_vocab_to=1, init_style="seed", rope_bf16=True, target_param_data_ratio=20.0, total_batch_size=524288,
        embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5, optimizer="seed",
        weight_decay=0.0, weight_decay_schedule="constant",
        warmup_ratio=0.0, warmup_steps=None, warmdown_ratio=0.2, final_lr_frac=0.0,
    ),
    "modern": dict(
        vocab_size=32768, rope_base=100000.0, value_embeds=True, window_pattern="SSSL",
        resid_lambdas=True, x0_lambdas=True, smear=True, backout=True, qk_scale=1.2,
        pad_vocab_to=64, init_style="modern", rope_bf16=False, target_param_data_ratio=12.0, total_batch_size=None,  # auto
        embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, optimizer="modern",
        weight_decay=0.28, weight_decay_schedule="cosine",
        warmup_ratio=None, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05,
    ),
}
MODERN_REF_DEPTH = 12          # the modern rules are calibrated at d12 ...
MODERN_B_REF = 2 ** 19         # ... with this many tokens per step
MODERN_BATCH_EXPONENT = 0.383  # B ∝ D^0.383
# The optimizer of each generation (nanochat/optim.py reads these keys; `stage.<key>` overrides one).
# seed = nanochat d575940 (Dec 2025): plain Muon (Newton–Schulz), one AdamW setting for every group.
# modern = nanochat 92d63d4: GPT.setup_optimizer's groups and base_train's momentum schedule.
# Betas null → [stage.adam_beta1, stage.adam_beta2]; weight decay null → 0.
OPTIMIZER_RECIPES: dict[str, dict[str, Any]] = {
    "seed": dict(
        muon_ns="newton_schulz", muon_ns_safety=None, muon_equilibrate=False, muon_renorm=False, normuon=False,
        muon_beta2=None, cautious_wd=False, muon_momentum_start=0.85, muon_momentum_end=0.95,
        muon_momentum_ramp=300, muon_momentum_final=None,
        lm_head_betas=None, lm_head_wd=None, embedding_betas=None, embedding_wd=None, value_embed_lr_frac=1.0,
        value_embed_betas=None, value_embed_wd=None, resid_lr_frac=0.01, resid_wd=None, x0_betas=None, gate_lr=None,
    ),
    "modern": dict(
        muon_ns="polar_express", muon_ns_safety=1.01, muon_equilibrate=True, muon_renorm=True, normuon=True,
        muon_beta2=0.9, cautious_wd=True, muon_momentum_start=0.85, muon_momentum_end=0.97,
        muon_momentum_ramp=400, muon_momentum_final=0.90,
        lm_head_betas=[0.8, 0.96], lm_head_wd=0.01, embedding_betas=[0.8, 0.995], embedding_wd=0.001,
        value_embed_lr_frac=0.5, value_embed_betas=[0.8, 0.995], value_embed_wd=0.01, resid_lr_frac=0.01,
        resid_wd=0.05, x0_betas=[0.96, 0.95], gate_lr=0.2,
    ),
}
# recipe keys that only mean something when the model has that parameter (ModelShape field)
RECIPE_NEEDS = {"value_embed_lr_frac": "value_embeds", "value_embed_betas": "value_embeds",
                "value_embed_wd": "value_embeds", "resid_lr_frac": "resid_lambdas", "resid_wd": "resid_lambdas",
                "x0_betas": "x0_lambdas", "gate_lr": "smear"}
DEFAULT_DEVICE_BATCH = 32


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
        """Keyword arguments for nanochat.gpt.GPTConfig: every field but the ones derived from the others."""
        return {k: v for k, v in asdict(self).items() if k not in ("depth", "head_dim", "padded_vocab_size")}


@dataclass
class ChatStagePlan:
    """What nanochat/chat_plan.py derives for a chat stage (mid, sft) or rl beyond the shared numbers."""
    tokenizer: Optional[str] = None          # the source run's tokenizer
    source_stage: Optional[str] = None
    base_lrs: dict = field(default_factory=dict)   # the LRs before × lr_frac
    mixture: list = field(default_factory=list)    # mid / sft: the training mixture's task specs
    conversations: int = 0
    packing: Optional[str] = None            # stream | bestfit | pad (nanochat/chat_data.py)
    examples_per_step: Optional[int] = None  # whole conversations per step (seed sft), else None
    lr_frac: Optional[float] = None
    load_optimizer: bool = False             # warm-start the optimizer from the source checkpoint
    chatcore_every: int = -1
    chatcore_max_cat: Optional[int] = None   # ChatCORE problems per categorical task (sized to the run)
    task: Optional[str] = None               # rl: the task with a reward


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
    muon_momentum_final: Optional[float] = None  # modern: end → this through the LR warmdown
    optimizer: str = "seed"         # the optimizer recipe (OPTIMIZER_RECIPES) the settings start from
    optim: dict = field(default_factory=dict)  # resolved recipe keys → nanochat.optim.build_optimizer(settings=)
    grad_clip: float = 0.0          # global gradient-norm clip inside the optimizer step (0 = off)
    fp8: Optional[str] = None       # model.fp8: tensorwise | rowwise training matmuls (torchao)
    fp8_layers: int = 0             # how many Linear layers that converts (fp8_layers)
    eval_tokens: Optional[int] = None          # validation tokens per pass
    source: Optional[str] = None               # the run this stage starts from (init_from)
    inherited: dict = field(default_factory=dict)  # plan key → where its value came from (source run)
    stage: Optional[ChatStagePlan] = None      # chat stages and rl: what their plan derived besides

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        names = {f.name for f in fields(ChatStagePlan)}   # a key an older plan.json has and this code does not: dropped
        stage = ChatStagePlan(**{k: v for k, v in d["stage"].items() if k in names}) if d.get("stage") else None
        return cls(**{**d, "model": ModelShape(**d["model"]), "stage": stage})


# --------------------------------------------------------------------------- model shape

def _pick_heads(n_embd: int, head_dim: int) -> int:
    """Head count near n_embd/head_dim that divides n_embd with an even head size (RoPE)."""
    want = max(1, math.ceil(n_embd / head_dim))
    if n_embd % want == 0 and (n_embd // want) % 2 == 0:
        return want
    # divisors in pairs up to sqrt(n_embd): a fuzzed depth can make n_embd huge
    divisors = {d for i in range(1, math.isqrt(n_embd) + 1) if n_embd % i == 0 for d in (i, n_embd // i)}
    valid = [h for h in divisors if (n_embd // h) % 2 == 0]
    return min(valid, key=lambda h: (abs(n_embd / h - head_dim), -h))


# model.<key>: null → the generation's value
GENERATION_KEYS = ("rope_base", "value_embeds", "resid_lambdas", "x0_lambdas", "smear", "backout", "qk_scale",
                   "pad_vocab_to")


def model_shape(m: ModelConfig, vocab_size: Optional[int] = None) -> ModelShape:
    """Depth (plus optional explicit overrides) → the full architecture."""
    gen, depth, g = m.generation, m.depth, GENERATIONS[m.generation]
    n_embd = m.n_embd if m.n_embd is not None else depth * m.aspect_ratio if gen == "seed" else \
        math.ceil(depth * m.aspect_ratio / m.head_dim) * m.head_dim
    if n_embd % 2:   # RoPE rotates pairs of channels: no head split of an odd width has an even head size
        key, value = ("model.n_embd", m.n_embd) if m.n_embd is not None else \
            ("model.head_dim", m.head_dim) if gen == "modern" else ("model.aspect_ratio", m.aspect_ratio)
        raise ConfigError(key, value, f"make the width even: set model.n_embd to an even number, or an even "
                          f"model.{'head_dim' if gen == 'modern' else 'aspect_ratio'}",
                          f"the width n_embd={n_embd} (model.depth={depth}) is odd, so no head has an even size")
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
    # in the type of the generation's value (a YAML 10000 is the float rope_base 10000.0)
    toggles = {k: type(g[k])(g[k] if getattr(m, k) is None else getattr(m, k)) for k in GENERATION_KEYS}
    vocab = m.vocab_size or vocab_size or g["vocab_size"]
    padded = math.ceil(vocab / toggles["pad_vocab_to"]) * toggles["pad_vocab_to"]
    pattern = (g["window_pattern"] if m.window_pattern is None else m.window_pattern).upper()
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
        softcap=m.softcap, window_pattern=pattern, short_window=short, long_window=long,
        init_style=g["init_style"], rope_bf16=g["rope_bf16"], **toggles)


def param_breakdown(s: ModelShape) -> dict[str, int]:
    """Parameters by role, as scaling-law studies count them (recorded in pretrain's result.json).

    wte (token embedding), value_embeds, lm_head, matrices (everything inside the transformer
    blocks, value-embedding gates included), scalars (lambdas, smear, backout: outside the blocks),
    total; and the two other counts a fit may use: non_embedding = total − lookup tables, and
    matmul = matrices + lm_head (nanochat's "scaling params": the weights every token multiplies).
    """
    c = param_counts(s)
    return dict(wte=c["embedding"], value_embeds=c["value_embed"], lm_head=c["lm_head"], matrices=c["matrix"],
                scalars=c["resid_scalar"] + c["x0_scalar"] + c["gate_scalar"], total=c["total"],
                non_embedding=c["total"] - c["lookup"], matmul=c["scaling"])


def linear_layers(s: ModelShape) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the built GPT: name → (in_features, out_features)."""
    d, kvd = s.n_embd, s.n_kv_head * s.head_dim
    out: dict[str, tuple[int, int]] = {}
    for i in range(s.n_layer):
        a, mlp = f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"
        out.update({f"{a}.c_q": (d, s.n_head * s.head_dim), f"{a}.c_k": (d, kvd), f"{a}.c_v": (d, kvd),
                    f"{a}.c_proj": (s.n_head * s.head_dim, d), f"{mlp}.c_fc": (d, 4 * d), f"{mlp}.c_proj": (4 * d, d)})
        if s.value_embeds and has_value_embed(i, s.n_layer):
            out[f"{a}.ve_gate"] = (VE_GATE_CHANNELS, s.n_kv_head)
    out["lm_head"] = (d, s.padded_vocab_size)
    if s.smear:
        out["smear_gate"] = (SMEAR_GATE_CHANNELS, 1)
    return out


def fp8_layers(s: ModelShape) -> list[str]:
    """The Linear layers fp8 training converts: nanochat 92d63d4's rule (precision.fp8_filter) on the
    analytic shapes: both dims divisible by 16, the smaller at least 128."""
    return [n for n, (i, o) in linear_layers(s).items() if i % 16 == 0 and o % 16 == 0 and min(i, o) >= 128]


# --------------------------------------------------------------------------- batch + horizon

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
    return [2 ** i for i in range((most & -most).bit_length() - 1, -1, -1)]   # up to most's lowest set bit


def _device_batch(cfg: Config, depth: int) -> int:
    """hardware.device_batch_size, else the table's entry for the smallest depth >= this one (else its largest)."""
    hw = cfg.hardware
    if hw.device_batch_size is not None and hw.device_batch_size != "auto":
        return hw.device_batch_size
    table = {int(k): int(v) for k, v in (hw.device_batch_table or {}).items()}
    return table[min((k for k in table if k >= depth), default=max(table))] if table else DEFAULT_DEVICE_BATCH


def auto_batch_candidates(total: int, seq: int, world: int) -> list[int]:
    """What hardware.device_batch_size=auto may pick (largest first); a ConfigError if nothing can."""
    cands = power_of_two_batches(total, seq, world)
    if not cands:
        raise ConfigError("hardware.device_batch_size", "auto",
                          f"make stage.total_batch_size a multiple of sequence_len × world = {seq * world}, "
                          "or set hardware.device_batch_size to an integer",
                          f"no power-of-two device batch divides total_batch_size={total}")
    return cands


def optimizer_settings(st: TrainStageConfig, generation: str, shape: ModelShape) -> tuple[str, dict]:
    """(recipe name, every recipe key resolved): stage.<key> over OPTIMIZER_RECIPES[stage.optimizer or
    the generation's]. A key set for a parameter this model lacks, or for a refinement that is off,
    is a ConfigError naming the key and the fix."""
    name = st.optimizer or GENERATIONS[generation]["optimizer"]
    if name not in OPTIMIZER_RECIPES:
        raise ConfigError("stage.optimizer", name, f"use one of: {', '.join(OPTIMIZER_RECIPES)} (or null for "
                          f"model.generation's)", "unknown optimizer recipe")
    out = {}
    for key, default in OPTIMIZER_RECIPES[name].items():
        given = getattr(st, key, None)
        if given is not None and key in RECIPE_NEEDS and not getattr(shape, RECIPE_NEEDS[key]):
            raise ConfigError(f"stage.{key}", given, f"drop it, or turn the parameter on (model.{RECIPE_NEEDS[key]}"
                              f"=true / model.generation=modern)", f"this model has no {RECIPE_NEEDS[key]}")
        value = given if given is not None else default   # null: betas → stage.adam_beta1/2, weight decay → 0
        out[key] = value if value is not None else [st.adam_beta1, st.adam_beta2] if key.endswith("_betas") else \
            0.0 if key.endswith("_wd") else None
    for key in ("lm_head_betas", "embedding_betas", "value_embed_betas", "x0_betas"):
        b = out[key]
        if b is not None and (len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)):
            raise ConfigError(f"stage.{key}", b, "use two numbers in [0, 1), e.g. [0.8, 0.95]", "invalid betas")
    if out["muon_ns"] not in ("newton_schulz", "polar_express"):
        raise ConfigError("stage.muon_ns", out["muon_ns"], "use newton_schulz or polar_express", "unknown method")
    if st.muon_ns_safety is not None and out["muon_ns"] != "polar_express":
        raise ConfigError("stage.muon_ns_safety", st.muon_ns_safety, "drop it, or set stage.muon_ns=polar_express",
                          "only Polar Express scales its input by a safety factor")
    if st.muon_beta2 is not None and not out["normuon"]:
        raise ConfigError("stage.muon_beta2", st.muon_beta2, "drop it, or set stage.normuon=true",
                          "NorMuon is off, so there is no second moment")
    if out["muon_beta2"] is not None and not 0 <= out["muon_beta2"] < 1:
        raise ConfigError("stage.muon_beta2", out["muon_beta2"], "use a number in [0, 1), e.g. 0.9", "out of range")
    if any(v is not None and not 0 <= v < 1 for v in (out[f"muon_momentum_{k}"] for k in ("start", "end", "final"))):
        raise ConfigError("stage.muon_momentum_start", out["muon_momentum_start"],
                          "Muon momenta (start, end, final) must be in [0, 1)", "out of range")
    if out["muon_momentum_ramp"] < 0:
        raise ConfigError("stage.muon_momentum_ramp", out["muon_momentum_ramp"], "use 0 or more steps", "out of range")
    return name, out


def adamw_group_settings(embedding_lr: float, unembedding_lr: float, scalar_lr: float, settings: dict,
                         adam_betas=(0.8, 0.95), default_wd: float = 0.0) -> dict[str, dict]:
    """Each AdamW group's lr, betas and weight decay (GPT.param_groups names) from the base LRs and the
    recipe keys; unset keys → adam_betas / default_wd. nanochat.optim.build_optimizer builds from this,
    the dry run prints it."""
    s = {k: v for k, v in settings.items() if v is not None}
    # a group's betas and weight decay: the recipe's `<prefix>_betas` / `<prefix>_wd`, where it has one
    group = lambda prefix, lr: dict(lr=lr, betas=tuple(s.get(f"{prefix}_betas", adam_betas)),
                                    weight_decay=s.get(f"{prefix}_wd", default_wd))
    return {"embedding": group("embedding", embedding_lr),
            "value_embed": group("value_embed", embedding_lr * s.get("value_embed_lr_frac", 1.0)),
            "lm_head": group("lm_head", unembedding_lr),
            "resid_scalar": group("resid", scalar_lr * s.get("resid_lr_frac", 0.01)),
            "x0_scalar": group("x0", scalar_lr),
            "gate_scalar": group("gate", s.get("gate_lr", scalar_lr))}


def make_plan(cfg: Config, vocab_size: Optional[int] = None, probe: Optional[dict] = None) -> Plan:
    """All derived numbers for `cfg`; `vocab_size` is the tokenizer's when model.vocab_size is null.

    probe: the result of nanochat.batch_size.find_device_batch when hardware.device_batch_size=auto
    (the launcher runs it on a real run); without it an auto plan shows a placeholder from the table.
    """
    m = cfg.model
    gen, g = m.generation, GENERATIONS[m.generation]
    shape = model_shape(m, vocab_size)
    counts, fpt = param_counts(shape), flops_per_token(shape)
    world = cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    st = cfg.stage if isinstance(cfg.stage, TrainStageConfig) else \
        TrainStageConfig(name=cfg.stage.name, init_from=cfg.stage.init_from)
    seq = st.max_seq_len or shape.sequence_len
    notes: list[str] = []

    given = lambda key: getattr(st, key) if getattr(st, key) is not None else g[key]  # else the generation's
    ratio = given("target_param_data_ratio")
    # The token budget scales with all params (seed) or with the scaling params (modern).
    budget_params = counts["total"] if gen == "seed" else counts["scaling"]
    # the modern rules' reference: this model's scaling params at MODERN_REF_DEPTH
    ref_scaling = lambda: param_counts(model_shape(replace(m, depth=MODERN_REF_DEPTH, n_embd=None, n_head=None,
                                                           n_kv_head=None), shape.vocab_size))["scaling"]

    total = given("total_batch_size")
    if total is None:   # modern auto: B = 2^round(log2(B_REF · (D/D_REF)^0.383)), D/D_REF = N/N_REF at a fixed ratio
        total = 2 ** round(math.log2(MODERN_B_REF * (counts["scaling"] / ref_scaling()) ** MODERN_BATCH_EXPONENT))
        notes.append(f"auto batch: 2^{int(math.log2(total))} tokens")

    dbs = _device_batch(cfg, m.depth)
    if cfg.hardware.device_batch_size == "auto":
        cands = auto_batch_candidates(total, seq, world)
        if probe is not None:
            dbs = int(probe["device_batch_size"])
            peak = lambda t: f" ({t['peak_gib']:.2f} GiB peak)" if t.get("peak_gib") is not None else ""
            trials = ", ".join(f"{t['batch']} fits{peak(t)}" if t["fits"] else f"{t['batch']} {t['reason']}"
                               for t in probe.get("trials", []))   # '64 OOM, 32 fits (11.2 GiB peak)'
            notes.append(f"device_batch_size auto → {dbs} (probe: {trials})")
        else:
            dbs = next((b for b in cands if b <= dbs), cands[-1])
            notes.append(f"device_batch_size auto: probed on a real run (candidates {cands}); "
                         f"{dbs} shown until then")
    if dbs * seq * world > total:  # tiny runs: shrink the micro-batch instead of failing
        valid = valid_device_batches(total, seq, world, limit=min(dbs, 1024))   # a scan: bounded
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
    lr = lambda key, adam: getattr(st, key) if getattr(st, key) is not None else \
        g[key] * (dscale if adam else 1.0) * bscale   # AdamW LRs scale with the width, all with the batch (modern)

    wd = given("weight_decay")
    if st.weight_decay is None and gen == "modern":
        wd = wd * bscale * (ratio * ref_scaling() / max(1.0, ratio * counts["scaling"]))

    warmup, warmdown = lr_schedule(steps, st.warmup_steps, given("warmup_ratio"), given("warmdown_ratio"),
                                   g["warmup_steps"] or 0)
    optimizer, optim = optimizer_settings(st, gen, shape)
    # a stage that starts from no run trains a fresh model, as nanochat's base_train: the one stage where
    # nanochat converts Linear layers to fp8 and (d575940's base_train, not its mid/SFT; not 92d63d4) clips gradients
    scratch = st.init_from in (None, "", "none")
    clip = st.grad_clip if st.grad_clip is not None else 1.0 if gen == "seed" and scratch else 0.0
    fp8 = fp8_layers(shape) if m.fp8 and scratch else []
    if m.fp8 and scratch and not fp8:
        raise ConfigError("model.fp8", m.fp8, "drop model.fp8 for a model this small, or make it wider "
                          "(model.n_embd a multiple of 16 and >= 128)",
                          f"no Linear layer qualifies (n_embd={shape.n_embd}: fp8 needs both dims divisible "
                          f"by 16 and the smaller >= 128)")

    return Plan(
        generation=gen, model=shape, num_params=counts["total"], num_embedding_params=counts["lookup"],
        num_scaling_params=counts["scaling"], flops_per_token=fpt, world_size=world,
        device_batch_size=dbs, sequence_len=seq, total_batch_size=total, grad_accum_steps=accum,
        num_iterations=steps, horizon_source=source, total_tokens=steps * total,
        total_flops=float(fpt) * total * steps, tokens_per_param=steps * total / counts["total"],
        embedding_lr=lr("embedding_lr", True), unembedding_lr=lr("unembedding_lr", True),
        matrix_lr=lr("matrix_lr", False), scalar_lr=lr("scalar_lr", False),
        weight_decay=wd, weight_decay_schedule=g["weight_decay_schedule"],
        lr_scale_dmodel=dscale, lr_scale_batch=bscale, warmup_steps=warmup, warmdown_steps=warmdown,
        final_lr_frac=given("final_lr_frac"), muon_momentum_start=optim.pop("muon_momentum_start"),
        muon_momentum_end=optim.pop("muon_momentum_end"), muon_momentum_steps=optim.pop("muon_momentum_ramp"),
        muon_momentum_final=optim.pop("muon_momentum_final"), notes=notes,
        device_batch_probe=probe if cfg.hardware.device_batch_size == "auto" else None,
        optimizer=optimizer, optim=optim, grad_clip=clip,
        fp8=m.fp8 if fp8 else None, fp8_layers=len(fp8),
        eval_tokens=getattr(st, "eval_tokens", None),
    )


def lr_schedule(steps: int, warmup_steps: Optional[int], warmup_ratio: Optional[float], warmdown_ratio: float,
                default_warmup: int = 0) -> tuple[int, int]:
    """(warmup, warmdown) steps of a horizon: warmup_steps, else warmup_ratio of it (else default_warmup),
    at most the horizon; then the last warmdown_ratio of it, at most what the warmup left."""
    if warmup_steps is None:
        warmup_steps = round(warmup_ratio * steps) if warmup_ratio is not None else default_warmup
    warmup = min(warmup_steps, steps)
    return warmup, min(round(warmdown_ratio * steps), steps - warmup)


def plan_rows(p: Plan) -> list[tuple[str, str]]:
    """(name, value) rows for the dry-run table; a value a later stage took from its source run (`p.inherited`)
    is marked `(inherited: key, ...)`."""
    s = p.model
    n = lambda x: f"{x:,.0f}" if abs(x) < 1e15 else f"{x:.3e}"
    got = lambda *keys: [k for k in keys if k in p.inherited]
    mark = lambda *keys: f"  (inherited: {', '.join(got(*keys))})" if got(*keys) else ""
    rows = [
        ("generation", p.generation),
        ("depth / width / heads", f"{s.depth} / {s.n_embd} / {s.n_head}×{s.head_dim} (kv {s.n_kv_head})"),
        ("vocab (padded)", f"{s.vocab_size:,} ({s.padded_vocab_size:,})"),
        ("sequence_len", str(p.sequence_len) + mark("sequence_len")),
        ("window pattern", s.window_pattern),
        ("toggles", ", ".join(k for k in ("value_embeds", "resid_lambdas", "x0_lambdas", "smear", "backout")
                               if getattr(s, k)) or "none"),
        ("params", n(p.num_params)),
        ("scaling params", n(p.num_scaling_params)),
        ("FLOPs / token", n(p.flops_per_token)),
        ("world size", str(p.world_size)),
        ("batch: device × seq × world × accum", f"{p.device_batch_size} × {p.sequence_len} × {p.world_size} × "
                                                 f"{p.grad_accum_steps} = {p.total_batch_size:,} tokens"
                                                 + mark("total_batch_size", "device_batch_size")),
        ("iterations", f"{p.num_iterations:,} (from {p.horizon_source})"),
        ("tokens", n(p.total_tokens)),
        ("tokens / param", f"{p.tokens_per_param:.2f}"),
        ("total FLOPs", f"{p.total_flops:.3e}"),
        ("LR embed / unembed / matrix / scalar",
         f"{p.embedding_lr:.4g} / {p.unembedding_lr:.4g} / {p.matrix_lr:.4g} / {p.scalar_lr:.4g}"
         + mark("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")),
        ("weight decay", f"{p.weight_decay:.4g} ({p.weight_decay_schedule})" + mark("weight_decay")),
        ("warmup / warmdown steps", f"{p.warmup_steps} / {p.warmdown_steps} → {p.final_lr_frac}"),
    ]
    fp8 = [("fp8", f"{p.fp8}: {p.fp8_layers} of {len(linear_layers(s))} Linear layers (torchao)")] if p.fp8 else []
    return rows + fp8 + optimizer_rows(p) + [("note", x) for x in p.notes]


def optimizer_rows(p: Plan) -> list[tuple[str, str]]:
    """The optimizer as the run builds it: Muon settings, then every AdamW group the model has."""
    o, present = p.optim, param_counts(p.model)
    flags = [k for k, on in (("MuonEq", o["muon_equilibrate"]), ("Muon+", o["muon_renorm"]),
                             (f"NorMuon β2 {o['muon_beta2']}", o["normuon"]), ("cautious wd", o["cautious_wd"])) if on]
    ns = o["muon_ns"] + (f" (safety {o['muon_ns_safety']})" if o["muon_ns"] == "polar_express" else "")
    mom = f"{p.muon_momentum_start} → {p.muon_momentum_end} over {p.muon_momentum_steps}" + \
        (f", → {p.muon_momentum_final} through warmdown" if p.muon_momentum_final is not None else "")
    return [("optimizer", f"{p.optimizer}: Muon {ns}" + (" + " + ", ".join(flags) if flags else "")),
            ("Muon lr / momentum", f"{p.matrix_lr:.4g} × sqrt(max(1, rows/cols)) / {mom}"),
            ("grad clip", f"{p.grad_clip:g}" if p.grad_clip > 0 else "off")] + \
        [(f"AdamW {name}", f"lr {g['lr']:.4g}, betas ({g['betas'][0]}, {g['betas'][1]}), wd {g['weight_decay']:g}")
         for name, g in adamw_group_settings(p.embedding_lr, p.unembedding_lr, p.scalar_lr, o).items() if present[name]]
