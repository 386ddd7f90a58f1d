"""``olaux``: OL-AUX, online auxiliary weights of Lin et al. (NeurIPS 2019).

"Adaptive Auxiliary Task Weighting for Reinforcement Learning". Weights follow the first-order
gradient of the target loss N steps ahead with respect to each auxiliary weight.
"""

from __future__ import annotations

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy


def olaux(
    horizon: int = 5,
    beta: float = 5.0,
    initial: float = 1.0,
    log_losses: bool = False,
) -> Strategy:
    """Every ``horizon`` steps: w_k ← max(0, w_k + β · η · Σ_{last N steps} <g_k, g_0>).

    η is the learning rate of the step (``Statistics.lr``). Defaults are the paper code's
    (N = 5, β = 5, w_k = 1 at start). With ``log_losses`` the dot products are those of the
    log-losses, ``<g_k, g_0> / (L_k L_0)``: the code's default "gradient balancing", which
    equalises loss scales; we default to the paper's plain rule and make balancing a switch.
    The code's 4-step smoothing of auxiliary gradients is not applied. α_0 = 1.
    """
    if horizon < 1:
        raise StrategyError(f"olaux: horizon must be >= 1, got {horizon}")
    if beta < 0 or initial < 0:
        raise StrategyError("olaux: beta and initial must be >= 0")

    def init(num_sources: int) -> State:
        weights = torch.full((num_sources,), float(initial), dtype=torch.float64)
        weights[0] = 1.0
        return {
            "weights": weights,
            "accumulated": torch.zeros(num_sources, dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
        }

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        dots = stats.require(Need.TARGET_ROW).to(torch.float64)
        if log_losses:
            losses = stats.require(Need.LOSSES).to(torch.float64).clamp_min(1e-12)
            dots = dots / (losses * losses[0])
        accumulated = state["accumulated"] + stats.lr * dots * stats.present
        count = state["count"] + 1
        weights = state["weights"]
        if int(count) % horizon == 0:
            weights = (weights + beta * accumulated).clamp_min(0.0)
            weights[0] = 1.0
            accumulated = torch.zeros_like(accumulated)
        new_state = {"weights": weights, "accumulated": accumulated, "count": count}
        return weights.clone(), new_state

    needs = {Need.TARGET_ROW} | ({Need.LOSSES} if log_losses else set())
    params = {"horizon": horizon, "beta": beta, "initial": initial, "log_losses": log_losses}
    return Strategy("olaux", frozenset(needs), init, update, params)
