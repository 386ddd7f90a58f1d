"""What an engine mode is: how it measures statistics and writes the combined gradient.

A mode is started once per :class:`~auxilia.engine.Engine` (it may hook the module's layers
then) and asked every step to ``measure`` a batch of per-source losses. The measurement holds
the step's :class:`~auxilia.statistics.Statistics` and writes Σ_k α_k g_k once α is known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from auxilia.engine.source_losses import SourceLosses
from auxilia.statistics import Need, Statistics

Layout = Literal["partitioned", "shared-input"]
LAYOUTS: tuple[Layout, ...] = ("partitioned", "shared-input")


class Measurement(Protocol):
    """What a mode returns: the step's statistics and a way to write the combined gradient."""

    statistics: Statistics

    def combine(self, coefficients: torch.Tensor) -> None:
        """Accumulate Σ_k α_k g_k into ``.grad`` of shared parameters (Σ_k g_k of the others)."""
        ...


class DirectionalMeasurement(Measurement, Protocol):
    """A measurement that can also take inner products with given parameter-shaped vectors.

    ``shared`` lists the shared parameters the two methods refer to, in their order (a mode
    may leave out parameters the step does not reach: every gradient there is 0).
    """

    @property
    def shared(self) -> list[torch.Tensor]: ...

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """<g_k, v> for every source k, v given per shared parameter; float64 [K+1] on CPU."""
        ...

    def source_gradient(self, k: int) -> list[torch.Tensor]:
        """Source k's gradient on each shared parameter (zeros where it does not reach)."""
        ...


class Runner(Protocol):
    """A started mode: measures one step at a time."""

    def measure(self, batch: SourceLosses, needs: frozenset[Need]) -> Measurement: ...

    def close(self) -> None:
        """Remove hooks or other attachments; the runner is not used afterwards."""
        ...


@dataclass(frozen=True)
class ModeContext:
    """What a mode is started with."""

    module: torch.nn.Module | None  # the model, when the Engine was given one (hook modes)
    params: list[torch.Tensor]  # every parameter that receives a gradient
    shared: list[torch.Tensor] | None  # parameters the statistics are over; None: all of them
    layout: Layout


@dataclass(frozen=True)
class Mode:
    """A named way of measuring: where it applies and which statistics it can compute."""

    name: str
    summary: str
    layouts: frozenset[Layout]
    provides: frozenset[Need]
    start: Callable[[ModeContext], Runner]
    requires_module: bool = False
