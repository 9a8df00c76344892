"""The schema of the whole config, as plain dataclasses.

Hydra composes YAML in `launch/`; everything in `nanochat/` only ever sees these
dataclasses. `config_from_dict` walks a plain dict (the composed config) against the
schema and raises `ConfigError` naming the key, the value and the fix, which is
how typos such as `+model.typo=1` (that Hydra lets through) are caught.

`null` in YAML means "derive it" (see `nanochat/plan.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


class ConfigError(Exception):
    """A bad config value: names the key, the value and how to fix it."""

    def __init__(self, key: str, value: Any, fix: str, problem: str = "invalid value"):
        self.key, self.value, self.fix, self.problem = key, value, fix, problem
        super().__init__(f"{key}={value!r}: {problem}. Fix: {fix}")


# --------------------------------------------------------------------------- groups

@dataclass
class RunConfig:
    root: str = "runs"                 # run dirs go under <root>/<stage>/d<depth>/<timestamp>
    dir: Optional[str] = None          # set by the launcher (or by the user to pin a dir)
    tag: Optional[str] = None          # derived from values: d<depth>
    dry_run: bool = False              # print the plan and exit, no run dir
    simulate: bool = False             # rehearse the planned training step on fake tensors, no run dir
    resume: Literal["auto", "must", "never"] = "auto"
    skip_if_done: bool = False         # skip a job whose dir already holds COMPLETED
    seed: int = 42
    pipeline: Optional[list] = None    # list of stage names run one after another
    print_config: bool = False         # print the resolved config on a real run too
    objective: Optional[str] = None    # result.json key a multirun job returns to Hydra's sweeper
    log_interval_s: float = 30.0       # plain progress lines (stdout not a terminal): seconds apart, 0 = every step
    profile: bool = False              # torch.profiler over training steps [profile_start, +profile_steps)
    profile_start: int = 5
    profile_steps: int = 3


@dataclass
class PathsConfig:
    base_dir: str = "~/.cache/nanochat"   # shared artifacts: tokenizers, shards, eval bundle
    eval_bundle: Optional[str] = None     # CORE bundle dir, or its zip (URL, hf://datasets/o/n/f.zip); null → download
    shared_data: Optional[str] = None     # local public datasets (../shared/data layout)


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "nanochat"
    name: Optional[str] = None


@dataclass
class TrackingConfig:
    tensorboard: bool = False   # TensorBoard event files in each run dir (`tensorboard --logdir runs/`)


@dataclass
class ModelConfig:
    generation: Literal["seed", "modern"] = "seed"   # Dec 2025 nanochat | mid 2026
    depth: int = 20
    aspect_ratio: int = 64            # n_embd = aspect_ratio * depth (rounded in modern)
    head_dim: int = 128
    n_embd: Optional[int] = None      # null → derived from depth
    n_head: Optional[int] = None      # null → derived
    n_kv_head: Optional[int] = None   # null → n_head (no GQA)
    vocab_size: Optional[int] = None  # null → the tokenizer's vocab (or the generation default)
    sequence_len: int = 2048
    softcap: float = 15.0
    # Later nanochat improvements: null → the generation's default (off in seed, on in modern).
    rope_base: Optional[float] = None        # seed 10k, modern 100k
    value_embeds: Optional[bool] = None      # ResFormer value embeddings on alternating layers
    window_pattern: Optional[str] = None     # seed "L", modern "SSSL"; last layer always full
    short_window: Optional[int] = None       # tokens left of the query on S layers; null → ceil(seq/4/128)·128
    resid_lambdas: Optional[bool] = None
    x0_lambdas: Optional[bool] = None
    smear: Optional[bool] = None
    backout: Optional[bool] = None
    qk_scale: Optional[float] = None         # seed 1.0, modern 1.2
    pad_vocab_to: Optional[int] = None       # seed 1, modern 64
    # fp8 training (torchao.float8) of the Linear layers nanochat converts: null | tensorwise | rowwise.
    # Needs an fp8 GPU (compute capability >= 8.9) unless fp8_emulate (CPU tests). Checkpoints stay fp32.
    fp8: Optional[str] = None
    fp8_emulate: bool = False
    activation_checkpointing: Literal["none", "full"] = "none"  # full: recompute each block in backward (less memory)


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: Literal["cpu", "cuda", "mps", "auto"] = "cpu"
    nproc_per_node: int = 1
    nnodes: int = 1
    gpus_per_node: Optional[int] = None  # what Slurm allocates per node (null on CPU: no GPU request)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # bfloat16: wte + value embeddings stored in bf16 (CUDA, bf16 compute)
    embedding_dtype: Literal["float32", "bfloat16"] = "float32"
    # null → table below / stage default; auto → the largest power of two that fits (a short
    # fwd+bwd+step probe at launch, nanochat/batch_size.py), recorded in plan.json
    device_batch_size: Optional[Union[int, str]] = None
    device_batch_table: dict = field(default_factory=dict)  # depth → device batch
    auto_batch_memory_gb: Optional[float] = None  # memory the auto probe may fill; null → the device's
    gpu_memory_gb: Optional[float] = None  # each GPU's memory: plan-time memory checks (nanochat/simulate.py)
    interconnect_gb_s: Optional[float] = None  # per-GPU bandwidth of the collectives, GB/s (traffic time)
    memory_check: Optional[bool] = None  # rehearse the step at plan time (true), before a Slurm submission (null), never (false)
    attention: Literal["auto", "sdpa", "flex", "flash"] = "auto"   # nanochat/attention.py
    compile: bool = False
    num_threads: Optional[int] = None  # torch threads per rank on CPU; null → cores / nproc
    backend: Optional[str] = None     # gloo | nccl; null → by device
    # multi-node (nnodes > 1). Under Slurm all three may stay null; without it, start one
    # launcher per node with node_rank=0..nnodes-1 and the same rdzv_endpoint (node 0's address).
    node_rank: Optional[int] = None   # null → $SLURM_NODEID
    rdzv_endpoint: Optional[str] = None  # host[:port] of node 0; null → first node of the allocation
    dist_timeout_s: Optional[int] = None  # collective/rendezvous timeout; null → torch's (gloo 30 min)


@dataclass
class DataConfig:
    name: str = "demo"
    source: Literal["demo", "fineweb_edu", "climbmix", "hub", "local", "mixture"] = "demo"
    path: Optional[str] = None        # local: dir or glob of parquet/jsonl/txt
    repo: Optional[str] = None        # hub: dataset repo <owner>/<name> of parquet shards (null → the source's)
    revision: str = "main"            # hub: branch, tag or commit of data.repo
    num_shards: Optional[int] = None  # remote: how many training shards to fetch (null = all needed)
    max_shard: Optional[int] = None   # remote: index of the last shard in the repo
    val_shard: Optional[int] = None   # remote: pinned validation shard index
    download_workers: int = 4
    tokenizer: str = "demo"           # name of the tokenizer artifact under <base_dir>/tokenizer/
    packing: Literal["stream", "bestfit"] = "stream"   # stream (seed) | bestfit (BOS-aligned best-fit)
    tokenizer_threads: int = 2
    tokenizer_batch_size: int = 128
    demo_chars: int = 4_000_000       # data=demo: size of the corpus built from the stdlib
    val_fraction: float = 0.05        # local/demo: fraction of documents held out for val
    # data=mixture: {source name: {name: <data option>, weight: w, <that option's keys>}} (nanochat/mixture.py)
    mixture: Optional[dict] = None
    max_epochs: Optional[float] = None  # mixture: a source repeated more often than this is a ConfigError


@dataclass
class StageConfig:
    """Fields shared by every stage (its declaration, nanochat/stages/<name>.py, names its own schema)."""
    name: str = "pretrain"
    init_from: Optional[str] = None   # <run dir> | latest | null
    init_stage: Optional[str] = None  # the source stage `latest` reads (null → the stage's default, see README)


@dataclass
class TokenizerStageConfig(StageConfig):
    vocab_size: int = 65536
    max_chars: int = 2_000_000_000
    doc_cap: int = 10_000
    eval_chars: int = 200_000         # held-out chars per source for compression eval


@dataclass
class TrainStageConfig(StageConfig):
    total_batch_size: Optional[int] = None       # tokens per optimizer step; null → derive
    num_iterations: Optional[int] = None         # horizon precedence: this >
    target_flops: Optional[float] = None         # > this >
    target_param_data_ratio: Optional[float] = None  # > this (null → generation default)
    embedding_lr: Optional[float] = None
    unembedding_lr: Optional[float] = None
    matrix_lr: Optional[float] = None
    scalar_lr: Optional[float] = None
    weight_decay: Optional[float] = None
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    warmup_ratio: Optional[float] = None
    warmup_steps: Optional[int] = None
    warmdown_ratio: Optional[float] = None
    final_lr_frac: Optional[float] = None
    # Optimizer recipe (nanochat/optim.py): null → the one of `optimizer`, itself null → model.generation's
    # (seed = nanochat d575940, Dec 2025; modern = nanochat 92d63d4). Each key shown in the dry run.
    optimizer: Optional[str] = None   # seed | modern
    muon_ns: Optional[str] = None     # newton_schulz (seed) | polar_express (modern)
    muon_ns_safety: Optional[float] = None   # Polar Express input scale 1/(‖G‖·this): 1.01
    muon_equilibrate: Optional[bool] = None  # MuonEq row equilibration (modern on)
    muon_renorm: Optional[bool] = None       # Muon+ Frobenius renormalisation (modern on)
    normuon: Optional[bool] = None           # NorMuon variance reduction (modern on)
    muon_beta2: Optional[float] = None       # NorMuon second-moment EMA: 0.9
    cautious_wd: Optional[bool] = None       # Muon weight decay only where update and weight agree in sign
    muon_momentum_start: Optional[float] = None   # 0.85
    muon_momentum_end: Optional[float] = None     # after the ramp: seed 0.95, modern 0.97
    muon_momentum_ramp: Optional[int] = None      # ramp steps: seed 300, modern 400
    muon_momentum_final: Optional[float] = None   # modern: end → this through the LR warmdown (0.90)
    lm_head_betas: Optional[list] = None          # AdamW per group; null → the recipe's (modern below,
    lm_head_wd: Optional[float] = None            # seed: adam_beta1/2 and weight decay 0 everywhere)
    embedding_betas: Optional[list] = None        # modern [0.8, 0.995], wd 0.001
    embedding_wd: Optional[float] = None
    value_embed_lr_frac: Optional[float] = None   # × embedding_lr: modern 0.5, seed 1
    value_embed_betas: Optional[list] = None      # modern [0.8, 0.995], wd 0.01
    value_embed_wd: Optional[float] = None
    resid_lr_frac: Optional[float] = None         # × scalar_lr: 0.01
    resid_wd: Optional[float] = None              # modern 0.05
    x0_betas: Optional[list] = None               # modern [0.96, 0.95]
    gate_lr: Optional[float] = None               # smear gate/lambda + backout lambda: modern fixed 0.2
    eval_every: int = 250
    eval_tokens: Optional[int] = 20 * 524288  # null → scaled to the run (chat stages)
    sample_every: int = 2000
    core_every: int = -1              # -1 = off
    core_max_per_task: int = 500
    save_every: int = -1              # -1 = only at the end
    keep_last: int = 2
    log_every: int = 1
    grad_clip: Optional[float] = None  # global grad-norm clip (0 = off); null → seed pretrain 1.0 (d575940), else 0
    max_seq_len: Optional[int] = None


@dataclass
class ChatStageConfig(TrainStageConfig):
    """mid / sft: conversation mixtures."""
    mixture: Optional[list] = None    # task specs, e.g. ["smoltalk", "mmlu_aux", "gsm8k"]
    num_epochs: int = 1
    eval_metrics_every: int = -1
    max_examples_per_task: int = -1
    init_lr_frac: Optional[float] = None      # LRs × this; null → mid 1.0, sft 0.02 (nanochat)
    examples_per_step: Optional[int] = None   # sft: conversations per optimizer step; null → 32
    eval_tasks: Optional[list] = None         # tasks scored at the end; null → graded tasks of the mixture
    eval_examples: int = 100                  # examples per task in that scoring (-1 = all)
    eval_max_new_tokens: int = 256            # sampling budget per answer in that scoring
    load_optimizer: Optional[bool] = None     # warm-start optimizer state from the source; null → modern sft yes (chat_sft), else no
    chatcore_every: Optional[int] = None      # ChatCORE every N steps + at the end (-1 off; null: modern sft 200)
    chatcore_max_cat: Optional[int] = None    # problems per categorical ChatCORE task (-1 = all; null: sized to the run)
    chatcore_max_sample: int = 24             # problems per generative ChatCORE task


@dataclass
class RLStageConfig(TrainStageConfig):
    num_samples: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    examples_per_step: int = 16
    pass_at_k_every: int = 60
    eval_examples: int = 400
    task: str = "gsm8k"               # RL task spec (a task with a reward), e.g. gsm8k | arithmetic
    num_epochs: int = 1               # horizon when num_iterations is null
    init_lr_frac: float = 0.05        # LRs × this (nanochat chat_rl)
    device_batch_size: Optional[int] = None   # sampled sequences per forward pass; null → num_samples
    eval_num_samples: int = 4         # samples per test question for pass@1..k


@dataclass
class HarnessConfig:
    """lm-evaluation-harness through our model (nanochat/harness.py); empty tasks → not run."""
    tasks: list = field(default_factory=list)   # arc_easy arc_challenge mmlu gsm8k humaneval
    limit: Optional[int] = None       # examples per task (null → all)
    num_fewshot: Optional[int] = None  # null → each task's own default
    batch_size: int = 16
    max_gen_toks: int = 256
    data_dir: Optional[str] = None    # local task data (arc/ mmlu/ gsm8k/); null → paths.shared_data


@dataclass
class EvalStageConfig(StageConfig):
    mode: str = "auto"                # auto | base | chat (auto: by the source checkpoint's stage)
    tasks: Optional[list] = None      # chat tasks; null → all
    bpb_tokens: int = 10 * 524288
    core: bool = True
    max_per_task: int = -1
    batch_size: int = 8
    num_samples: int = 1
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 50
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # tasks set → lm-eval runs instead


@dataclass
class ServeStageConfig(StageConfig):
    """serve: an HTTP chat server (nanochat/serve/); `latest` = newest completed rl > sft > mid run."""
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: Optional[str] = None  # id in /v1/models; null → nanochat-<tag>-<stage>
    max_seqs: int = 16                # concurrent sequences (KV-cache rows) per replica
    max_queue: int = 64               # requests waiting for a row per replica; beyond → 429
    kv_bucket: int = 16               # decode key length padded to a multiple (batch-invariant outputs); 0 = context
    decode_tile: int = 1              # a decode step computes the rows in use, at least this many
    prefill_rows: int = 16            # prompts prefilled together in one forward
    prefill_chunk: int = 256          # prompt tokens per prefill forward (decode steps run between chunks)
    prefix_cache_mb: float = 256.0    # keys/values of earlier prompts reused by later ones; 0 = off
    stream_interval_ms: float = 20.0  # streamed tokens go out at most this often, joined per choice; 0 = each
    api_key: Optional[str] = None     # require `Authorization: Bearer <key>` on /v1/* and /chat/completions
    retry_after_s: int = 1            # Retry-After of a 429
    shutdown_grace_s: float = 5.0     # on SIGINT/SIGTERM: in-flight streams get this long to finish
    temperature: float = 0.6          # defaults when a request does not say
    top_k: int = 50
    max_tokens: int = 512
    seed: int = 42
    max_messages: int = 500           # abuse limits (nanochat's): HTTP 400 beyond them
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_max_tokens: int = 4096


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=TrainStageConfig)
    experiment: Optional[str] = None  # name of the experiment recipe, if any (informational)
    sweep: Optional[str] = None
    stages: dict = field(default_factory=dict)  # pipeline: per-stage overrides, {sft: {num_iterations: 50}}


# --------------------------------------------------------------------------- validation

_NUMBER = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
# annotation → (accepts the value, converts it, fix, problem)
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), bool, "use true or false for {}", "expected a bool"),
    int: (lambda v: _NUMBER(v) and (isinstance(v, int) or v.is_integer()), int, "use an integer for {}",
          "expected an int"),
    # YAML reads 1e18 (no dot) as a string
    float: (lambda v: _NUMBER(v) or isinstance(v, str), float, "use a number for {}", "expected a float"),
    str: (lambda v: _NUMBER(v) or isinstance(v, str), str, "use a string for {}", "expected a string"),
    # a,b,c from the command line is a list too
    list: (lambda v: isinstance(v, (list, tuple, str)),
           lambda v: [x for x in v.split(",") if x] if isinstance(v, str) else list(v),
           "use a list for {}, e.g. [a,b]", "expected a list"),
    dict: (lambda v: isinstance(v, dict), dict, "use a mapping for {}", "expected a mapping"),
}


def _check_value(tp: Any, value: Any, key: str) -> Any:
    """Check `value` (of `key`) against annotation `tp`; return the (possibly coerced) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        first = None
        # str last: typing caches Unions ignoring order, so Union[int, str] may list str first
        for a in sorted((a for a in typing.get_args(tp) if a is not type(None)), key=lambda a: a is str):
            try:
                return _check_value(a, value, key)
            except ConfigError as e:
                first = first or e
        raise ConfigError(first.key, first.value, f"{first.fix}, or null", first.problem)
    if origin is typing.Literal:   # the field's choices
        value = _check_value(str, value, key)
        if value not in typing.get_args(tp):
            raise ConfigError(key, value, f"use one of: {', '.join(typing.get_args(tp))}", "invalid choice")
        return value
    if value is None:
        name = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        raise ConfigError(key, value, f"set {key} to a {name} (null is not allowed here)", "missing value")
    if (origin or tp) not in _SCALARS:
        return value
    accepts, convert, fix, problem = _SCALARS[origin or tp]
    with contextlib.suppress(ValueError):  # a string that is not a number
        if accepts(value):
            return convert(value)
    raise ConfigError(key, value, fix.format(key), problem)


