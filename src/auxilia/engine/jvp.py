"""``jvp`` mode: the target row <g_k, g_0> for every source k at a cost that does not grow with K.

The target row is J g_0, with J [K+1, P] the Jacobian of the source means m on the shared
parameters: one forward-mode product along g_0. The engine gets losses whose graph already
exists (no forward closure to re-run with ``torch.func.jvp``), so the product is taken on that
graph with the double-backward trick:

1. one backward pass with ``create_graph=True`` of uᵀm, u = e_0 a leaf that requires grad,
   gives w(u) = Jᵀu on the shared parameters; its value is g_0;
2. one backward pass of <w(u), g_0> to u gives ∂/∂u <Jᵀu, g_0> = J g_0, the whole row;
3. once α is known, one backward pass of αᵀm writes Σ_k α_k g_k into the shared parameters,
   and one pass of 1ᵀm, which only runs through the part of the graph that reaches them,
   Σ_k g_k into the others (heads).

Three backward-sized passes whatever K is. Strategies that need no gradient statistics
(``equal``, ``fixed``) pay only step 3. A step with at most two present sources takes their
two gradients from the ``batched`` mode instead, which costs less than three passes. A
second-order pass can fail where an operator has no
double backward (CPU flash attention, ``@once_differentiable`` functions) or be silently
incomplete (a custom backward that leaves the graph); the mode checks the row's first entry
against ‖g_0‖², which it knows independently, and on a failure or a mismatch warns once and
measures through the ``batched`` mode (one vmapped backward, then J g_0) for the rest of the
run. Numbers from a failed pass are never returned.

Provides losses, the target row and products with other vectors (the target-gradient EMA);
not the norms or the Gram matrix, which need every g_k.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.engine.batched import (
    BatchedRunner,
    JacobianMeasurement,
    Path,
    product_dtype,
    split_shared,
    write_gradient,
)
from auxilia.engine.mode import Layout, Measurement, Mode, ModeContext
from auxilia.engine.source_losses import SourceLosses, Weighted
from auxilia.errors import EngineError
from auxilia.statistics import Need, Statistics

PROVIDES = frozenset({Need.LOSSES, Need.TARGET_ROW, Need.TARGET_EMA, Need.TARGET_EMA_NORM})
SECOND_ORDER_ERRORS: tuple[type[Exception], ...] = (RuntimeError, NotImplementedError)
# |row[0] − ‖g_0‖²| above this fraction of ‖g_0‖² means the second-order pass missed a path.
# Loose enough for bfloat16 autocast (rounding of the recorded backward), tight enough to
# catch a missing branch of the graph.
CHECK_RTOL = 2e-2


class SecondOrderError(Exception):
    """The double-backward pass could not be trusted on this model."""


# What makes the mode fall back: an untrusted second-order pass, or one that raised.
FALLBACK_ERRORS: tuple[type[Exception], ...] = (SecondOrderError, *SECOND_ORDER_ERRORS)


@dataclass
class Probe:
    """The graph of w(u) = Jᵀu on the shared parameters, kept to take products J v."""

    u: torch.Tensor  # [K+1] leaf, value e_0
    outputs: list[torch.Tensor]  # w_i for the shared parameters i in ``index``
    index: list[int]  # positions of those parameters among the shared ones

    def products(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """J v: <g_k, v> for every source k, in the means' dtype and device."""
        if not self.outputs:
            return torch.zeros_like(self.u).detach()
        (result,) = torch.autograd.grad(
            self.outputs,
            self.u,
            grad_outputs=[vectors[i].to(self.outputs[j].dtype) for j, i in enumerate(self.index)],
            retain_graph=True,
            allow_unused=True,
        )
        return torch.zeros_like(self.u).detach() if result is None else result


@dataclass
class JvpMeasurement:
    """The target's gradient and row of one step; writes the gradient once α is known."""

    statistics: Statistics
    combination: Weighted  # what the combine's backward passes differentiate
    shared: list[torch.Tensor]
    others: list[torch.Tensor]
    target: list[torch.Tensor] | None  # g_0 on each shared parameter (zeros where unreached)
    probe: Probe | None
    released: bool = False

    def combine(self, coefficients: torch.Tensor) -> None:
        """Σ_k α_k g_k on shared parameters, Σ_k g_k on the others: one backward pass each."""
        self.probe = None  # release the second-order graph before the next pass
        self.released = True
        write_gradient(
            self.combination, self.shared, self.others, coefficients, self.statistics.present
        )

    def source_gradient(self, k: int) -> list[torch.Tensor]:
        """The target's gradient on each shared parameter; jvp measures no other g_k."""
        if k != 0 or self.target is None:
            raise EngineError(
                f"engine mode 'jvp' measures only the target's gradient, not source {k}'s"
            )
        return self.target

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """<g_k, v> for every source k: one more second-order pass along v."""
        if self.released:
            raise EngineError("engine mode 'jvp': dots() must come before combine()")
        if self.probe is None:
            if self.target is not None:  # measured, and g_0 = 0 (or nothing shared)
                return torch.zeros(self.statistics.num_sources, dtype=torch.float64)
            raise EngineError(
                "engine mode 'jvp': products with other vectors need the target row "
                "(declare Need.TARGET_ROW)"
            )
        if len(vectors) != len(self.shared):
            raise EngineError(
                f"dots: got {len(vectors)} vectors for {len(self.shared)} shared parameters"
            )
        return self.probe.products(vectors).detach().to(torch.float64).cpu()


