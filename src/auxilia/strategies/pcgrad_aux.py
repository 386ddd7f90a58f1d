"""``pcgrad-aux``: one-sided gradient surgery for auxiliaries (PCGrad applied to auxiliaries).

The variant of PCGrad (Yu et al., NeurIPS 2020) used as a baseline for auxiliary learning, e.g.
in "Careful with that Scalpel: Improving Gradient Surgery with an EMA" (Hsieh et al., ICML
2024, the Bloop paper): only auxiliary gradients are projected, and only off the target's
gradient; the target's gradient is never altered.
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import Strategy, stateless

F64 = torch.float64
FLOAT_MAX = torch.finfo(F64).max


def pcgrad_aux(weight: float = 1.0) -> Strategy:
    """d = g_0 + Σ_k λ (g_k − min(0, <g_k, g_0>) / ‖g_0‖² · g_0), i.e. in coefficients
    α_0 = 1 − λ Σ_k min(0, G_k0) / G_00 and α_k = λ for every present auxiliary k.

    An auxiliary gradient that conflicts with the target's loses its component along g_0; one
    that agrees is kept whole. Then <d, g_0> = G_00 + λ Σ_k max(0, G_k0) ≥ 0: to first order
    the step never increases the target loss (for every λ ≥ 0, not only λ ≤ 1). The target's
    gradient only ever gets a larger coefficient (α_0 ≥ 1), never a new direction.

    ``weight`` is λ, one weight for all auxiliaries; default 1, the plain sum of PCGrad (the
    Bloop code's default λ = 0.1 belongs to its own bias-imposition setting). Runs on the
    target row alone (G_00 is its first entry), so it works in the engine's cheap modes.
    When G_00 = 0 (a zero target gradient) nothing can be projected and α_0 = 1. Absent
    sources get α_k = 0; an absent target gets α_0 = 0 and the auxiliaries are unprojected.
    """
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise StrategyError(f"pcgrad-aux: weight must be a finite number >= 0, got {weight!r}")

    def rule(stats: Statistics) -> torch.Tensor:
        row = stats.require(Need.TARGET_ROW).to(F64)
        present = stats.present
        auxiliary = present.clone()
        auxiliary[0] = False
        alpha = torch.where(auxiliary, torch.full_like(row, float(weight)), torch.zeros_like(row))
        g00 = float(row[0])
        target = 0.0
        if bool(present[0]):
            target = 1.0
            if g00 > 0:
                conflict = float(torch.where(auxiliary, row.clamp_max(0.0), 0.0).sum())
                target = 1.0 - weight * conflict / g00
                target = min(target, float(FLOAT_MAX)) if not math.isnan(target) else 1.0
        alpha[0] = target
        return alpha

    return stateless("pcgrad-aux", frozenset({Need.TARGET_ROW}), rule, {"weight": weight})
