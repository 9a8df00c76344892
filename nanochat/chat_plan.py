"""Plans of the chat stages (mid, sft, rl): what they inherit from their source run, in pure Python.

One function per stage turns (config, source run) into the Plan the run trains with; the
launcher prints it for `run.dry_run=true` and freezes it as plan.json, and the worker reads
it back, so the numbers shown are the numbers used. Which rules apply is the source's
generation:

- seed (nanochat, Dec 2025): mid keeps the source's LRs and batch (warmdown 20%); sft trains
  `examples_per_step` (32) whole conversations per step, LRs × 0.02, linear decay to 0.
- modern (nanochat 92d63d4's chat_sft): sequence length, device batch, total batch and the
  embedding / unembedding / matrix LRs come from the source run (an explicit value wins, and
  is named); LRs × init_lr_frac 0.8, warmdown the last 50% to 0, weight decay 0 (pretraining
  already decayed it to 0), Muon momentum 0.85 → 0.95 over 300 steps; batches are token rows
  packed best-fit from whole conversations (each row starts at a BOS).

The horizon when `stage.num_iterations` is null is `num_epochs` over the rendered tokens of
the mixture (chat rows) or over the questions (rl), counted here, before any work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from nanochat.common import get_base_dir
from nanochat.config import Config, ConfigError
from nanochat.plan import (GENERATIONS, ChatStagePlan, Plan, lr_schedule, make_plan, plan_rows,
                           valid_device_batches)
from nanochat.stage_plan import SourceRun, StagePlan, due_count, fill_vocab, model_rows, source_rows, when

# Default mixtures. Entries marked optional (True) are skipped, with a note, when their data is
# neither local nor downloadable, so the defaults work offline with ../shared/data.
DEFAULT_MID_MIXTURE = [
    ("smoltalk", True), ("mmlu_aux", True), ("arc_easy", True), ("arc_challenge", True), ("gsm8k", True),
    ("identity", True), ("identity", True), ("simplespelling:size=20000", False),
    ("spellingbee:size=8000", False), ("arithmetic:size=8000", False),
]
SEED_SFT_MIXTURE = [  # nanochat Dec 2025: ARC train, GSM8K train, SmolTalk 10k, identity, spelling
    ("arc_easy", True), ("arc_challenge", True), ("gsm8k", True), ("smoltalk:stop=10000", True),
    ("identity", True), ("simplespelling:size=300", False), ("spellingbee:size=300", False),
    ("arithmetic:size=300", False),
]
MODERN_SFT_MIXTURE = [("smoltalk", True)] + [("mmlu_aux", True)] * 3 + [("gsm8k", True)] * 4  # 92d63d4
GRADED = ("arc_easy", "arc_challenge", "mmlu", "mmlu_aux", "mmlu_auxiliary_train", "gsm8k", "humaneval",
          "spellingbee", "simplespelling", "arithmetic")
SEED_SFT_EXAMPLES_PER_STEP = 32
EVAL_TOKENS_CAP = 20 * 524288          # nanochat's pretraining default per validation pass
CHAT_MOMENTUM = (0.85, 0.95, 300)     # chat_sft / mid_train: Muon momentum ramp, no warmdown leg
LR_KEYS = ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr")
MODERN_SFT_INHERITED_LRS = ("embedding_lr", "unembedding_lr", "matrix_lr")  # as 92d63d4's chat_sft


@dataclass(frozen=True)
class ChatRules:
    """One stage's recipe for one generation."""
    lr_frac: float                     # LRs × this (stage.init_lr_frac overrides)
    warmup_ratio: float
    warmdown_ratio: float
    final_lr_frac: float
    momentum: tuple                    # Muon momentum (start, end, ramp steps)
    weight_decay: Optional[float]      # None: the source's
    batching: str                      # tokens: total_batch_size tokens per step | examples: whole rows
    packing: str                       # stream | bestfit | pad (see nanochat/chat_data.py)
    mixture: list
    chatcore_every: int = -1
    load_optimizer: bool = False       # warm-start the optimizer from the source (stage.load_optimizer overrides)


