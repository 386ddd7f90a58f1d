"""``arml``: ARML, auxiliary task reweighting of Shi et al. (NeurIPS 2020).

"Auxiliary Task Reweighting for Minimum-data Learning". The weighted auxiliary gradients should
match the target's: α minimises ‖g_0 − Σ_k α_k g_k‖² subject to α ≥ 0 and Σ_k α_k = K.
Everything is computed from the (K+1)×(K+1) Gram matrix, never from P-dimensional vectors.
"""

from __future__ import annotations

from typing import Literal

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy

Variant = Literal["nnls", "sgd"]


def nnls_gram(gram: torch.Tensor, rhs: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """Solve min_{x ≥ 0} xᵀ G x − 2 bᵀ x (the NNLS ‖g_0 − Σ x_k g_k‖² in Gram form).

    Lawson–Hanson active-set method on the K×K system: exact (to rounding) in finitely many
    steps. ``gram`` is G_aa [K, K], ``rhs`` is b = G_a0 [K]; both float64.
    """
    k = int(rhs.shape[0])
    x = torch.zeros(k, dtype=torch.float64)
    if k == 0:
        return x
    scale = float(gram.diagonal().abs().max().clamp_min(rhs.abs().max()))
    if scale == 0.0:
        return x
    tol = 1e-12 * scale * k
    passive = torch.zeros(k, dtype=torch.bool)
    for _ in range(max_iter if max_iter is not None else 3 * k + 10):
        w = rhs - gram @ x  # minus half the gradient
        candidates = torch.where(~passive, w, torch.full_like(w, -torch.inf))
        if bool(passive.all()) or float(candidates.max()) <= tol:
            break
        passive[int(candidates.argmax())] = True
        for _ in range(3 * k + 10):
            idx = passive.nonzero().squeeze(1)
            s = torch.zeros(k, dtype=torch.float64)
            s[idx] = torch.linalg.pinv(gram[idx][:, idx], hermitian=True) @ rhs[idx]
            if bool((s[idx] > 0).all()):
                x = s
                break
            # Step from x towards s until the first passive variable hits zero; drop it.
            blocking = passive & (s <= 0)
            ratios = x[blocking] / (x[blocking] - s[blocking])
            step = float(ratios.min()) if ratios.numel() else 0.0
            x = (x + step * (s - x)).clamp_min(0.0)
            passive &= x > 0
            x = torch.where(passive, x, torch.zeros_like(x))
            if not bool(passive.any()):
                break
    return x


def arml(variant: Variant = "nnls", update_every: int = 20, lr: float = 0.05) -> Strategy:
    """α_0 = 1; α = argmin_{α ≥ 0, Σα = K} ‖g_0 − Σ_k α_k g_k‖² = G00 − 2 Σ α_k G0k + αᵀ G_aa α.

    α starts at 1 for every auxiliary and changes only on steps with count % ``update_every``
    == 0 (the first step included, as in the paper code's ``t mod 20 == 0``); between updates
    it is constant. ``variant="sgd"`` is the code's rule (``SSL/lib/task_weighter.py``): one
    step α_k ← α_k + 2·lr·(G_0k − Σ_j α_j G_jk), then the shift α ← α + (K − Σα)/K, then
    α ← max(α, 0). ``variant="nnls"`` (default) solves the problem in closed form instead: the
    non-negative least squares min_{α ≥ 0} ‖g_0 − Σ α_k g_k‖² (active set on the K×K Gram
    system), rescaled so that Σα = K; if every weight is 0 the previous α is kept. Defaults
    are the code's (every 20 steps, lr = 0.05).

    K counts the auxiliaries present in the step: absent ones get α_k = 0, take no part in the
    solve and keep their stored weight for later steps. Choices against the code: the code's
    Langevin noise is not implemented, because it is a sampling scheme for the model's
    parameters (SGLD on the weighted loss, to take the expectation over θ), not part of the
    weighting rule; and on update steps the code freezes the model, whereas here the new α
    also weights that step's gradient. The code excludes the task heads from g; here g is
    over the shared parameters, as for every strategy.
    """
    if variant not in ("nnls", "sgd"):
        raise StrategyError(f"arml: variant must be 'nnls' or 'sgd', got {variant!r}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise StrategyError(f"arml: update_every must be an integer >= 1, got {update_every!r}")
    if not (lr > 0 and lr < float("inf")):
        raise StrategyError(f"arml: lr must be a finite number > 0, got {lr!r}")

    def init(num_sources: int) -> State:
        return {
            "weights": torch.ones(num_sources, dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
        }

    def solve(stats: Statistics, weights: torch.Tensor) -> torch.Tensor:
        gram = stats.require(Need.GRAM).to(torch.float64)
        aux = stats.present.clone()
        aux[0] = False
        idx = aux.nonzero().squeeze(1)
        k = int(idx.numel())
        weights = weights.clone()
        if k == 0:
            return weights
        g_aa = gram[idx][:, idx]
        g_a0 = gram[idx, 0]
        alpha = weights[idx]
        if variant == "sgd":
            grad = -2.0 * (g_a0 - g_aa @ alpha)
            alpha = alpha - lr * grad
            alpha = (alpha + (k - alpha.sum()) / k).clamp_min(0.0)
        else:
            solution = nnls_gram(g_aa, g_a0)
            total = float(solution.sum())
            if total > 0:
                alpha = solution * (k / total)
        weights[idx] = alpha
        return weights

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        weights = state["weights"]
        if int(state["count"]) % update_every == 0:
            weights = solve(stats, weights)
        weights = weights.clone()
        weights[0] = 1.0
        new_state = {"weights": weights, "count": state["count"] + 1}
        alpha = torch.where(stats.present, weights, torch.zeros_like(weights))
        alpha[0] = 1.0
        return alpha, new_state

    params = {"variant": variant, "update_every": update_every, "lr": lr}
    return Strategy("arml", frozenset({Need.GRAM}), init, update, params)