def _build(cls: type, tree: Any, prefix: str, schemas: Optional[dict] = None) -> Any:
    """`cls` from the mapping at `prefix` ("" for the whole config); schemas: field → the dataclass it is
    built as instead of its annotation (the stage group: the declared stage's schema)."""
    if not isinstance(tree, dict):
        raise ConfigError(prefix, tree, f"{prefix} must be a group (mapping) of keys", "expected a mapping")
    hints = {**typing.get_type_hints(cls), **(schemas or {})}
    fields = [f.name for f in dataclasses.fields(cls)]
    where = f"{prefix}." if prefix else ""
    k = next((k for k in tree if k not in fields), None)
    if k is not None:
        close = difflib.get_close_matches(k, fields, n=1)
        valid = f"valid keys of {prefix}" if prefix else "top-level keys"
        fix = f"did you mean {where}{close[0]}?" if close else f"remove it; {valid}: {', '.join(sorted(fields))}"
        raise ConfigError(f"{where}{k}", tree[k], fix, "unknown key")
    # in the order of the fields: the first bad one is the one reported
    return cls(**{n: (_build if dataclasses.is_dataclass(hints[n]) else _check_value)(hints[n], tree[n], where + n)
                  for n in fields if n in tree})


# Rules between keys, checked in this order after the ranges: (key, is its value bad, fix, problem)
_RULES = (
    # a per-layer list of a drawn depth of 9e102 never ended (tests/test_config_cases.py)
    ("model.depth", lambda v, c: v is not None and v > 2 ** 20, "use at most 1,048,576 (2**20) layers", "too deep"),
    ("model.fp8", lambda v, c: v not in (None, "tensorwise", "rowwise"),
     "use null, tensorwise (faster) or rowwise (more accurate)", "unknown fp8 recipe"),
    ("model.fp8_emulate", lambda v, c: v and c.model.fp8 is None,
     "set model.fp8=tensorwise|rowwise too, or drop fp8_emulate", "emulation without fp8"),
    ("hardware.node_rank", lambda v, c: v is not None and not 0 <= v < c.hardware.nnodes,
     lambda c: f"use 0..{c.hardware.nnodes - 1} (hardware.nnodes={c.hardware.nnodes})", "out of range"),
    ("hardware.dist_timeout_s", lambda v, c: v is not None and v < 1,
     "use a positive number of seconds, or null for torch's default", "out of range"),
    ("hardware.device_batch_size", lambda v, c: v is not None and v != "auto" and not (isinstance(v, int) and v >= 1),
     "use a positive integer, auto (probe the largest that fits), or null (the table)", "invalid device batch size"),
    ("hardware.auto_batch_memory_gb", lambda v, c: v is not None and v <= 0, "use a positive number of GiB, or null",
     "out of range"),
)


