"""``bloop``: gradient surgery against an EMA of the target gradient (Hsieh et al., ICML 2024).

"Careful with that Scalpel: Improving Gradient Surgery with an EMA". The auxiliary gradients
are projected off a moving average of the target's gradient, so that to first order the step
is a pure descent step for the target, without the noise of projecting on one mini-batch.
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy, no_state


def bloop(weight: float = 0.1, ema: float = 0.1, eps: float = 1e-7) -> Strategy:
    """d = g_0 + λ Σ_k (g_k − r_k ĝ), r_k = <g_k, ĝ> / (‖ĝ‖² + ε), ĝ ← ĝ + ρ (g_0 − ĝ) first.

    λ = ``weight``, ρ = ``ema``, ε = ``eps``; defaults are the paper code's (λ = 0.1, ρ = 0.1,
    ε = 1e-7, ĝ starting at the first target gradient, the library's "grad" init). The engine
    keeps ĝ over the shared parameters (one parameter-sized buffer, saved in checkpoints) and
    this strategy returns α_0 = 1, α_k = λ for present auxiliaries and −λ Σ_k r_k for ĝ.
    With several auxiliaries the projection of their sum is the sum of their projections, so
    this is the paper's rule with g_aux = Σ_k g_k. It runs on every mode that can take inner
    products with a given direction (``exact``, ``ghost``, ``jvp``, ``batched``). Credit in the
    report counts α_k <g_k, g_0> and leaves out the projected-away part.
    """
    for key, value in (("weight", weight), ("ema", ema), ("eps", eps)):
        if not math.isfinite(value):
            raise StrategyError(f"bloop: {key} must be finite, got {value!r}")
    if weight < 0:
        raise StrategyError(f"bloop: weight must be >= 0, got {weight!r}")
    if not 0.0 < ema <= 1.0:
        raise StrategyError(f"bloop: ema must be in (0, 1], got {ema!r}")
    if eps < 0:
        raise StrategyError(f"bloop: eps must be >= 0, got {eps!r}")

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        row = stats.require(Need.TARGET_EMA).to(torch.float64)
        if stats.ema_sqnorm is None:
            raise ValueError("statistic 'ema_sqnorm' was not computed")
        sqnorm = float(stats.ema_sqnorm)
        aux = stats.present.clone()
        aux[0] = False
        ratios = torch.where(aux, row / (sqnorm + eps), torch.zeros_like(row))
        alpha = torch.zeros(stats.num_sources + 1, dtype=torch.float64)
        alpha[0] = 1.0
        alpha[1:-1] = aux[1:].to(torch.float64) * weight
        alpha[-1] = -weight * float(ratios.sum())
        return alpha, state

    params = {"weight": weight, "ema": ema, "eps": eps}
    return Strategy("bloop", frozenset({Need.TARGET_EMA}), no_state, update, params, ema)
