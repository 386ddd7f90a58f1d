"""``dwa``: Dynamic Weight Average of Liu, Johns & Davison (CVPR 2019, the MTAN paper).

"End-to-End Multi-Task Learning with Attention". A task whose loss fell less over the last
period gets more weight. A symmetric multi-task baseline: the target is one more task, with no
say over the auxiliaries.
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy

F64 = torch.float64
RATIO_BOUND = 1e6  # loss ratios are clipped to [-1e6, 1e6]
LOGIT_BOUND = 1e300  # r / T is clipped so that a tiny temperature cannot overflow to inf


def dwa(temperature: float = 2.0, period: int = 50) -> Strategy:
    """α_k = n · softmax_k(r_k / T), r_k = L̄_k(p−1) / L̄_k(p−2), over the n present sources.

    L̄_k(p) is source k's mean loss over period p, a period being ``period`` consecutive steps
    (the paper's epoch); α is constant within a period. For the first two periods there is no
    ratio and α = 1 for every present source (the paper's λ_k = 1 for t = 1, 2). Defaults:
    T = 2 (the paper's); ``period`` = 50 steps, so that a default 500-step run has 8 weighted
    periods after the 2 equal ones, and each period averages enough batches for the ratio to
    measure progress rather than noise.

    The paper's K counts all tasks; here n counts the sources present in the step, so present
    sources average 1 and an all-equal ratio gives α = 1 (the ``equal`` strategy). A source
    absent for a whole period adds no average for it and keeps its two last averages; a
    source without two averages yet uses r_k = 1 (the value the paper uses for every task
    before two epochs exist). A ratio whose denominator is zero or negative is taken as 1,
    and ratios are clipped to [−1e6, 1e6]. Needs only the losses.
    """
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise StrategyError(f"dwa: temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise StrategyError(f"dwa: period must be an integer >= 1, got {period!r}")

    def init(num_sources: int) -> State:
        zeros = torch.zeros(num_sources, dtype=F64)
        return {
            "sum": zeros.clone(),  # losses summed over the current period
            "seen": torch.zeros(num_sources, dtype=torch.int64),  # steps present this period
            "last": zeros.clone(),  # L̄_k(p−1)
            "before_last": zeros.clone(),  # L̄_k(p−2)
            "periods": torch.zeros(num_sources, dtype=torch.int64),  # averages recorded
            "count": torch.zeros((), dtype=torch.int64),  # steps so far
        }

    def weights(present: torch.Tensor, state: State) -> torch.Tensor:
        last, before = state["last"], state["before_last"]
        ready = (state["periods"] >= 2) & (before > 0)
        safe = torch.where(ready, before, torch.ones_like(before))
        ratio = torch.where(ready, last / safe, torch.ones_like(last))
        ratio = torch.nan_to_num(ratio, nan=1.0).clamp(-RATIO_BOUND, RATIO_BOUND)
        logits = (ratio / temperature).clamp(-LOGIT_BOUND, LOGIT_BOUND)
        logits = torch.where(present, logits, torch.full_like(logits, -torch.inf))
        n = int(present.sum())
        if n == 0:
            return torch.zeros_like(logits)
        return n * torch.softmax(logits, dim=0)

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        present = stats.present
        losses = stats.require(Need.LOSSES).to(F64)
        alpha = weights(present, state)
        total = state["sum"] + torch.where(present, losses, torch.zeros_like(losses))
        seen = state["seen"] + present.to(torch.int64)
        count = state["count"] + 1
        last, before, periods = state["last"], state["before_last"], state["periods"]
        if int(count) % period == 0:
            done = seen > 0
            mean = total / seen.clamp_min(1).to(F64)
            before = torch.where(done, last, before)
            last = torch.where(done, mean, last)
            periods = periods + done.to(torch.int64)
            total = torch.zeros_like(total)
            seen = torch.zeros_like(seen)
        new_state = {
            "sum": total,
            "seen": seen,
            "last": last,
            "before_last": before,
            "periods": periods,
            "count": count,
        }
        return alpha, new_state

    params = {"temperature": temperature, "period": period}
    return Strategy("dwa", frozenset({Need.LOSSES}), init, update, params)
