"""Per-sample losses tagged with source ids, reduced to one mean loss per source."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from auxilia.errors import EngineError, NonFiniteSourceError


@dataclass(frozen=True)
class Weighted:
    """What a weighted backward pass differentiates: ``outputs`` with :meth:`grads` as their
    output gradients back-propagate Σ_k w_k · mean_k for any weights w [K+1].

    Per-sample losses with w_{k(i)} / n_{k(i)} (``ids`` and ``counts`` given) when the means
    were not formed: the same gradient, without the means' index_add and division in the graph
    or in the pass; the means themselves with w otherwise.
    """

    outputs: torch.Tensor
    ids: torch.Tensor | None = None  # the source of each output (per-sample losses)
    counts: torch.Tensor | None = None  # n_k, on the outputs' device (with ids)

    def grads(self, weights: torch.Tensor) -> torch.Tensor:
        """The output gradients for coefficients ``weights`` [K+1]."""
        out = self.outputs
        w = weights.to(device=out.device, dtype=out.dtype)
        if self.ids is None or self.counts is None:
            return w
        return (w / self.counts.clamp_min(1))[self.ids]


@dataclass(frozen=True)
class SourceLosses:
    """Per-sample losses with their sources, and each source's mean loss.

    ``mean_vector`` holds every source's mean in one graph-connected tensor (what the exact,
    batched and jvp modes differentiate); ``means`` splits it into scalars on demand. Both are
    formed on first use: ``ghost`` and ``sketch`` differentiate the per-sample losses
    themselves and never build them, so a step pays for what its mode reads, for any K.
    """

    counts: torch.Tensor  # int64 [K+1] on CPU
    losses: torch.Tensor  # per-sample losses: [N] (partitioned) or [B, K+1] (shared-input)
    ids: torch.Tensor  # int64 [N], the source of each sample (partitioned; empty otherwise)
    given_means: torch.Tensor | None = None  # [K+1] graph-connected means, when known already
    given_values: torch.Tensor | None = None  # float64 [K+1] on CPU, their detached values
    device_counts: torch.Tensor | None = None  # ``counts`` on the losses' device, if there

    @cached_property
    def mean_vector(self) -> torch.Tensor:
        """[K+1], graph-connected, 0 where the source is absent."""
        if self.given_means is not None:
            return self.given_means
        return self._means(self.losses)

    @cached_property
    def mean_values(self) -> torch.Tensor:
        """float64 [K+1] on CPU, detached means (0 where absent)."""
        if self.given_values is not None:
            return self.given_values
        if "mean_vector" in self.__dict__ or self.given_means is not None:
            return self.mean_vector.detach().to("cpu", torch.float64)
        return self._means(self.losses.detach()).to("cpu", torch.float64)  # no graph

    def _means(self, losses: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(self.num_sources, dtype=losses.dtype, device=losses.device)
        sums = sums.index_add(0, self.ids, losses)
        counts = self.counts if self.device_counts is None else self.device_counts
        return sums / counts.to(losses.device).clamp_min(1)

    def weighted(self) -> Weighted:
        """What backward passes for Σ_k w_k mean_k differentiate (see :class:`Weighted`)."""
        if self.given_means is not None or self.device_counts is None:
            return Weighted(self.mean_vector)
        return Weighted(self.losses, self.ids, self.device_counts)

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    @property
    def num_sources(self) -> int:
        return int(self.counts.shape[0])

    @cached_property
    def means(self) -> list[torch.Tensor | None]:
        """Each source's mean loss as a graph-connected scalar; None where it is absent."""
        out: list[torch.Tensor | None] = [None] * self.num_sources
        for k in self.present_indices():
            out[k] = self.mean_vector[k]
        return out

    def values(self) -> torch.Tensor:
        """Detached float64 mean loss per source (0 where absent)."""
        return self.mean_values.clone()

    def present_indices(self) -> list[int]:
        """The sources with at least one sample in the batch, in order."""
        return self.present.nonzero().squeeze(1).tolist()


def _checked_mean(mean: torch.Tensor, k: int, names: Sequence[str] | None) -> torch.Tensor:
    if not bool(torch.isfinite(mean.detach())):
        label = names[k] if names is not None and k < len(names) else str(k)
        raise NonFiniteSourceError(label, float(mean.detach()))
    return mean


def split_by_task(
    losses: torch.Tensor,
    num_sources: int,
    names: Sequence[str] | None = None,
    *,
    check_finite: bool = True,
) -> SourceLosses:
    """Validate shared-input ``losses``, [B, K+1] per sample or [K+1] means, one per task.

    ``check_finite=False`` leaves the check of the means to the caller (across processes it is
    made on the global means, so that every rank stops at the same step)."""
    if losses.dim() not in (1, 2) or losses.shape[-1] != num_sources:
        raise EngineError(
            f"shared-input losses must have shape [batch, {num_sources}] or [{num_sources}] "
            f"(one column per task, the target first), got {tuple(losses.shape)}"
        )
    if losses.dim() == 2 and losses.shape[0] == 0:
        raise EngineError("losses is empty: a step needs at least one sample")
    means = losses.mean(dim=0) if losses.dim() == 2 else losses
    values = means.detach().to(device="cpu", dtype=torch.float64)
    if check_finite and not bool(torch.isfinite(values).all()):
        k = int((~torch.isfinite(values)).nonzero()[0, 0])
        _checked_mean(means[k], k, names)
    counts = torch.full((num_sources,), losses.shape[0] if losses.dim() == 2 else 1)
    empty = torch.zeros(0, dtype=torch.int64, device=losses.device)
    return SourceLosses(counts, losses, empty, given_means=means, given_values=values)


def split_by_source(
    losses: torch.Tensor,
    source_ids: torch.Tensor,
    num_sources: int,
    names: Sequence[str] | None = None,
    *,
    check_finite: bool = True,
) -> SourceLosses:
    """Validate ``losses`` [N] and ``source_ids`` [N] and average the losses of each source
    (``check_finite``: as in :func:`split_by_task`)."""
    if losses.dim() != 1:
        raise EngineError(
            f"losses must be one loss per sample (1-D), got shape {tuple(losses.shape)}"
        )
    if source_ids.dim() != 1 or source_ids.shape[0] != losses.shape[0]:
        raise EngineError(
            f"source_ids must be 1-D with one id per loss ({losses.shape[0]}), "
            f"got shape {tuple(source_ids.shape)}"
        )
    if source_ids.dtype.is_floating_point or source_ids.dtype == torch.bool:
        raise EngineError(f"source_ids must be integers, got {source_ids.dtype}")
    if losses.numel() == 0:
        raise EngineError("losses is empty: a step needs at least one sample")
    ids = source_ids.to(device=losses.device, dtype=torch.int64)
    try:
        counts_here = torch.bincount(ids, minlength=num_sources)  # refuses negative ids
    except RuntimeError:
        raise EngineError(f"source id {int(ids.min())} outside [0, {num_sources})") from None
    if counts_here.shape[0] > num_sources:
        raise EngineError(f"source id {counts_here.shape[0] - 1} outside [0, {num_sources})")
    batch = SourceLosses(counts_here.cpu(), losses, ids, device_counts=counts_here)
    # One sum and one transfer, for any number of sources: the means are formed only where
    # a loss is not finite (to name its source) or where the mode reads them.
    if check_finite and not math.isfinite(float(losses.detach().sum())):
        values = batch.mean_values
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():  # (else the sum overflowed)
            k = int(bad[0, 0])
            _checked_mean(batch.mean_vector[k], k, names)
    return batch
