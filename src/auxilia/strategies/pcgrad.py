"""``pcgrad``: projecting conflicting gradients (PCGrad) of Yu et al. (NeurIPS 2020).

"Gradient Surgery for Multi-Task Learning" (Yu, Kumar, Gupta, Levine, Hausman, Finn). Each
task's gradient is projected off every other task's gradient it conflicts with. A symmetric
multi-task baseline: the target is one more task, and is projected like the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy

F64 = torch.float64


def project_gram(gram: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """PCGrad on a Gram matrix: row i of the result is c_i, with g_i' = Σ_l c_il g_l.

    ``orders[i]`` lists the tasks g_i is projected against, in order (the indices of ``gram``;
    an empty list leaves c_i = e_i). Each step is g_i' ← g_i' − min(0, <g_i', g_j>) / ‖g_j‖² g_j
    against the original g_j, which on coefficients reads c_i ← c_i − min(0, c_i·G_j) / G_jj e_j
    since <g_i', g_j> = Σ_l c_il G_lj. A g_j with G_jj ≤ 0 (a zero gradient) is skipped.
    """
    gram = gram.to(F64)
    n = int(gram.shape[0])
    rows = torch.eye(n, dtype=F64)
    for i, order in enumerate(orders):
        c = rows[i]
        for j in order:
            dot = float(c @ gram[:, j])
            norm2 = float(gram[j, j])
            if dot < 0 and norm2 > 0:
                c[j] -= dot / norm2
    return rows


def pcgrad(seed: int = 0) -> Strategy:
    """α = Σ_i c_i, the coefficients of d = Σ_i g_i' with g_i' PCGrad's projected gradients.

    For each present task i, for each other present task j in a random order: if
    <g_i', g_j> < 0, then g_i' ← g_i' − <g_i', g_j> / ‖g_j‖² · g_j (the paper's Algorithm 1;
    projections are against the original g_j). Everything runs on the (K+1)×(K+1) Gram matrix
    (:func:`project_gram`), never on P-dimensional vectors, as in TorchJD's Gramian form.

    Each task gets its own random order, drawn by ``torch.randperm`` from a generator seeded
    with ``seed`` whose state is part of the strategy state (so resume and every distributed
    rank see the same orders). Pytorch-PCGrad also re-shuffles per task, but its inner loop
    runs over all tasks, g_i itself included; we follow the paper's j ≠ i. d is the sum of
    the projected gradients, as in the paper (Pytorch-PCGrad defaults to their mean, a
    1/(K+1) rescaling).
    Absent sources take no part and get α_k = 0; one present source gets α = 1.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise StrategyError(f"pcgrad: seed must be an integer in [0, 2**63), got {seed!r}")

    def init(num_sources: int) -> State:
        del num_sources
        generator = torch.Generator().manual_seed(seed)
        return {"rng": generator.get_state()}

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        gram = stats.require(Need.GRAM).to(F64)
        idx = stats.present.nonzero().squeeze(1)
        m = int(idx.numel())
        alpha = torch.zeros(stats.num_sources, dtype=F64)
        if m == 0:
            return alpha, state
        generator = torch.Generator()
        generator.set_state(state["rng"].clone())
        orders: list[list[int]] = []
        for i in range(m):
            others = [j for j in range(m) if j != i]
            perm = torch.randperm(m - 1, generator=generator).tolist() if m > 1 else []
            orders.append([others[p] for p in perm])
        rows = project_gram(gram[idx][:, idx], orders)
        alpha[idx] = rows.sum(dim=0)
        return alpha, {"rng": generator.get_state()}

    return Strategy("pcgrad", frozenset({Need.GRAM}), init, update, {"seed": seed})
