"""Scaling-law fits of an isoFLOP sweep. Pure numbers in, numbers out: no files, no plots.

Two estimates of how the compute-optimal model size N and token count D grow with the
FLOP budget C, as in Hoffmann et al. 2022 ("Chinchilla"):

- Approach 2 (isoFLOP profiles): at each budget, a quadratic in log10 N through the
  final losses of the sizes up to 2 steps either side of the measured minimum; its vertex is N_opt(C). Power laws N_opt = k_N·C^a and D_opt = k_D·C^b
  through the optima give the exponents; bootstrap over runs gives their intervals.
- Approach 3 (parametric): L(N, D) = E + A/N^α + B/D^β fitted to every run with a Huber
  loss on log L, minimised by L-BFGS from a grid of starting points (Besiroglu et al. 2024,
  "Chinchilla scaling: a replication attempt"). Then a = β/(α+β), b = α/(α+β).

Degenerate inputs never raise: a budget with fewer than 3 runs, or whose parabola opens
downward, falls back to its measured minimum and says so in `IsoFit.note`; with a single
budget there are no power laws (`Approach2.a` is None) and predictions fall back on approach 3.
`nanochat/scaling_report.py` reads run dirs into `Point`s and renders what these return.
"""
from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

HUBER_DELTA = 1e-3  # on log-loss residuals, as Hoffmann et al. and Besiroglu et al.
FIT_REACH = 2       # approach 2's parabola: the sizes up to 2 steps either side of each budget's minimum


@dataclass
class Point:
    """One finished run: its budget (None when not part of an isoFLOP grid), size, tokens, loss."""
    params: float
    tokens: float
    loss: float
    budget: Optional[float] = None
    flops: Optional[float] = None
    depth: Optional[int] = None
    name: str = ""


@dataclass
class IsoFit:
    budget: float
    n_points: int
    n_opt: float
    d_opt: float
    loss_opt: float
    method: str                       # "quadratic" | "measured minimum"
    coef: Optional[tuple] = None      # (c2, c1, c0): loss = c2·x² + c1·x + c0, x = log10 N
    valley: bool = False              # the measured minimum is not at either end of the sizes
    note: str = ""
    fit_range: Optional[tuple] = None # (smallest N, largest N) of the runs the parabola went through

    @property
    def tokens_per_param(self) -> float:
        return self.d_opt / self.n_opt


@dataclass
class PowerLaw:
    """y = coef · C^exponent."""
    exponent: float
    coef: float
    ci: Optional[tuple] = None        # bootstrap 95% interval of the exponent

    def __call__(self, c: float) -> float:
        return self.coef * c ** self.exponent


@dataclass
class Approach2:
    fits: list                        # IsoFit per budget, by budget
    n_opt: Optional[PowerLaw] = None  # N_opt(C); None with fewer than 2 budgets
    d_opt: Optional[PowerLaw] = None
    notes: list = field(default_factory=list)


