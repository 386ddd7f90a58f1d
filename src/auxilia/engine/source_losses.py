"""Per-sample losses tagged with source ids, reduced to one mean loss per source."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.errors import EngineError


@dataclass(frozen=True)
class SourceLosses:
    """Mean loss per source (a graph-connected scalar each) plus which sources are present."""

    means: list[torch.Tensor | None]  # None where the source has no sample in the batch
    counts: torch.Tensor  # int64 [K+1]
    losses: torch.Tensor  # the per-sample losses [N], for modes that work per sample
    ids: torch.Tensor  # int64 [N], the source of each sample

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    @property
    def num_sources(self) -> int:
        return len(self.means)

    def values(self) -> torch.Tensor:
        """Detached float64 mean loss per source (0 where absent)."""
        return torch.tensor(
            [0.0 if m is None else float(m.detach()) for m in self.means], dtype=torch.float64
        )


def split_by_source(
    losses: torch.Tensor,
    source_ids: torch.Tensor,
    num_sources: int,
    names: Sequence[str] | None = None,
) -> SourceLosses:
    """Validate ``losses`` [N] and ``source_ids`` [N] and average the losses of each source."""
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
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_sources:
        raise EngineError(f"source id {low if low < 0 else high} outside [0, {num_sources})")
    counts = torch.bincount(ids, minlength=num_sources).cpu()
    sums = torch.zeros(num_sources, dtype=losses.dtype, device=losses.device).index_add(
        0, ids, losses
    )
    means: list[torch.Tensor | None] = []
    for k in range(num_sources):
        n = int(counts[k])
        if n == 0:
            means.append(None)
            continue
        mean = sums[k] / n
        if not bool(torch.isfinite(mean.detach())):
            label = names[k] if names is not None else str(k)
            raise EngineError(f"non-finite loss {float(mean.detach())} for source '{label}'")
        means.append(mean)
    return SourceLosses(means, counts, losses, ids)
