"""Samplers: which sources enter a step, so that the number of sources can grow to thousands."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from auxilia.registry import build
from auxilia.samplers.all_sources import all_sources
from auxilia.samplers.base import Sampler, SamplerState
from auxilia.samplers.uniform import uniform

REGISTRY: dict[str, Callable[..., Sampler]] = {"all": all_sources, "uniform": uniform}


def names() -> list[str]:
    """Names accepted by :func:`get`, configs and the CLI."""
    return sorted(REGISTRY)


def get(name: str, params: Mapping[str, Any] | None = None) -> Sampler:
    """Build the sampler called ``name`` with keyword ``params``; errors name the bad key."""
    return build("sampler", name, REGISTRY, params)


__all__ = ["REGISTRY", "Sampler", "SamplerState", "all_sources", "get", "names", "uniform"]
