"""The stage contract, and SFT from a modern base as nanochat 92d63d4's chat_sft does it.

- stage modules never import one another; no code outside a stage names it; every stage is one
  declaration (schema, planner, worker, sources, headline) and its YAML holds values only; a broken
  declaration fails every launch; `latest` falls back on another accepted source and says so
- the dry run prints the plan the run then uses (its table vs the run's effective_plan.json)
- modern SFT from a pretrain run: inherited sequence length / device batch / total batch / LRs
  (marked inherited), LRs × 0.8, weight decay 0, per-step LRs of a 50% warmdown, Muon momentum
  0.85 → 0.95 over 300 steps, optimizer state carried from the source
- best-fit packing of a small fixed mixture: exact rows and loss masks
- bad input: a source stage not accepted, an init_stage not accepted, an inherited batch that does
  not divide, a source trained with another vocabulary, load_optimizer without optimizer state
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import nanochat_run

REPO = Path(__file__).resolve().parents[1]
MIX = 'stage.mixture=["arithmetic:size=400,max_value=20"]'


# --------------------------------------------------------------------------- structure (fast)

def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_stage_modules_never_import_each_other():
    stages = {p.stem for p in (REPO / "nanochat" / "stages").glob("*.py") if p.stem not in ("__init__", "_entry")}
    assert {"pretrain", "mid", "sft", "rl", "eval", "serve", "tokenizer"} <= stages
    stage_module = lambda m: any(m == f"nanochat.stages.{s}" or m.startswith(f"nanochat.stages.{s}.") for s in stages)
    for p in (REPO / "nanochat" / "stages").glob("*.py"):
        bad = {m for m in _imports(p) if stage_module(m) and m != f"nanochat.stages.{p.stem}"}
        assert not bad, f"{p.name} imports another stage module: {bad} (shared code goes in a library module)"
    for p in (REPO / "nanochat").glob("*.py"):  # nor does the library lean on a stage (the registry is fine)
        bad = {m for m in _imports(p) if stage_module(m)}
        assert not bad, f"library module {p.name} imports a stage: {bad}"


def test_no_code_outside_a_stage_names_it():
    """The launcher, the planner and the schema hold no stage name: each stage's module declares what differs."""
    from nanochat.stages import stages
    names = set(stages())
    # StageConfig.name's default (the stage conf/config.yaml picks too); the files of a nanochat checkpoint
    allowed = {"config.py": {"pretrain"}, "interop_cli.py": {"tokenizer"}}
    for path in [*(REPO / "launch").glob("*.py"), REPO / "nanochat" / "plan.py", REPO / "nanochat" / "config.py"]:
        consts = [c for c in ast.walk(ast.parse(path.read_text())) if isinstance(c, ast.Constant) and c.value in names]
        bad = [(c.value, c.lineno) for c in consts if c.value not in allowed.get(path.name, set())]
        assert not bad, f"{path.name} names stages: {bad}"


