"""nanochat-scaling: the scaling-law report of a sweep dir.

    nanochat-scaling SWEEP_DIR [--params total|non_embedding|matmul] [--budget C] [--bootstrap N]

Reads every run dir under SWEEP_DIR (result.json, plan.json, resolved_config.yaml; never logs),
fits the laws in `nanochat/scaling.py`, and writes SWEEP_DIR/scaling/report.md with PNG figures
next to it: isoFLOP curves, N_opt/D_opt against C, val bpb against depth and tokens per
parameter, the parametric fit, a table of every run, and the depth + iterations the fits
predict for `--budget` (default 10× the largest budget) as a ready `nanochat-run` command.
Failed or unfinished jobs are listed and skipped; degenerate grids get a best-effort report
with the reason. The sweep callback (launch/callbacks.py) runs this at the end of a multirun
whose jobs differ in stage.target_flops. No Hydra here: it works on any copied sweep dir.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from nanochat import scaling as S
from nanochat.common import atomic_write_text
from nanochat.plots import pyplot, save     # matplotlib itself is imported on first use
from nanochat.report import fmt_time, md_table, wall_time_s
from nanochat.results import PretrainResult, load_result
from nanochat.runs import find_runs, read_file

PARAM_KINDS = ("total", "non_embedding", "matmul")
DEFAULT_KIND = "matmul"  # nanochat's "scaling params": transformer matrices + lm_head
SWEPT_KEYS = {"model.depth", "stage.target_flops", "stage.num_iterations", "stage.target_param_data_ratio",
              "run.dir", "run.root", "run.skip_if_done"}


@dataclass
class RunRecord:
    job: str
    run_dir: Path
    status: str
    depth: Optional[int] = None
    budget: Optional[float] = None
    params: dict = field(default_factory=dict)
    tokens: Optional[float] = None
    flops: Optional[float] = None
    val_bpb: Optional[float] = None
    core: Optional[float] = None
    wall_time_s: Optional[float] = None
    overrides: list = field(default_factory=list)
    skip_reason: str = ""
    mixture: dict = field(default_factory=dict)    # data=mixture: normalised weights per source
    by_source: dict = field(default_factory=dict)  # and the final val bpb of each source


def read_run(sweep_dir: Path, run_dir: Path) -> RunRecord:
    """One run dir → a record; `skip_reason` says why it cannot enter a fit."""
    rec = RunRecord(job=str(run_dir.relative_to(sweep_dir)), run_dir=run_dir, status="unknown")
    status = read_file(run_dir / "status.json") or {}
    rec.status = "completed" if (run_dir / "COMPLETED").exists() else status.get("status", "unfinished")
    cfg = read_file(run_dir / "resolved_config.yaml") or {}
    rec.depth = (cfg.get("model") or {}).get("depth")
    tf = (cfg.get("stage") or {}).get("target_flops")
    rec.budget = float(tf) if tf not in (None, "") and float(tf) > 0 else None
    rec.overrides = [str(o) for o in read_file(run_dir / ".hydra" / "overrides.yaml") or []]
    plan = read_file(run_dir / "plan.json") or {}
    raw = load_result(run_dir)
    if rec.status != "completed" or raw is None:
        rec.skip_reason = "completed but result.json is missing" if rec.status == "completed" else \
            f"{rec.status}" + (f": {status['error']}" if status.get("error") else "")
        return rec
    result = PretrainResult.from_dict(raw)
    from nanochat.plan import ModelShape, param_breakdown   # older result.json: the counts from plan.json
    rec.params = result.params or (param_breakdown(ModelShape(**plan["model"])) if plan.get("model") else {})
    rec.tokens, rec.flops, rec.val_bpb, rec.core = result.tokens_seen, result.flops, result.final_val_bpb, result.core
    rec.mixture, rec.by_source = result.mixture, result.val_bpb_by_source
    rec.wall_time_s = result.wall_time_s if result.wall_time_s is not None else wall_time_s(str(run_dir))
    if rec.val_bpb is None or not math.isfinite(rec.val_bpb):
        rec.skip_reason = "no final val bpb (stage.eval_every must reach the last step)"
    elif not rec.tokens:
        rec.skip_reason = "no tokens trained"
    elif not rec.params:
        rec.skip_reason = "no parameter counts (no result.json params and no plan.json)"
    return rec


# --------------------------------------------------------------------------- prediction → command

def shared_overrides(recs: Sequence[RunRecord]) -> list[str]:
    """Overrides every job had (the sweep's fixed settings), minus what the sweep varied."""
    lists = [r.overrides for r in recs if r.overrides]
    common = [o for o in (lists[0] if lists else []) if all(o in l for l in lists[1:])]
    return [o for o in common if o.lstrip("+~").split("=", 1)[0] not in SWEPT_KEYS and not o.startswith("hydra")]


def suggest_run(template: RunRecord, kind: str, pred: S.Prediction, overrides: Sequence[str] = (),
                max_depth: int = 96) -> Optional[dict]:
    """The depth whose `kind` parameter count is nearest N_opt (in log), and iterations for D_opt."""
    from nanochat.config import ConfigError, load_config
    from nanochat.plan import make_plan, model_shape, param_breakdown
    try:
        cfg = load_config(str(template.run_dir / "resolved_config.yaml"))
    except Exception:  # an unreadable template: no command, the numbers stay in the report
        return None
    vocab = ((read_file(template.run_dir / "plan.json") or {}).get("model") or {}).get("vocab_size")
    sizes = {}
    for d in range(1, max_depth + 1):
        try:
            sizes[d] = param_breakdown(model_shape(replace(cfg.model, depth=d), vocab))[kind]
        except (ConfigError, ValueError):
            continue
    if not sizes:
        return None
    depth = min(sizes, key=lambda d: abs(math.log(sizes[d] / pred.n_opt)))
    st = replace(cfg.stage, num_iterations=None, target_flops=pred.budget)
    try:
        plan = make_plan(replace(cfg, model=replace(cfg.model, depth=depth), stage=st), vocab)
    except ConfigError:
        return None
    iters = max(1, round(pred.d_opt / plan.total_batch_size))
    args = ["stage=pretrain", *overrides, f"model.depth={depth}", f"stage.num_iterations={iters}"]
    return dict(depth=depth, params=sizes[depth], iterations=iters, batch=plan.total_batch_size,
                iterations_at_budget=plan.num_iterations,
                command="nanochat-run " + " ".join(shlex.quote(a) for a in args))


# --------------------------------------------------------------------------- figures

def _budget_colors(budgets: Sequence[float]) -> dict:
    cmap = pyplot().get_cmap("viridis")
    n = max(1, len(budgets) - 1)
    return {c: cmap(0.1 + 0.8 * i / n) for i, c in enumerate(budgets)}


def fig_isoflop(a2: S.Approach2, pts: Sequence[S.Point], a3: Optional[S.Approach3], kind: str, out: Path) -> Path:
    import numpy as np
    groups = S.group_by_budget(pts)
    colors = _budget_colors(list(groups))
    fig, ax = pyplot().subplots(figsize=(7, 4.8))
    for fit in a2.fits:
        g, col = groups[fit.budget], colors[fit.budget]
        ns = [p.params for p in g]
        ax.scatter(ns, [p.loss for p in g], color=col, s=22, label=f"C = {fit.budget:.3g}")
        if fit.method == "quadratic":
            xq = np.linspace(math.log10(fit.fit_range[0]) - 0.1, math.log10(fit.fit_range[1]) + 0.1, 100)  # fitted
            ax.plot(10 ** xq, np.polyval(fit.coef, xq), color=col, lw=1.2, ls="--")
        if a3 is not None:
            n = np.logspace(math.log10(min(ns)) - 0.1, math.log10(max(ns)) + 0.1, 100)
            ax.plot(n, a3.loss(n, fit.budget / (a3.flops_per_param_token * n)), color=col, lw=0.8, ls=":")
        ax.scatter([fit.n_opt], [fit.loss_opt], color=col, marker="*", s=160, edgecolor="k", zorder=5)
    ax.set(xscale="log", xlabel=f"parameters N ({kind})", ylabel="val bpb")
    ax.set_title("isoFLOP curves: quadratic fit in log N (dashed), optimum (★), L(N,D) fit (dotted)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, out)


def fig_optimal(a2: S.Approach2, pred: Optional[S.Prediction], out: Path) -> Path:
    import numpy as np
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    cs = [f.budget for f in a2.fits]
    grid = np.logspace(math.log10(min(cs)), math.log10(max(cs + ([pred.budget] if pred else []))), 50)
    for ax, attr, law, label in ((axes[0], "n_opt", a2.n_opt, "N_opt"), (axes[1], "d_opt", a2.d_opt, "D_opt")):
        ax.scatter(cs, [getattr(f, attr) for f in a2.fits], color="C0", zorder=3, label="per budget (approach 2)")
        if law is not None:
            ax.plot(grid, law(grid), color="C0", lw=1, label=f"{label} ∝ C^{law.exponent:.3f}")
        if pred is not None:
            ax.scatter([pred.budget], [getattr(pred, attr)], marker="*", s=160, color="C3", zorder=4,
                       label=f"prediction at C = {pred.budget:.3g}")
        ax.set(xscale="log", yscale="log", xlabel="FLOP budget C", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save(fig, out)


def fig_by(recs: Sequence[RunRecord], kind: str, x: str, out: Path) -> Path:
    """val bpb against depth (x='depth') or tokens per parameter (x='ratio'), one line per budget."""
    good = [r for r in recs if not r.skip_reason]
    budgets = sorted({r.budget for r in good if r.budget is not None})
    colors = _budget_colors(budgets)
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    key = (lambda r: r.depth or 0) if x == "depth" else (lambda r: r.tokens / r.params[kind])
    for c in budgets or [None]:
        rs = sorted((r for r in good if r.budget == c), key=key)
        ax.plot([key(r) for r in rs], [r.val_bpb for r in rs], marker="o", color=colors.get(c, "C0"),
                label=f"C = {c:.3g}" if c else "runs")
    ax.set(xscale="linear" if x == "depth" else "log", ylabel="val bpb",
           xlabel="depth" if x == "depth" else f"tokens per parameter ({kind})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, out)


# --------------------------------------------------------------------------- the report

FIGURES = {"isoflop": "isoFLOP curves", "optimal": "N_opt and D_opt against C", "depth": "val bpb against depth",
           "ratio": "val bpb against tokens per parameter"}   # figure → its alt text in report.md

def _ci(ci: Optional[tuple]) -> str:
    return f" (95% CI {ci[0]:.3f} – {ci[1]:.3f})" if ci and all(math.isfinite(v) for v in ci) else ""


def analyse(sweep_dir: Path, kind: str = DEFAULT_KIND, budget: Optional[float] = None, n_boot: int = 200,
            seed: int = 0) -> dict:
    """Read, fit and predict; returns everything the report shows (also what tests check)."""
    if kind not in PARAM_KINDS:
        raise ValueError(f"--params {kind!r}: use one of {', '.join(PARAM_KINDS)}")
    root = Path(sweep_dir)   # every run dir but the report's own (find_runs skips a run dir's checkpoints)
    recs = [read_run(root, d) for d in find_runs(root) if d.relative_to(root).parts[:1] != ("scaling",)]
    good = [r for r in recs if not r.skip_reason]
    pts = [S.Point(params=float(r.params[kind]), tokens=float(r.tokens), loss=float(r.val_bpb), budget=r.budget,
                   flops=r.flops, depth=r.depth, name=r.job) for r in good]
    notes: list[str] = []
    if not recs:
        notes.append(f"no run dirs (resolved_config.yaml) under {sweep_dir}")
    if len(good) < len(recs):
        notes.append(f"{len(recs) - len(good)} job(s) skipped (failed, unfinished or without a final val bpb): "
                     "see the table")
    a2 = S.approach2(pts, n_boot=n_boot, seed=seed)
    if not a2.fits:
        notes.append("no run has a FLOP budget (stage.target_flops): no isoFLOP analysis")
    notes += [f"C = {f.budget:.3g}: {f.note}" for f in a2.fits if f.note] + a2.notes
    a3 = S.approach3(pts, n_boot=max(0, n_boot // 2), seed=seed)
    if a3 is None and len(pts) < 5:
        notes.append(f"{len(pts)} usable run(s): the parametric fit L(N, D) needs at least 5")
    elif a3 is None:
        notes.append(f"the parametric fit L(N, D) found no plausible optimum (every start ran off to an exponent "
                     f"≥ {S.MAX_EXPONENT:g} or a coefficient ≥ e^{S.MAX_LOG_COEF:g}): the sizes do not constrain "
                     "it; add budgets or sizes around the optimum")
    if budget is None:   # 10× the largest budget, else 10× the most FLOPs a run spent
        spent = [f.budget for f in a2.fits] or [p.flops for p in pts if p.flops]
        budget = 10 * max(spent) if spent else None
    pred = S.predict(budget, a2, a3) if budget else None
    if pred is None:
        notes.append("no compute-optimal prediction: needs 2 FLOP budgets (approach 2) or 5 runs (approach 3)")
    elif pred.source == "approach 3":
        notes.append("prediction from the parametric law (approach 3): approach 2 has no power laws")
    suggestion = suggest_run(good[0], kind, pred, shared_overrides(recs)) if pred is not None and good else None
    return dict(sweep_dir=Path(sweep_dir), kind=kind, records=recs, points=pts, approach2=a2, approach3=a3,
                budget=budget, prediction=pred, suggestion=suggestion, notes=notes)


def render(res: dict, figures: dict) -> str:
    a2, a3, pred, kind = res["approach2"], res["approach3"], res["prediction"], res["kind"]
    images = lambda *names: [x for k in names if k in figures for x in (f"![{FIGURES[k]}]({figures[k]})", "")]
    L = [f"# Scaling-law report: `{res['sweep_dir']}`", "",
         f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `nanochat-scaling`. N counts **{kind}** parameters; "
         f"D = tokens trained; loss = final val bpb. {len(res['points'])} of {len(res['records'])} runs used.", ""]
    if res["notes"]:
        L += ["## Warnings", ""] + [f"- {n}" for n in res["notes"]] + [""]
    if pred is not None:
        L += ["## Recommendation", "",
              f"At C = {pred.budget:.3g} FLOPs ({pred.source}): N_opt = {pred.n_opt:,.0f}, D_opt = {pred.d_opt:,.0f} "
              f"tokens, {pred.tokens_per_param:.1f} tokens per parameter."]
        if s := res["suggestion"]:
            L += ["", f"Nearest depth: **d{s['depth']}** ({s['params']:,} {kind} params), {s['iterations']:,} iterations "
                      f"of {s['batch']:,} tokens ({s['iterations_at_budget']:,} would spend exactly C):", "",
                  "```bash", s["command"], "```"]
        L.append("")
    if a2.fits:
        L += ["## Approach 2: isoFLOP profiles", "",
              f"At each budget a quadratic in log10 N through the sizes up to {S.FIT_REACH} steps either side "
              "of the measured minimum; its vertex is the optimum. A valley: the measured minimum is not at either end.", "",
              *md_table(("budget C", "runs", "N_opt", "D_opt", "tokens/param", "bpb at opt", "fit", "valley"),
                        ((f"{f.budget:.3g}", f.n_points, f"{f.n_opt:,.0f}", f"{f.d_opt:,.0f}",
                          f"{f.tokens_per_param:.2f}", f"{f.loss_opt:.4f}", f.method, "yes" if f.valley else "no")
                         for f in a2.fits)), ""]
        if a2.n_opt is not None:
            ref = pred.budget if pred else max(f.budget for f in a2.fits)
            L += [f"- N_opt ∝ C^a with **a = {a2.n_opt.exponent:.3f}**{_ci(a2.n_opt.ci)}",
                  f"- D_opt ∝ C^b with **b = {a2.d_opt.exponent:.3f}**{_ci(a2.d_opt.ci)}",
                  f"- compute-optimal tokens per parameter at C = {ref:.3g}: "
                  f"**{a2.d_opt(ref) / a2.n_opt(ref):.2f}**", ""]
        L += images("isoflop", "optimal")
    if a3 is not None:
        ci = a3.ci
        L += ["## Approach 3: parametric fit L(N, D) = E + A/N^α + B/D^β", "",
              f"Huber loss (δ = {S.HUBER_DELTA}) on log L, L-BFGS from the best starting points of a "
              f"{int(math.prod(len(v) for v in S.START_GRID.values())):,}-point grid; {a3.n_points} runs; "
              f"bootstrap 95% intervals.", "",
              f"- E = {a3.E:.4f}{_ci(ci.get('E'))}, A = {a3.A:.4g}, B = {a3.B:.4g}",
              f"- **α = {a3.alpha:.3f}**{_ci(ci.get('alpha'))}, **β = {a3.beta:.3f}**{_ci(ci.get('beta'))}",
              f"- a = β/(α+β) = **{a3.a:.3f}**{_ci(ci.get('a'))}, b = α/(α+β) = **{a3.b:.3f}**{_ci(ci.get('b'))}",
              f"- C ≈ {a3.flops_per_param_token:.2f}·N·D (median over runs)"]
        if pred is not None:
            n, d = a3.optimum(pred.budget)
            L.append(f"- at C = {pred.budget:.3g}: N_opt = {n:,.0f}, D_opt = {d:,.0f}, {d / n:.1f} tokens per parameter")
        L.append("")
    L += images("depth", "ratio")
    L += ["## Runs", "", *md_table(("job", "status", "depth", "budget C", f"N ({kind})", "N total", "tokens",
                                    "tokens/N", "FLOPs", "val bpb", "CORE", "wall"))]
    for r in res["records"]:
        if r.skip_reason:
            L.append(f"| `{r.job}` | {r.skip_reason.replace('|', '/')[:160]} | {r.depth or '–'} | "
                     f"{f'{r.budget:.3g}' if r.budget else '–'} | | | | | | | | |")
            continue
        n = r.params[kind]
        L.append(f"| `{r.job}` | {r.status} | {r.depth} | {f'{r.budget:.3g}' if r.budget else '–'} | {n:,} | "
                 f"{r.params['total']:,} | {r.tokens:,.0f} | {r.tokens / n:.2f} | {r.flops or 0:.3g} | "
                 f"{r.val_bpb:.4f} | {'–' if r.core is None else f'{r.core:.4f}'} | {fmt_time(r.wall_time_s)} |")
    return "\n".join(L + mixture_table(res["records"])) + "\n"


def mixture_table(recs: Sequence[RunRecord]) -> list[str]:
    """Runs on data mixtures side by side (a weight sweep): weights, total and per-source val bpb, best first."""
    mixed = sorted((r for r in recs if r.mixture and not r.skip_reason), key=lambda r: r.val_bpb)
    if not mixed:
        return []
    names = list(dict.fromkeys(n for r in mixed for n in r.mixture))
    return ["", "## Mixtures", "", "Weights are normalised shares of the training tokens; the total weighs each "
            "source's val bpb by them.", ""] + md_table(
        ("job", "depth", *(f"w {n}" for n in names), "val bpb", *(f"bpb {n}" for n in names)),
        ((f"`{r.job}`", r.depth, *(f"{r.mixture.get(n, 0):.3f}" for n in names), f"{r.val_bpb:.4f}",
          *(f"{r.by_source[n]:.4f}" if n in r.by_source else "–" for n in names)) for r in mixed))


def write_report(sweep_dir: Path, kind: str = DEFAULT_KIND, budget: Optional[float] = None,
                 n_boot: int = 200, seed: int = 0) -> tuple[Path, dict]:
    """Analyse SWEEP_DIR and write SWEEP_DIR/scaling/{report.md, *.png}; returns (report path, analysis)."""
    res = analyse(Path(sweep_dir), kind, budget, n_boot, seed)
    out = Path(sweep_dir) / "scaling"
    figures: dict[str, str] = {}

    def fig(name: str, make) -> None:
        try:
            figures[name] = make(out / f"{name}.png").name
        except Exception as e:  # a figure that cannot be drawn must not cost the report
            res["notes"].append(f"figure {name}.png not drawn: {type(e).__name__}: {e}")

    if res["approach2"].fits:
        fig("isoflop", lambda p: fig_isoflop(res["approach2"], res["points"], res["approach3"], kind, p))
        if len(res["approach2"].fits) >= 2:
            fig("optimal", lambda p: fig_optimal(res["approach2"], res["prediction"], p))
    if res["points"]:
        if any(r.depth for r in res["records"] if not r.skip_reason):
            fig("depth", lambda p: fig_by(res["records"], kind, "depth", p))
        fig("ratio", lambda p: fig_by(res["records"], kind, "ratio", p))
    path = out / "report.md"
    atomic_write_text(path, render(res, figures))
    res["figures"] = {k: out / v for k, v in figures.items()}
    return path, res


def summary_lines(res: dict) -> list[str]:
    """A few lines for the terminal: exponents, the optimum per budget, the command."""
    a2, a3, pred = res["approach2"], res["approach3"], res["prediction"]
    lines = [f"C={f.budget:.3g}: N_opt={f.n_opt:,.0f} D_opt={f.d_opt:,.0f} ({f.tokens_per_param:.1f} tok/param,"
             f" {f.method}{', valley' if f.valley else ''})" for f in a2.fits]
    if a2.n_opt is not None:
        lines.append(f"approach 2: a={a2.n_opt.exponent:.3f}{_ci(a2.n_opt.ci)} b={a2.d_opt.exponent:.3f}{_ci(a2.d_opt.ci)}")
    if a3 is not None:
        lines.append(f"approach 3: alpha={a3.alpha:.3f} beta={a3.beta:.3f} a={a3.a:.3f} b={a3.b:.3f} E={a3.E:.3f}")
    if pred is not None and res["suggestion"]:
        lines.append(f"C={pred.budget:.3g}: {res['suggestion']['command']}")
    lines += [f"note: {n}" for n in res["notes"]]
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="nanochat-scaling", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="a multirun dir (hydra.sweep.dir) holding one run dir per job")
    ap.add_argument("--params", choices=PARAM_KINDS, default=DEFAULT_KIND,
                    help="which parameter count is N (default: matmul = transformer matrices + lm_head)")
    ap.add_argument("--budget", type=float, default=None, help="FLOP budget to predict for (default: 10× the largest)")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    problem = (f"{args.sweep_dir} is not a directory (pass a sweep dir: hydra.sweep.dir)" if not args.sweep_dir.is_dir()
               else f"--budget {args.budget}: must be a positive number of FLOPs, e.g. 1e19"
               if args.budget is not None and not args.budget > 0 else None)
    if problem:
        print(f"nanochat-scaling: {problem}", file=sys.stderr)
        return 2
    path, res = write_report(args.sweep_dir, args.params, args.budget, args.bootstrap, args.seed)
    for line in summary_lines(res):
        print(line)
    print(f"report: {path}")
    return 0 if res["points"] else 1


if __name__ == "__main__":
    sys.exit(main())