@dataclass
class Approach3:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    flops_per_param_token: float      # C ≈ k·N·D (k = 6 for the textbook count)
    objective: float
    n_points: int
    ci: dict = field(default_factory=dict)  # name → (lo, hi) bootstrap 95% intervals

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def loss(self, n, d):
        return law_loss(n, d, self.E, self.A, self.B, self.alpha, self.beta)

    def optimum(self, c: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under k·N·D = C."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        nd = c / self.flops_per_param_token
        n = g * nd ** self.a
        return n, nd / n


def law_loss(n, d, E: float, A: float, B: float, alpha: float, beta: float):
    """L(N, D) = E + A/N^α + B/D^β (numpy arrays or floats)."""
    return E + A / np.power(n, alpha) + B / np.power(d, beta)


# --------------------------------------------------------------------------- approach 2

def group_by_budget(points: Sequence[Point]) -> dict[float, list[Point]]:
    groups: dict[float, list[Point]] = {}
    for p in points:
        if p.budget is not None:
            groups.setdefault(float(p.budget), []).append(p)
    return dict(sorted(groups.items()))


def _tokens_at(points: Sequence[Point], n: float, budget: float) -> float:
    """D at size n on this budget's line: log D is linear in log N across its runs (D ≈ C/(k·N))."""
    ns, ds = (np.log([getattr(p, k) for p in points]) for k in ("params", "tokens"))
    if len(set(ns.tolist())) >= 2:
        slope, icept = np.polyfit(ns, ds, 1)
        return float(math.exp(icept + slope * math.log(n)))
    return budget / (6.0 * n)


def fit_isoflop(budget: float, points: Sequence[Point]) -> IsoFit:
    """The optimum of one budget: vertex of a quadratic in log10 N, else the measured minimum."""
    pts = sorted(points, key=lambda p: p.params)
    i_min = int(np.argmin([p.loss for p in pts]))
    valley = 0 < i_min < len(pts) - 1
    best = pts[i_min]
    measured = IsoFit(budget, len(pts), best.params, best.tokens, best.loss, "measured minimum", valley=valley)
    if len({p.params for p in pts}) < 3:
        measured.note = f"{len(pts)} run(s) of distinct size < 3: no parabola, the measured minimum is used"
        return measured
    near = _window(pts, best.params)
    x = np.log10([p.params for p in near])
    c2, c1, c0 = coef = tuple(float(c) for c in np.polyfit(x, [p.loss for p in near], 2))
    xv = -c1 / (2 * c2) if c2 > 0 else None
    # a nearly flat parabola puts its vertex decades away: extrapolating that far is meaningless
    if xv is None or not (math.isfinite(xv) and x.min() - 1 <= xv <= x.max() + 1):
        measured.coef = coef
        measured.note = ("the parabola opens downward (no valley in the fit)" if xv is None else "the fitted "
                         "optimum lies over a decade outside the sizes run") + ": the measured minimum is used"
        return measured
    n_opt = 10.0 ** xv
    note = "" if x.min() <= xv <= x.max() else \
        "the fitted optimum lies outside the sizes run (extrapolated): widen the size range"
    return IsoFit(budget, len(pts), n_opt, _tokens_at(pts, n_opt, budget), c0 - c1 * c1 / (4 * c2), "quadratic",
                  coef, valley, note, fit_range=(near[0].params, near[-1].params))


def _window(pts: Sequence[Point], n_best: float) -> list[Point]:
    """The runs of the sizes up to FIT_REACH steps either side of the measured minimum (by size).
    A parabola is only a good model of an isoFLOP curve near its bottom: far from it the loss
    of a model trained for a handful of steps is dominated by optimisation noise, and one such
    point can tilt a whole-range fit or open it downward."""
    sizes = sorted({p.params for p in pts})
    i = sizes.index(n_best)
    lo, hi = max(0, i - FIT_REACH), min(len(sizes), i + FIT_REACH + 1)
    while hi - lo < 3:  # a minimum at an end: still three sizes for a parabola
        lo, hi = (lo - 1, hi) if hi == len(sizes) else (lo, hi + 1)
    keep = set(sizes[lo:hi])
    return [p for p in pts if p.params in keep]


def fit_power_law(budgets: Sequence[float], values: Sequence[float]) -> PowerLaw:
    """Least squares in log-log (approach2 calls it with at least 2 distinct budgets)."""
    slope, icept = np.polyfit(np.log(budgets), np.log(values), 1)
    return PowerLaw(float(slope), float(math.exp(icept)))


def approach2(points: Sequence[Point], n_boot: int = 200, seed: int = 0) -> Approach2:
    groups = group_by_budget(points)
    fits = [fit_isoflop(c, pts) for c, pts in groups.items()]
    out = Approach2(fits)
    if len(fits) < 2:
        out.notes.append(f"{len(fits)} FLOP budget(s): N_opt ∝ C^a needs at least 2; no exponents from approach 2")
        return out
    cs, rng = [f.budget for f in fits], np.random.default_rng(seed)
    boots = [[fit_isoflop(c, [pts[i] for i in rng.integers(0, len(pts), len(pts))]) for c, pts in groups.items()]
             for _ in range(n_boot)]
    for attr in ("n_opt", "d_opt"):   # N_opt(C), D_opt(C); their exponents' intervals from the resampled fits
        law = lambda fs: fit_power_law(cs, [getattr(f, attr) for f in fs])
        setattr(out, attr, replace(law(fits), ci=_interval([law(bf).exponent for bf in boots]) if boots else None))
    return out


def _interval(xs: Sequence[float]) -> tuple[float, float]:
    xs = np.asarray([x for x in xs if np.isfinite(x)])
    return (float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5))) if len(xs) else (float("nan"), float("nan"))


# --------------------------------------------------------------------------- approach 3

