"""Quadratic programs over the probability simplex, on the small Gram matrix.

Shared by ``mgda`` (the min-norm point of the convex hull of the gradients), ``cagrad`` (its
inner problem) and ``nash-mtl`` (to detect that no Nash bargaining solution exists). Everything
is float64 and works on the n×n Gram matrix of the present sources, never on P-dim gradients.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def present_index(present: torch.Tensor) -> torch.Tensor:
    """Indices of the present sources (target included), as a 1-D int64 tensor."""
    return present.nonzero().reshape(-1)


def kkt_solve(quad: torch.Tensor, rhs_w: torch.Tensor, rhs_sum: float) -> torch.Tensor:
    """A solution w of [Q 1; 1ᵀ 0][w; −ν] = [rhs_w; rhs_sum] (least-norm if singular)."""
    m = int(quad.shape[0])
    kkt = torch.zeros(m + 1, m + 1, dtype=F64)
    kkt[:m, :m] = quad
    kkt[:m, m] = 1.0
    kkt[m, :m] = 1.0
    rhs = torch.cat([rhs_w, torch.tensor([rhs_sum], dtype=F64)])
    solution: torch.Tensor = torch.linalg.pinv(kkt, hermitian=True) @ rhs
    return solution[:m]


def simplex_qp(
    quad: torch.Tensor, lin: torch.Tensor | None = None, *, max_iter: int | None = None
) -> torch.Tensor:
    """argmin of ½ wᵀ Q w + qᵀ w over the simplex {w ≥ 0, Σ w = 1}, for Q symmetric PSD.

    Primal active-set method (Lawson–Hanson adapted to the simplex): start at the best vertex;
    repeatedly add the coordinate whose partial derivative is furthest below the multiplier,
    solve the equality-constrained problem on the support (a bordered (m+1)×(m+1) KKT system,
    pseudo-inverse when Q is singular), and step back to the boundary when a weight would turn
    negative. Finite: exact up to rounding, at most a few times n support changes. Q and q are
    first divided by their largest entry, so the result does not depend on the gradients' scale.
    When Q and q are both zero every point is optimal and the centre 1/n is returned.
    """
    quad = quad.to(F64)
    n = int(quad.shape[0])
    lin = torch.zeros(n, dtype=F64) if lin is None else lin.to(F64)
    if n == 0:
        return torch.zeros(0, dtype=F64)
    scale = max(float(quad.abs().max()), float(lin.abs().max()))
    if n == 1 or scale == 0.0:
        return torch.full((n,), 1.0 / n, dtype=F64)
    quad = quad / scale
    lin = lin / scale
    tol = 1e-14 * n
    start = int((0.5 * quad.diagonal() + lin).argmin())
    w = torch.zeros(n, dtype=F64)
    w[start] = 1.0
    support = torch.zeros(n, dtype=torch.bool)
    support[start] = True
    limit = max_iter if max_iter is not None else 3 * n + 10
    for _ in range(limit):
        grad = quad @ w + lin
        multiplier = float(w @ grad)  # equals grad_k on the support at a support optimum
        candidates = torch.where(support, torch.full_like(grad, torch.inf), grad)
        entering = int(candidates.argmin())
        if bool(support.all()) or float(candidates[entering]) >= multiplier - tol:
            break
        support[entering] = True
        for _ in range(limit):
            idx = support.nonzero().reshape(-1)
            z = torch.zeros(n, dtype=F64)
            z[idx] = kkt_solve(quad[idx][:, idx], -lin[idx], 1.0)
            if bool((z[idx] > 0).all()):
                w = z
                break
            # Move from w towards z until the first support weight hits zero; drop it.
            blocking = support & (z <= 0)
            gap = w[blocking] - z[blocking]
            ratios = torch.where(gap > 0, w[blocking] / gap.clamp_min(1e-300), 0.0)
            step = float(ratios.min().clamp(0.0, 1.0))
            w = (w + step * (z - w)).clamp_min(0.0)
            support &= w > 0
            w = torch.where(support, w, torch.zeros_like(w))
            w = w / w.sum()
        else:  # no progress within the limit: keep the last feasible point
            break
        if not bool(support[entering]):  # dropped at once: optimal up to rounding
            break
    return w


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """Weights w on the simplex of the min-norm point Σ w_k g_k of the gradients' convex hull.

    The min-norm point itself is unique; w is not when the gradients are affinely dependent.
    """
    return simplex_qp(gram)
