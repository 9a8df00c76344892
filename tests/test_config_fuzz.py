"""Config fuzzing: random override lists through compose → validate → plan, as a dry run does.

Every list must end in a plan or a ConfigError that names a key: never another exception
(a traceback for the user) and never a hang (pytest-timeout guards the whole test). A list it finds
that fails goes into tests/test_config_cases.py with the fix, so CI keeps checking it every run.
"""
from __future__ import annotations

import os
import string

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, dry_run_plans

GROUPS = {g: sorted(p.stem for p in (REPO / "conf" / g).glob("*.yaml") if p.stem != "base")
          for g in ("model", "stage", "hardware", "data", "experiment")}
KEYS = [
    "model.depth", "model.sequence_len", "model.aspect_ratio", "model.head_dim", "model.n_head", "model.n_kv_head",
    "model.n_embd", "model.vocab_size", "model.generation", "model.window_pattern", "model.softcap", "model.rope_base",
    "model.pad_vocab_to", "model.short_window", "hardware.nproc_per_node", "hardware.nnodes", "hardware.dtype",
    "hardware.device", "hardware.device_batch_size", "hardware.num_threads", "stage.total_batch_size",
    "stage.num_iterations", "stage.target_flops", "stage.target_param_data_ratio", "stage.matrix_lr",
    "stage.embedding_lr", "stage.warmup_ratio", "stage.warmup_steps", "stage.warmdown_ratio", "stage.final_lr_frac",
    "stage.weight_decay", "stage.eval_every", "stage.save_every", "stage.keep_last", "stage.grad_clip",
    "stage.init_from", "stage.vocab_size", "run.resume", "run.seed", "run.tag", "run.pipeline", "data.source",
    "data.packing", "data.val_fraction", "wandb.mode",
]
ODD = st.sampled_from(["", " ", "null", "~", "nan", "inf", "-inf", "1e999", "-0", "0x10", "'quoted'", '"q"',
                       "${model.depth}", "${nope}", "${", "[1,2]", "{a: 1}", "a,b", "ä", "../..", "/etc/passwd",
                       "true", "False", "1_000", "0.5", "-1", "3.7", "2**63", str(2**63), "-999999999999"])
VALUES = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
    st.sampled_from([0, 1, 2, 3, 4, 7, 64, 65536]).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.ascii_letters + string.digits + "_-.,:/ ", max_size=8),
    ODD,
)


@st.composite
def overrides(draw) -> str:
    kind = draw(st.sampled_from(["key", "key", "key", "group", "unknown", "delete"]))
    if kind == "group":
        group = draw(st.sampled_from(sorted(GROUPS)))
        option = draw(st.one_of(st.sampled_from(GROUPS[group]), st.text(string.ascii_lowercase + "_", max_size=6)))
        return f"{group}={option}"
    if kind == "unknown":
        head = draw(st.sampled_from(["model", "stage", "hardware", "run", "data", "paths", "nosuchgroup"]))
        leaf = draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=8))
        return f"{draw(st.sampled_from(['', '+', '++']))}{head}.{leaf}={draw(VALUES)}"
    key = draw(st.sampled_from(KEYS))
    if kind == "delete":
        return f"~{key}"
    return f"{draw(st.sampled_from(['', '', '+', '++']))}{key}={draw(VALUES)}"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))  # no tokenizer: plans use the default vocab
    monkeypatch.chdir(tmp_path)


@settings(max_examples=int(os.environ.get("NANOCHAT_FUZZ_EXAMPLES", 80)), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(overrides(), min_size=1, max_size=5))
def test_random_overrides_end_in_a_plan_or_a_named_config_error(ovs):
    from nanochat.config import ConfigError
    try:
        dry_run_plans(ovs)
    except ConfigError as e:
        assert e.key and isinstance(e.key, str), (ovs, e)
        assert e.fix, (ovs, e)