def test_every_stage_declares_its_contract():
    """Each declaration is whole and consistent, and its YAML holds values only (no code paths)."""
    from nanochat.config import StageConfig, config_from_dict
    from nanochat.stages import Stage, stages
    found = stages()
    assert {"tokenizer", "pretrain", "mid", "sft", "rl", "eval", "serve"} <= set(found)
    for name, st in found.items():
        assert isinstance(st, Stage) and st.name == name and issubclass(st.schema, StageConfig)
        assert callable(st.planner) and callable(st.worker) and st.worker.__name__ == "run", name
        assert set(st.sources) <= set(found) and set(st.default_source.values()) <= set(st.sources), name
        assert st.source_tag in ("same", "any"), name
        assert st.headline is None or isinstance(st.headline, str), name
    for path in sorted((REPO / "conf" / "stage").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        assert not {"worker", "planner", "sources", "default_source", "source_tag", "schema"} & set(tree), path.name
        assert type(config_from_dict({"stage": tree}).stage) is found[tree["name"]].schema, path.name


def test_runs_frozen_with_the_old_yaml_keys_still_load(tmp_path):
    """Run dirs made when YAML named worker/planner/sources stay readable as sources; the launcher refuses the keys."""
    from nanochat.config import ConfigError, config_from_dict, load_config
    old = {"stage": {"name": "sft", "worker": "nanochat.stages.sft", "planner": "nanochat.chat_plan.sft_plan",
                     "sources": ["pretrain", "mid"], "default_source": {"seed": "mid"}, "source_tag": "same"}}
    (tmp_path / "resolved_config.yaml").write_text(yaml.safe_dump(old))
    assert load_config(str(tmp_path / "resolved_config.yaml")).stage.name == "sft"
    with pytest.raises(ConfigError, match="stage.worker"):
        config_from_dict(old)


def test_sweep_objective_is_the_declared_headline():
    import math
    from launch.run import objective
    done = lambda **r: {"status": "completed", "result": r}
    assert objective(done(final_val_bpb=1.5, mean_reward=0.2), None, "pretrain") == 1.5
    assert objective(done(final_val_bpb=1.5, mean_reward=0.2), None, "rl") == 0.2
    assert objective(done(final_val_bpb=1.5, mean_reward=0.2), "final_val_bpb", "rl") == 1.5  # run.objective wins
    assert math.isnan(objective(done(vocab_size=4096), None, "tokenizer"))  # no headline declared
    pipeline = {"status": "completed", "stages": [{"kind": "pretrain", "result": {"final_val_bpb": 1.0}},
                                                  {"kind": "sft", "result": {"final_val_loss": 0.7}}]}
    assert objective(pipeline, None, "pretrain") == 0.7  # the last stage's headline


def test_sft_latest_source_follows_the_generation():
    """chat_sft (modern) reads the base run; Dec-2025 SFT (seed) the mid run; each falls back on the other;
    init_stage names one alone."""
    from nanochat.config import ConfigError, config_from_dict
    from nanochat.stages import stage
    st = yaml.safe_load((REPO / "conf" / "stage" / "sft.yaml").read_text())
    cfg = lambda gen, **kw: config_from_dict({"stage": {**st, **kw}, "model": {"generation": gen}})
    sft = stage("sft")
    assert sft.source_order(cfg("modern")) == (["pretrain"], ["mid"])
    assert sft.source_order(cfg("seed")) == (["mid"], ["pretrain"])
    assert sft.source_order(cfg("modern", init_stage="mid")) == (["mid"], [])
    with pytest.raises(ConfigError, match="stage.init_stage"):
        sft.source_order(cfg("seed", init_stage="rl"))


def _completed(root: Path, stage: str, tag: str, name: str) -> Path:
    d = root / stage / tag / name
    d.mkdir(parents=True)
    (d / "COMPLETED").write_text("")
    return d


def test_latest_falls_back_to_another_source_and_says_so(tmp_path):
    """The issue's case: a modern pretrain run, then `stage=sft` with the seed default (mid): the pretrain run is
    taken and the plan says why; with no run at all, the error names every way out."""
    from launch.rundir import resolve_source
    from nanochat.config import ConfigError, config_from_dict
    from nanochat.stages import stage
    st = yaml.safe_load((REPO / "conf" / "stage" / "sft.yaml").read_text())
    cfg = lambda **kw: config_from_dict({"stage": {**st, **kw}, "model": {"depth": 4}, "run": {"root": str(tmp_path)}})
    with pytest.raises(ConfigError) as e:
        resolve_source(cfg(), stage("sft"))
    msg = str(e.value)
    assert "no completed mid / pretrain run found for tag d4" in msg
    for way in ("stage.init_stage=pretrain|mid", "model.generation", "seed: mid, modern: pretrain", "stage.init_from"):
        assert way in msg, (way, msg)
    pre = _completed(tmp_path, "pretrain", "d4", "a")
    _completed(tmp_path, "pretrain", "d6", "b")  # another tag: never taken
    path, note = resolve_source(cfg(), stage("sft"))
    assert path == pre.resolve() and "no completed mid run for tag d4" in note and "pretrain run" in note
    assert "stage.init_stage=mid" in note
    with pytest.raises(ConfigError) as e:  # an explicit init_stage insists, and the error says what else is there
        resolve_source(cfg(init_stage="mid"), stage("sft"))
    assert "stage.init_stage" in str(e.value) and "pretrain has a run" in str(e.value)
    mid = _completed(tmp_path, "mid", "d4", "c")
    assert resolve_source(cfg(), stage("sft")) == (mid.resolve(), None)  # the default source, when it has a run


def test_a_broken_declaration_fails_every_launch_before_any_run(tmp_path):
    """A renamed worker is a NameError when the launcher imports the declarations, not when a run starts."""
    (tmp_path / "broken_stage.py").write_text(
        "from nanochat.config import TrainStageConfig\nfrom nanochat.stage_plan import train_plan\n"
        "from nanochat.stages import Stage\n\ndef run_renamed(cfg, run_dir):\n    return {}\n\n"
        "STAGE = Stage('broken', schema=TrainStageConfig, planner=train_plan, worker=run)\n")
    _entry_point(tmp_path, "broken_stage", "broken = broken_stage:STAGE")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    p = subprocess.run([sys.executable, "-m", "launch.run", "stage=tokenizer", f"run.root={tmp_path / 'runs'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "NameError: name 'run' is not defined" in p.stdout + p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def _entry_point(where: Path, dist: str, line: str) -> None:
    """What `pip install` of a package declaring a `nanochat.stages` entry point leaves on sys.path."""
    info = where / f"{dist}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[nanochat.stages]\n{line}\n")


# --------------------------------------------------------------------------- packing (fast)

class _Rendered:
    """Conversations already rendered: render_conversation returns the stored ids and mask (and
    truncates like the real tokenizer does), so row contents can be checked token by token."""
    BOS = 0

    def get_bos_token_id(self) -> int:
        return self.BOS

    def render_conversation(self, conv: dict, max_tokens: int = 2048):
        return conv["ids"][:max_tokens], conv["mask"][:max_tokens]


def _conv(n: int, start: int) -> dict:
    ids = [0] + list(range(start, start + n - 1))          # BOS, then the conversation's tokens
    mask = [0] * (n // 2) + [1] * (n - n // 2)              # the second half is the assistant's
    return {"ids": ids, "mask": mask}


def test_bestfit_packing_rows_and_masks():
    from nanochat.chat_data import BestFitChatLoader
    lengths = [6, 4, 9, 3, 5, 2]  # rows of T + 1 = 9 tokens
    convs = [_conv(n, 100 * (i + 1)) for i, n in enumerate(lengths)]
    loader = BestFitChatLoader(convs, _Rendered(), batch_size=3, seq_len=8, buffer_size=3)
    rows, masks = loader.next_rows()
    # nanochat's best fit over a buffer of 3 (refilled before each pick): the longest conversation
    # that fits the room left, else pad with BOS
    order = [[2], [0, 3], [4, 1]]  # 9 | 6 + 3 | 5 + 4
    for r, picks in enumerate(order):
        want = sum((convs[i]["ids"] for i in picks), [])
        want_mask = sum((convs[i]["mask"] for i in picks), [])
        pad = 9 - len(want)
        assert rows[r] == want + [0] * pad and masks[r] == want_mask + [0] * pad, r
    x, y = BestFitChatLoader(convs, _Rendered(), batch_size=3, seq_len=8, buffer_size=3).__next__()
    import torch
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(x[1], torch.tensor(rows[1][:-1]))
    keep = torch.tensor(masks[1][1:], dtype=torch.bool)
    assert torch.equal(y[1], torch.where(keep, torch.tensor(rows[1][1:]), -1))  # -1 off the assistant
    # the buffer wrapped into the next epoch; the next row: 6 + 2, then 1 token of padding (mask 0)
    assert loader.epoch == 1
    rows2, masks2 = loader.next_rows()
    assert rows2[0] == convs[0]["ids"] + convs[5]["ids"] + [0]
    assert masks2[0] == convs[0]["mask"] + convs[5]["mask"] + [0]
    # resume: a loader rebuilt from the state gives the same next rows
    state = json.loads(json.dumps(loader.state_dict()))
    again = BestFitChatLoader(convs, _Rendered(), batch_size=3, seq_len=8, buffer_size=3, state=state)
    assert again.next_rows() == loader.next_rows()


def test_bestfit_truncates_a_conversation_longer_than_a_row():
    from nanochat.chat_data import BestFitChatLoader
    convs = [_conv(20, 100), _conv(3, 500)]
    rows, masks = BestFitChatLoader(convs, _Rendered(), batch_size=1, seq_len=8, buffer_size=2).next_rows()
    assert rows[0] == convs[0]["ids"][:9]  # nanochat would pad rows forever; we crop to the row


# --------------------------------------------------------------------------- optimizer warm start (fast)

@pytest.mark.parametrize("generation", ["seed", "modern"])
def test_optimizer_warm_start_carries_state_not_lrs(tmp_path, generation):
    """Whatever state the generation's optimizer keeps (momentum, Adam moments, NorMuon second moments)."""
    import torch
    from nanochat import training as T
    from nanochat.chat_train import warm_start_optimizer
    from nanochat.checkpoint import save_checkpoint
    from nanochat.config import ModelConfig, TrainStageConfig
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import build_optimizer
    from nanochat.plan import model_shape
    from nanochat.precision import Precision
    torch.manual_seed(0)
    shape = model_shape(ModelConfig(generation=generation, depth=2, aspect_ratio=32, head_dim=16, sequence_len=16,
                                    vocab_size=64))
    model = GPT(GPTConfig(**shape.gpt_config_kwargs()))
    model.init_weights()
    settings = None
    try:  # the recipe of the generation's optimizer, where the optimizer module has recipes
        from nanochat.plan import optimizer_settings
        settings = optimizer_settings(TrainStageConfig(name="sft"), generation, shape)[1]
        for k in ("muon_momentum_start", "muon_momentum_end", "muon_momentum_ramp", "muon_momentum_final"):
            settings.pop(k, None)
    except ImportError:
        pass

    def opt(lr):
        return build_optimizer(model, embedding_lr=lr, unembedding_lr=lr, matrix_lr=lr, scalar_lr=lr,
                               weight_decay=0.0, adam_betas=(0.8, 0.95), world_size=1, rank=0,
                               **({"settings": settings} if settings is not None else {}))
    src = opt(0.01)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x, x).backward()
        src.step()
        src.zero_grad(set_to_none=True)
    run = tmp_path / "src"
    save_checkpoint(run, 2, model=model, optimizer=src, loader_state=None, meta={"world_size": 1}, rank=0)
    new = opt(0.5)
    for g in new.param_groups:
        g["momentum"] = 0.85
    ours = [(g["lr"], g["initial_lr"]) for g in new.param_groups]
    rt = T.Runtime(0, 0, 1, torch.device("cpu"), Precision.resolve("cpu", "float32"), tmp_path)
    notes = []
    assert warm_start_optimizer(new, str(run), rt, notes.append)
    carried = src.state_dict()["state"]
    kinds = {name for st in carried.values() for name in st}
    # what 92d63d4's chat_sft carries: Muon momentum (+ NorMuon second moments), AdamW moments and steps
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"} <= kinds
    assert ("second_momentum_buffer" in kinds) == (generation == "modern")
    got = new.state_dict()["state"]
    assert set(got) == set(carried)
    for k, s in carried.items():
        for name, v in s.items():  # momentum buffers, Adam moments, step counts: all carried
            assert torch.equal(torch.as_tensor(got[k][name]), torch.as_tensor(v)), (k, name)
    assert [(g["lr"], g["initial_lr"]) for g in new.param_groups] == ours  # this stage's LRs, not the source's
    assert all(g["momentum"] == 0.85 for g in new.param_groups if g.get("kind") == "muon")
    # a source without optimizer state: a warning, and the optimizer stays fresh
    for f in (run / "checkpoints").glob("*/optim_rank0.pt"):
        f.unlink()
    fresh = opt(0.5)
    assert not warm_start_optimizer(fresh, str(run), rt, notes.append)
    assert "WARNING" in notes[-1] and "no optimizer state" in notes[-1] and not fresh.state_dict()["state"]


# --------------------------------------------------------------------------- modern SFT end to end

@pytest.fixture(scope="module")
def modern(stage_root):
    """A tiny modern-generation pretrain run (the SFT source) in a private run root."""
    env, root, _ = stage_root
    src = root / "pretrain" / "d2" / "modern"
    nanochat_run(env, "experiment=tiny", "model=modern", "model.depth=2", "model.sequence_len=128",
                 "model.aspect_ratio=32", "model.head_dim=64", "stage.num_iterations=4", "stage.eval_every=-1",
                 "stage.total_batch_size=2048", "hardware.device_batch_size=8", f"run.root={root}", f"run.dir={src}")
    return env, root, src


def _table(stdout: str) -> dict[str, str]:
    """The dry-run table's rows, {name: value} (rich wraps nothing at COLUMNS=400)."""
    rows = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) == 4 and parts[1]:
            rows[parts[1]] = parts[2]
    return rows


SFT = ["experiment=tiny", "stage=sft", MIX, "stage.num_iterations=null", "stage.total_batch_size=null",
       "hardware.device_batch_size=null", "stage.eval_tokens=null", "stage.eval_every=4", "stage.chatcore_every=-1",
       "stage.eval_examples=2", "stage.eval_max_new_tokens=4", "stage.save_every=-1"]  # load_optimizer: modern default (on)


@pytest.mark.slow
def test_modern_sft_dry_run_is_the_run(modern):
    from nanochat.plan import GENERATIONS, Plan, plan_rows
    env, root, src = modern
    env = {**env, "COLUMNS": "400"}
    args = [*SFT, f"stage.init_from={src}", f"run.root={root}"]
    dry = _table(nanochat_run(env, *args, "run.dry_run=true").stdout)
    run_dir = root / "sft_modern"
    out = nanochat_run(env, *args, f"run.dir={run_dir}").stdout
    eff = json.loads((run_dir / "effective_plan.json").read_text())
    assert json.loads((run_dir / "plan.json").read_text()) == eff  # one plan: frozen == trained with
    for name, value in plan_rows(Plan.from_dict(eff)):
        assert dry[name].startswith(value), (name, dry[name], value)  # the dry run showed these very numbers
    # what chat_sft inherits from the base run, marked as inherited
    s = json.loads((src / "plan.json").read_text())
    assert (eff["sequence_len"], eff["device_batch_size"], eff["total_batch_size"]) == \
        (s["sequence_len"], s["device_batch_size"], s["total_batch_size"]) == (128, 8, 2048)
    assert set(eff["inherited"]) == {"sequence_len", "device_batch_size", "total_batch_size", "embedding_lr",
                                     "unembedding_lr", "matrix_lr"}
    assert "(inherited: total_batch_size, device_batch_size)" in dry["batch: device × seq × world × accum"]
    assert str(src) in dry["init_from"] and "pretrain, modern" in dry["init_from"]
    g, dscale = GENERATIONS["modern"], s["lr_scale_dmodel"]
    # the LRs the base run was configured with (before its batch scaling) × init_lr_frac 0.8
    assert eff["matrix_lr"] == pytest.approx(0.8 * g["matrix_lr"])
    assert eff["embedding_lr"] == pytest.approx(0.8 * g["embedding_lr"] * dscale)
    assert eff["unembedding_lr"] == pytest.approx(0.8 * g["unembedding_lr"] * dscale)
    assert eff["scalar_lr"] == pytest.approx(0.8 * g["scalar_lr"])
    assert eff["weight_decay"] == 0.0 and eff["warmup_steps"] == 0 and eff["final_lr_frac"] == 0.0
    assert (eff["muon_momentum_start"], eff["muon_momentum_end"], eff["muon_momentum_steps"]) == (0.85, 0.95, 300)
    assert eff["stage"]["packing"] == "bestfit" and eff["stage"]["lr_frac"] == 0.8
    N = eff["num_iterations"]
    assert eff["warmdown_steps"] == round(0.5 * N) and N >= 4
    # per-step LRs: flat, then linear to 0 over the second half (chat_sft's progress schedule)
    lrs = [m["lr"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in m]
    want = [eff["matrix_lr"] * min(1.0, (N - k) / eff["warmdown_steps"]) for k in range(N)]
    assert lrs == pytest.approx(want)
    assert "optimizer: state warm-started from" in out
    assert "validation:" in out  # the chat validation pass says what it does
    r = json.loads((run_dir / "result.json").read_text())
    assert r["step"] == N and r["final_val_loss"] < r["first_val_loss"]
    assert eff["eval_tokens"] <= max(eff["total_tokens"] // 20, 8 * 128)  # validation scaled to the run


@pytest.mark.slow
def test_seed_default_sft_takes_a_modern_pretrain_run(modern, tmp_path):
    """The issue's case end to end: a modern pretrain run alone, then `stage=sft` with the seed default (mid):
    `latest` takes the pretrain run, the plan says so, and the source's generation (modern) picks the rules."""
    env, _, src = modern
    root = tmp_path / "runs"
    shutil.copytree(src, root / "pretrain" / "d2" / "modern")
    dry = _table(nanochat_run({**env, "COLUMNS": "400"}, *SFT, "model.depth=2", f"run.root={root}",
                              "run.dry_run=true").stdout)
    assert dry["source"].startswith("no completed mid run for tag d2: starting from the newest pretrain run"), dry
    assert "pretrain, modern" in dry["init_from"] and dry["generation"].startswith("modern"), dry


@pytest.mark.slow
def test_bad_sources_are_refused_before_work(modern):
    env, root, src = modern
    env = {**env, "COLUMNS": "400"}

    def refused(*args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "launch.run", *args, f"run.root={root}", "run.dry_run=true"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0, p.stdout[-2000:]
        return p.stdout + p.stderr
    sft = root / "sft_modern"
    if not (sft / "COMPLETED").exists():
        pytest.skip("needs the SFT run of test_modern_sft_dry_run_is_the_run")
    out = refused("experiment=tiny", "stage=mid", f"stage.init_from={sft}")
    assert "stage.init_from" in out and "a sft run; the mid stage does not start from that stage" in out
    out = refused("experiment=tiny", "stage=sft", "stage.init_stage=rl")
    assert "stage.init_stage" in out and "pretrain, mid" in out
    out = refused(*SFT, f"stage.init_from={src}", "hardware.device_batch_size=3")
    assert "hardware.device_batch_size" in out and "does not divide" in out
    other = root / "pretrain" / "d2" / "other_vocab"
    shutil.copytree(src, other)
    plan = json.loads((other / "plan.json").read_text())
    plan["model"]["vocab_size"] = 32768  # a run trained with another generation's vocabulary
    (other / "plan.json").write_text(json.dumps(plan))
    out = refused(*SFT, f"stage.init_from={other}")
    assert "data.tokenizer" in out and "does not match the source model's vocab 32,768" in out
    # load_optimizer without optimizer state in the source: a warning, not a refusal
    bare = root / "pretrain" / "d2" / "no_optim"
    shutil.copytree(src, bare)
    for f in bare.glob("checkpoints/*/optim_rank*.pt"):
        f.unlink()
    p = nanochat_run(env, *SFT, f"stage.init_from={bare}", f"run.root={root}", "run.dry_run=true")
    assert "WARNING" in p.stdout and "no optimizer state" in p.stdout


@pytest.mark.slow
def test_rl_and_chat_eval_read_a_modern_sft_run(modern):
    env, root, _ = modern
    sft = root / "sft_modern"
    if not (sft / "COMPLETED").exists():
        pytest.skip("needs the SFT run of test_modern_sft_dry_run_is_the_run")
    rl = root / "rl_modern"
    nanochat_run(env, "stage=rl", "hardware=cpu", "data=demo", f"stage.init_from={sft}", "stage.task=\"arithmetic:max_value=9\"",
                 "stage.num_iterations=1", "stage.examples_per_step=2", "stage.num_samples=2", "stage.max_new_tokens=8",
                 "stage.eval_examples=2", "stage.eval_num_samples=1", f"run.root={root}", f"run.dir={rl}")
    plan = json.loads((rl / "plan.json").read_text())
    base = json.loads((sft / "plan.json").read_text())["stage"]["base_lrs"]
    assert plan["generation"] == "modern" and plan["source"] == str(sft)
    assert plan["matrix_lr"] == pytest.approx(0.05 * base["matrix_lr"])  # the SFT's base LRs × rl's 0.05
    ev = root / "eval_modern"
    nanochat_run(env, "stage=eval", "hardware=cpu", "data=demo", f"stage.init_from={sft}",
                 'stage.tasks=["arithmetic:max_value=9"]', "stage.max_per_task=2", "stage.max_new_tokens=8",
                 f"run.root={root}", f"run.dir={ev}")
    r = json.loads((ev / "result.json").read_text())
    assert r["mode"] == "chat" and r["source_stage"] == "sft" and "arithmetic" in r["task_accuracy"]


def test_modern_sft_default_mixture_offline(base_dir, monkeypatch):
    """SmolTalk + MMLU auxiliary_train ×3 + GSM8K train ×4; what is missing offline is skipped with a note."""
    from nanochat.chat_plan import MODERN_SFT_MIXTURE, build_mixture
    from nanochat.common import shared_data_dir
    if shared_data_dir() is None:
        pytest.skip("../shared/data is absent: the offline default mixture needs its task files")
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    notes = []
    mix, names = build_mixture(None, MODERN_SFT_MIXTURE, "train", data_dir=None, base_dir=base_dir, seed=0,
                               log=notes.append)
    assert names.count("gsm8k") == 4
    have_aux = names.count("mmlu_aux")
    assert have_aux in (0, 3) and (have_aux == 3 or any("mmlu_aux" in n for n in notes))
    assert "smoltalk" in names or any("smoltalk" in n for n in notes)  # hub-only: a note, not an error
    assert len(mix) >= 4 * 7000  # GSM8K train (7,473 rows) four times over


@pytest.mark.slow
def test_adding_a_stage_is_one_module_and_its_yaml(stage_root, tmp_path):
    """A new stage from outside the repo: its YAML (on hydra.searchpath) and its declaring module (an entry point)."""
    env, root, pre = stage_root
    (tmp_path / "conf" / "stage").mkdir(parents=True)
    mid = yaml.safe_load((REPO / "conf" / "stage" / "mid.yaml").read_text())
    mid.update(name="distill")
    (tmp_path / "conf" / "stage" / "distill.yaml").write_text(yaml.safe_dump(mid))
    (tmp_path / "distill_stage.py").write_text(
        "from nanochat.chat_plan import mid_plan\nfrom nanochat.config import ChatStageConfig\n"
        "from nanochat.stages import Stage\n\n"
        "def run(cfg, run_dir):\n    from nanochat.chat_train import train_chat\n"
        "    return {**train_chat(cfg, run_dir), 'distilled': True}\n\n"
        "STAGE = Stage('distill', schema=ChatStageConfig, planner=mid_plan, worker=run, sources=('pretrain',),\n"
        "              headline='final_val_loss')\n")
    _entry_point(tmp_path, "distill_stage", "distill = distill_stage:STAGE")
    env = {**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    run = root / "distill_run"
    out = nanochat_run(env, "experiment=tiny", "model.depth=2", "stage=distill", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                       f"stage.init_from={pre}", "stage.num_iterations=2", "stage.eval_every=-1", "stage.eval_tasks=[]",
                       'stage.mixture=["arithmetic:size=50"]', f"run.root={root}", f"run.dir={run}").stdout
    assert "stage=distill" in out
    r = json.loads((run / "result.json").read_text())
    assert r["distilled"] and r["step"] == 2
