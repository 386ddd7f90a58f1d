"""``batched`` mode: every present source's gradient from one vectorised backward pass.

The per-source mean losses are stacked into one vector ``m`` [K+1] and differentiated with
``torch.autograd.grad(m, shared, grad_outputs=I, is_grads_batched=True)``: one backward pass,
vectorised over the rows of the identity by ``torch.vmap``, gives the Jacobian J [K'+1, P] of
the present sources on the shared parameters. From it: the Gram matrix J Jᵀ (K² P work), or,
when the strategy needs no Gram, only the target row J g_0 and the norms (K P work). The
combined gradient of the shared parameters is αᵀJ, with no further backward pass; parameters
that are not shared (heads) get Σ_k g_k from one ordinary backward pass, which only runs
through the part of the graph that leads to them.

Where vmap cannot run the backward pass (an operator without a batching rule that raises, a
custom ``autograd.Function`` without vmap support, data-dependent control flow, ...), the
mode falls back to one backward pass per present source, says so once with a warning, and
keeps doing so for the rest of the run: the numbers are the same, only slower. It never
returns numbers from a failed pass. Where vmap runs but slowly (on CPU, convolution and
pooling backward have no real batching rule and loop inside vmap), the first steps time both
paths and the runner keeps the faster one (:class:`BatchedRunner`).

The helpers here (:func:`split_shared`, :func:`write_gradient`) are
shared with the ``jvp`` mode, which also measures through this mode where its second-order
pass cannot run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from auxilia.engine.exact import accumulate, gradient_statistics
from auxilia.engine.mode import Layout, Mode, ModeContext
from auxilia.engine.source_losses import SourceLosses, Weighted
from auxilia.statistics import Need, Statistics

# What a vectorised backward pass raises when vmap cannot batch it (vmap errors are
# RuntimeErrors; a few operators raise NotImplementedError). Anything else propagates.
VMAP_ERRORS: tuple[type[Exception], ...] = (RuntimeError, NotImplementedError)


def split_shared(
    params: Sequence[torch.Tensor], shared: Sequence[torch.Tensor] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(shared, others) in the order of ``params``; every parameter is shared when None."""
    if shared is None:
        return list(params), []
    ids = {id(p) for p in shared}
    inside = [p for p in params if id(p) in ids]
    outside = [p for p in params if id(p) not in ids]
    return inside, outside


def write_combined(
    combination: Weighted,
    params: Sequence[torch.Tensor],
    weights: torch.Tensor,
) -> None:
    """Accumulate the gradient of Σ_k weights_k m_k into ``.grad`` of ``params`` (one pass).

    ``backward`` restricted to ``params`` accumulates as ``loss.backward()`` does (a fresh
    gradient becomes ``.grad`` without a copy); parameters it does not reach are left alone.
    """
    if not params:
        return
    torch.autograd.backward(
        combination.outputs,
        grad_tensors=combination.grads(weights),
        inputs=list(params),
        retain_graph=True,
    )


def write_unweighted(
    combination: Weighted, others: Sequence[torch.Tensor], present: torch.Tensor
) -> None:
    """Σ_k g_k (present k) into ``.grad`` of the parameters that are not shared (heads)."""
    if others:
        write_combined(combination, others, present.to(torch.float64))


def write_gradient(
    combination: Weighted,
    shared: Sequence[torch.Tensor],
    others: Sequence[torch.Tensor],
    coefficients: torch.Tensor,
    present: torch.Tensor,
) -> None:
    """Σ_k α_k g_k into the shared parameters and Σ_k g_k into the others, by backward passes.

    One pass when α is 1 on every present source (``equal``, and often ``olaux``): then both
    sums are the same gradient. Otherwise one pass for each group.
    """
    alpha = coefficients.to(torch.float64)
    if others and bool((alpha[present] == 1.0).all()):
        write_combined(combination, [*shared, *others], present.to(torch.float64))
        return
    write_combined(combination, shared, alpha)
    write_unweighted(combination, others, present)


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """Inner products of half-precision gradients are formed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batched_jacobian(
    means: torch.Tensor, rows: list[int], shared: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Rows ``rows`` of the Jacobian of ``means`` on each shared parameter, [len(rows), *shape]
    (None where no source reaches the parameter), from one vectorised backward pass."""
    eye = torch.zeros(len(rows), means.shape[0], dtype=means.dtype, device=means.device)
    eye[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.int64)] = 1.0
    grads = torch.autograd.grad(
        means,
        shared,
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )
    return list(grads)


