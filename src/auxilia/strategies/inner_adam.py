"""Adam for the few parameters a strategy learns itself (log-variances, loss weights).

Pure and explicit like the strategies: the moments live in the strategy's state dict, so
checkpoints and exact resume cover them.
"""

from __future__ import annotations

import torch

from auxilia.strategies.base import State

F64 = torch.float64
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's defaults (torch.optim.Adam)


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State,
    prefix: str,
    mask: torch.Tensor,
    lr: float,
) -> tuple[torch.Tensor, State]:
    """One Adam step (torch.optim.Adam's rule, bias-corrected) on the entries where ``mask``.

    Moments live in ``state[prefix + "m"|"v"|"t"]`` (t counts each entry's own steps, so an
    entry left out by the mask keeps its moments and its bias correction). Returns the new
    parameter and the new moments; nothing is modified in place.
    """
    grad = torch.where(mask, grad, torch.zeros_like(grad))
    t = state[prefix + "t"] + mask.to(torch.int64)
    m = torch.where(mask, BETA1 * state[prefix + "m"] + (1 - BETA1) * grad, state[prefix + "m"])
    v = torch.where(
        mask, BETA2 * state[prefix + "v"] + (1 - BETA2) * grad * grad, state[prefix + "v"]
    )
    steps = t.clamp_min(1).to(F64)
    m_hat = m / (1 - BETA1**steps)
    v_hat = v / (1 - BETA2**steps)
    new = torch.where(mask, param - lr * m_hat / (v_hat.sqrt() + EPS), param)
    return new, {prefix + "m": m, prefix + "v": v, prefix + "t": t}
