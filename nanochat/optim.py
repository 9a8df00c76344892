"""Optimizers: Muon for the transformer matrices, AdamW for everything else, in one object.

`build_optimizer(model, ...)` returns a `MuonAdamW` (a torch.optim.Optimizer) whose param_groups
carry `kind` ("muon" | "adamw"), `name`, `lr` and `initial_lr`, so the training loop schedules
them with the pure functions at the bottom of this file:

    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * lr_multiplier(step, ...)
        if g["kind"] == "muon":
            g["momentum"] = muon_momentum(step, ...)
            g["weight_decay"] = weight_decay_at(step, num_iterations, base_wd, "cosine")

Two recipes share the one Muon loop below; each refinement is a key of the Muon group, off by
default (nanochat d575940, Dec 2025) and all on in nanochat 92d63d4's (mid 2026; the values of
both recipes are plan.OPTIMIZER_RECIPES, passed to `build_optimizer(settings=...)`):

  1. momentum (lerp form), Nesterov: buf ← lerp(buf, G, 1−μ); U ← lerp(G, buf, μ)
  2. `equilibrate` (MuonEq): every row of U rescaled to the mean row norm ‖U‖_F/√rows
  3. orthogonalize: quintic Newton–Schulz (`ns="newton_schulz"`, Keller Jordan's coefficients) or
     Polar Express (`ns="polar_express"`, arXiv 2505.16932, input scaled by 1/(‖U‖_F·`ns_safety`))
  4. `renorm` (Muon+): Frobenius norm snapped to √min(rows, cols), that of a semi-orthogonal matrix
  5. `normuon` (NorMuon): a factored second moment (one value per row, or per column for wide
     matrices: reduced over the longer dimension) with EMA `beta2` rescales the update per
     neuron, keeping its total norm
  6. update with lr·sqrt(max(1, rows/cols)); decoupled weight decay with that same LR, `cautious`
     = only where update and weight agree in sign: p ← p − lr_eff·(O + wd·p·[O·p ≥ 0])

Same-shape matrices are stacked and updated in one batched call. The orthogonalization runs in
fp32 on CPU (bf16 matmuls are ~100× slower there) and bf16 on CUDA; in fp32, matrices at least
2:1 evaluate the same polynomial through m×m Gram products (`_ns_gram`, ~40% fewer FLOPs for the
4:1 MLP matrices). AdamW is torch's own fused kernel (decoupled weight decay, bias correction).
`grad_clip > 0` clips the global gradient norm inside step() (after the cross-rank average).

Optimizer state (what `state_dict()` holds, torch's standard layout keyed by parameter index):
  AdamW param p:  step (0-D fp32), exp_avg, exp_avg_sq — shaped like p, or like this rank's flat
                  slice of p when sharded
  Muon bucket (all same-shape matrices of a group), under the bucket's FIRST param:
                  momentum_buffer (k, rows, cols) and, once normuon ran, second_momentum_buffer
                  (k, rows, 1) for rows ≥ cols else (k, 1, cols); k = the bucket's size, or this
                  rank's share of it when sharded
A state without second_momentum_buffer (e.g. from a run without NorMuon) starts it at zero, so a
checkpoint of one recipe warm-starts the other. Group hyperparameters come back with the state;
a caller that wants new ones (a new stage) sets `lr`/`initial_lr`/… on the groups after loading.

Distributed (world_size > 1): no DDP wrapper. After backward, `step()` reduce-scatters the
gradients (average), each rank updates only the parameters it owns and keeps optimizer state
only for those (ZeRO-2), then all-gathers the new values. AdamW shards every tensor by flat
element ranges (padded to a multiple of the world size); Muon shards whole matrices of each
same-shape stack (stacks padded with zero matrices; every Muon step above is per matrix, so the
shards compute exactly what one rank would). `state_dict()` holds this rank's shard only; load it
into an optimizer built with the same model, world size and rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_functional

from nanochat.plan import adamw_group_settings   # pure Python: the AdamW groups' lr / betas / weight decay

# quintic Newton–Schulz coefficients (Keller Jordan's Muon): fast, not exactly converging to 1
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv 2505.16932): num_iters 5, safety_factor 2e-2, cushion 2 (nanochat 92d63d4's)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_METHODS = ("newton_schulz", "polar_express")
PE_SAFETY = 1.01   # Polar Express input scaling X / (‖X‖_F·1.01 + 1e-6), as nanochat 92d63d4
# what a group leaves out: the Dec-2025 recipe (every Muon refinement off). "fused" picks torch's fused
# AdamW kernel; the key also makes load_state_dict put "step" on the param's device, where that kernel wants it
MUON_DEFAULTS = dict(momentum=0.95, nesterov=True, ns="newton_schulz", ns_steps=5, ns_safety=PE_SAFETY,
                     equilibrate=False, renorm=False, normuon=False, beta2=0.9, cautious=False)
ADAMW_DEFAULTS = dict(betas=(0.8, 0.95), eps=1e-10, fused=True)


def _ns_gram(X: torch.Tensor, coeffs) -> torch.Tensor:
    """The same polynomial iteration as the direct form, evaluated on m×m Gram matrices.

    Each step is X ← H·X with H = a·I + b·A + c·A², A = X·Xᵀ. Every H is a polynomial in
    A₀ = X₀·X₀ᵀ, so X₅ = H₄⋯H₀·X₀ and A_{k+1} = H·A_k·H need only m×m products; X₀ (m, n) is
    touched twice (A₀ and the final product) instead of twice per step. For n = 4m this is
    ~25 m³ of matmul instead of 45 m³. fp32 only: the recurrence on A compounds rounding.
    """
    A = torch.bmm(X, X.mT)
    Q = None
    for i, (a, b, c) in enumerate(coeffs):
        H = torch.baddbmm(A, A, A, beta=b, alpha=c)           # b·A + c·A²
        H.diagonal(dim1=-2, dim2=-1).add_(a)                   # + a·I
        Q = H if Q is None else torch.bmm(H, Q)
        if i < len(coeffs) - 1:
            A = torch.bmm(torch.bmm(H, A), H)
    return torch.bmm(Q, X)


def orthogonalize(G: torch.Tensor, ns: str = "newton_schulz", steps: int = 5,
                  dtype: Optional[torch.dtype] = None, gram: Optional[bool] = None,
                  safety: float = PE_SAFETY) -> torch.Tensor:
    """Approximate U·Vᵀ of G = U·S·Vᵀ for a matrix (m, n) or a stack (k, m, n).

    dtype: compute precision; default fp32 on CPU, bf16 on CUDA. Returns G's dtype.
    safety: Polar Express scales its input by 1/(‖G‖_F·safety) (Newton–Schulz by 1/‖G‖_F).
    gram: evaluate through Gram matrices (`_ns_gram`); default: fp32 and aspect ratio >= 2.
    """
    if ns not in NS_METHODS:
        raise ValueError(f"ns={ns!r}: use one of {', '.join(NS_METHODS)}")
    dtype = dtype or (torch.bfloat16 if G.is_cuda else torch.float32)
    X = G.reshape(-1, *G.shape[-2:]).to(dtype)   # a stack (k, m, n), also of one matrix
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X   # iterate on the wide orientation: the Gram matrix X·Xᵀ is the smaller one
    nrm = X.norm(dim=(-2, -1), keepdim=True)
    if ns == "polar_express":
        X = X / (nrm * safety + 1e-6)
        coeffs = POLAR_EXPRESS_COEFFS[:steps]
        if steps > len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"polar_express supports at most {len(POLAR_EXPRESS_COEFFS)} steps, got {steps}")
    else:
        X = X / (nrm + 1e-7)
        coeffs = (NS_COEFFS,) * steps
    X = X.contiguous()
    if gram is None:   # see _ns_gram: pays off for fp32 when the matrix is at least 2:1
        gram = dtype == torch.float32 and X.size(-1) >= 2 * X.size(-2)
    if gram:
        X = _ns_gram(X, coeffs)
    else:
        for a, b, c in coeffs:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)      # b·A + c·A²
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)    # a·X + B·X
    return (X.mT if tall else X).to(G.dtype).reshape(G.shape)


def muon_scale(shape: torch.Size) -> float:
    """Muon's shape factor: sqrt(max(1, rows/cols))."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def equilibrate_rows(X: torch.Tensor) -> torch.Tensor:
    """MuonEq (arXiv 2603.28254): each row rescaled to the mean row norm ‖X‖_F/√rows, so the
    spectrum entering the orthogonalization is better conditioned. Returns a new tensor."""
    Xf = X.float()
    target = Xf.norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = Xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return X * (target / row_norm).to(X.dtype)


