"""Strategies: rules that turn gradient statistics into one coefficient per source.

Each strategy is built by a small constructor (``ax.strategies.gcs(variant="weighted")``) or by
name (``ax.strategies.get("gcs", {"variant": "weighted"})``), the way configs and the CLI do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from auxilia.errors import ConfigError
from auxilia.registry import build
from auxilia.strategies.arml import arml
from auxilia.strategies.auto import auto
from auxilia.strategies.auxilearn import auxilearn
from auxilia.strategies.auxinash import auxinash
from auxilia.strategies.base import State, Strategy, stateless
from auxilia.strategies.bloop import bloop
from auxilia.strategies.cagrad import cagrad
from auxilia.strategies.dwa import dwa
from auxilia.strategies.equal import equal
from auxilia.strategies.fixed import fixed
from auxilia.strategies.gcs import gcs
from auxilia.strategies.gradnorm import gradnorm
from auxilia.strategies.mgda import mgda
from auxilia.strategies.nash_mtl import nash_mtl
from auxilia.strategies.olaux import olaux
from auxilia.strategies.pcgrad import pcgrad
from auxilia.strategies.pcgrad_aux import pcgrad_aux
from auxilia.strategies.target_only import target_only
from auxilia.strategies.tawt import tawt
from auxilia.strategies.uncertainty import uncertainty

REGISTRY: dict[str, Callable[..., Strategy]] = {
    "target-only": target_only,
    "equal": equal,
    "fixed": fixed,
    "gcs": gcs,
    "olaux": olaux,
    "arml": arml,
    "bloop": bloop,
    "auxilearn": auxilearn,
    "auxinash": auxinash,
    "auto": auto,
    "tawt": tawt,
    "pcgrad-aux": pcgrad_aux,
    "uncertainty": uncertainty,
    "dwa": dwa,
    "gradnorm": gradnorm,
    "pcgrad": pcgrad,
    "mgda": mgda,
    "cagrad": cagrad,
    "nash-mtl": nash_mtl,
}


def names() -> list[str]:
    """Names accepted by :func:`get`, configs and the CLI."""
    return sorted(REGISTRY)


def from_spec(spec: str) -> Strategy:
    """``NAME`` or ``NAME:VARIANT`` (``gcs:unweighted``, ``auto:projection``), as the benchmark
    commands take them: the strategy with its defaults, or with ``variant=VARIANT``."""
    name, _, variant = spec.partition(":")
    if name not in REGISTRY:
        raise ConfigError(f"unknown strategy '{name}'; expected one of: {', '.join(names())}")
    return get(name, {"variant": variant} if variant else None)


def get(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build the strategy called ``name`` with keyword ``params``; errors name the bad key."""
    return build("strategy", name, REGISTRY, params)


__all__ = [
    "REGISTRY",
    "State",
    "Strategy",
    "arml",
    "auto",
    "auxilearn",
    "auxinash",
    "bloop",
    "cagrad",
    "dwa",
    "equal",
    "fixed",
    "from_spec",
    "gcs",
    "get",
    "gradnorm",
    "mgda",
    "names",
    "nash_mtl",
    "olaux",
    "pcgrad",
    "pcgrad_aux",
    "stateless",
    "target_only",
    "tawt",
    "uncertainty",
]