MID = ChatRules(1.0, 0.0, 0.2, 0.0, CHAT_MOMENTUM, None, "tokens", "stream", DEFAULT_MID_MIXTURE)
SEED_SFT = ChatRules(0.02, 0.0, 1.0, 0.0, (0.95, 0.95, 0), None, "examples", "pad", SEED_SFT_MIXTURE)
MODERN_SFT = ChatRules(0.8, 0.0, 0.5, 0.0, CHAT_MOMENTUM, 0.0, "tokens", "bestfit", MODERN_SFT_MIXTURE, 200, True)


# --------------------------------------------------------------------------- mixtures (no torch)

def build_mixture(specs: Optional[list], default: list, split: str, *, data_dir: Optional[str], base_dir: Any,
                  seed: int, max_per_task: int = -1, log: Callable[[str], None] = print):
    """(TaskMixture, names) from config specs (every one required) or a default (optional ones skipped)."""
    from nanochat.tasks import TaskDataError, TaskMixture, make_task
    entries = [(s, False) for s in specs] if specs else list(default)
    tasks, names = [], []
    for spec, optional in entries:
        try:
            task = make_task(spec, split, data_dir=data_dir, base_dir=str(base_dir))
        except (TaskDataError, OSError) as e:
            if not optional:
                raise ConfigError("stage.mixture", spec, "make its data available (paths.shared_data) or drop it "
                                  "from stage.mixture", f"no data ({str(e)[:160]})") from None
            log(f"mixture: skipping {spec!r} (no data: {str(e)[:120]})")
            continue
        if max_per_task > 0 and len(task) > max_per_task:
            task.stop = task.start + max_per_task * task.step
        tasks.append(task)
        names.append(spec if isinstance(spec, str) else dict(spec))
    if not tasks:
        raise ConfigError("stage.mixture", [s for s, _ in entries], "set stage.mixture to tasks available "
                          "offline, e.g. [arithmetic, spellingbee]", "no task of the mixture has data")
    return TaskMixture(tasks, seed=seed), names


def held_out_specs(specs: list) -> list:
    """The graded tasks of a mixture, for validation and scoring on their held-out split."""
    from nanochat.tasks import parse_spec
    out = []
    for spec in specs:
        name = parse_spec(spec)[0]
        spec = "mmlu" if name in ("mmlu_aux", "mmlu_auxiliary_train") else spec
        if name in GRADED and spec not in out:
            out.append(spec)
    return out


