"""Scaling-law fits on synthetic grids from a known law, degenerate grids, the sweep reader, and
the parameter breakdown against the built model. (The real sweeps are in test_scaling_e2e.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from nanochat import scaling as S
from nanochat.scaling_report import main as scaling_main, write_report

# Chinchilla's fitted law (Hoffmann et al. 2022), in nats
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
TRUE_B = TRUE["alpha"] / (TRUE["alpha"] + TRUE["beta"])


def synthetic_grid(budgets=(1e18, 1e19, 1e20, 1e21), sizes: int = 9, noise: float = 0.003, seed: int = 1,
                   k: float = 6.0) -> list[S.Point]:
    """Per budget, `sizes` models log-spaced over ±1 decade around the true optimum, D = C/(k·N)."""
    rng = np.random.default_rng(seed)
    g = (TRUE["alpha"] * TRUE["A"] / (TRUE["beta"] * TRUE["B"])) ** (1 / (TRUE["alpha"] + TRUE["beta"]))
    pts = []
    for c in budgets:
        n_opt = g * (c / k) ** TRUE_A
        for n in n_opt * np.logspace(-1, 1, sizes):
            d = c / (k * n)
            loss = S.law_loss(n, d, **TRUE) * np.exp(rng.normal(0, noise))
            pts.append(S.Point(params=n, tokens=d, loss=float(loss), budget=c, flops=c))
    return pts


def test_fits_recover_the_true_law():
    pts = synthetic_grid()
    a2 = S.approach2(pts, n_boot=50)
    assert all(f.method == "quadratic" and f.valley and not f.note for f in a2.fits)
    assert abs(a2.n_opt.exponent - TRUE_A) < 0.05 and abs(a2.d_opt.exponent - TRUE_B) < 0.05
    assert a2.n_opt.ci[0] <= a2.n_opt.exponent <= a2.n_opt.ci[1]
    a3 = S.approach3(pts, n_boot=10)
    assert abs(a3.alpha - TRUE["alpha"]) < 0.05 and abs(a3.beta - TRUE["beta"]) < 0.05
    assert abs(a3.a - TRUE_A) < 0.05 and abs(a3.b - TRUE_B) < 0.05
    assert abs(a3.E - TRUE["E"]) < 0.1 and a3.flops_per_param_token == pytest.approx(6.0)
    assert a3.ci["alpha"][0] < a3.ci["alpha"][1]
    # the two approaches agree on the compute-optimal allocation at a new budget
    p2 = S.predict(1e22, a2, a3)
    n3, d3 = a3.optimum(1e22)
    assert p2.source == "approach 2" and abs(np.log10(p2.n_opt / n3)) < 0.15
    assert p2.d_opt * p2.n_opt * 6 == pytest.approx(1e22, rel=0.2)


def test_lbfgs_minimises_a_quadratic_bowl():
    m = np.array([[3.0, 0.5], [0.5, 1.0]])
    x, f = S.lbfgs(lambda x: (float(0.5 * x @ m @ x - x.sum()), m @ x - 1), np.zeros(2))
    assert np.allclose(x, np.linalg.solve(m, np.ones(2)), atol=1e-6)


def test_single_budget_has_no_power_law_but_approach_3_predicts():
    pts = synthetic_grid(budgets=(1e19,))
    a2 = S.approach2(pts, n_boot=5)
    assert a2.n_opt is None and "at least 2" in a2.notes[0]
    a3 = S.approach3(pts, n_boot=0)
    pred = S.predict(1e20, a2, a3)
    assert pred.source == "approach 3" and pred.n_opt > 0


def test_downward_parabola_and_too_few_points_use_the_measured_minimum():
    hill = [S.Point(params=n, tokens=1e9 / n, loss=l, budget=1e15) for n, l in
            [(1e4, 3.0), (1e5, 3.4), (1e6, 3.5), (1e7, 3.1)]]  # concave: the parabola opens downward
    f = S.fit_isoflop(1e15, hill)
    assert f.method == "measured minimum" and "opens downward" in f.note and f.n_opt == 1e4 and not f.valley
    two = S.fit_isoflop(1e15, hill[:2])
    assert two.method == "measured minimum" and "< 3" in two.note
    assert S.approach3(hill, n_boot=0) is None  # 4 runs for 5 parameters
    assert S.predict(1e16, S.approach2(hill[:2], n_boot=0), None) is None


def test_isoflop_parabola_ignores_runs_far_from_the_minimum():
    # a clean bowl around N = 1e4, plus a far-off model trained for a handful of steps whose loss
    # is noise (below the bowl): a parabola through every run is tilted by it
    bowl = [(n, 3.0 + 0.5 * (np.log10(n) - 4.0) ** 2) for n in np.logspace(3, 5, 5)]
    runs = [S.Point(params=n, tokens=1e10 / n, loss=l, budget=1e15) for n, l in bowl + [(10 ** 6.5, 3.4)]]
    c2, c1, _ = np.polyfit(np.log10([p.params for p in runs]), [p.loss for p in runs], 2)
    assert abs(-c1 / (2 * c2) - 4.0) > 0.1  # what a whole-range fit would say
    f = S.fit_isoflop(1e15, runs)
    assert f.method == "quadratic" and f.valley and f.n_opt == pytest.approx(1e4, rel=1e-6)
    assert f.fit_range == (pytest.approx(1e3), pytest.approx(1e5))  # 2 sizes either side; not 10^6.5
    edge = S.fit_isoflop(1e15, runs[2:])  # minimum at the smallest size: still 3 sizes in the fit
    assert not edge.valley and edge.fit_range == (pytest.approx(1e4), pytest.approx(10 ** 5))


# A real CPU isoFLOP grid (aspect 8, d1-d6, 3 budgets): (C, N matmul, D, val bpb, FLOPs). Its
# bootstrap resamples drive an unbounded L-BFGS onto a ridge (α ≈ 27, log A ≈ 225) that once
# overflowed exp(log A) and crashed the report.
CPU_GRID = [
    (4e10, 4864, 962560, 2.9608, 3.992e10), (4e10, 14336, 294912, 3.1094, 3.986e10),
    (4e10, 33024, 131072, 3.3454, 4.047e10), (4e10, 65536, 69632, 4.1063, 4.107e10),
    (4e10, 116480, 40960, 3.6016, 4.121e10), (4e10, 190464, 24576, 3.5005, 3.896e10),
    (1.2e11, 4864, 2891776, 2.9469, 1.199e11), (1.2e11, 14336, 888832, 2.8200, 1.201e11),
    (1.2e11, 33024, 389120, 2.9381, 1.201e11), (1.2e11, 65536, 204800, 3.2166, 1.208e11),
    (1.2e11, 116480, 118784, 3.3163, 1.195e11), (1.2e11, 190464, 73728, 4.0202, 1.169e11),
    (3.6e11, 4864, 8679424, 2.8828, 3.6e11), (3.6e11, 14336, 2662400, 2.7297, 3.599e11),
    (3.6e11, 33024, 1167360, 2.7418, 3.604e11), (3.6e11, 65536, 610304, 2.8246, 3.6e11),
    (3.6e11, 116480, 356352, 2.9249, 3.585e11), (3.6e11, 190464, 225280, 3.1083, 3.571e11),
]


def test_runaway_parametric_fits_are_rejected_not_overflowed():
    pts = [S.Point(params=n, tokens=d, loss=l, budget=c, flops=f) for c, n, d, l, f in CPU_GRID]
    resample = [pts[i] for i in (1, 5, 8, 7, 7, 0, 0, 2, 0, 12, 9, 11, 4, 11, 13, 6, 8, 17)]
    args = (np.log([p.params for p in resample]), np.log([p.tokens for p in resample]),
            np.log([p.loss for p in resample]), S.HUBER_DELTA)
    x, _ = S.lbfgs(S._objective, np.array([15.0, 5.0, 1.0, 2.0, 0.5]), args)
    assert not S._plausible(x) and x[3] > S.MAX_EXPONENT  # the raw optimiser does run away here
    assert S.approach3(resample, n_boot=0) is None  # every start runs away: no fit, not a crash
    fit = S.approach3(pts, n_boot=3)
    assert fit is not None and 0 < fit.alpha < S.MAX_EXPONENT and 0 < fit.beta < S.MAX_EXPONENT
    assert len(fit.ci) == 5 and all(np.isfinite(v) for ci in fit.ci.values() for v in ci)


# --------------------------------------------------------------------------- the reader on run dirs

def _fake_run(sweep: Path, name: str, depth: int, budget: float, n: float, d: float, loss: float | None,
              status: str = "completed") -> None:
    """A run dir as a finished pretrain job leaves it (the files nanochat-scaling reads)."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({"model": {"depth": depth},
                                                              "stage": {"target_flops": budget}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.depth={depth}",
                                                                   f"stage.target_flops={budget}", "data=demo"]))
    if status != "completed":
        (run / "status.json").write_text(json.dumps({"status": status, "error": "boom"}))
        return
    params = dict(wte=10, value_embeds=0, lm_head=10, matrices=int(n) - 10, scalars=0, total=int(n) + 10,
                  non_embedding=int(n), matmul=int(n))
    (run / "result.json").write_text(json.dumps({"final_val_bpb": loss, "tokens_seen": d, "flops": 6 * n * d,
                                                 "params": params, "wall_time_s": 1.0}))
    (run / "COMPLETED").write_text("")


