"""The gradient engine: statistics in, target-aware ``.grad`` out, used like ``loss.backward()``."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch

from auxilia.engine.batched import BatchedRunner
from auxilia.engine.distributed import (
    Collectives,
    GlobalLosses,
    distributed_world,
    globalise,
    globalise_losses,
)
from auxilia.engine.exact import accumulate
from auxilia.engine.jvp import JvpRunner
from auxilia.engine.mode import (
    LAYOUTS,
    DirectionalMeasurement,
    Layout,
    Measurement,
    Mode,
    ModeContext,
)
from auxilia.engine.modes import MODES, PREFERENCE, mode_reason, resolve_mode
from auxilia.engine.source_losses import SourceLosses, split_by_source, split_by_task
from auxilia.errors import EngineError, ModeUnavailableError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy


def statistics_to_measure(needs: frozenset[Need]) -> frozenset[Need]:
    """What the mode must compute for a strategy that needs ``needs`` (after
    :meth:`Need.closure`): the held-out row is formed from the Gram matrix of the step."""
    return needs | ({Need.GRAM} if Need.VALIDATION in needs else set())


class Engine:
    """Fill ``.grad`` with Σ_k α_k g_k on shared parameters, α from a strategy.

    Hand it one loss per sample and the id of the source each sample belongs to (0 = target);
    it measures what the strategy needs, asks the strategy for the coefficients α, writes the
    combined gradient (accumulating into ``.grad``, like ``backward``), and returns α.
    Parameters listed in ``shared`` (all of them when it is None) get Σ_k α_k g_k and are those
    the statistics are measured on; the others (heads) get each source's own gradient, unweighted.

    ``layout="partitioned"`` (default): each sample belongs to one source, ``losses`` is [N]
    and ``source_ids`` [N]. ``layout="shared-input"``: every task is evaluated on the same
    samples, ``losses`` is [B, K+1] (one column per task, the target first) or [K+1].
    ``mode="auto"`` picks the fastest mode that computes what the strategy needs; a name
    (``"exact"``, ``"ghost"``, ...) or a configured :class:`Mode` (``sketch(dim=64)``) forces one.

    Across processes (``torchrun``; ``distributed=None`` turns it on when torch.distributed is
    initialised with more than one process) each rank passes its own samples and every
    statistic is one of the global batch: all ranks get the same α and ``.grad`` holds the
    global combined gradient, already summed over ranks (do not wrap the model in
    ``DistributedDataParallel``). The collectives are listed in
    :mod:`auxilia.engine.distributed`.

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
        mode: str | Mode = "auto",
        layout: Layout = "partitioned",
        extra_needs: Iterable[Need] = (),
        names: Sequence[str] | None = None,
        distributed: bool | None = None,
    ) -> None:
        if num_sources < 1:
            raise EngineError(f"num_sources must be >= 1, got {num_sources}")
        if names is not None and len(names) != num_sources:
            raise EngineError(f"got {len(names)} names for {num_sources} sources")
        if layout not in LAYOUTS:
            raise EngineError(f"unknown layout '{layout}'; expected one of: {', '.join(LAYOUTS)}")
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
        self.layout: Layout = layout
        self.names = list(names) if names is not None else None
        self.needs = Need.closure(set(strategy.needs) | set(extra_needs))
        if Need.VALIDATION in self.needs and layout != "partitioned":
            raise EngineError(
                f"strategy '{strategy.name}' needs held-out target losses, which only the "
                "partitioned layout supports"
            )
        if Need.TARGET_EMA_NORM in self.needs and not 0.0 < strategy.target_ema <= 1.0:
            raise EngineError(
                f"strategy '{strategy.name}' needs the target-gradient EMA but its rate "
                f"target_ema={strategy.target_ema} is not in (0, 1]"
            )
        mode_needs = statistics_to_measure(self.needs)
        self.mode = resolve_mode(mode, layout, mode_needs, self.module is not None)
        self._auto = mode == "auto"
        self.fallback: str | None = None  # why ``auto`` left its first choice, once it did
        self._mode_needs = mode_needs - {Need.VALIDATION, Need.TARGET_EMA, Need.TARGET_EMA_NORM}
        if distributed is None:
            distributed = distributed_world() > 1
        self.collectives = Collectives() if distributed else None
        if self.collectives is not None and self.mode.name == "sketch":
            raise EngineError(
                "engine mode 'sketch' estimates statistics per process and is not supported "
                "across processes; use 'auto', 'ghost' or 'exact'"
            )
        self._context = ModeContext(self.module, self.params, self.shared, layout)
        self.runner = self.mode.start(self._context)
        self.strategy_state: State = strategy.init(num_sources)
        self.ema: list[torch.Tensor] | None = None
        self.step = 0
        self.last_statistics: Statistics | None = None

    # ---- one step -------------------------------------------------------------------------

    def backward(
        self,
        losses: torch.Tensor,
        source_ids: torch.Tensor | None = None,
        *,
        lr: float = 1.0,
        validation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Measure, weight and write the gradient of one step; return α (float64, [K+1]).

        ``validation``: per-sample losses of held-out target samples, from the same forward
        graph, for strategies that need ``Need.VALIDATION``; measured, never trained on.
        """
        batch = self._split(losses, source_ids, validation)
        measurement: Measurement
        if self.collectives is None:
            measurement = self._measure(batch)
        else:
            reduced: GlobalLosses = globalise_losses(
                self.collectives, batch, self.layout, self._names(batch)
            )
            local = self._measure(reduced.batch)
            measurement = globalise(
                self.collectives,
                local,
                reduced,
                self._mode_needs,
                self._shared_params(),
                self.params,
                self.mode.name,
            )
        stats = measurement.statistics
        if Need.VALIDATION in self.needs:
            stats = _without_validation(stats, self.needs)
        extra: dict[str, Any] = {}
        if Need.TARGET_EMA_NORM in self.needs:
            extra = self._update_ema(
                cast(DirectionalMeasurement, measurement), row=Need.TARGET_EMA in self.needs
            )
        stats = dataclasses.replace(stats, step=self.step, lr=float(lr), **extra)
        alpha, state = self.strategy.update(stats, self.strategy_state)
        alpha, ema_coefficient = self._checked(alpha)
        alpha = alpha * stats.present.to(torch.float64)
        if Need.VALIDATION in self.needs:
            measurement.combine(torch.cat([alpha, torch.zeros(1, dtype=torch.float64)]))
        else:
            measurement.combine(alpha)
        if self.ema is not None and ema_coefficient != 0.0:
            for param, direction in zip(self._shared_params(), self.ema, strict=True):
                accumulate(param, ema_coefficient * direction)
        self.strategy_state = state
        self.step += 1
        self.last_statistics = stats
        return alpha

    def _measure(self, batch: SourceLosses) -> Measurement:
        """The runner's measurement; under ``mode="auto"``, a mode that finds it cannot measure
        this model (before computing anything) hands the step to the next one that can."""
        try:
            return self.runner.measure(batch, self._mode_needs)
        except ModeUnavailableError as error:
            if not self._auto:
                raise
            self._fall_back(error)
            return self._measure(batch)
        except RuntimeError as error:
            if "use_reentrant=True" not in str(error):
                raise
            raise EngineError(
                "the model runs torch.utils.checkpoint with use_reentrant=True, through which "
                "the engine's torch.autograd.grad passes cannot go: pass use_reentrant=False "
                "(PyTorch's recommended setting)"
            ) from error

    def _fall_back(self, error: ModeUnavailableError) -> None:
        """Leave the current mode for the next in ``auto``'s order that serves the needs."""
        order = PREFERENCE[self.layout]
        later = order[order.index(self.mode.name) + 1 :] if self.mode.name in order else ()
        needs = statistics_to_measure(self.needs)
        mode = next(
            (
                MODES[name]
                for name in later
                if mode_reason(MODES[name], self.layout, needs, self.module is not None) is None
            ),
            None,
        )
        if mode is None:
            raise error
        self.runner.close()
        self.fallback = f"{self.mode.name} cannot measure this model ({error.reason}): {mode.name}"
        warnings.warn(f"engine mode auto: {self.fallback} instead", stacklevel=4)
        self.mode = mode
        self.runner = mode.start(self._context)

    def _split(
        self,
        losses: torch.Tensor,
        source_ids: torch.Tensor | None,
        validation: torch.Tensor | None,
    ) -> SourceLosses:
        local = self.collectives is None  # across processes the global means are checked
        if self.layout == "shared-input":
            if source_ids is not None:
                raise EngineError("the shared-input layout takes no source_ids")
            return split_by_task(losses, self.num_sources, self.names, check_finite=local)
        if source_ids is None:
            raise EngineError("the partitioned layout needs source_ids, one per loss")
        if Need.VALIDATION not in self.needs:
            if validation is not None:
                raise EngineError(
                    f"validation losses were given but strategy '{self.strategy.name}' does "
                    "not use them"
                )
            return split_by_source(
                losses, source_ids, self.num_sources, self.names, check_finite=local
            )
        # Across processes a rank may hold none of the step's held-out samples.
        if validation is None or validation.dim() != 1 or (local and validation.numel() == 0):
            raise EngineError(
                f"strategy '{self.strategy.name}' needs held-out target losses: pass "
                "validation=<1-D per-sample losses> to backward"
            )
        names = None if self.names is None else [*self.names, "validation"]
        ids = torch.cat(
            [
                source_ids.to(device=losses.device, dtype=torch.int64),
                torch.full_like(validation, self.num_sources, dtype=torch.int64),
            ]
        )
        return split_by_source(
            torch.cat([losses, validation]), ids, self.num_sources + 1, names, check_finite=local
        )

    def _names(self, batch: SourceLosses) -> list[str] | None:
        if self.names is None:
            return None
        return self.names + ["validation"] * (batch.num_sources - len(self.names))

    def _shared_params(self) -> list[torch.Tensor]:
        return self.params if self.shared is None else self.shared

    def _update_ema(self, measurement: DirectionalMeasurement, row: bool) -> dict[str, Any]:
        """ĝ ← ĝ + ρ (g_0 − ĝ) (ĝ starts at the first g_0); ‖ĝ‖², and with ``row`` <g_k, ĝ>.

        ĝ covers every shared parameter in the engine's order; a parameter the step does not
        reach has g_0 = 0 there (and every g_k too, so it adds nothing to the products). The
        row costs a pass over the step's factors (about a forward pass on ``ghost``): only the
        strategies that read it (``Need.TARGET_EMA``) pay for it.
        """
        if not hasattr(measurement, "source_gradient"):
            raise EngineError(f"engine mode '{self.mode.name}' cannot keep a target-gradient EMA")
        measured = dict(
            zip(map(id, measurement.shared), measurement.source_gradient(0), strict=True)
        )
        target: list[torch.Tensor] = []
        for p in self._shared_params():
            g = measured.get(id(p))
            target.append(
                torch.zeros_like(p) if g is None else g.detach() if g.requires_grad else g
            )
        if self.ema is None:
            self.ema = [g.clone() for g in target]
        else:
            # One fused call over every parameter: the update runs each step, and on small
            # models each operation's fixed cost is what counts.
            torch._foreach_lerp_(self.ema, target, self.strategy.target_ema)
        # Each parameter's norm in its own precision (relative error ~1e-7 in float32), summed
        # in float64.
        norms = torch.stack(torch._foreach_norm(self.ema)).to(torch.float64)
        out: dict[str, Any] = {"ema_sqnorm": norms.square().sum().cpu()}
        if row:
            by_id = {id(p): e for p, e in zip(self._shared_params(), self.ema, strict=True)}
            out["ema_row"] = measurement.dots([by_id[id(p)] for p in measurement.shared])
        return out

    def _checked(self, alpha: torch.Tensor) -> tuple[torch.Tensor, float]:
        expected = self.num_sources + (1 if Need.TARGET_EMA in self.needs else 0)  # ĝ's
        if alpha.shape != (expected,):
            raise EngineError(
                f"strategy '{self.strategy.name}' returned {tuple(alpha.shape)} coefficients "
                f"for {self.num_sources} sources"
            )
        alpha = alpha.detach().to(torch.float64).cpu()
        if not math.isfinite(float(alpha.sum())) and not bool(torch.isfinite(alpha).all()):
            raise EngineError(f"strategy '{self.strategy.name}' returned non-finite coefficients")
        if expected > self.num_sources:
            return alpha[: self.num_sources], float(alpha[-1])
        return alpha, 0.0

    def path(self) -> tuple[str | None, list[str]]:
        """How the mode ran on this model where it chooses while running, and why: ``jvp``
        measuring through ``batched``, ``batched``'s vmap or loop of backward passes.
        (None, []) for a mode that has no such choice, or before the choice is made."""
        runner: Any = self.runner
        path: list[str] = []
        notes = [] if self.fallback is None else [f"auto: {self.fallback}"]
        if isinstance(runner, JvpRunner) and runner.batched is not None:
            path.append("via batched")
            if runner.failure is not None:
                notes.append(f"jvp measured through batched: {runner.failure}")
            else:
                notes.append(
                    f"jvp measured through batched: at most {runner.ROWS_AT_MOST} sources present"
                )
            runner = runner.batched
        if isinstance(runner, BatchedRunner):
            if runner.vmap_failure is not None:
                path.append("loop")
                notes.append(
                    f"batched: vmap failed, loop of backward passes: {runner.vmap_failure}"
                )
            elif runner.path is not None:
                path.append(runner.path)
                vmap, loop = runner.timings["vmap"][1:], runner.timings["loop"]
                if vmap and loop:  # the path was timed (not restored from a checkpoint)
                    notes.append(
                        f"batched chose {runner.path}: per source vmap {1e3 * min(vmap):.3f} "
                        f"ms, loop {1e3 * min(loop):.3f} ms"
                    )
        return (", ".join(path) or None), notes

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Detach the mode from the model (hooks); the engine is not used afterwards."""
        self.runner.close()

    def communication(self) -> dict[str, dict[str, float]]:
        """Bytes, calls and seconds the engine's collectives took on this rank ({} on one)."""
        return {} if self.collectives is None else self.collectives.report()

    def state_dict(self) -> dict[str, Any]:
        """The strategy state, step counter, target-gradient EMA and the path ``batched`` chose
        by timing (a resumed run keeps it rather than timing again), for checkpoints."""
        state: dict[str, Any] = {"step": self.step, "strategy": dict(self.strategy_state)}
        if self.ema is not None:
            state["ema"] = [e.detach().cpu().clone() for e in self.ema]
        runner: Any = self.runner
        if isinstance(runner, JvpRunner):
            runner = runner.batched
        if isinstance(runner, BatchedRunner) and runner.path is not None:
            state["batched_path"] = runner.path
        if self.fallback is not None:
            state["fallback"] = {"mode": self.mode.name, "why": self.fallback}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a mode ``auto`` moved on to included)."""
        fallback = state.get("fallback")
        if fallback is not None and fallback["mode"] != self.mode.name:
            name = fallback["mode"]
            if not self._auto or name not in MODES:
                raise EngineError(
                    f"checkpoint: the engine ran in mode '{name}' after leaving its first "
                    f"choice, which this engine (mode '{self.mode.name}') cannot take"
                )
            self.runner.close()
            self.mode = MODES[name]
            self.runner = self.mode.start(self._context)
            self.fallback = str(fallback["why"])
        self.step = int(state["step"])
        self.strategy_state = dict(state["strategy"])
        if "ema" in state:
            shared = self._shared_params()
            self.ema = [e.to(p.device) for e, p in zip(state["ema"], shared, strict=True)]
        path = state.get("batched_path")
        if path is not None:
            if path not in ("vmap", "loop"):
                raise EngineError(f"checkpoint: unknown batched path {path!r}")
            if isinstance(self.runner, JvpRunner):
                self.runner.batched_path = path
                if self.runner.batched is not None:
                    self.runner.batched.path = path
            elif isinstance(self.runner, BatchedRunner):
                self.runner.path = path


def _without_validation(stats: Statistics, needs: frozenset[Need]) -> Statistics:
    """Split the (K+2)-source statistics into the K+1 sources and the validation row."""
    gram = stats.require(Need.GRAM)
    num = gram.shape[0] - 1
    inner = gram[:num, :num].clone()
    present = stats.present[:num].clone()
    return Statistics(
        present=present,
        losses=None if stats.losses is None else stats.losses[:num].clone(),
        target_row=inner[0].clone() if Need.TARGET_ROW in needs else None,
        gram=inner if Need.GRAM in needs else None,
        norms=inner.diagonal().clamp_min(0).sqrt() if Need.NORMS in needs else None,
        validation_row=gram[num, :num].clone(),
    )