def count_tokens(task: Any, tokenizer: Any, max_tokens: int, sample: int = 20000) -> int:
    """Rendered tokens in a mixture (exact up to `sample` conversations, else estimated from a sample)."""
    n = len(task)
    idx = range(n) if n <= sample else range(0, n, max(1, n // sample))
    total = sum(len(tokenizer.render_conversation(task[i], max_tokens=max_tokens)[0]) for i in idx)
    return total if n <= sample else int(total * n / len(idx))


def check_tokenizer(cfg: Config, source: SourceRun) -> None:
    """The tokenizer artifact (the source's: stage_plan.open_source set both) must still match the source
    model's vocabulary."""
    from nanochat.tokenizer import tokenizer_vocab_size
    name, want = cfg.data.tokenizer, cfg.model.vocab_size
    have = tokenizer_vocab_size(get_base_dir(cfg.paths.base_dir), name)
    if have is None:
        raise ConfigError("data.tokenizer", name, f"train it first (nanochat-run stage=tokenizer "
                          f"data.tokenizer={name}) or set paths.base_dir to where it lives",
                          f"the source run {source.path} was trained with tokenizer {name!r}, not found")
    if want is not None and have != want:
        raise ConfigError("data.tokenizer", name, f"use the tokenizer the source was trained with (vocab {want:,}), "
                          f"or start from a run trained with this one", f"vocab {have:,} does not match the source "
                          f"model's vocab {want:,} ({source.generation} generation)")


# --------------------------------------------------------------------------- inheritance

class Inheritance:
    """Picks each value: the stage's explicit setting, else the source's, else a fallback (`base`: plan.py's
    numbers for the source's model); records which and why."""

    def __init__(self, cfg: Config, source: SourceRun):
        self.source, self.inherited, self.notes = source, {}, []
        self.base = make_plan(replace(cfg, stage=replace(cfg.stage, num_iterations=1, total_batch_size=None)))

    def pick(self, key: str, explicit: Any, from_source: Any, fallback: Any, cfg_key: Optional[str] = None) -> Any:
        if explicit is not None:
            if from_source is not None and explicit != from_source:
                self.notes.append(f"{cfg_key or 'stage.' + key}={explicit} overrides the source's {from_source}")
            return explicit
        if from_source is not None:
            self.inherited[key] = f"{self.source.stage} run"
            return from_source
        return fallback

    def lrs(self, st: Any, modern_sft: bool) -> dict:
        """The LRs before × lr_frac: stage.<key>, else the source's, else the base plan's.

        The source's, for modern sft (92d63d4): the LRs the source was configured with before its batch
        scaling (nanochat's user_config), i.e. an explicit stage value or the generation default × the
        AdamW width scale; scalar_lr is not inherited there (chat_sft's optimizer default, without batch
        scaling). Otherwise: the unscaled LRs the source stage itself started from (its base_lrs), else
        its plan's.
        """
        sp, gen = self.source.plan, GENERATIONS[self.source.generation]
        fallback = {k: getattr(self.base, k) for k in LR_KEYS}
        if modern_sft:
            given = {k: getattr(self.source.config.stage, k, None) for k in MODERN_SFT_INHERITED_LRS}
            scale = {k: 1.0 if k == "matrix_lr" else sp.get("lr_scale_dmodel", 1.0) for k in given}  # AdamW's width
            src = {k: v if v is not None else gen[k] * scale[k] for k, v in given.items()}
            fallback["scalar_lr"] = gen["scalar_lr"]
        else:
            base = (sp.get("stage") or {}).get("base_lrs") or {}
            src = {k: base.get(k, sp.get(k)) for k in LR_KEYS}
        return {k: self.pick(k, getattr(st, k), src.get(k), fallback[k]) for k in LR_KEYS}


# For the plan's estimate of what the evaluations cost (the data decide the real counts at run time):
CHATCORE_CAT = {"ARC-Easy": 2376, "ARC-Challenge": 1172, "MMLU": 14042}   # test-split problems
PROBLEM_TOKENS = 250                                                     # a rendered problem, roughly


def chatcore_cap(explicit: Optional[int], run_tokens: int, passes: int) -> int:
    """Problems per categorical ChatCORE task: stage.chatcore_max_cat, else what ~5% of the run's compute
    buys (a forward costs a third of a training token), at least 100; -1 (all) once that covers every task."""
    if explicit is not None:
        return explicit
    cap = max(100, int(0.05 * 3 * run_tokens / (max(1, passes) * len(CHATCORE_CAT) * PROBLEM_TOKENS)))
    return -1 if cap >= max(CHATCORE_CAT.values()) else cap


def eval_rows(p: Plan, st: Any, chatcore_every: int, max_cat: int, scored: list) -> list[tuple[str, str]]:
    """Each evaluation the run will do, its size, and an estimate of its cost against the training's."""
    N, fwd = p.num_iterations, p.flops_per_token / 3
    vp = due_count(N, st.eval_every, at_zero=True)
    cp = due_count(N, chatcore_every, at_zero=False) if chatcore_every > 0 else 0
    cat = sum(n if max_cat < 0 else min(n, max_cat) for n in CHATCORE_CAT.values())
    tokens = vp * p.eval_tokens + cp * (cat * PROBLEM_TOKENS + 2 * st.chatcore_max_sample * (PROBLEM_TOKENS + 256))
    tokens += len(scored) * max(st.eval_examples, 0) * (PROBLEM_TOKENS + st.eval_max_new_tokens)
    each = "all" if max_cat < 0 else f"≤ {max_cat:,}"
    return [("validation", f"{vp} × {p.eval_tokens:,} tokens ({when(st.eval_every)})"),
            ("ChatCORE", f"{cp} × ({', '.join(CHATCORE_CAT)}: {each} problems each; GSM8K, HumanEval: "
                         f"{st.chatcore_max_sample} each), {when(chatcore_every)}" if cp else
                         "off (stage.chatcore_every=-1)"),
            ("scores at the end", f"{', '.join(map(str, scored))}: {'all' if st.eval_examples < 0 else st.eval_examples}"
                                  f" examples each" if scored else "none"),
            ("evaluation cost", f"≈ {tokens * fwd:.2g} FLOPs = {tokens * fwd / max(p.total_flops, 1):.0%} of training"
                                + (" + the end scores over all examples" if st.eval_examples < 0 and scored else "")
                                + "; sampling is slower per FLOP than training")]


def _pending(cfg: Config) -> StagePlan:
    """A dry-run pipeline: the source is planned but not trained yet, so the numbers wait for it."""
    cfg = fill_vocab(cfg)
    p = make_plan(replace(cfg, stage=replace(cfg.stage, num_iterations=cfg.stage.num_iterations or 1)))
    rows = model_rows(p) + [("horizon / batch / LRs", "derived from the source run once the pipeline has trained it")]
    return StagePlan(None, rows + source_rows(cfg, None))


def _per_rank(examples: int, world: int) -> int:
    if examples % world:
        raise ConfigError("stage.examples_per_step", examples, f"use a multiple of the world size {world}",
                          "does not split evenly over the ranks")
    return examples // world


def _derive(cfg: Config, inh: Inheritance, N: int, total: int, horizon: str, lrs0: dict, frac: float, note: str,
            stage: ChatStagePlan, extra: Callable[[Plan], list], **kw: Any) -> StagePlan:
    """What mid, sft and rl share: the base plan with this stage's horizon, batch, constant weight decay,
    LRs (`lrs0` × `frac`) and what it inherited, and its rows."""
    source, base = inh.source, inh.base
    p = replace(base, total_batch_size=total, num_iterations=N, horizon_source=horizon, total_tokens=N * total,
                total_flops=float(base.flops_per_token) * N * total, tokens_per_param=N * total / base.num_params,
                weight_decay_schedule="constant", muon_momentum_final=None, lr_scale_batch=1.0,
                notes=[note] + inh.notes, source=str(source.path), inherited=inh.inherited,
                stage=replace(stage, base_lrs=lrs0, source_stage=source.stage, tokenizer=cfg.data.tokenizer),
                **{k: v * frac for k, v in lrs0.items()}, **kw)
    return StagePlan(p, plan_rows(p) + extra(p) + source_rows(cfg, source))


# --------------------------------------------------------------------------- planners

def chat_plan(cfg: Config, source: Optional[SourceRun], rules: ChatRules) -> StagePlan:
    """mid / sft: inherit from the source, count the mixture, derive the horizon, batch and schedule."""
    if source is None:
        return _pending(cfg)
    from nanochat.tokenizer import get_tokenizer
    check_tokenizer(cfg, source)
    st, hw, sp = cfg.stage, cfg.hardware, source.plan
    modern = rules is MODERN_SFT
    inh = Inheritance(cfg, source)
    base, world = inh.base, inh.base.world_size
    seq = inh.pick("sequence_len", st.max_seq_len, sp.get("sequence_len"), base.sequence_len, "stage.max_seq_len")
    if seq > base.model.sequence_len:
        raise ConfigError("stage.max_seq_len", seq, f"use at most the model's sequence_len={base.model.sequence_len}",
                          "longer than the source model's context")
    explicit_dbs = hw.device_batch_size if isinstance(hw.device_batch_size, int) else None
    if rules.batching == "examples":
        examples = st.examples_per_step or SEED_SFT_EXAMPLES_PER_STEP
        per_rank = _per_rank(examples, world)
        cap = min(explicit_dbs or base.device_batch_size, per_rank)
        dbs = max(d for d in range(1, cap + 1) if per_rank % d == 0)
        accum, total = per_rank // dbs, examples * seq
    else:
        examples = None
        total = inh.pick("total_batch_size", st.total_batch_size, sp.get("total_batch_size"), base.total_batch_size)
        # 92d63d4 inherits the device batch too, and refuses one that does not divide
        dbs = inh.pick("device_batch_size", explicit_dbs, sp.get("device_batch_size"), base.device_batch_size,
                       "hardware.device_batch_size") if modern else explicit_dbs or base.device_batch_size
        if total % (dbs * seq * world):
            valid = valid_device_batches(total, seq, world, limit=dbs)
            if modern:
                raise ConfigError("hardware.device_batch_size", dbs,
                                  f"set hardware.device_batch_size to one of {valid[-4:] or [1]} or stage.total_batch_"
                                  f"size to a multiple of {dbs * seq * world}",
                                  f"total_batch_size={total:,} (from the source) does not divide into device_batch_"
                                  f"size={dbs} × sequence_len={seq} × world={world}")
            if not valid:
                raise ConfigError("stage.total_batch_size", total, f"use a multiple of sequence_len × world = "
                                  f"{seq * world}", "does not divide into whole micro-batches")
            dbs = valid[-1]   # tiny runs: the largest device batch that divides
        accum = total // (dbs * seq * world)
    lrs0 = inh.lrs(st, modern)   # the source's LRs, × this stage's fraction
    # stage.<key>, else this recipe's <name or key>
    given = lambda key, name=None: getattr(st, key) if getattr(st, key) is not None else getattr(rules, name or key)
    frac = given("init_lr_frac", "lr_frac")
    wd = given("weight_decay")
    if wd is None:
        wd = inh.pick("weight_decay", None, sp.get("weight_decay"), base.weight_decay)
    # horizon
    base_dir = get_base_dir(cfg.paths.base_dir)
    mixture, names = build_mixture(st.mixture, rules.mixture, "train", data_dir=cfg.paths.shared_data,
                                   base_dir=base_dir, seed=cfg.run.seed, max_per_task=st.max_examples_per_task,
                                   log=lambda s: None)
    if st.num_iterations:
        N, horizon = st.num_iterations, "num_iterations"
    else:   # num_epochs over the conversations (whole ones per step) or over their rendered tokens
        cap = max(2048, seq + 1) if rules.packing == "stream" else seq + 1
        count, unit = (len(mixture), "conversations") if examples else \
            (count_tokens(mixture, get_tokenizer(base_dir, cfg.data.tokenizer), cap), "tokens")
        N = max(1, math.ceil(st.num_epochs * count / (examples or total)))
        horizon = f"{st.num_epochs} epoch(s) of {count:,} {unit}"
    wu, wdn = lr_schedule(N, st.warmup_steps, given("warmup_ratio"), given("warmdown_ratio"))
    load_opt = given("load_optimizer")
    if load_opt and not source.has_optimizer_state():  # nanochat warns and continues too
        inh.notes.append(f"WARNING: stage.load_optimizer=true but {source.checkpoint or source.path} has no "
                         f"optimizer state; the optimizer starts fresh")
    chatcore_every = given("chatcore_every")
    max_cat = chatcore_cap(st.chatcore_max_cat, N * total, due_count(N, chatcore_every, at_zero=False))
    mom = tuple(v if v is not None else r for v, r in zip(
        (st.muon_momentum_start, st.muon_momentum_end, st.muon_momentum_ramp), rules.momentum))
    micro = dbs * seq * world   # validation tokens per pass: stage.eval_tokens, else 5% of the run's (≥ a micro-step)
    eval_tokens = st.eval_tokens if st.eval_tokens is not None else \
        min(EVAL_TOKENS_CAP, N * total // 20) // micro * micro
    scored = list(st.eval_tasks) if st.eval_tasks is not None else held_out_specs(names)
    note = f"{st.name} ({'modern' if modern else source.generation} rules): LRs × {frac}"
    derived = ChatStagePlan(mixture=names, conversations=len(mixture), packing=rules.packing,
                            examples_per_step=examples, lr_frac=frac, load_optimizer=bool(load_opt),
                            chatcore_every=chatcore_every, chatcore_max_cat=max_cat)
    rows = lambda p: [("mixture", f"{len(mixture):,} conversations: {', '.join(map(str, names))}"),
                      ("packing", rules.packing + (f" ({examples} conversations / step)" if examples else "")),
                      ("momentum", f"{mom[0]} → {mom[1]} over {mom[2]} steps"),
                      ("optimizer state", "from the source checkpoint" + ("" if source.has_optimizer_state() else
                                           " (none there: fresh)") if load_opt else "fresh"),
                      *eval_rows(p, st, chatcore_every, max_cat, scored)]
    return _derive(cfg, inh, N, total, horizon, lrs0, frac, note, derived, rows, sequence_len=seq,
                   device_batch_size=dbs, grad_accum_steps=accum, weight_decay=wd, warmup_steps=wu, warmdown_steps=wdn,
                   final_lr_frac=given("final_lr_frac"), muon_momentum_start=mom[0], muon_momentum_end=mom[1],
                   muon_momentum_steps=mom[2], eval_tokens=max(micro, eval_tokens))


def mid_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    return chat_plan(cfg, source, MID)


def sft_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    gen = source.generation if source is not None else cfg.model.generation
    return chat_plan(cfg, source, MODERN_SFT if gen == "modern" else SEED_SFT)


def rl_plan(cfg: Config, source: Optional[SourceRun], probe: Optional[dict] = None) -> StagePlan:
    """rl: questions × samples per step; LRs of the source (its unscaled ones) × init_lr_frac, decay to 0."""
    if source is None:
        return _pending(cfg)
    from nanochat.tasks import make_task
    check_tokenizer(cfg, source)
    st = cfg.stage
    E, S = st.examples_per_step, st.num_samples
    _per_rank(E, cfg.hardware.nproc_per_node * cfg.hardware.nnodes)
    inh = Inheritance(cfg, source)
    lrs0 = inh.lrs(st, False)
    wd = inh.pick("weight_decay", st.weight_decay, source.plan.get("weight_decay"), inh.base.weight_decay)
    if st.num_iterations:
        N, horizon = st.num_iterations, "num_iterations"
    else:
        n = len(make_task(st.task, "train", data_dir=cfg.paths.shared_data,
                          base_dir=str(get_base_dir(cfg.paths.base_dir))))
        N, horizon = max(1, (n // E) * st.num_epochs), f"{st.num_epochs} epoch(s) of {n:,} questions"
    return _derive(cfg, inh, N, E * S * inh.base.sequence_len, horizon, lrs0, st.init_lr_frac,
                   f"rl: LRs × {st.init_lr_frac}", ChatStagePlan(task=st.task),
                   lambda p: [("rollouts", f"{E} questions × {S} samples per step, ≤ {st.max_new_tokens} new tokens"),
                              ("task", st.task)],
                   device_batch_size=st.device_batch_size or S, grad_accum_steps=1, weight_decay=wd, warmup_steps=0,
                   warmdown_steps=N, final_lr_frac=0.0, muon_momentum_start=0.95, muon_momentum_end=0.95)
