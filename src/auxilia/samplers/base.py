"""The sampler interface: which sources enter a step, as pure functions over explicit state.

``init(num_sources, seed) -> state`` and ``draw(state, coefficients) -> (mask, state)``, where
``mask`` is a bool tensor over sources (the target, index 0, is always drawn) and
``coefficients`` are the strategy's latest coefficients (samplers may draw in proportion).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

SamplerState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """A named rule choosing the sources of each step."""

    name: str
    init: Callable[[int, int], SamplerState]
    draw: Callable[[SamplerState, torch.Tensor], tuple[torch.Tensor, SamplerState]]
    params: Mapping[str, Any] = field(default_factory=dict)


def generator_from(state: SamplerState) -> torch.Generator:
    """A CPU generator restored from ``state['rng']`` (samplers keep their RNG in their state)."""
    generator = torch.Generator()
    generator.set_state(state["rng"])
    return generator


def seeded_rng_state(seed: int) -> torch.Tensor:
    """The state of a fresh CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed).get_state()
