"""Trunk factories for the distributed tests: an MLP whose rank ``rank`` fails at a step."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn


class _Failing(nn.Module):
    """An MLP; on rank ``rank``, training forward pass ``after + 1`` fails as ``how`` says."""

    def __init__(self, inner: nn.Module, rank: int, after: int, how: str) -> None:
        super().__init__()
        self.inner = inner
        self.rank = rank
        self.after = after
        self.how = how
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        if not torch.is_grad_enabled() or int(os.environ.get("RANK", "0")) != self.rank:
            return out
        self.calls += 1
        if self.calls > self.after:
            if self.how == "exit":
                os._exit(3)  # the process dies at once, as if killed
            if self.how == "raise":
                raise ValueError(f"injected failure at training step {self.calls}")
            if self.how == "nan":
                return torch.full_like(out, float("nan"))
            if self.how == "hang":
                import time

                time.sleep(3600)
        return out


def failing_trunk(
    input_shape: Sequence[int],
    hidden: Sequence[int] = (16,),
    rank: int = 1,
    after: int = 6,
    how: str = "exit",
) -> nn.Module:
    """Trunk factory: on ``rank``, training step ``after + 1`` exits, raises, gives NaN features
    or hangs."""
    from auxilia.models import mlp

    return _Failing(mlp(input_shape, hidden=hidden), rank, after, how)
