"""``exact`` mode: one autograd pass per source, the reference every fast mode is tested against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.engine.mode import Mode, ModeContext
from auxilia.engine.source_losses import SourceLosses
from auxilia.statistics import Need, Statistics


@dataclass
class ExactMeasurement:
    """Per-source gradients of one step on the shared parameters, kept until α is known."""

    statistics: Statistics
    shared: list[torch.Tensor]  # shared parameters the step reaches
    grads: dict[int, list[torch.Tensor | None]]  # present source k -> its gradient per shared
    heads: list[torch.Tensor]  # non-shared parameters the step reaches
    total: torch.Tensor | None  # Σ_k mean_k, still attached to its graph when heads exist

    def combine(self, coefficients: torch.Tensor) -> None:
        """Accumulate Σ_k α_k g_k into ``.grad`` of shared parameters, Σ_k g_k elsewhere."""
        for i, param in enumerate(self.shared):
            total: torch.Tensor | None = None
            for k, grads in self.grads.items():
                g = grads[i]
                if g is None:
                    continue
                term = g * coefficients[k].to(g.dtype)
                total = term if total is None else total + term
            if total is not None:
                accumulate(param, total)
        if self.heads and self.total is not None:  # one pass for every head, unweighted
            torch.autograd.backward(self.total, inputs=self.heads)

    def source_gradient(self, k: int) -> list[torch.Tensor]:
        """Source k's gradient on each shared parameter (zeros where it does not reach)."""
        grads = self.grads.get(k, [None] * len(self.shared))
        return [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(self.shared, grads, strict=True)
        ]

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """<g_k, v> for every source k; ``vectors`` follow the shared parameters' order."""
        num = self.statistics.num_sources
        out = torch.zeros(num, dtype=torch.float64)
        for k, grads in self.grads.items():
            total = 0.0
            for g, v in zip(grads, vectors, strict=True):
                if g is not None:
                    total += float((g.detach().to(torch.float64) * v.to(torch.float64)).sum())
            out[k] = total
        return out


def accumulate(param: torch.Tensor, value: torch.Tensor) -> None:
    """Add ``value`` to ``param.grad`` the way ``backward`` does (creating it if absent)."""
    if param.grad is None:
        param.grad = value.detach().clone()
    else:
        param.grad.add_(value)


def reached_leaves(roots: Sequence[torch.Tensor]) -> set[int]:
    """The ids of the leaf tensors the autograd graph of ``roots`` reaches.

    A model with one head per source has thousands of parameters of which a step reaches a
    few; differentiating only those keeps a step's cost independent of the number of sources.
    """
    seen: set[int] = set()
    leaves: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return leaves


def gradient_statistics(
    present: torch.Tensor,
    gram_of_present: torch.Tensor,
    losses: torch.Tensor | None,
    needs: frozenset[Need],
) -> Statistics:
    """Statistics from the Gram matrix of the present sources (absent entries: 0).

    The dense (K+1)×(K+1) matrix is formed only when a strategy needs it, so that a step that
    draws 4 of 1,000 sources handles vectors of 1,001 entries, not a million-entry matrix.
    """
    num = int(present.shape[0])
    small = gram_of_present.to(torch.float64).cpu()
    gram: torch.Tensor | None = None
    if small.shape[0] == num:  # every source present: no scattering
        if Need.GRAM in needs:
            gram = small.clone()
        norms = small.diagonal().clamp_min(0).sqrt()
        row = small[0].clone()
    else:
        idx = present.nonzero().squeeze(1)
        if Need.GRAM in needs:
            gram = torch.zeros(num, num, dtype=torch.float64)
            gram[idx.unsqueeze(1), idx.unsqueeze(0)] = small
        row = torch.zeros(num, dtype=torch.float64)
        norms = torch.zeros(num, dtype=torch.float64)
        if len(idx):
            norms[idx] = small.diagonal().clamp_min(0).sqrt()
            if bool(present[0]):
                row[idx] = small[0]  # the target is the first present source
    return Statistics(
        present=present,
        losses=losses if Need.LOSSES in needs else None,
        target_row=row if Need.TARGET_ROW in needs else None,
        gram=gram,
        norms=norms if Need.NORMS in needs else None,
    )


def measure_exact(
    batch: SourceLosses,
    params: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor] | None,
    needs: frozenset[Need],
) -> ExactMeasurement:
    """Differentiate each present source's mean loss separately and form the statistics.

    Parameters are shared when listed in ``shared``; all are when ``shared`` is None.
    Statistics are over shared parameters only. Only present sources cost anything: a step
    that draws 4 of 1,000 sources does 5 backward passes and forms a 5×5 Gram matrix. The
    other parameters (heads) get their unweighted gradient from one more pass, in ``combine``.
    """
    present = batch.present_indices()
    roots = [m for m in batch.means if m is not None]
    params = list(params)
    if len(params) > 64:  # many leaves (a head per source): keep those this step reaches
        reached = reached_leaves(roots)
        params = [p for p in params if id(p) in reached]
    shared_ids = {id(p) for p in (params if shared is None else shared)}
    shared_params = [p for p in params if id(p) in shared_ids]
    heads = [p for p in params if id(p) not in shared_ids]
    total = torch.stack(roots).sum() if heads else None

    grads: dict[int, list[torch.Tensor | None]] = {}
    for k in present:
        mean = batch.means[k]
        assert mean is not None
        if shared_params:
            g = torch.autograd.grad(mean, shared_params, retain_graph=True, allow_unused=True)
            grads[k] = list(g)
        else:
            grads[k] = []
    gram = torch.zeros(len(present), len(present), dtype=torch.float64)
    for i, param in enumerate(shared_params):
        block = torch.zeros(len(present), param.numel(), dtype=torch.float64, device=param.device)
        for row, k in enumerate(present):
            gk = grads[k][i]
            if gk is not None:
                block[row] = gk.detach().reshape(-1).to(torch.float64)
        gram += (block @ block.T).cpu()  # only the small K×K matrix leaves the device
    losses = batch.values() if Need.LOSSES in needs else None
    stats = gradient_statistics(batch.present, gram, losses, needs)
    return ExactMeasurement(stats, shared_params, grads, heads, total)


class ExactRunner:
    """The ``exact`` mode, started: holds which parameters are shared."""

    def __init__(self, context: ModeContext) -> None:
        self.params = context.params
        self.shared = context.shared

    def measure(self, batch: SourceLosses, needs: frozenset[Need]) -> ExactMeasurement:
        return measure_exact(batch, self.params, self.shared, needs)

    def close(self) -> None:
        """Nothing to detach."""


EXACT = Mode(
    name="exact",
    summary="one backward pass per present source; the reference, always available",
    layouts=frozenset({"partitioned", "shared-input"}),
    provides=frozenset(Need),
    start=ExactRunner,
)
