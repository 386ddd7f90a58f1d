"""``cagrad``: conflict-averse gradient descent of Liu, Liu, Jin, Stone & Liu (NeurIPS 2021).

"Conflict-Averse Gradient Descent for Multi-task Learning". The update maximises the worst
task's first-order improvement within a ball around the mean gradient: it stays close to
plain averaging (for c < 1 it still converges to a minimum of the average loss) while
favouring the most conflicted task. A symmetric multi-task baseline: the target is one more
task, with no priority.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.arml import nnls_gram
from auxilia.strategies.base import Strategy, stateless
from auxilia.strategies.simplex import kkt_solve, min_norm_weights, present_index, simplex_qp

F64 = torch.float64
Scale = Literal["sources", "one"]


def _quadratic_roots(a: float, b: float, c: float) -> list[float]:
    """Real roots of a x² + b x + c = 0 (a may vanish)."""
    if abs(a) <= 1e-14 * (abs(b) + abs(c)):
        return [] if b == 0.0 else [-c / b]
    disc = b * b - 4.0 * a * c
    if disc < 0.0:
        return []
    sq = math.sqrt(disc)
    return [(-b + sq) / (2.0 * a), (-b - sq) / (2.0 * a)]


def cagrad_direction(gram: torch.Tensor, c: float, *, max_iter: int = 60) -> torch.Tensor:
    """Coefficients β of CAGrad's direction d = Σ_k β_k g_k, before any rescaling.

    d = argmax_{‖d − g_0‖ ≤ r} min_k ⟨g_k, d⟩ with g_0 the mean gradient and r = c‖g_0‖. By
    duality d = g_0 + (r/‖g_w‖) g_w, w = argmin_{w ∈ Δ} F(w) = ⟨g_w, g_0⟩ + r‖g_w‖. F is solved
    through ‖x‖ = min_{t>0} (‖x‖²/(2t) + t/2): for fixed t it is the simplex QP
    min ½ wᵀGw + (t/r) ⟨g_w, g_0⟩ and the optimal t solves t = ‖g_{w(t)}‖ (V(t) = min_w is convex,
    V'(t) ∝ 1 − ‖g_{w(t)}‖²/t²). The root is bracketed by [min-norm of the hull, max_k ‖g_k‖]; on
    a fixed support w(t) is affine in t, so the root is a quadratic equation solved exactly,
    confirmed by a new QP solve at it, with bisection as a safeguard (typically two or three QP
    solves; at most ``max_iter``). Stops when |t² − ‖g_w‖²| ≤ 1e-12 max(t², ‖g_w‖²).

    If 0 is in the convex hull and the projection p of g_0 onto {d : ⟨g_k, d⟩ ≥ 0 ∀k} lies in
    the ball, the optimum is at g_w = 0, where the formula is 0/0, and p is optimal: it is
    returned when its worst-case improvement matches the dual value. Otherwise the result is
    the best, by min_k ⟨g_k, d⟩, of the formula's d, p (if in the ball) and g_0, which guards
    near-degenerate cases where rounding in G hides the direction of g_w.
    """
    gram = gram.to(F64)
    n = int(gram.shape[0])
    mean = torch.full((n,), 1.0 / max(n, 1), dtype=F64)
    top2 = float(gram.diagonal().max()) if n else 0.0
    if n == 0 or c == 0.0 or not top2 > 0.0:
        return mean
    gram = gram / top2  # scale-free from here: the largest gradient has norm 1
    row = gram.mean(dim=1)  # ⟨g_k, g_0⟩
    radius = c * math.sqrt(max(float(row.mean()), 0.0))
    if radius == 0.0:
        return mean
    candidates = [mean]  # always feasible; the best worst-case improvement wins
    mgda = min_norm_weights(gram)
    lo = math.sqrt(max(float(mgda @ gram @ mgda), 0.0))
    if lo <= 1e-6:  # 0 is in the hull (to the precision of G): is the optimum at g_w = 0?
        mu = nnls_gram(gram, -row)  # min ½ μᵀGμ + ⟨g_μ, g_0⟩, μ ≥ 0: projection onto the cone
        if float(mu @ gram @ mu) <= radius * radius * (1.0 + 1e-9):
            projection = mean + mu
            dual_value = float(row @ mgda) + radius * lo  # F at the min-norm weights
            if float((gram @ projection).min()) >= dual_value - 1e-12:
                return projection  # primal value = a dual value: optimal
            candidates.append(projection)
    hi = 1.0
    t = min(max(radius / c, lo), hi)  # start at ‖g_0‖
    w = simplex_qp(gram, (t / radius) * row)
    for _ in range(max_iter):
        norm2 = float(w @ gram @ w)
        h = t * t - norm2
        if abs(h) <= 1e-12 * max(t * t, norm2) or hi - lo <= 1e-15:
            break
        if h < 0.0:
            lo = t
        else:
            hi = t
        # On this support w(τ) = w0 + τ w1 with τ = t/r; solve r²τ² = ‖g_{w(τ)}‖².
        idx = (w > 0).nonzero().reshape(-1)
        sub = gram[idx][:, idx]
        w0 = kkt_solve(sub, torch.zeros(idx.numel(), dtype=F64), 1.0)
        w1 = kkt_solve(sub, -row[idx], 0.0)
        a, b, q = float(w0 @ sub @ w0), float(w0 @ sub @ w1), float(w1 @ sub @ w1)
        roots = _quadratic_roots(radius * radius - q, -2.0 * b, -a)
        inside = [radius * tau for tau in roots if lo < radius * tau < hi]
        t = min(inside, key=lambda x: abs(x - t)) if inside else 0.5 * (lo + hi)
        w = simplex_qp(gram, (t / radius) * row)
    norm = math.sqrt(max(float(w @ gram @ w), 0.0))
    if norm > 0.0:
        candidates.insert(0, mean + (radius / norm) * w)
    return max(candidates, key=lambda beta: float((gram @ beta).min()))


def cagrad(c: float = 0.5, rescale: int = 1, scale: Scale = "sources") -> Strategy:
    """α = s · (1/n + (c‖g_0‖/‖g_w‖) w) / ρ, i.e. d = g_0 + c‖g_0‖ g_w/‖g_w‖ with g_0 the mean.

    w = argmin_{w ∈ Δ} ⟨g_w, g_0⟩ + c‖g_0‖ ‖g_w‖ (the dual of max_{‖d − g_0‖ ≤ c‖g_0‖} min_k
    ⟨g_k, d⟩), solved on the n×n Gram matrix of the present sources (see
    :func:`cagrad_direction`). ``c`` = 0.5 is the default of the paper code's ``cagrad()``
    (its NYUv2 script and the Nash-MTL code use 0.4); c = 0 is the mean gradient. ``rescale`` is
    the code's: ρ = 1 + c² (1, default), 1 (0) or 1 + c (2). ``scale="sources"`` (default) sets
    s = n, the number of present sources, as the code does "to match the sum loss" (so c = 0
    gives α = 1 for all, the ``equal`` strategy); ``scale="one"`` gives s = 1, the paper's d.

    Absent sources get α = 0 and take no part in the solve. Against the code (SciPy SLSQP from
    the uniform start, with 1e-8 added under the square roots and to ‖g_w‖): the dual is solved
    exactly up to rounding, without epsilons. Where the optimum is at g_w = 0 (0 in the hull of
    the gradients) the code's λ g_w vanishes and it returns about g_0; we return the projection
    of g_0 onto {d : ⟨g_k, d⟩ ≥ 0 ∀k}, which lies in the ball and is the actual maximiser.
    All-zero gradients give the mean.
    """
    if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 <= c < math.inf:
        raise StrategyError(f"cagrad: c must be a finite number >= 0, got {c!r}")
    if isinstance(rescale, bool) or not isinstance(rescale, int) or rescale not in (0, 1, 2):
        raise StrategyError(f"cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
    if scale not in ("sources", "one"):
        raise StrategyError(f"cagrad: scale must be 'sources' or 'one', got {scale!r}")
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]

    def rule(stats: Statistics) -> torch.Tensor:
        gram = stats.require(Need.GRAM).to(F64)
        idx = present_index(stats.present)
        alpha = torch.zeros(stats.num_sources, dtype=F64)
        if idx.numel() == 0:
            return alpha
        beta = cagrad_direction(gram[idx][:, idx], float(c))
        factor = (float(idx.numel()) if scale == "sources" else 1.0) / divisor
        alpha[idx] = beta * factor
        return alpha

    params = {"c": c, "rescale": rescale, "scale": scale}
    return stateless("cagrad", frozenset({Need.GRAM}), rule, params)