def first_order(
    means: torch.Tensor, shared: list[torch.Tensor]
) -> tuple[list[torch.Tensor], Probe]:
    """Pass 1: w(u) = Jᵀu with ``create_graph``, u = e_0; (g_0 per shared parameter, probe)."""
    u = torch.zeros_like(means).detach()
    u[0] = 1.0
    u.requires_grad_(True)
    w = torch.autograd.grad(means, shared, grad_outputs=u, create_graph=True, allow_unused=True)
    target: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    index: list[int] = []
    for i, (param, wi) in enumerate(zip(shared, w, strict=True)):
        if wi is None:
            target.append(torch.zeros_like(param))
            continue
        target.append(wi.detach())
        if not wi.requires_grad:  # a gradient that does not depend on u: the graph was cut
            raise SecondOrderError("a backward function left the graph (no double backward)")
        outputs.append(wi)
        index.append(i)
    return target, Probe(u, outputs, index)


def checked_row(target: list[torch.Tensor], probe: Probe) -> torch.Tensor:
    """Pass 2: J g_0 (float64, CPU), its first entry checked against ‖g_0‖² and set to it."""
    row = probe.products(target).detach().to(torch.float64).cpu()
    # ‖g_0‖² in the gradients' dtype (float64 sums of float32 products cost a full copy).
    squares = [
        torch.linalg.vector_norm(t, dtype=product_dtype(t.dtype)).to(torch.float64) ** 2
        for t in target
    ]
    norm_sq = float(torch.stack(squares).sum()) if squares else 0.0
    if abs(float(row[0]) - norm_sq) > CHECK_RTOL * norm_sq:
        raise SecondOrderError(
            f"the second-order pass gives <g_0, g_0> = {float(row[0]):.6g}, "
            f"the gradient itself {norm_sq:.6g}"
        )
    row[0] = norm_sq
    return row


def second_order_row(
    means: torch.Tensor, shared: list[torch.Tensor]
) -> tuple[list[torch.Tensor], Probe, torch.Tensor]:
    """(g_0 per shared parameter, the probe, J g_0 as float64 on the CPU) for a present target."""
    target, probe = first_order(means, shared)
    return target, probe, checked_row(target, probe)


class JvpRunner:
    """The ``jvp`` mode, started: measures through ``batched`` where that is cheaper or needed.

    With at most ``ROWS_AT_MOST`` present sources their gradients cost no more than the three
    passes of the second-order route, so the step takes them from ``batched`` (no warning);
    where double backward fails, every step does (one warning).
    """

    ROWS_AT_MOST = 2

    def __init__(self, context: ModeContext) -> None:
        self.layout: Layout = context.layout
        self.shared, self.others = split_shared(context.params, context.shared)
        self.batched: BatchedRunner | None = None  # started on first use
        self.failure: str | None = None  # why the second-order pass cannot be used
        self.batched_path: Path | None = None  # batched's path, where a checkpoint gave one
        self._context = context

    def measure(self, batch: SourceLosses, needs: frozenset[Need]) -> Measurement:
        missing = needs - PROVIDES
        if missing:
            names = ", ".join(sorted(n.value for n in missing))
            raise EngineError(f"engine mode 'jvp' cannot compute {names}")
        present = batch.present
        if self.failure is not None or (
            Need.TARGET_ROW in needs and int(present.sum()) <= self.ROWS_AT_MOST
        ):
            return self._batched_measure(batch, needs)
        combination = batch.weighted()
        losses = batch.values() if Need.LOSSES in needs else None
        if Need.TARGET_ROW not in needs:  # the losses alone: no pass before combine
            stats = Statistics(present=present, losses=losses)
            return JvpMeasurement(stats, combination, self.shared, self.others, None, None)
        if not self.shared or not bool(present[0]):
            # Nothing shared, or no target sample: g_0 = 0 and so is the row.
            row = torch.zeros(batch.num_sources, dtype=torch.float64)
            stats = Statistics(present=present, losses=losses, target_row=row)
            target = [torch.zeros_like(p) for p in self.shared]
            return JvpMeasurement(stats, combination, self.shared, self.others, target, None)
        try:
            target, probe, row = second_order_row(batch.mean_vector, self.shared)
        except FALLBACK_ERRORS as error:
            self.failure = f"{type(error).__name__}: {error}".splitlines()[0]
            hint = (
                "; a fused attention kernel has no second derivative: run the forward under "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) to keep jvp"
                if "scaled_dot_product" in self.failure
                else ""
            )
            warnings.warn(
                "engine mode 'jvp': the second-order pass failed on this model "
                f"({self.failure}); measuring through the 'batched' mode from now on "
                f"(same numbers, at a cost that grows with the number of sources){hint}",
                RuntimeWarning,
                stacklevel=3,
            )
            return self._batched_measure(batch, needs)
        stats = Statistics(present=present, losses=losses, target_row=row * present)
        return JvpMeasurement(stats, combination, self.shared, self.others, target, probe)

    def _batched_measure(self, batch: SourceLosses, needs: frozenset[Need]) -> JacobianMeasurement:
        if self.batched is None:
            self.batched = BatchedRunner(self._context)
            self.batched.path = self.batched_path
        return self.batched.measure(batch, needs)

    def close(self) -> None:
        """Nothing to detach."""


JVP = Mode(
    name="jvp",
    summary="target row <g_k, g_0> for all k from one second-order pass along g_0; flat in K",
    layouts=frozenset({"partitioned", "shared-input"}),
    provides=PROVIDES,
    start=JvpRunner,
)
