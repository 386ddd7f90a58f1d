"""A purpose problem shared by strategy tests: one helpful and one harmful auxiliary source."""

from __future__ import annotations

import torch

from auxilia.engine import Engine
from auxilia.statistics import Need
from auxilia.strategies import Strategy

F64 = torch.float64


def train_helpful_vs_harmful(strategy: Strategy, steps: int = 20, seed: int = 0) -> torch.Tensor:
    """Linear regression on y = <x, w*>; a helpful source with the same labels (gradient
    aligned with the target's) and a harmful one with labels -y (gradient opposed). Returns the
    coefficients of the last step. Strategies that need held-out target losses get a fresh
    batch of target samples as ``validation``."""
    gen = torch.Generator().manual_seed(seed)
    dim, per_source, lr = 4, 16, 0.05
    w_star = torch.randn(dim, generator=gen, dtype=F64)
    model = torch.nn.Linear(dim, 1, bias=False).to(F64)
    torch.nn.init.zeros_(model.weight)
    engine = Engine(
        model.parameters(),
        strategy=strategy,
        num_sources=3,
        names=["target", "helpful", "harmful"],
    )
    ids = torch.arange(3).repeat_interleave(per_source)
    sign = torch.tensor([1.0, 1.0, -1.0], dtype=F64)[ids]
    alpha = torch.empty(0)
    for _ in range(steps):
        x = torch.randn(3 * per_source, dim, generator=gen, dtype=F64)
        y = sign * (x @ w_star)
        losses = (model(x).squeeze(1) - y) ** 2
        validation = None
        if Need.VALIDATION in engine.needs:
            xv = torch.randn(per_source, dim, generator=gen, dtype=F64)
            validation = (model(xv).squeeze(1) - xv @ w_star) ** 2
        model.zero_grad()
        alpha = engine.backward(losses, ids, lr=lr, validation=validation)
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return alpha
