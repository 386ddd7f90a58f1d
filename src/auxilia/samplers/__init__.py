"""Samplers: which sources enter a step, so that the number of sources can grow to thousands."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from auxilia.registry import build
from auxilia.samplers.all_sources import all_sources
from auxilia.samplers.base import Sampler, SamplerState, no_feedback
from auxilia.samplers.exp3 import exp3
from auxilia.samplers.proportional import proportional
from auxilia.samplers.ucb1 import ucb1
from auxilia.samplers.uniform import uniform

REGISTRY: dict[str, Callable[..., Sampler]] = {
    "all": all_sources,
    "uniform": uniform,
    "proportional": proportional,
    "exp3": exp3,
    "ucb1": ucb1,
}


def names() -> list[str]:
    """Names accepted by :func:`get`, configs and the CLI."""
    return sorted(REGISTRY)


def get(name: str, params: Mapping[str, Any] | None = None) -> Sampler:
    """Build the sampler called ``name`` with keyword ``params``; errors name the bad key."""
    return build("sampler", name, REGISTRY, params)


__all__ = [
    "REGISTRY",
    "Sampler",
    "SamplerState",
    "all_sources",
    "exp3",
    "get",
    "names",
    "no_feedback",
    "proportional",
    "ucb1",
    "uniform",
]
