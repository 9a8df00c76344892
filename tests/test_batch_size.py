"""hardware.device_batch_size=auto: candidates, the probe against real OOMs, the plan record, OOM advice."""
import json
from pathlib import Path

import pytest
import torch

from nanochat.batch_size import explain_oom, find_device_batch
from nanochat.config import ConfigError, config_from_dict
from nanochat.plan import make_plan, power_of_two_batches

from conftest import TINY, run_cli

TINY_GPT = dict(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture()
def one_thread():
    # the probe's trials are tiny; one thread avoids oversubscribing a shared CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_power_of_two_candidates_divide_the_total_batch():
    assert power_of_two_batches(2 ** 19, 2048, 8) == [32, 16, 8, 4, 2, 1]      # d20 on 8 GPUs
    assert power_of_two_batches(3 * 4 * 2048, 2048, 1) == [4, 2, 1]           # 12 sequences: 4 divides, 8 not
    assert power_of_two_batches(1000, 128, 1) == []


def test_config_accepts_auto_and_names_bad_values():
    cfg = config_from_dict({"hardware": {"device_batch_size": "auto"}})
    assert cfg.hardware.device_batch_size == "auto"
    assert config_from_dict({"hardware": {"device_batch_size": 16}}).hardware.device_batch_size == 16
    for bad in ("big", 0):
        with pytest.raises(ConfigError, match=r"hardware.device_batch_size=.*positive integer, auto"):
            config_from_dict({"hardware": {"device_batch_size": bad}})


@pytest.fixture(scope="module")
def cpu_probe():
    """A real probe on this CPU under a 0.1 GiB address-space budget: the big batches hit real OOMs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return find_device_batch(TINY_GPT, 64, [1024, 512, 256, 128, 64], "cpu", "float32", memory_gb=0.1)
    finally:
        torch.set_num_threads(n)


def test_probe_picks_the_largest_batch_that_fits(cpu_probe):
    trials = cpu_probe["trials"]
    assert trials[0]["batch"] == 1024 and trials[0]["reason"] == "OOM"    # the budget really binds
    assert [t["batch"] for t in trials] == [1024, 512, 256, 128, 64][:len(trials)]   # largest first
    assert all(not t["fits"] for t in trials[:-1]) and trials[-1]["fits"]  # stops at the first fit
    assert cpu_probe["device_batch_size"] == trials[-1]["batch"] < 1024   # it ran 2 steps inside the budget


def test_probe_that_cannot_fit_batch_one_is_a_clear_error(one_thread):
    with pytest.raises(ValueError, match=r"auto: even device batch 1 does not fit"):
        find_device_batch(dict(TINY_GPT, vocab_size=65536, n_embd=256, n_head=2, n_kv_head=2), 128, [1],
                          "cpu", "float32", memory_gb=0.05)


def test_plan_records_the_probe(cpu_probe):
    tree = {"model": {"depth": 2, "vocab_size": 256, "sequence_len": 64},
            "hardware": {"device_batch_size": "auto"}, "stage": {"name": "pretrain", "total_batch_size": 1024 * 64,
                                                                 "num_iterations": 1}}
    cfg = config_from_dict(tree)
    dry = make_plan(cfg)
    assert dry.device_batch_probe is None and "probed on a real run" in dry.notes[-1]
    plan = make_plan(cfg, probe=cpu_probe)
    b = cpu_probe["device_batch_size"]
    assert plan.device_batch_size == b and plan.grad_accum_steps == 1024 // b
    assert plan.device_batch_probe["trials"][0]["reason"] == "OOM"
    assert f"device_batch_size auto → {b}" in plan.notes[-1] and "1024 OOM" in plan.notes[-1]


def test_oom_mid_run_says_which_batch_to_try():
    with pytest.raises(MemoryError, match=r"hardware.device_batch_size=32: try hardware.device_batch_size=16 "
                                          r"\(grad accumulation 2 → 4"):
        with explain_oom(32, 2):
            torch.empty(2 ** 46, dtype=torch.uint8)      # a real allocator failure (64 TiB)
    with pytest.raises(ValueError):                       # other errors pass through untouched
        with explain_oom(32, 2):
            raise ValueError("not memory")


@pytest.mark.slow
def test_launcher_probes_and_freezes_the_result(base_dir, workdir):
    run_cli([*TINY, "hardware.device_batch_size=auto", "hardware.auto_batch_memory_gb=4",
             "stage.num_iterations=2", f"run.root={workdir}/runs"], base_dir, workdir, check=True)
    plan_file = next(Path(workdir, "runs").rglob("plan.json"))
    plan = json.loads(plan_file.read_text())
    probe = plan["device_batch_probe"]
    assert probe["trials"][-1]["fits"] and plan["device_batch_size"] == probe["device_batch_size"]
    assert (plan_file.parent / "COMPLETED").exists()
