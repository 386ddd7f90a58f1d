"""``nash-mtl``: multi-task learning as a bargaining game, Navon et al. (ICML 2022).

"Multi-Task Learning as a Bargaining Game". The update d = Σ_k α_k g_k is the Nash bargaining
solution among the tasks: it maximises Σ_k log ⟨g_k, d⟩ in a ball, which gives
⟨g_k, d⟩ = 1/α_k, so that each task's improvement is inversely proportional to its weight.
A symmetric multi-task baseline: the target is one more task, with no priority.
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy
from auxilia.strategies.simplex import min_norm_weights, present_index

F64 = torch.float64
MAX_ITER = 100
TOL = 1e-12
ZERO_GRADIENT = 1e-12  # ‖g_k‖ / max_j ‖g_j‖ below this: treated as a zero gradient
IN_HULL = 1e-6  # min-norm point of the unit gradients' hull below this: 0 is in the hull


def nash_solve(
    gram: torch.Tensor, start: torch.Tensor, powers: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The α > 0 with α_k (Gα)_k = p_k for all k, or None if there is none (0 in the hull).

    ``powers`` p (default all 1, Nash-MTL) are the bargaining powers of asymmetric Nash
    bargaining (AuxiNash); the potential below then weighs each log-barrier term by p_k.

    With D = diag(‖g_k‖) and C = D⁻¹GD⁻¹ the cosine matrix, α = D⁻¹β where Cβ = 1/β: the
    solve runs on C, which is as accurate as the Gram matrix allows whatever the gradients'
    scales. β is the minimiser of the strictly convex, self-concordant
    f(β) = ½ βᵀCβ − Σ_k p_k log β_k (∇f = Cβ − p/β). It exists iff no non-zero v ≥ 0 has Cv = 0,
    i.e. iff 0 is not in the convex hull of the gradients; this is checked with the min-norm
    point of the unit gradients (None when its norm is ≤ 1e-6, about the precision a Gram matrix
    allows). Damped Newton (step 1/(1 + λ) while the Newton decrement λ > 1/4, full steps
    after, which keeps β > 0), warm-started from ``start`` rescaled by the best scalar. Stops
    when max_k |β_k (Cβ)_k − 1| ≤ 1e-12 or λ² ≤ 1e-26, after at most 100 iterations (a handful
    from a warm start). Every gradient must be non-zero.
    """
    gram = gram.to(F64)
    n = int(gram.shape[0])
    norms = gram.diagonal().sqrt()
    if n == 0 or not bool((norms > 0).all()):
        return None
    cos = gram / norms[:, None] / norms[None, :]
    w = min_norm_weights(cos)
    if float(w @ cos @ w) <= IN_HULL**2:
        return None
    beta = start.to(F64) * norms
    if not bool((beta > 0).all()) or not bool(torch.isfinite(beta).all()):
        beta = torch.ones(n, dtype=F64)
    beta = beta / beta.max()  # only β's direction matters here; this keeps βᵀCβ from underflowing
    p = torch.ones(n, dtype=F64) if powers is None else powers.to(F64)
    beta = beta * math.sqrt(float(p.sum()) / float(beta @ cos @ beta))  # argmin_s f(s β)
    for _ in range(MAX_ITER):
        c_beta = cos @ beta
        if float((beta * c_beta - p).abs().max()) <= TOL * max(1.0, float(p.max())):
            break
        grad = c_beta - p / beta
        hessian = cos + torch.diag(p / (beta * beta))
        step, info = torch.linalg.solve_ex(hessian, grad)
        decrement2 = float(grad @ step)
        if int(info) != 0 or not decrement2 > 1e-26:  # singular to rounding, or converged
            break
        decrement = math.sqrt(decrement2)
        move = step / (1.0 + decrement) if decrement > 0.25 else step
        shrinking = move > 0  # keep β > 0 (guaranteed by the damping only when every p_k ≥ 1)
        if bool(shrinking.any()):
            limit = float((beta[shrinking] / move[shrinking]).min())
            if limit <= 1.0:
                move = move * (0.95 * limit)
        beta = beta - move
    return beta / norms


