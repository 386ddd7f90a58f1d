"""``exact`` mode: one autograd pass per source, the reference every fast mode is tested against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.engine.source_losses import SourceLosses
from auxilia.statistics import Need, Statistics


@dataclass
class ExactMeasurement:
    """Per-source gradients of one step, kept until the coefficients are known."""

    statistics: Statistics
    params: list[torch.Tensor]
    grads: list[list[torch.Tensor | None]]  # grads[k][i]: source k's gradient on params[i]
    is_shared: list[bool]

    def combine(self, coefficients: torch.Tensor) -> None:
        """Accumulate Σ_k α_k g_k into ``.grad`` of shared parameters, Σ_k g_k elsewhere."""
        for i, param in enumerate(self.params):
            total: torch.Tensor | None = None
            for k, grads in enumerate(self.grads):
                g = grads[i]
                if g is None:
                    continue
                term = g * coefficients[k].to(g.dtype) if self.is_shared[i] else g
                total = term if total is None else total + term
            if total is None:
                continue
            if param.grad is None:
                param.grad = total.detach().clone()
            else:
                param.grad.add_(total)


def measure_exact(
    batch: SourceLosses,
    params: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor] | None,
    needs: frozenset[Need],
) -> ExactMeasurement:
    """Differentiate each present source's mean loss separately and form the statistics.

    Parameters are shared when listed in ``shared``; all are when ``shared`` is None.
    Statistics are over shared parameters only.
    """
    params = list(params)
    grads: list[list[torch.Tensor | None]] = []
    for mean in batch.means:
        if mean is None:
            grads.append([None] * len(params))
            continue
        g = torch.autograd.grad(mean, params, retain_graph=True, allow_unused=True)
        grads.append(list(g))
    ids = {id(p) for p in (params if shared is None else shared)}
    is_shared = [id(p) in ids for p in params]

    num = batch.num_sources
    flat = torch.zeros(num, 0, dtype=torch.float64)
    if any(is_shared):
        columns = []
        for i, param in enumerate(params):
            if not is_shared[i]:
                continue
            block = torch.zeros(num, param.numel(), dtype=torch.float64, device=param.device)
            for k in range(num):
                gk = grads[k][i]
                if gk is not None:
                    block[k] = gk.detach().reshape(-1).to(torch.float64)
            columns.append(block)
        flat = torch.cat(columns, dim=1)
    gram = (flat @ flat.T).cpu()  # only the small K×K matrix leaves the device
    norms = gram.diagonal().clamp_min(0).sqrt()
    stats = Statistics(
        present=batch.present,
        losses=batch.values() if Need.LOSSES in needs else None,
        target_row=gram[0].clone() if Need.TARGET_ROW in needs else None,
        gram=gram if Need.GRAM in needs else None,
        norms=norms if Need.NORMS in needs else None,
    )
    return ExactMeasurement(stats, params, grads, is_shared)
