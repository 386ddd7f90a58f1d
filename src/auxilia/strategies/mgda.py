"""``mgda``: the multiple-gradient descent algorithm of Sener & Koltun (NeurIPS 2018).

"Multi-Task Learning as Multi-Objective Optimization". The update is the min-norm point of the
convex hull of the task gradients; when it is not zero it decreases every task's loss to first
order, and when it is zero the point is Pareto-stationary. A symmetric multi-task baseline: the
target is one more task, with no priority over the auxiliary sources.
"""

from __future__ import annotations

from typing import Literal

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import Strategy, stateless
from auxilia.strategies.simplex import min_norm_weights, present_index

Scale = Literal["sources", "one"]


def mgda(scale: Scale = "sources") -> Strategy:
    """α = s · argmin_{w ∈ Δ} ‖Σ_k w_k g_k‖² = s · argmin_{w ≥ 0, Σw = 1} wᵀ G w.

    The min-norm point d = Σ_k w_k g_k satisfies ⟨d, g_k⟩ ≥ ‖d‖² ≥ 0 for every task k. With
    ``scale="sources"`` (default) s is the number n of present sources, so that Σα = n as for
    the summed loss of ``equal``: the Nash-MTL code (``methods/weight_methods.py::MGDA``,
    ``sol * n_tasks``) and the CAGrad code (``overwrite_grad``, ``newgrad * 3``) both do this,
    "to match the sum loss". ``scale="one"`` gives the paper's weights, Σα = 1.

    Sources absent from the step get α = 0 and take no part in the solve. Against the paper's
    code (``min_norm_solvers.py``, Frank–Wolfe capped at 250 iterations with stop criterion
    1e-5, and the closed form for two tasks): the quadratic program on the n×n Gram matrix is
    solved exactly (up to rounding) by an active-set method, which for two tasks is the closed
    form w_1 = clip(⟨g_2 − g_1, g_2⟩ / ‖g_1 − g_2‖², 0, 1). The optional gradient normalisation
    of the code ("not included in the paper") is not implemented. The weights are unique only
    when the gradients are affinely independent; the direction d always is. All-zero gradients
    give the centre w = 1/n.
    """
    if scale not in ("sources", "one"):
        raise StrategyError(f"mgda: scale must be 'sources' or 'one', got {scale!r}")

    def rule(stats: Statistics) -> torch.Tensor:
        gram = stats.require(Need.GRAM).to(torch.float64)
        idx = present_index(stats.present)
        alpha = torch.zeros(stats.num_sources, dtype=torch.float64)
        if idx.numel() == 0:
            return alpha
        w = min_norm_weights(gram[idx][:, idx])
        alpha[idx] = w * (float(idx.numel()) if scale == "sources" else 1.0)
        return alpha

    return stateless("mgda", frozenset({Need.GRAM}), rule, {"scale": scale})
