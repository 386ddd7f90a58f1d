"""What the gradient engine measures in a step and hands to a strategy.

Index 0 is always the target; indices 1..K are the auxiliary sources. This module is the only
one of ours that strategies import.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch


class Need(enum.Enum):
    """A statistic a strategy may declare it needs; the engine computes only what is asked."""

    LOSSES = "losses"
    TARGET_ROW = "target_row"  # <g_k, g_0> for every source k
    GRAM = "gram"  # <g_k, g_l> for every pair
    NORMS = "norms"  # ||g_k|| for every source k
    VALIDATION = "validation_row"  # <g_val, g_k>: held-out target gradient against each source
    TARGET_EMA = "ema_row"  # <g_k, ĝ>: ĝ an exponential moving average of the target gradient
    TARGET_EMA_NORM = "ema_sqnorm"  # ||ĝ||² alone: no inner products against ĝ, no coefficient

    @staticmethod
    def closure(needs: Iterable[Need]) -> frozenset[Need]:
        """Add what is implied: the Gram matrix contains the target row and the norms; the
        EMA row comes with the EMA's norm; ĝ is kept from the modes that measure the row."""
        out = set(needs)
        if Need.TARGET_EMA in out:
            out.add(Need.TARGET_EMA_NORM)
        if out & {Need.VALIDATION, Need.TARGET_EMA_NORM}:
            out.add(Need.TARGET_ROW)
        if Need.GRAM in out:
            out |= {Need.TARGET_ROW, Need.NORMS}
        return frozenset(out)


@dataclass(frozen=True)
class Statistics:
    """Gradient statistics of one step, over the parameters shared between sources.

    Every tensor has ``num_sources`` entries along each source axis. Statistics that were not
    requested are ``None``. Sources absent from the step (``present[k]`` is False) have zero
    entries and must get coefficient 0.
    """

    present: torch.Tensor  # bool [K+1]
    losses: torch.Tensor | None = None  # [K+1] mean loss per source
    target_row: torch.Tensor | None = None  # [K+1], target_row[k] = <g_k, g_0>
    gram: torch.Tensor | None = None  # [K+1, K+1]
    norms: torch.Tensor | None = None  # [K+1]
    validation_row: torch.Tensor | None = None  # [K+1], <g_val, g_k>, g_val on held-out target
    ema_row: torch.Tensor | None = None  # [K+1], <g_k, ĝ> with ĝ updated by this step's g_0
    ema_sqnorm: torch.Tensor | None = None  # scalar ||ĝ||²
    step: int = 0
    lr: float = 1.0  # learning rate the optimizer applies at this step

    @property
    def num_sources(self) -> int:
        return int(self.present.shape[0])

    def require(self, need: Need) -> torch.Tensor:
        """Return the statistic for ``need``, or raise if the engine did not compute it."""
        value = getattr(self, need.value)
        if value is None:
            raise ValueError(
                f"statistic '{need.value}' was not computed; declare Need.{need.name} "
                "in the strategy's needs"
            )
        assert isinstance(value, torch.Tensor)
        return value

    def cosines(self) -> torch.Tensor:
        """cos(g_k, g_0) for every source k, in [-1, 1] (0 where a gradient is exactly zero).

        No epsilon in the denominator: the cosine does not depend on the gradients' scale.
        """
        row, norms = self.require(Need.TARGET_ROW), self.require(Need.NORMS)
        denominator = norms * norms[0]
        # Where the denominator is 0 the quotient (inf or nan) is discarded for 0.
        return torch.where(denominator > 0, row / denominator, 0.0).clamp(-1.0, 1.0)
