"""The sampler interface: which sources enter a step, as pure functions over explicit state.

``init(num_sources, seed) -> state``, ``draw(state, coefficients) -> (mask, state)`` and
``observe(state, statistics, drawn) -> state``. ``mask`` is a bool tensor over sources (the
target, index 0, is always drawn); ``coefficients`` are the strategy's latest coefficients
(samplers may draw in proportion); ``observe`` is called after the engine's backward with that
step's :class:`~auxilia.statistics.Statistics` and the mask that was drawn, so that bandits learn
from the reward of the arms they played. A sampler declares the statistics it reads in ``needs``
(the trainer adds them to the engine's). State is a flat ``dict[str, torch.Tensor]`` that
includes the RNG state, so checkpoints and exact resume work as for strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from auxilia.statistics import Need, Statistics

SamplerState = dict[str, torch.Tensor]
InitFn = Callable[[int, int], SamplerState]
DrawFn = Callable[[SamplerState, torch.Tensor], tuple[torch.Tensor, SamplerState]]
ObserveFn = Callable[[SamplerState, Statistics, torch.Tensor], SamplerState]


def no_feedback(state: SamplerState, statistics: Statistics, drawn: torch.Tensor) -> SamplerState:
    """``observe`` for samplers that do not learn from a step: the state is unchanged."""
    del statistics, drawn
    return state


@dataclass(frozen=True)
class Sampler:
    """A named rule choosing the sources of each step, and learning from what it drew."""

    name: str
    init: InitFn
    draw: DrawFn
    params: Mapping[str, Any] = field(default_factory=dict)
    needs: frozenset[Need] = frozenset()
    observe: ObserveFn = no_feedback


def generator_from(state: SamplerState) -> torch.Generator:
    """A CPU generator restored from ``state['rng']`` (samplers keep their RNG in their state)."""
    generator = torch.Generator()
    generator.set_state(state["rng"])
    return generator


def seeded_rng_state(seed: int) -> torch.Tensor:
    """The state of a fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed).get_state()


def inclusion_probabilities(weights: torch.Tensor, count: int) -> torch.Tensor:
    """Probabilities ``p`` (each <= 1, summing to ``count``) proportional to ``weights`` where
    possible: ``p = count * w / Σw``, with entries above 1 capped at 1 and their excess spread
    over the others in proportion to their weights (the usual πps capping).

    ``weights`` are positive, ``0 < count <= len(weights)``. At most ``count`` passes of O(K)
    vector operations.
    """
    weights = weights.to(torch.float64)
    capped = torch.zeros(weights.shape, dtype=torch.bool)
    p = weights * (count / weights.sum())
    for _ in range(count):
        over = (p > 1.0) & ~capped
        if not bool(over.any()):
            break
        capped |= p >= 1.0
        free = weights.masked_fill(capped, 0.0)
        remaining = count - int(capped.sum())
        scale = remaining / float(free.sum()) if remaining > 0 else 0.0
        p = torch.where(capped, torch.ones_like(p), free * scale)
    return p.clamp(max=1.0)


def systematic_sample(
    probabilities: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of ``count`` distinct items, item ``i`` included with probability
    ``probabilities[i]`` exactly (they must sum to ``count``, each in [0, 1]).

    Randomised systematic sampling (Madow 1949; Hartley and Rao 1962): the items are shuffled,
    laid end to end on [0, count) with lengths ``probabilities``, and the points
    ``u, u + 1, ..., u + count - 1`` (u uniform in [0, 1)) pick the items they fall on. An item
    has length <= 1, so no two points pick it. O(K) vector operations, no Python loop over items.
    """
    size = probabilities.shape[0]
    order = torch.randperm(size, generator=generator)
    edges = torch.cumsum(probabilities.to(torch.float64)[order], dim=0)
    edges = edges * (count / float(edges[-1]))
    edges[-1] = float(count)  # exact, so that every point falls on an item
    start = torch.rand((), generator=generator, dtype=torch.float64)
    points = start + torch.arange(count, dtype=torch.float64)
    picked = torch.searchsorted(edges, points, right=True).clamp(max=size - 1)
    return order[picked]


def target_mask(num_sources: int) -> torch.Tensor:
    """A bool mask over ``num_sources`` sources with only the target (index 0) set."""
    mask = torch.zeros(num_sources, dtype=torch.bool)
    mask[0] = True
    return mask


def played_arms(stats: Statistics, drawn: torch.Tensor) -> torch.Tensor:
    """The auxiliary sources drawn this step that were present in the batch (bool [K+1])."""
    played = drawn.clone()
    played[0] = False
    return played & stats.present


def smoothed_rewards(
    previous: torch.Tensor,
    rewards: torch.Tensor,
    plays: torch.Tensor,
    played: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """R ← (1 − β) R + β r on played arms, the first reward taken as it is; others keep R."""
    updated = torch.where(plays == 0, rewards, (1.0 - beta) * previous + beta * rewards)
    return torch.where(played, updated, previous)
