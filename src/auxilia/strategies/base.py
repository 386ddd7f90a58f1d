"""The strategy interface: a pair of pure functions over explicit state (as in optax).

``init(num_sources) -> state`` and ``update(statistics, state) -> (coefficients, state)``.
State is a flat ``dict[str, torch.Tensor]`` so that checkpoints (``torch.load(weights_only=True)``),
exact resume and identical coefficients on every distributed rank come for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics

State = dict[str, torch.Tensor]
InitFn = Callable[[int], State]
UpdateFn = Callable[[Statistics, State], tuple[torch.Tensor, State]]


@dataclass(frozen=True)
class Strategy:
    """A named rule turning gradient statistics into one coefficient per source.

    ``coefficients[0]`` multiplies the target's gradient, ``coefficients[k]`` source k's. The
    engine forces the coefficient of a source absent from a step to zero. A strategy that
    needs ``Need.TARGET_EMA`` or ``Need.TARGET_EMA_NORM`` sets ``target_ema`` (the EMA rate ρ of
    the target gradient ĝ the engine keeps: ĝ ← ĝ + ρ(g_0 − ĝ)); one that needs
    ``Need.TARGET_EMA`` (inner products with ĝ) returns one more coefficient, the last, for ĝ.
    """

    name: str
    needs: frozenset[Need]
    init: InitFn
    update: UpdateFn
    params: Mapping[str, Any] = field(default_factory=dict)
    target_ema: float = 0.0


def no_state(num_sources: int) -> State:
    """``init`` for strategies that keep no state."""
    del num_sources
    return {}


def stateless(
    name: str,
    needs: frozenset[Need],
    rule: Callable[[Statistics], torch.Tensor],
    params: Mapping[str, Any] | None = None,
) -> Strategy:
    """Build a strategy whose coefficients depend on the current statistics only."""

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        return rule(stats), state

    return Strategy(name, needs, no_state, update, dict(params or {}))


def target_one_hot(stats: Statistics) -> torch.Tensor:
    """Coefficients ``[1, 0, ..., 0]`` in float64."""
    alpha = torch.zeros(stats.num_sources, dtype=torch.float64)
    alpha[0] = 1.0
    return alpha


def check_rate(name: str, key: str, value: float) -> None:
    """Raise unless ``value`` is a finite number > 0 (bools rejected)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise StrategyError(f"{name}: {key} must be a finite number > 0, got {value!r}")
