"""Override lists tests/test_config_fuzz.py drew that once ended in a traceback or a hang, pinned here
with the outcome a user must get: a plan (None) or a ConfigError naming this key (and a fix)."""
from __future__ import annotations

import pytest

from conftest import dry_run_plans
from nanochat.config import ConfigError

CASES = [
    # no head split of an odd width has an even (RoPE) head size: ValueError in plan._pick_heads before
    (["model.aspect_ratio=1", "model.depth=1"], "model.aspect_ratio"),
    (["model.aspect_ratio=5", "model.depth=3"], "model.aspect_ratio"),
    (["model.n_embd=7"], "model.n_embd"),
    (["model.generation=modern", "model.head_dim=3", "model.aspect_ratio=1", "model.depth=1"], "model.head_dim"),
    (["model.aspect_ratio=2", "model.depth=1"], None),          # the smallest even width still plans
    # a huge drawn depth made _pick_heads scan every integer up to n_embd (hours)
    (["model.depth=1000003", "stage.num_iterations=1"], None),
    # a depth of 9e102 (as a float) made every per-layer list (window sizes, FLOPs) run for ever
    (["++model.depth=9.364324127439266e+102", "stage.final_lr_frac=3460342", "model=d6"], "model.depth"),
    # a huge device batch over the total batch made the shrink rule scan every batch up to it
    (["hardware.device_batch_size=18446744073709551616"], None),
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))  # no tokenizer: plans use the default vocab
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("overrides,key", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_found_case_ends_in_a_plan_or_a_named_config_error(overrides, key):
    if key is None:
        assert dry_run_plans(overrides)
        return
    with pytest.raises(ConfigError) as e:
        dry_run_plans(overrides)
    assert e.value.key == key and e.value.fix