def test_report_lists_failed_and_missing_jobs_and_still_writes(tmp_path):
    sweep = tmp_path / "sweep"
    for i, p in enumerate(synthetic_grid(budgets=(1e18, 1e19), sizes=5)):
        _fake_run(sweep, f"job{i:02d}", depth=i % 5 + 1, budget=p.budget, n=p.params, d=p.tokens, loss=p.loss)
    _fake_run(sweep, "crashed", 6, 1e18, 1, 1, None, status="failed")
    _fake_run(sweep, "no_eval", 7, 1e19, 1e6, 1e6, None)
    (sweep / "never_started").mkdir()  # no resolved_config.yaml: not a run dir
    path, res = write_report(sweep, n_boot=10)
    md = path.read_text()
    skipped = {r.job: r.skip_reason for r in res["records"] if r.skip_reason}
    assert set(skipped) == {"crashed", "no_eval"}
    assert "failed: boom" in skipped["crashed"] and "val bpb" in skipped["no_eval"]
    assert "2 job(s) skipped" in md and "`crashed`" in md and "a = " in md and "α = " in md
    assert (sweep / "scaling" / "isoflop.png").stat().st_size > 5000
    assert res["prediction"].budget == pytest.approx(1e20)  # default: 10× the largest budget
    cmd = res["suggestion"]["command"]  # shared overrides kept, swept ones replaced by depth + iterations
    assert "data=demo" in cmd and f"model.depth={res['suggestion']['depth']}" in cmd
    assert "stage.target_flops" not in cmd and "stage.num_iterations=" in cmd


