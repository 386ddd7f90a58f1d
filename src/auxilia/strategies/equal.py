"""``equal``: the plain summed loss, every source with coefficient 1."""

from __future__ import annotations

import torch

from auxilia.statistics import Statistics
from auxilia.strategies.base import Strategy, stateless


def _ones(stats: Statistics) -> torch.Tensor:
    return torch.ones(stats.num_sources, dtype=torch.float64)


def equal() -> Strategy:
    """α_k = 1 for every source: ``L_target + Σ_k L_k``, what naive multi-source training does."""
    return stateless("equal", frozenset(), _ones)
