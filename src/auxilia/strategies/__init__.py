"""Strategies: rules that turn gradient statistics into one coefficient per source.

Each strategy is built by a small constructor (``ax.strategies.gcs(variant="weighted")``) or by
name (``ax.strategies.get("gcs", {"variant": "weighted"})``), the way configs and the CLI do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from auxilia.registry import build
from auxilia.strategies.arml import arml
from auxilia.strategies.base import State, Strategy, stateless
from auxilia.strategies.equal import equal
from auxilia.strategies.fixed import fixed
from auxilia.strategies.gcs import gcs
from auxilia.strategies.olaux import olaux
from auxilia.strategies.target_only import target_only

REGISTRY: dict[str, Callable[..., Strategy]] = {
    "target-only": target_only,
    "equal": equal,
    "fixed": fixed,
    "gcs": gcs,
    "olaux": olaux,
    "arml": arml,
}


def names() -> list[str]:
    """Names accepted by :func:`get`, configs and the CLI."""
    return sorted(REGISTRY)


def get(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build the strategy called ``name`` with keyword ``params``; errors name the bad key."""
    return build("strategy", name, REGISTRY, params)


__all__ = [
    "REGISTRY",
    "State",
    "Strategy",
    "arml",
    "equal",
    "fixed",
    "gcs",
    "get",
    "names",
    "olaux",
    "stateless",
    "target_only",
]