def sequential_jacobian(
    means: torch.Tensor, rows: list[int], shared: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    """The same Jacobian rows as :func:`batched_jacobian`, one backward pass per row."""
    per_row = [
        torch.autograd.grad(means[k], shared, retain_graph=True, allow_unused=True) for k in rows
    ]
    blocks: list[torch.Tensor | None] = []
    for i, param in enumerate(shared):
        if all(g[i] is None for g in per_row):
            blocks.append(None)
            continue
        blocks.append(
            torch.stack([torch.zeros_like(param) if g[i] is None else g[i] for g in per_row])
        )
    return blocks


@dataclass
class JacobianMeasurement:
    """The Jacobian of the present sources on the shared parameters, until α is known."""

    statistics: Statistics
    combination: Weighted  # what the backward passes of the combine differentiate
    rows: list[int]  # the present sources, in order: row r of each block is source rows[r]
    shared: list[torch.Tensor]
    others: list[torch.Tensor]
    blocks: list[torch.Tensor | None] | None  # [len(rows), *param.shape] per shared parameter

    def combine(self, coefficients: torch.Tensor) -> None:
        """αᵀJ on shared parameters (no backward pass), Σ_k g_k on the others (one pass)."""
        present = self.statistics.present
        if self.blocks is None:
            write_gradient(self.combination, self.shared, self.others, coefficients, present)
            return
        index = torch.tensor(self.rows, dtype=torch.int64)
        alpha = coefficients.to(torch.float64)[index]
        for param, block in zip(self.shared, self.blocks, strict=True):
            if block is None:
                continue
            weights = alpha.to(device=block.device, dtype=block.dtype)
            total = (weights @ block.reshape(len(self.rows), -1)).reshape(block.shape[1:])
            accumulate(param, total)
        write_unweighted(self.combination, self.others, present)
        self.blocks = None  # the Jacobian is not needed any more

    def _require_blocks(self) -> list[torch.Tensor | None]:
        if self.blocks is None:
            raise RuntimeError("the per-source gradients were released by combine()")
        return self.blocks

    def source_gradient(self, k: int) -> list[torch.Tensor]:
        """Source k's gradient on each shared parameter (zeros where it does not reach)."""
        blocks = self._require_blocks()
        row = self.rows.index(k) if k in self.rows else None
        out = []
        for param, block in zip(self.shared, blocks, strict=True):
            if block is None or row is None:
                out.append(torch.zeros_like(param))
            else:
                out.append(block[row].detach())
        return out

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """<g_k, v> for every source k; ``vectors`` follow the shared parameters' order."""
        blocks = self._require_blocks()
        values = _row_products(blocks, list(vectors), len(self.rows))
        out = torch.zeros(self.statistics.num_sources, dtype=torch.float64)
        out[torch.tensor(self.rows, dtype=torch.int64)] = values
        return out


def _row_products(
    blocks: list[torch.Tensor | None], vectors: list[torch.Tensor], num_rows: int
) -> torch.Tensor:
    """Σ_params block_i @ v_i: float64 [num_rows] on the CPU (one transfer)."""
    total: torch.Tensor | None = None
    for block, vector in zip(blocks, vectors, strict=True):
        if block is None:
            continue
        dtype = product_dtype(block.dtype)
        term = (block.reshape(num_rows, -1).to(dtype) @ vector.reshape(-1).to(dtype)).to(
            torch.float64
        )
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(num_rows, dtype=torch.float64)
    return total.cpu()


def jacobian_statistics(
    batch: SourceLosses,
    rows: list[int],
    blocks: list[torch.Tensor | None],
    needs: frozenset[Need],
) -> Statistics:
    """Statistics from the Jacobian rows: the Gram matrix when needed, else row and norms."""
    present = batch.present
    losses = batch.values() if Need.LOSSES in needs else None
    num_rows = len(rows)
    if Need.GRAM in needs:
        gram: torch.Tensor | None = None
        for block in blocks:
            if block is None:
                continue
            flat = block.reshape(num_rows, -1).to(product_dtype(block.dtype))
            term = (flat @ flat.T).to(torch.float64)
            gram = term if gram is None else gram + term
        if gram is None:
            gram = torch.zeros(num_rows, num_rows, dtype=torch.float64)
        return gradient_statistics(present, gram.cpu(), losses, needs)
    num = batch.num_sources
    index = torch.tensor(rows, dtype=torch.int64)
    target_row: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    if Need.TARGET_ROW in needs:
        target_row = torch.zeros(num, dtype=torch.float64)
        if rows and rows[0] == 0:  # the target is present: its gradient is row 0
            target = [None if b is None else b[0] for b in blocks]
            vectors = [torch.zeros(()) if t is None else t for t in target]
            target_row[index] = _row_products(blocks, vectors, num_rows)
    if Need.NORMS in needs:
        squares: torch.Tensor | None = None
        for block in blocks:
            if block is None:
                continue
            flat = block.reshape(num_rows, -1).to(product_dtype(block.dtype))
            term = torch.linalg.vector_norm(flat, dim=1).to(torch.float64) ** 2
            squares = term if squares is None else squares + term
        norms = torch.zeros(num, dtype=torch.float64)
        if squares is not None:
            norms[index] = squares.cpu().clamp_min(0).sqrt()
    return Statistics(present=present, losses=losses, target_row=target_row, norms=norms)


# What needs a Jacobian (rather than the losses alone).
GRADIENT_NEEDS = frozenset(
    {Need.TARGET_ROW, Need.GRAM, Need.NORMS, Need.TARGET_EMA, Need.TARGET_EMA_NORM}
)


Path = Literal["vmap", "loop"]


def _clock(means: torch.Tensor) -> float:
    """Wall time, after the device's queued work (for timing the two paths)."""
    if means.is_cuda:
        torch.cuda.synchronize(means.device)
    return time.perf_counter()


class BatchedRunner:
    """The ``batched`` mode, started: chooses vmap or a loop of backward passes for the model.

    vmap batches the backward pass only as well as the operators' batching rules allow: on
    CPU, convolution and pooling backward fall back to a loop inside vmap and come out slower
    than plain backward passes one source at a time. So the first steps time both paths (the
    first vmap call is a warm-up, then ``TRIALS`` timed calls of each, per source) and the
    runner keeps the faster; both give the same numbers. Where vmap raises, the loop is used
    from then on, with a warning.
    """

    TRIALS = 2

    def __init__(self, context: ModeContext) -> None:
        self.layout: Layout = context.layout
        self.shared, self.others = split_shared(context.params, context.shared)
        self.vmap_failure: str | None = None
        self.path: Path | None = None  # None while the first steps still time both
        self.timings: dict[Path, list[float]] = {"vmap": [], "loop": []}

    def measure(self, batch: SourceLosses, needs: frozenset[Need]) -> JacobianMeasurement:
        rows = batch.present.nonzero().squeeze(1).tolist()
        combination = batch.weighted()
        if not needs & GRADIENT_NEEDS or not self.shared:
            losses = batch.values() if Need.LOSSES in needs else None
            stats = Statistics(present=batch.present, losses=losses)
            if needs & GRADIENT_NEEDS:  # nothing is shared: every inner product is 0
                stats = gradient_statistics(
                    batch.present, torch.zeros(len(rows), len(rows)), losses, needs
                )
            return JacobianMeasurement(stats, combination, rows, self.shared, self.others, None)
        blocks = self.jacobian(batch.mean_vector, rows)
        stats = jacobian_statistics(batch, rows, blocks, needs)
        return JacobianMeasurement(stats, combination, rows, self.shared, self.others, blocks)

    def jacobian(self, means: torch.Tensor, rows: list[int]) -> list[torch.Tensor | None]:
        """The Jacobian rows, by the path chosen for this model (timing both at first)."""
        if self.path == "loop" or self.vmap_failure is not None:
            return sequential_jacobian(means, rows, self.shared)
        if self.path == "vmap":
            return self._vmapped(means, rows)
        trial: Path = "vmap" if len(self.timings["vmap"]) <= self.TRIALS else "loop"
        start = _clock(means)
        if trial == "vmap":
            blocks = self._vmapped(means, rows)
            if self.vmap_failure is not None:
                return blocks
        else:
            blocks = sequential_jacobian(means, rows, self.shared)
        self.timings[trial].append((_clock(means) - start) / max(len(rows), 1))
        if len(self.timings["loop"]) == self.TRIALS:
            vmap_time = min(self.timings["vmap"][1:])  # the first call was a warm-up
            self.path = "vmap" if vmap_time <= min(self.timings["loop"]) else "loop"
        return blocks

    def _vmapped(self, means: torch.Tensor, rows: list[int]) -> list[torch.Tensor | None]:
        try:
            return batched_jacobian(means, rows, self.shared)
        except VMAP_ERRORS as error:
            self.vmap_failure = f"{type(error).__name__}: {error}".splitlines()[0]
            self.path = "loop"
            warnings.warn(
                "engine mode 'batched': torch.vmap cannot run this model's backward pass "
                f"({self.vmap_failure}); using one backward pass per source from now on "
                "(same numbers, slower)",
                RuntimeWarning,
                stacklevel=5,
            )
        return sequential_jacobian(means, rows, self.shared)

    def close(self) -> None:
        """Nothing to detach."""


BATCHED = Mode(
    name="batched",
    summary="all per-source gradients in one vmapped backward pass; full Gram matrix",
    layouts=frozenset({"partitioned", "shared-input"}),
    provides=frozenset(Need),
    start=BatchedRunner,
)