def test_cli_refuses_bad_input(tmp_path, capsys):
    assert scaling_main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert scaling_main([str(tmp_path), "--budget", "-1"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert scaling_main([str(tmp_path), "--bootstrap", "0"]) == 1  # empty dir: a report that says so
    assert "no run dirs" in (tmp_path / "scaling" / "report.md").read_text()


# --------------------------------------------------------------------------- parameter breakdown

def _classify(name: str) -> str:
    if name.startswith("transformer.wte."):
        return "wte"
    if name.startswith("value_embeds."):
        return "value_embeds"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("transformer.h."):
        return "matrices"
    return "scalars"


@pytest.mark.parametrize("generation", ["seed", "modern"])
def test_param_breakdown_matches_the_built_model(generation):
    import torch
    from nanochat.config import ModelConfig
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.plan import model_shape, param_breakdown
    shape = model_shape(ModelConfig(generation=generation, depth=3, aspect_ratio=64, head_dim=64,
                                    sequence_len=64), vocab_size=1000)
    with torch.device("meta"):
        model = GPT(GPTConfig(**shape.gpt_config_kwargs()))
    built = {k: 0 for k in ("wte", "value_embeds", "lm_head", "matrices", "scalars")}
    for name, p in model.named_parameters():
        built[_classify(name)] += p.numel()
    bd = param_breakdown(shape)
    assert {k: bd[k] for k in built} == built
    assert bd["total"] == sum(built.values()) == sum(p.numel() for p in model.parameters())
    assert bd["non_embedding"] == bd["total"] - built["wte"] - built["value_embeds"]
    assert bd["matmul"] == built["matrices"] + built["lm_head"]
    if generation == "modern":
        assert built["value_embeds"] > 0 and built["scalars"] > 0