# Numbers that must be > 0 (or >= 0) when set; null still means "derive it". Without these, a 0 or a
# negative value ends as a ZeroDivisionError deep in plan.py (found by tests/test_config_fuzz.py).
_POSITIVE = ("model.depth", "model.sequence_len", "model.aspect_ratio", "model.head_dim", "model.n_embd",
             "model.n_head", "model.n_kv_head", "model.vocab_size", "model.short_window", "model.pad_vocab_to",
             "model.rope_base", "hardware.nproc_per_node", "hardware.nnodes",
             "hardware.num_threads", "stage.total_batch_size", "stage.target_flops", "stage.target_param_data_ratio",
             "stage.vocab_size", "stage.max_chars", "stage.examples_per_step", "stage.num_samples",
             "stage.device_batch_size", "stage.max_seq_len", "data.max_epochs", "run.profile_start",
             "run.profile_steps")
_NON_NEGATIVE = ("stage.num_iterations", "stage.warmup_steps", "stage.embedding_lr", "stage.unembedding_lr",
                 "stage.matrix_lr", "stage.scalar_lr", "stage.weight_decay", "stage.warmup_ratio",
                 "stage.warmdown_ratio", "stage.final_lr_frac", "stage.grad_clip", "stage.init_lr_frac",
                 "model.softcap", "data.val_fraction", "run.log_interval_s")