# θ = (a, b, e, α, β) with A = e^a, B = e^b, E = e^e; Chinchilla's grid of starting points
START_GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
                  alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber(log L̂ − log L) and its gradient; log L̂ = logsumexp(a − α·log N, b − β·log D, e)."""
    a, b, e, al, be = theta
    t1, t2 = a - al * logn, b - be * logd
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    r = m + np.log(s) - logl
    g = np.clip(r, -delta, delta) / s  # dHuber/dr times the softmax normaliser
    gw1, gw2 = g * w1, g * w2
    grad = np.array([gw1.sum(), gw2.sum(), (g * w3).sum(), -(gw1 @ logn), -(gw2 @ logd)])
    return float(_huber(r, delta).sum()), grad


def _screen(logn, logd, logl, delta: float, keep: int) -> list[np.ndarray]:
    """The `keep` grid points with the lowest starting objective (vectorised over the grid)."""
    grid = np.array(list(itertools.product(*START_GRID.values())))  # (G, 5)
    a, b, e, al, be = (grid[:, i:i + 1] for i in range(5))
    terms = np.stack([a - al * logn, b - be * logd, np.broadcast_to(e, (len(grid), len(logn)))])
    pred = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2])
    obj = _huber(pred - logl, delta).sum(axis=1)
    return [grid[i] for i in np.argsort(obj)[:keep]]


def lbfgs(fun, x0: np.ndarray, args: tuple = (), memory: int = 10, max_iter: int = 1000,
          tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Minimise a smooth `fun(x, *args) -> (f, grad)` with L-BFGS (two-loop recursion) and an
    Armijo backtracking line search. Small and dependency-free: scipy's L-BFGS-B costs ~10 ms of
    overhead per iteration here, which makes a bootstrap of hundreds of fits slow."""
    x = np.asarray(x0, dtype=float).copy()
    f, g = fun(x, *args)
    pairs: deque = deque(maxlen=memory)   # the last `memory` steps s and gradient changes y
    for _ in range(max_iter):
        q = g.copy()
        alphas = []
        for s_, y_ in reversed(pairs):
            a_ = (s_ @ q) / (y_ @ s_)
            alphas.append(a_)
            q -= a_ * y_
        if pairs:
            q *= (pairs[-1][0] @ pairs[-1][1]) / (pairs[-1][1] @ pairs[-1][1])
        for (s_, y_), a_ in zip(pairs, reversed(alphas)):
            q += s_ * (a_ - (y_ @ q) / (y_ @ s_))
        d = -q
        slope = g @ d
        if slope >= 0:  # not a descent direction: restart from steepest descent
            pairs.clear()
            d, slope = -g, -(g @ g)
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = fun(x_new, *args)
            if np.isfinite(f_new) and f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-20:
                return x, f
        s_, y_ = x_new - x, g_new - g
        if s_ @ y_ > 1e-18:
            pairs.append((s_, y_))
        converged = abs(f - f_new) <= tol * max(1.0, abs(f)) and np.abs(g_new).max() < 1e-10
        x, f, g = x_new, f_new, g_new
        if converged or f - f_new == 0 and np.abs(s_).max() < 1e-14:
            break
    return x, f


# A fit is only kept inside these bounds. With few budgets (or a bootstrap resample that drew
# a handful of distinct runs) the loss surface has a ridge along which α and log A grow
# together without bound; such a "fit" explains nothing and overflows exp(log A).
MAX_EXPONENT = 5.0
MAX_LOG_COEF = 200.0


def _plausible(theta: np.ndarray) -> bool:
    a, b, e, al, be = theta
    return bool(np.all(np.isfinite(theta)) and max(a, b, e) < MAX_LOG_COEF
                and 0 < al < MAX_EXPONENT and 0 < be < MAX_EXPONENT)


def _lbfgs(starts, logn, logd, logl, delta: float) -> tuple[Optional[np.ndarray], float]:
    """The best plausible L-BFGS result over the starting points (None when none is)."""
    best, best_f = None, float("inf")
    for x0 in starts:
        x, fx = lbfgs(_objective, x0, (logn, logd, logl, delta))
        if _plausible(x) and fx < best_f:
            best, best_f = x, float(fx)
    return best, best_f


def approach3(points: Sequence[Point], n_boot: int = 100, seed: int = 0, starts: int = 8,
              delta: float = HUBER_DELTA) -> Optional[Approach3]:
    """Fit L(N, D) = E + A/N^α + B/D^β; None with fewer than 5 runs (5 free parameters)."""
    pts = [p for p in points if p.params > 0 and p.tokens > 0 and p.loss > 0]
    if len(pts) < 5:
        return None
    logn, logd, logl = (np.log([getattr(p, k) for p in pts]) for k in ("params", "tokens", "loss"))
    theta, fval = _lbfgs(_screen(logn, logd, logl, delta, starts), logn, logd, logl, delta)
    if theta is None:
        return None
    ks = [p.flops / (p.params * p.tokens) for p in pts if p.flops]
    k = float(np.median(ks)) if ks else 6.0
    fit = _to_result(theta, fval, k, len(pts))
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(pts), len(pts))
            # warm start at the full fit, plus the best grid point of this resample
            st = [theta] + _screen(logn[idx], logd[idx], logl[idx], delta, 1)
            th, fv = _lbfgs(st, logn[idx], logd[idx], logl[idx], delta)
            if th is not None:
                boots.append(_to_result(th, fv, k, len(idx)))
        fit.ci = {name: _interval([getattr(r, name) for r in boots]) for name in ("alpha", "beta", "a", "b", "E")}
    return fit


def _to_result(theta: np.ndarray, fval: float, k: float, n: int) -> Approach3:
    a, b, e, al, be = (float(v) for v in theta)
    return Approach3(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be,
                     flops_per_param_token=k, objective=fval, n_points=n)


# --------------------------------------------------------------------------- prediction

@dataclass
class Prediction:
    budget: float
    n_opt: float
    d_opt: float
    source: str                       # "approach 2" | "approach 3"
    tokens_per_param = IsoFit.tokens_per_param


def predict(budget: float, a2: Optional[Approach2], a3: Optional[Approach3]) -> Optional[Prediction]:
    """Compute-optimal (N, D) at `budget`: approach 2's power laws, else approach 3's law."""
    if a2 is not None and a2.n_opt is not None and a2.d_opt is not None:
        return Prediction(budget, a2.n_opt(budget), a2.d_opt(budget), "approach 2")
    if a3 is not None and a3.alpha + a3.beta > 0:
        n, d = a3.optimum(budget)
        return Prediction(budget, n, d, "approach 3")
    return None
