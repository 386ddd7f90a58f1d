"""The short warm-up run that gradient-based scoring compares samples on, and its checkpoints.

LESS (Xia et al., 2024) and TracIn (Pruthi et al., 2020) score a sample by its gradient at
several checkpoints of a short training run, weighted by the learning rate at each. Here the
warm-up trains the model with equal weights on the target's labels and a random subset of each
pool (``warmup_samples`` rows each; LESS warms up on 5 % of its pool), with Adam, and keeps
``checkpoints`` evenly spaced states (parameters, Adam moments and learning rate).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.data.batching import IndexStream
from auxilia.errors import NonFiniteLossError
from auxilia.selection.learner import Learner


@dataclass(frozen=True)
class Group:
    """Samples trained on in the warm-up: (x, y) through ``head``, ``name`` for messages."""

    name: str
    head: str
    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class Checkpoint:
    """The model at one warm-up step: its state, Adam's moments by parameter name, and lr."""

    step: int
    lr: float
    state: dict[str, torch.Tensor]
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """``count`` evenly spaced steps of ``steps``, the last one included (distinct, sorted)."""
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def warm_up(
    learner: Learner,
    groups: Sequence[Group],
    *,
    steps: int,
    checkpoints: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[Checkpoint]:
    """Train ``learner`` for ``steps`` Adam steps on the mean loss of every group (summed);
    return the states at ``checkpoint_steps(steps, checkpoints)``."""
    module = learner.module.to(device).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    streams = [IndexStream(len(g.y), seed + 101 * i) for i, g in enumerate(groups)]
    keep = set(checkpoint_steps(steps, checkpoints))
    names = {id(p): n for n, p in module.named_parameters()}
    out: list[Checkpoint] = []
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for group, stream in zip(groups, streams, strict=True):
            rows = stream.take(min(batch_size, len(group.y)))
            loss = learner.losses(group.x[rows].to(device), group.y[rows].to(device), group.head)
            mean = loss.mean()
            if not bool(torch.isfinite(mean.detach())):
                raise NonFiniteLossError(step, group.name, float(mean.detach()))
            total = total + mean
        torch.autograd.backward(total)
        optimizer.step()
        if step in keep:
            moments = {}
            for group_params in optimizer.param_groups:
                for p in group_params["params"]:
                    state = optimizer.state.get(p, {})
                    if "exp_avg" in state:
                        moments[names[id(p)]] = (
                            state["exp_avg"].detach().clone(),
                            state["exp_avg_sq"].detach().clone(),
                        )
            out.append(
                Checkpoint(
                    step,
                    float(optimizer.param_groups[0]["lr"]),
                    copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()}),
                    moments,
                )
            )
    module.eval()
    return out