_RANGES = {**dict.fromkeys(_POSITIVE, (1e-300, "positive")), **dict.fromkeys(_NON_NEGATIVE, (0, "zero or positive"))}


# stage keys of run dirs frozen before stages were declared in Python: dropped when such a run is read
RETIRED_STAGE_KEYS = ("worker", "planner", "sources", "default_source", "source_tag", "schema")


def config_from_dict(tree: dict, frozen: bool = False) -> Config:
    """Validate a plain dict (the composed, resolved config; frozen: a run dir's) and build the dataclass."""
    from nanochat.stages import stage  # the stage's declaration owns its schema
    tree = {k: v for k, v in tree.items() if k != "hydra"}  # present only when Hydra adds it
    stage_tree = tree["stage"] if isinstance(tree.get("stage"), dict) else {}  # not a mapping: _build says so
    if frozen and stage_tree:
        tree["stage"] = {k: v for k, v in stage_tree.items() if k not in RETIRED_STAGE_KEYS}
    name = stage_tree.get("name", StageConfig.name)
    cfg = _build(Config, tree, "", {"stage": stage(name).schema})
    for group in ("model", "hardware", "data", "stage", "run"):   # every number finite, those in _RANGES in range
        for f in dataclasses.fields(getattr(cfg, group)):
            key, v = f"{group}.{f.name}", getattr(getattr(cfg, group), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(key, v, f"use a finite number for {key}", "not finite")
            low, word = _RANGES.get(key, (-math.inf, ""))
            if _NUMBER(v) and v < low:   # "auto" (a str) is checked by its own rule
                derive = " (or null to derive it)" if f.default is None else ""
                raise ConfigError(key, v, f"{key} must be {word}{derive}", "out of range")
    if cfg.data.source == "mixture" or cfg.data.mixture is not None:
        from nanochat.mixture import check_mixture  # torch-free
        check_mixture(cfg.data)
    for key, bad, fix, problem in _RULES:
        v = operator.attrgetter(key)(cfg)
        if bad(v, cfg):
            raise ConfigError(key, v, fix(cfg) if callable(fix) else fix, problem)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str) -> Config:
    """Workers: read a frozen resolved_config.yaml with plain OmegaConf (no Hydra)."""
    from omegaconf import OmegaConf
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return config_from_dict(tree, frozen=True)
