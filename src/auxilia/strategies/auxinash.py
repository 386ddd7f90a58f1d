"""``auxinash``: asymmetric Nash bargaining over the sources (Shamsian et al., ICML 2023).

"Auxiliary Learning as an Asymmetric Bargaining Game". The update is the Nash bargaining
solution of the sources with bargaining powers p; p is learned by the hypergradient of the
held-out target loss, so the target and the auxiliaries that help it gain power.
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy
from auxilia.strategies.nash_mtl import nash_solve


def auxinash(
    update_every: int = 25,
    meta_lr: float = 5e-3,
    momentum: float = 0.9,
    ridge: float = 1e-6,
    min_power: float = 1e-4,
) -> Strategy:
    """α solves α_i (M̃ α)_i = p_i, M̃ = M / ‖M‖_F; every H steps p ← SGD(p, ∂L_val/∂p).

    M is the Gram matrix of the present sources (target included), plus ``ridge`` × its
    largest diagonal entry so that the bargaining problem has a solution when gradients are
    collinear. Powers start at p_i = 1. Every ``update_every`` steps (25) the hypergradient
    ∂L_val/∂p = (∂L_val/∂α) dα/dp with ∂L_val/∂α_i = −<g_val, g_i> (held-out target gradient,
    ``Need.VALIDATION``; identity inverse Hessian, as in ``auxilearn``) and, by the implicit
    function theorem on M̃α − p ⊘ α = 0, dα/dp = (M̃ + diag(p/α²))⁻¹ diag(1/α); it is clipped
    to norm 1, p takes an SGD step (lr 5e-3, momentum 0.9: the code's), then p ← max(p, 1e-4)
    and p ← (K+1) p / Σp.

    Departures from the code: the bargaining problem is solved exactly by damped Newton on its
    convex potential (``nash_mtl.nash_solve`` with powers; no cvxpy, no 20-step concave-convex
    loop); the IFT uses the normalised
    M̃ that α actually solves (the code uses M there); the hypergradient is averaged over the
    steps since the last update; total-gradient-norm clipping is left to the optimiser setup.
    """
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise StrategyError(f"auxinash: update_every must be an integer >= 1, got {update_every!r}")
    for key, value in (
        ("meta_lr", meta_lr),
        ("momentum", momentum),
        ("ridge", ridge),
        ("min_power", min_power),
    ):
        if not math.isfinite(value) or value < 0:
            raise StrategyError(f"auxinash: {key} must be a finite number >= 0, got {value!r}")
    if momentum >= 1:
        raise StrategyError(f"auxinash: momentum must be < 1, got {momentum!r}")
    if min_power <= 0:
        raise StrategyError(f"auxinash: min_power must be > 0, got {min_power!r}")

    def init(num_sources: int) -> State:
        return {
            "powers": torch.ones(num_sources, dtype=torch.float64),
            "alpha": torch.ones(num_sources, dtype=torch.float64),
            "velocity": torch.zeros(num_sources, dtype=torch.float64),
            "hypergrad": torch.zeros(num_sources, dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
            "accumulated": torch.zeros((), dtype=torch.int64),
        }

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        gram = stats.require(Need.GRAM).to(torch.float64)
        row = stats.require(Need.VALIDATION).to(torch.float64)
        idx = stats.present.nonzero().squeeze(1)
        m = gram[idx][:, idx]
        scale = float(torch.linalg.matrix_norm(m))
        new_state = {key: value.clone() for key, value in state.items()}
        new_state["count"] = state["count"] + 1
        alpha = torch.zeros(stats.num_sources, dtype=torch.float64)
        if scale == 0.0:  # every gradient is zero: nothing to bargain over
            alpha[idx] = 1.0
            return alpha, new_state
        m = m / scale
        m = m + ridge * float(m.diagonal().max()) * torch.eye(len(idx), dtype=torch.float64)
        powers = state["powers"][idx]
        solution = nash_solve(m, state["alpha"][idx], powers)
        if solution is None:  # no bargaining solution (0 in the hull, ridge 0): keep α
            alpha[idx] = state["alpha"][idx]
            return alpha, new_state
        new_state["alpha"][idx] = solution
        # Hypergradient on the powers of the present sources (IFT on M̃α = p ⊘ α).
        d_alpha = -row[idx]
        jacobian = torch.linalg.solve(
            m + torch.diag(powers / solution**2), torch.diag(1.0 / solution)
        )
        new_state["hypergrad"][idx] += d_alpha @ jacobian
        new_state["accumulated"] = state["accumulated"] + 1
        if int(new_state["count"]) % update_every == 0:
            grad = new_state["hypergrad"] / max(int(new_state["accumulated"]), 1)
            norm = float(grad.norm())
            if norm > 1.0:
                grad = grad / norm
            velocity = momentum * state["velocity"] + grad
            powers_all = (state["powers"] - meta_lr * velocity).clamp_min(min_power)
            new_state["powers"] = powers_all * (stats.num_sources / float(powers_all.sum()))
            new_state["velocity"] = velocity
            new_state["hypergrad"] = torch.zeros_like(grad)
            new_state["accumulated"] = torch.zeros((), dtype=torch.int64)
        alpha[idx] = solution
        return alpha, new_state

    params = {
        "update_every": update_every,
        "meta_lr": meta_lr,
        "momentum": momentum,
        "ridge": ridge,
        "min_power": min_power,
    }
    return Strategy("auxinash", frozenset({Need.GRAM, Need.VALIDATION}), init, update, params)
