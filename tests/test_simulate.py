"""The GPU step rehearsed on fake tensors (nanochat/simulate.py): its peak equals the same tracker's on a
real run of the same step, its FLOPs the plan's formula, its traffic the ZeRO-2 layout; memory planning
refuses what does not fit; activation checkpointing changes memory, not numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.config import ConfigError, config_from_dict
from nanochat.plan import make_plan
from nanochat.shapes import memory_floor
from nanochat.simulate import check_request, rehearse

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "sequence_len": 64, "vocab_size": 512}


def cfg_plan(model=None, stage=None, hardware=None, base_dir=None):
    tree = {"model": {**TINY, **(model or {})}, "stage": {"name": "pretrain", "total_batch_size": 4 * 64 * 2,
                                                            **(stage or {})},
            "hardware": {"device_batch_size": 4, **(hardware or {})}}
    if base_dir is not None:
        tree["paths"] = {"base_dir": str(base_dir)}
    cfg = config_from_dict(tree)
    return cfg, make_plan(cfg)


@pytest.mark.parametrize("model,hardware", [
    ({"generation": "seed"}, {}),                                              # 1 rank, accum 2
    ({"generation": "modern", "short_window": 16}, {"nproc_per_node": 2}),    # ZeRO-2 over 2 fake ranks, windows
    ({"generation": "seed", "activation_checkpointing": "full"}, {"compile": True}),
])
def test_simulated_peak_equals_real_run(model, hardware):
    cfg, plan = cfg_plan(model, hardware=hardware)
    fake = rehearse(cfg, plan)
    real = rehearse(cfg, plan, fake=False)
    assert fake["fake"] and not real["fake"]
    assert abs(fake["peak_memory_gib"] - real["peak_memory_gib"]) <= 0.10 * real["peak_memory_gib"]
    floor = memory_floor(plan.model, plan.device_batch_size, plan.grad_accum_steps, plan.world_size,
                         checkpointing=cfg.model.activation_checkpointing == "full")
    assert floor["total"] / 2 ** 30 <= real["peak_memory_gib"]   # a floor: never above what the step holds
    assert floor["activations"] / 2 ** 30 <= real["memory_gib"]["activations"]
    assert fake["memory_gib"]["params"] == real["memory_gib"]["params"] > 0
    assert len(real["losses"]) == 2 and all(torch.isfinite(torch.tensor(real["losses"])))


def test_flops_counted_equal_plan_with_windows_and_fp8():
    cfg, plan = cfg_plan({"generation": "modern", "short_window": 16, "n_embd": 256, "fp8": "tensorwise"})
    r = rehearse(cfg, plan)
    assert plan.fp8 == "tensorwise" and r["fp8"] == "tensorwise"
    assert r["flops_per_token_counted"] == pytest.approx(plan.flops_per_token, rel=0.01)


def test_zero2_traffic_is_the_padded_gradient_bytes():
    cfg, plan = cfg_plan({"generation": "seed"}, hardware={"nproc_per_node": 4, "interconnect_gb_s": 100})
    r = rehearse(cfg, plan)
    from nanochat.gpt import GPT
    from nanochat.training import gpt_config
    with torch.device("meta"):
        model = GPT(gpt_config(plan))
    W = 4
    groups = model.param_groups()
    adam = sum(-(-p.numel() // W) * W for k, ps in groups.items() if k != "matrix" for p in ps)
    shapes: dict = {}
    for p in groups["matrix"]:
        shapes.setdefault(tuple(p.shape), []).append(p)
    muon = sum(-(-len(ps) // W) * W * ps[0].numel() for ps in shapes.values())
    assert r["reduce_scatter_bytes"] == r["all_gather_bytes"] == 4 * (adam + muon)
    assert r["comm_seconds_per_step"] == pytest.approx(2 * 4 * (adam + muon) * 3 / 4 / 100e9)


def test_activation_checkpointing_saves_memory_and_changes_no_number():
    base, plan = cfg_plan({"generation": "modern", "short_window": 16})
    full, _ = cfg_plan({"generation": "modern", "short_window": 16, "activation_checkpointing": "full"})
    a, b = rehearse(base, plan, fake=False), rehearse(full, plan, fake=False)
    assert a["losses"] == b["losses"]                       # bitwise, fp32 on CPU
    assert b["memory_gib"]["activations"] < 0.8 * a["memory_gib"]["activations"]
    assert rehearse(full, plan)["peak_memory_gib"] < rehearse(base, plan)["peak_memory_gib"]


def test_activation_checkpointing_resumes_exactly():
    from nanochat import training as T
    from nanochat.gpt import build_model
    from nanochat.precision import Precision
    from nanochat.simulate import train_step
    cfg, plan = cfg_plan({"generation": "modern", "short_window": 16, "activation_checkpointing": "full"})
    rt = T.Runtime(0, 0, 1, torch.device("cpu"), Precision("cpu"), Path("."))
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 512, (4, 65), generator=g) for _ in range(3)]

    def fresh():
        m = build_model(T.gpt_config(plan), "cpu", 0)
        m.activation_checkpointing = "full"
        return m, T.make_optimizer(m, plan, cfg, rt)

    def step(m, o, s):
        return float(train_step(m, o, [(data[s][:, :-1], data[s][:, 1:])], rt.precision, plan, s))
    m, o = fresh()
    straight = [step(m, o, s) for s in range(3)]
    m, o = fresh()
    step(m, o, 0), step(m, o, 1)
    sd, osd = m.state_dict(), o.state_dict()
    m2, o2 = fresh()
    m2.load_state_dict(sd), o2.load_state_dict(osd)
    assert step(m2, o2, 2) == straight[2]


def test_bad_input_names_key_and_fix():
    cfg = config_from_dict({"model": TINY, "stage": {"name": "eval"}})
    with pytest.raises(ConfigError) as e:
        check_request(cfg)
    assert e.value.key == "run.simulate" and "stage=pretrain" in e.value.fix
    cfg, _ = cfg_plan(hardware={"device": "cuda", "dtype": "bfloat16"})
    with pytest.raises(ConfigError) as e:
        check_request(cfg)
    assert e.value.key == "hardware.gpu_memory_gb" and "80" in e.value.fix
    cfg = config_from_dict({"model": TINY, "hardware": {"nproc_per_node": 8, "nnodes": 10_000}})
    with pytest.raises(ConfigError) as e:
        check_request(cfg)
    assert e.value.key == "hardware.nproc_per_node"


def test_plan_time_memory_check_and_simulated_auto_batch(tmp_path):
    """A batch that does not fit is refused at plan time with the batch that does; auto picks it."""
    from launch.probe import plan_memory
    from nanochat.stages import stage
    st = stage("pretrain")
    hw = {"device": "cuda", "dtype": "bfloat16", "compile": False, "gpu_memory_gb": 0.013, "memory_check": True}
    stage = {"total_batch_size": 8 * 64}
    cfg, _ = cfg_plan({"generation": "seed"}, stage, {**hw, "device_batch_size": 8}, base_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        plan_memory(cfg, None, st.planner(cfg, None), st)
    assert e.value.key == "hardware.device_batch_size" and e.value.value == 8
    fit = int(e.value.fix.split("hardware.device_batch_size=")[1].split()[0])
    assert 1 <= fit < 8 and "grad accumulation" in e.value.fix
    cfg, _ = cfg_plan({"generation": "seed"}, stage, {**hw, "device_batch_size": "auto"}, base_dir=tmp_path)
    sp = plan_memory(cfg, None, st.planner(cfg, None), st)
    assert sp.plan.device_batch_size == fit and sp.plan.grad_accum_steps == 8 // fit
    assert any(k == "simulated peak / rank" for k, _ in sp.rows)


def test_every_gpu_plan_checks_the_memory_floor_and_names_a_batch_that_fits(tmp_path):
    """Without hardware.memory_check, a GPU plan checks the torch-free floor only (no simulation: a row
    says it); a batch over the floor is refused, naming the largest batch the simulator fits."""
    from launch.probe import plan_memory
    from nanochat.stages import stage
    st = stage("pretrain")
    hw = {"device": "cuda", "dtype": "bfloat16", "compile": False, "gpu_memory_gb": 0.012}
    stage_kw = {"total_batch_size": 64 * 64}
    cfg, plan = cfg_plan({"generation": "seed"}, stage_kw, {**hw, "device_batch_size": 4}, base_dir=tmp_path)
    sp = plan_memory(cfg, None, st.planner(cfg, None), st)
    assert [k for k, _ in sp.rows if "memory" in k] == ["memory floor / rank"]
    assert not (tmp_path / "simulate").exists()            # nothing was rehearsed
    cfg, plan = cfg_plan({"generation": "seed"}, stage_kw, {**hw, "device_batch_size": 64}, base_dir=tmp_path)
    floor = memory_floor(plan.model, 64, plan.grad_accum_steps, 1)
    assert floor["total"] > 0.9 * 0.012 * 2 ** 30           # its logits alone: 64 × 64 × 512 × 4 bytes = 8 MiB
    with pytest.raises(ConfigError) as e:
        plan_memory(cfg, None, st.planner(cfg, None), st)
    assert e.value.key == "hardware.device_batch_size" and "memory floor" in e.value.problem
    fit = int(e.value.fix.split("hardware.device_batch_size=")[1].split()[0])
    assert 1 <= fit < 64
    ok, _ = cfg_plan({"generation": "seed"}, stage_kw, {**hw, "device_batch_size": fit}, base_dir=tmp_path)
    assert rehearse(ok, make_plan(ok))["fits"]


def test_bf16_embeddings_shrink_the_simulated_tables():
    hw = {"device": "cuda", "dtype": "bfloat16", "compile": False, "gpu_memory_gb": 80}
    model = {"generation": "modern", "short_window": 16}
    peaks = [rehearse(*cfg_plan(model, hardware={**hw, "embedding_dtype": e})) for e in ("float32", "bfloat16")]
    _, plan = cfg_plan(model)
    from nanochat.shapes import param_counts
    saved = 2 * param_counts(plan.model)["lookup"] / 2 ** 30      # 2 bytes less per table entry
    got = peaks[0]["memory_gib"]["params"] - peaks[1]["memory_gib"]["params"]
    assert got == pytest.approx(saved, rel=1e-6)
    assert peaks[1]["memory_gib"]["optimizer"] < peaks[0]["memory_gib"]["optimizer"]


def test_cli_simulate_prints_json_last_and_creates_no_run_dir(tmp_path):
    cmd = [sys.executable, "-m", "launch.run", "stage=pretrain", "model=d4", "model.vocab_size=512",
           "model.sequence_len=64", "stage.total_batch_size=512", "hardware.device_batch_size=4",
           "hardware.nproc_per_node=2", f"paths.base_dir={tmp_path / 'base'}", f"run.root={tmp_path / 'runs'}",
           "run.simulate=true"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for k in ("peak_memory_gib", "gpu_memory_gib", "flops_per_token_counted", "flops_per_token_plan",
              "world_size", "device_batch_size"):
        assert k in out
    assert out["world_size"] == 2 and out["reduce_scatter_bytes"] > 0
    assert "simulated peak / rank" in p.stdout
    assert not (tmp_path / "runs").exists()
