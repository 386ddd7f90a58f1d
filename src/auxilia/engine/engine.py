"""The gradient engine: statistics in, target-aware ``.grad`` out, used like ``loss.backward()``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from auxilia.engine.exact import measure_exact
from auxilia.engine.source_losses import SourceLosses, split_by_source
from auxilia.errors import EngineError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy


class Measurement(Protocol):
    """What a mode returns: the step's statistics and a way to write the combined gradient."""

    statistics: Statistics

    def combine(self, coefficients: torch.Tensor) -> None: ...


MeasureFn = Callable[
    [SourceLosses, Sequence[torch.Tensor], Sequence[torch.Tensor] | None, frozenset[Need]],
    Measurement,
]

MODES: dict[str, MeasureFn] = {"exact": measure_exact}


class Engine:
    """Fill ``.grad`` with Σ_k α_k g_k on shared parameters, α from a strategy.

    Hand it one loss per sample and the id of the source each sample belongs to (0 = target);
    it measures what the strategy needs, asks the strategy for the coefficients α, writes the
    combined gradient (accumulating into ``.grad``, like ``backward``), and returns α.
    Parameters listed in ``shared`` (all of them when it is None) get Σ_k α_k g_k and are those
    the statistics are measured on; the others (heads) get each source's own gradient, unweighted.

    Example::

        engine = Engine(model.parameters(), strategy=ax.strategies.gcs(), num_sources=3)
        losses = F.cross_entropy(model(x), y, reduction="none")
        alpha = engine.backward(losses, source_ids)
        optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | torch.nn.Module,
        *,
        strategy: Strategy,
        num_sources: int,
        shared: Iterable[torch.Tensor] | None = None,
        mode: str = "exact",
        extra_needs: Iterable[Need] = (),
        names: Sequence[str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise EngineError(f"unknown engine mode '{mode}'; expected one of: {', '.join(MODES)}")
        if num_sources < 1:
            raise EngineError(f"num_sources must be >= 1, got {num_sources}")
        if names is not None and len(names) != num_sources:
            raise EngineError(f"got {len(names)} names for {num_sources} sources")
        # A module (rather than its parameters) lets per-sample modes hook its layers.
        self.module = params if isinstance(params, torch.nn.Module) else None
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise EngineError("no parameter requires grad")
        self.shared = None if shared is None else [p for p in shared if p.requires_grad]
        self.strategy = strategy
        self.num_sources = num_sources
        self.mode = mode
        self.names = list(names) if names is not None else None
        self.needs = Need.closure(set(strategy.needs) | set(extra_needs))
        self.strategy_state: State = strategy.init(num_sources)
        self.step = 0
        self.last_statistics: Statistics | None = None

    def backward(
        self, losses: torch.Tensor, source_ids: torch.Tensor, *, lr: float = 1.0
    ) -> torch.Tensor:
        """Measure, weight and write the gradient of one step; return α (float64, [K+1])."""
        batch = split_by_source(losses, source_ids, self.num_sources, self.names)
        measurement = MODES[self.mode](batch, self.params, self.shared, self.needs)
        stats = dataclasses.replace(measurement.statistics, step=self.step, lr=float(lr))
        alpha, state = self.strategy.update(stats, self.strategy_state)
        alpha = self._checked(alpha) * stats.present.to(torch.float64)
        measurement.combine(alpha)
        self.strategy_state = state
        self.step += 1
        self.last_statistics = stats
        return alpha

    def _checked(self, alpha: torch.Tensor) -> torch.Tensor:
        if alpha.shape != (self.num_sources,):
            raise EngineError(
                f"strategy '{self.strategy.name}' returned {tuple(alpha.shape)} coefficients "
                f"for {self.num_sources} sources"
            )
        alpha = alpha.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(alpha).all()):
            raise EngineError(f"strategy '{self.strategy.name}' returned non-finite coefficients")
        return alpha

    def state_dict(self) -> dict[str, Any]:
        """The strategy state and step counter, for checkpoints."""
        return {"step": self.step, "strategy": dict(self.strategy_state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step = int(state["step"])
        self.strategy_state = dict(state["strategy"])
