"""``fixed``: user-given constant coefficients (grid-searched weights, ablations)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Statistics
from auxilia.strategies.base import State, Strategy


def fixed(weights: Sequence[float]) -> Strategy:
    """α = ``weights`` (one per source, the target first), the same at every step.

    Weights must be finite and non-negative; their number must equal the number of sources,
    which is checked when the strategy is initialised.
    """
    values = [float(w) for w in weights]
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise StrategyError(f"fixed: weights must be finite and >= 0, got {bad[0]}")
    table = torch.tensor(values, dtype=torch.float64)

    def init(num_sources: int) -> State:
        if num_sources != len(values):
            raise StrategyError(
                f"fixed: got {len(values)} weights for {num_sources} sources "
                "(one per source, the target first)"
            )
        return {}

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        return table.clone(), state

    return Strategy("fixed", frozenset(), init, update, {"weights": values})