def nash_mtl(update_weights_every: int = 1, max_norm: float = 1.0) -> Strategy:
    """α > 0 with Gα = 1/α (α_k ⟨g_k, d⟩ = 1, d = Σ_k α_k g_k), then d clipped to ‖d‖ ≤ max_norm.

    The solution has ‖d‖² = αᵀGα = n (the number of present sources), so with the default
    max_norm = 1 a freshly solved update is always scaled to ‖d‖ = 1; max_norm = 0 disables
    the clip. Defaults are
    the paper code's (``methods/weight_methods.py::NashMTL``: max_norm = 1.0,
    update_weights_every = 1; α starts at 1 and is warm-started from the previous step): α is
    re-solved on steps with count % ``update_weights_every`` == 0 and kept otherwise (the clip
    uses the current step's Gram matrix either way, as ``clip_grad_norm_`` does in the code).

    Sources absent from the step get α = 0, take no part in the solve and keep their stored α.
    Against the code: no cvxpy. Its concave-convex procedure (at most 20 ECOS solves of a
    linearised problem, stopping when ‖Gα − 1/α‖ < 1e-3) is replaced by damped Newton on the
    same optimality condition (:func:`nash_solve`), run to max_k |α_k (Gα)_k − 1| ≤ 1e-12
    (typically under 10 iterations, at most 100). The code solves
    on G/‖G‖_F with the normalisation put back in the constraints, i.e. the system above with the
    raw G, as here. The clip scales α, which equals clipping the shared gradient (heads are not
    weighted by the engine). Where no solution exists (0 in the convex hull of the gradients,
    e.g. exactly opposed tasks) the code's solver fails and it keeps the previous α; so do we.
    A source whose gradient is zero (‖g_k‖ ≤ 1e-12 max_j ‖g_j‖) has no stake in the bargain:
    it is left out of the solve and keeps its stored α, which does not change d.
    """
    if (
        isinstance(update_weights_every, bool)
        or not isinstance(update_weights_every, int)
        or update_weights_every < 1
    ):
        raise StrategyError(
            f"nash-mtl: update_weights_every must be an integer >= 1, got {update_weights_every!r}"
        )
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, int | float)
        or not 0.0 <= max_norm < math.inf
    ):
        raise StrategyError(f"nash-mtl: max_norm must be a finite number >= 0, got {max_norm!r}")

    def init(num_sources: int) -> State:
        return {
            "weights": torch.ones(num_sources, dtype=F64),
            "count": torch.zeros((), dtype=torch.int64),
        }

    def solve(gram: torch.Tensor, present: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        idx = present_index(present)
        if idx.numel() == 0:
            return weights
        diag = gram.diagonal()[idx]
        idx = idx[diag > float(diag.max()) * ZERO_GRADIENT**2]
        alpha = nash_solve(gram[idx][:, idx], weights[idx]) if idx.numel() else None
        if alpha is None:
            return weights
        weights = weights.clone()
        weights[idx] = alpha
        return weights

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        gram = stats.require(Need.GRAM).to(F64)
        weights = state["weights"]
        if int(state["count"]) % update_weights_every == 0:
            weights = solve(gram, stats.present, weights)
        alpha = torch.where(stats.present, weights, torch.zeros_like(weights))
        if max_norm > 0:
            norm = math.sqrt(max(float(alpha @ gram @ alpha), 0.0))
            if norm > max_norm:
                alpha = alpha * (max_norm / norm)
        return alpha, {"weights": weights.clone(), "count": state["count"] + 1}

    params = {"update_weights_every": update_weights_every, "max_norm": max_norm}
    return Strategy("nash-mtl", frozenset({Need.GRAM}), init, update, params)
