"""``gcs``: the gradient-similarity gate of Du et al. (2018).

"Adapting Auxiliary Losses Using Gradient Similarity", arXiv:1812.02224. An auxiliary gradient
is added only when it does not point against the target's, which provably keeps the update a
descent direction for the target.
"""

from __future__ import annotations

from typing import Literal

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import Strategy, stateless

Variant = Literal["weighted", "unweighted"]


def gcs(variant: Variant = "weighted") -> Strategy:
    """α_0 = 1; α_k = max(0, cos(g_k, g_0)) (``weighted``) or 1[cos(g_k, g_0) > 0] (``unweighted``).

    The cosine is global over all shared parameters, as in the AuxiLearn and AuxiNash
    reimplementations (there is no official code). The unweighted gate needs only the sign of
    ``<g_k, g_0>``, so it declares the target row alone and runs on the cheap ``jvp`` mode.
    """
    if variant not in ("weighted", "unweighted"):
        raise StrategyError(f"gcs: variant must be 'weighted' or 'unweighted', got {variant!r}")

    def rule(stats: Statistics) -> torch.Tensor:
        if variant == "weighted":
            alpha = stats.cosines().to(torch.float64).clamp_min(0.0)
        else:
            alpha = (stats.require(Need.TARGET_ROW) > 0).to(torch.float64)
        alpha[0] = 1.0
        return alpha

    needs = {Need.TARGET_ROW} | ({Need.NORMS} if variant == "weighted" else set())
    return stateless("gcs", frozenset(needs), rule, {"variant": variant})