def renorm_frobenius(X: torch.Tensor) -> torch.Tensor:
    """Muon+ (arXiv 2602.21545): Frobenius norm snapped to √min(rows, cols), the norm of an exactly
    semi-orthogonal matrix (corrects the polar iteration's under-convergence)."""
    target = min(X.size(-2), X.size(-1)) ** 0.5
    return X * (target / X.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(X.dtype)


def normuon_dim(shape) -> int:
    """NorMuon reduces over the longer dimension: per row (dim -1) when rows >= cols, else per column."""
    return -1 if shape[-2] >= shape[-1] else -2


def normuon_(O: torch.Tensor, second: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (arXiv 2510.05491) variance reduction of an orthogonalized update O (k, m, n).

    `second` (k, m, 1) or (k, 1, n) is the EMA of O²'s mean over the longer dim (updated in place);
    O is rescaled per neuron by its inverse square root, then back to O's Frobenius norm.
    """
    red = normuon_dim(O.shape)
    size = O.size(red)
    v_mean = O.float().square().mean(dim=red, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    second.lerp_(v_mean.to(second.dtype), 1 - beta2)
    step = second.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * size) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return O * (step * (v_norm / v_norm_new.clamp_min(1e-10))).to(O.dtype)


MUON_CHUNK_BYTES = 256 * 2 ** 20


def _chunks(k: int, matrix: torch.Tensor) -> list[slice]:
    """A Muon bucket of k matrices shaped like `matrix` in slices of at most MUON_CHUNK_BYTES: the step's
    temporaries (stacks, orthogonalization, the update) then cost a few chunks, not a few whole
    buckets (GiBs on a 1B model); every Muon step is per matrix, so slices compute the same."""
    n = max(1, MUON_CHUNK_BYTES // (matrix.numel() * matrix.element_size()))
    return [slice(i, min(i + n, k)) for i in range(0, k, n)]


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW over explicitly typed groups, optionally ZeRO-2 sharded.

    Each group is a dict with `params`, `kind` ("muon" | "adamw"), `name`, `lr`, `weight_decay` and
    its kind's keys, MUON_DEFAULTS / ADAMW_DEFAULTS where left out (the module docstring says what they do).
    """

    def __init__(self, param_groups: list[dict], world_size: int = 1, rank: int = 0, process_group=None,
                 grad_clip: float = 0.0):
        for g in param_groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise ValueError(f"param group {g.get('name')!r}: kind={g.get('kind')!r}, use 'muon' or 'adamw'")
            for p in g["params"] if g["kind"] == "muon" else ():
                if p.dim() != 2:
                    raise ValueError(f"Muon group {g.get('name')!r} got a {p.dim()}-D parameter "
                                     f"{tuple(p.shape)}; Muon needs matrices (put it in an AdamW group)")
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"rank={rank} world_size={world_size}: need 0 <= rank < world_size")
        super().__init__(param_groups, defaults={})
        for g in self.param_groups:
            defaults = MUON_DEFAULTS if g["kind"] == "muon" else ADAMW_DEFAULTS
            for k, v in dict(defaults, initial_lr=g["lr"], weight_decay=0.0).items():
                g.setdefault(k, v)
        self.world_size, self.rank, self.process_group = world_size, rank, process_group
        # clip the global (averaged) gradient norm inside step(): with ZeRO the full gradient
        # only exists sharded, so clipping before step() would clip each rank's local gradient
        self.grad_clip = grad_clip
        self.last_grad_norm: Optional[torch.Tensor] = None   # set by step() when grad_clip > 0
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"MuonAdamW(world_size={world_size}) needs torch.distributed initialized first")

    # ------------------------------------------------------------------ layout helpers
    @staticmethod
    def _buckets(group: dict) -> list[list[torch.Tensor]]:
        """Muon params grouped by shape, in first-seen order (deterministic on every rank)."""
        by_shape: dict = {}
        for p in group["params"]:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        return list(by_shape.values())

    def _own_range(self, n: int) -> tuple[int, int, int]:
        """(start, length, shard) of this rank's slice of n items padded to a multiple of world."""
        shard = -(-n // self.world_size)
        start = self.rank * shard
        return start, max(0, min(shard, n - start)), shard

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.world_size == 1:
            self._step_local()
            return loss
        shards = self._reduce_scatter_grads()      # 1) every averaging reduce-scatter, launched up front
        if self.grad_clip > 0:                     # the global norm needs every shard before any update
            for *_, work in shards:
                work.wait()
            self._clip([grad for _, _, grad, _ in shards])
        for work, params, recv in self._update_owned(shards):   # 2) owners update their shard, all-gather
            work.wait()                                             # 3) every rank takes the new values
            n = len(params) * params[0].numel()
            torch._foreach_copy_(params, list(recv.view(-1)[:n].view(len(params), *params[0].shape).unbind(0)))
        return loss

    def _step_local(self) -> None:
        if self.grad_clip > 0:
            self._clip([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None])
        for g in self.param_groups:
            if g["kind"] == "adamw":
                params = [p for p in g["params"] if p.grad is not None]
                self._adamw_update(g, params, [p.grad for p in params], [self.state[p] for p in params])
                continue
            for bucket in self._buckets(g):
                live = [p for p in bucket if p.grad is not None]
                for rows in _chunks(len(live), bucket[0]):
                    part = live[rows]
                    P = torch.stack(part)
                    self._muon_update(g, live[0], P, torch.stack([p.grad for p in part]), rows, len(live))
                    torch._foreach_copy_(part, list(P.unbind(0)))

    def _clip(self, grads: list) -> None:
        """Scale `grads` so the global norm is at most grad_clip; with ZeRO they are this rank's shards,
        whose squared norms sum across ranks (the zero padding adds nothing)."""
        sumsq = torch.stack([torch.linalg.vector_norm(x) for x in grads]).square().sum()
        if self.world_size > 1:
            dist.all_reduce(sumsq, group=self.process_group)
        self.last_grad_norm = norm = sumsq.sqrt()
        torch._foreach_mul_(grads, (self.grad_clip / (norm + 1e-6)).clamp(max=1.0))

    # ---- AdamW
    def _adamw_update(self, g: dict, params: list, grads: list, states: list) -> None:
        """torch's AdamW math (decoupled weight decay, bias correction) through its functional API:
        the fused kernel (one pass over p, g, m, v) on CPU/CUDA fp32/bf16, foreach elsewhere."""
        if not params:
            return
        for st, p in zip(states, params):
            if not st:
                st.update(step=torch.zeros((), dtype=torch.float32, device=p.device), exp_avg=torch.zeros_like(p),
                          exp_avg_sq=torch.zeros_like(p))
        fused = (g.get("fused", True) and params[0].device.type in ("cpu", "cuda")
                 and all(p.dtype == params[0].dtype for p in params))
        adamw_functional(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                         [], [st["step"] for st in states], foreach=None if fused else True,
                         fused=True if fused else None, amsgrad=False, beta1=g["betas"][0], beta2=g["betas"][1],
                         lr=g["lr"], weight_decay=g["weight_decay"], eps=g["eps"], maximize=False)

    # ---- Muon
    def _muon_update(self, g: dict, key: torch.Tensor, P: torch.Tensor, G: torch.Tensor, rows: slice, k: int) -> None:
        """Update the stacked matrices P in place from their stacked grads G (consumed): rows `rows` of
        the bucket's k. State lives, stacked (k, m, n), under `key` (the bucket's first param); steps as
        in the module docstring."""
        st = self.state[key]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = G.new_zeros((k, *G.shape[1:]))
        buf = st["momentum_buffer"][rows]
        mom = g["momentum"]
        buf.lerp_(G, 1 - mom)
        U = G.lerp_(buf, mom) if g["nesterov"] else buf
        if g["equilibrate"]:
            U = equilibrate_rows(U)
        O = orthogonalize(U, g["ns"], g["ns_steps"], safety=g["ns_safety"])
        if g["renorm"]:
            O = renorm_frobenius(O)
        if g["normuon"]:
            if "second_momentum_buffer" not in st:
                shape = [k, *G.shape[1:]]
                shape[normuon_dim(G.shape)] = 1
                st["second_momentum_buffer"] = G.new_zeros(shape)
            O = normuon_(O, st["second_momentum_buffer"][rows], g["beta2"])
        lr = g["lr"] * muon_scale(G.shape)
        wd = g["weight_decay"]
        O = O.to(P.dtype).mul_(lr)   # O is this step's own tensor: scaled in place, one temporary fewer
        if wd != 0:
            O.add_(P * (O * P >= 0) if g["cautious"] else P, alpha=lr * wd)
        P.sub_(O)

    # ---- distributed (ZeRO-2); newer torch renames the collectives (*_single; the old names warn)
    def _reduce_scatter_grads(self) -> list[tuple]:
        """Launch every averaging reduce-scatter, in the same order on every rank: (group, params, grad,
        work) for each AdamW param (sharded by flat elements) and each Muon shape bucket (by whole
        matrices); grad is this rank's shard ((shard,) or (shard, m, n)), work the async handle."""
        W, pg = self.world_size, self.process_group
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        shards = []
        for g in self.param_groups:
            adamw = g["kind"] == "adamw"
            for params in ([[p] for p in g["params"]] if adamw else self._buckets(g)):
                p0 = params[0]
                n, item = (p0.numel(), ()) if adamw else (len(params), p0.shape)
                full = p0.new_zeros((self._own_range(n)[2] * W, *item))
                per_param = full[:n].view(len(params), *p0.shape)
                for i, p in enumerate(params):
                    if p.grad is not None:
                        per_param[i] = p.grad
                out = full.new_empty((full.size(0) // W, *item))
                work = reduce_scatter(out, full, op=dist.ReduceOp.AVG, group=pg, async_op=True)
                shards.append((g, params, out, work))
        return shards

    def _update_owned(self, shards: list[tuple]) -> list[tuple]:
        """Each owner updates its shard; returns the all-gathers in flight as (work, params, recv)."""
        W, pg = self.world_size, self.process_group
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gathers = []
        for g, params, grad, work in shards:
            if self.grad_clip <= 0:   # else step() waited already, to clip (a second wait() may copy again)
                work.wait()
            p0 = params[0]
            start, length, shard = self._own_range(p0.numel() if g["kind"] == "adamw" else len(params))
            P = torch.zeros_like(grad)        # this rank's slice (+ zero padding); every rank copies it back
            if g["kind"] == "adamw":
                P[:length] = p0.view(-1)[start:start + length]
                self._adamw_update(g, [P[:length]], [grad[:length]], [self.state[p0]])
            else:
                for j in range(length):
                    P[j] = params[start + j]
                for rows in _chunks(shard, p0):
                    self._muon_update(g, p0, P[rows], grad[rows], rows, shard)
            recv = P.new_empty((shard * W, *P.shape[1:]))
            gathers.append((all_gather(recv, P, group=pg, async_op=True), params, recv))
        return gathers


# The recipe keys `build_optimizer(settings=...)` reads: the same names as the config's stage.* keys
# (nanochat/config.py) and plan.OPTIMIZER_RECIPES, which holds each generation's values. A key
# left out keeps the Dec-2025 behaviour (MUON_DEFAULTS, adam_betas, adamw_weight_decay).
MUON_SETTINGS = {"muon_ns": "ns", "muon_ns_safety": "ns_safety", "muon_equilibrate": "equilibrate",   # → group key
                 "muon_renorm": "renorm", "normuon": "normuon", "muon_beta2": "beta2", "cautious_wd": "cautious"}
SETTING_KEYS = (*MUON_SETTINGS, "lm_head_betas", "lm_head_wd", "embedding_betas", "embedding_wd",
                "value_embed_lr_frac", "value_embed_betas", "value_embed_wd", "resid_lr_frac", "resid_wd",
                "x0_betas", "gate_lr")


def build_optimizer(model, *, embedding_lr: float, unembedding_lr: float, matrix_lr: float,
                    scalar_lr: float, weight_decay: float = 0.0, adam_betas=(0.8, 0.95),
                    world_size: int = 1, rank: int = 0,
                    adamw_weight_decay: float = 0.0, process_group=None, grad_clip: float = 0.0,
                    settings: Optional[dict] = None) -> MuonAdamW:
    """One optimizer for the whole GPT: Muon on block matrices, AdamW on the rest.

    LRs are used as given (the caller applies any width/batch scaling). `weight_decay` is Muon's
    decoupled weight decay (on the matrices). Groups (names = GPT.param_groups keys):
      matrix        Muon, matrix_lr (bucketed by shape inside the group)
      embedding     embedding_lr                      betas, wd: embedding_betas, embedding_wd
      value_embed   embedding_lr × value_embed_lr_frac            value_embed_betas, value_embed_wd
      lm_head       unembedding_lr                                lm_head_betas, lm_head_wd
      resid_scalar  scalar_lr × resid_lr_frac (0.01)              resid_wd
      x0_scalar     scalar_lr                                     x0_betas
      gate_scalar   gate_lr, else scalar_lr (smear gate + lambda, backout lambda)
    `settings` holds those recipe keys and the Muon ones (SETTING_KEYS; plan.OPTIMIZER_RECIPES has
    nanochat d575940's and 92d63d4's values); unset → adam_betas / adamw_weight_decay / refinement
    off. Empty groups are left out. grad_clip > 0 clips the global
    gradient norm inside step() (after the cross-rank average); the pre-clip norm is then in
    `opt.last_grad_norm`.
    """
    s = {k: v for k, v in (settings or {}).items() if v is not None}
    if unknown := set(s) - set(SETTING_KEYS):
        raise ValueError(f"unknown optimizer setting(s) {sorted(unknown)}; known: {', '.join(SETTING_KEYS)}")
    pg = model.param_groups()
    adamw = adamw_group_settings(embedding_lr, unembedding_lr, scalar_lr, s, adam_betas, adamw_weight_decay)
    muon = {MUON_SETTINGS[k]: v for k, v in s.items() if k in MUON_SETTINGS}
    groups = [dict(kind="muon", name="matrix", params=pg["matrix"], lr=matrix_lr, weight_decay=weight_decay, **muon)]
    groups += [dict(kind="adamw", name=name, params=pg[name], **a) for name, a in adamw.items()]
    groups = [g for g in groups if g["params"]]
    return MuonAdamW(groups, world_size=world_size, rank=rank, process_group=process_group, grad_clip=grad_clip)


# ----------------------------------------------------------------------------- schedules

def lr_multiplier(step: int, num_iterations: int, warmup_steps: int, warmdown_steps: int,
                  final_lr_frac: float) -> float:
    """Linear warmup to 1, flat, then linear warmdown to final_lr_frac at num_iterations."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if warmdown_steps > 0 and step > num_iterations - warmdown_steps:
        progress = max(0.0, (num_iterations - step) / warmdown_steps)
        return progress + (1 - progress) * final_lr_frac
    return 1.0


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300,
                  final: Optional[float] = None, warmdown_steps: int = 0, num_iterations: int = 0) -> float:
    """Muon momentum: linear from start to end over ramp_steps, then end; with `final`, linear from
    end to final over the LR warmdown (its last `warmdown_steps` of `num_iterations`).

    The ramp wins where the two overlap (nanochat 92d63d4's get_muon_momentum): seed 0.85→0.95
    over 300; modern 0.85→0.97 over 400, then 0.97→0.90 through the warmdown.
    """
    if ramp_steps > 0 and step < ramp_steps:
        frac = step / ramp_steps
        return (1 - frac) * start + frac * end
    warmdown_start = num_iterations - warmdown_steps
    if final is not None and warmdown_steps > 0 and step >= warmdown_start:
        progress = (step - warmdown_start) / warmdown_steps
        return end * (1 - progress) + final * progress
    return end


def weight_decay_at(step: int, num_iterations: int, base_wd: float, schedule: str = "constant") -> float:
    """Weight decay at `step`: constant, linear to 0, or cosine to 0 at num_iterations."""
    frac = min(max(step / max(1, num_iterations), 0.0), 1.0)
    factor = {"constant": 1.0, "linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}
    if schedule not in factor:
        raise ValueError(f"weight decay schedule={schedule!r}: use constant, linear or cosine")
    return base_wd * factor[schedule]
