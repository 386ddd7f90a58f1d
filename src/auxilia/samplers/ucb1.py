"""``ucb1``: UCB1-FLAD, a stochastic bandit over the auxiliary datasets (FLAD, §8).

Albalak, Raffel and Wang, "Improving Few-Shot Generalization by Exploring and Exploiting
Auxiliary Data", NeurIPS 2023 (code: github.com/alon-albalak/FLAD, ``UCB1BatchedFLADTrainer``).
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.samplers.base import (
    Sampler,
    SamplerState,
    played_arms,
    smoothed_rewards,
    target_mask,
)
from auxilia.statistics import Need, Statistics


def ucb1_index(state: SamplerState) -> torch.Tensor:
    """The upper confidence index of every auxiliary arm (index 0 of the result is arm 1):
    ``R̂_a + sqrt(2 ln t / n_a)`` with t the plays so far, ``+inf`` for an arm never played."""
    plays = state["plays"][1:]
    total = float(plays.sum())
    bonus = torch.sqrt(2.0 * math.log(max(total, 1.0)) / plays.clamp(min=1).to(torch.float64))
    index = state["estimated"][1:] + bonus
    return torch.where(plays == 0, torch.full_like(index, float("inf")), index)


def ucb1(per_step: int = 4, beta: float = 0.1) -> Sampler:
    r"""UCB1-FLAD: draw the ``per_step`` auxiliary datasets with the highest upper confidence index.

    Rule (K auxiliary arms; n_a the plays of arm a, t = Σ_a n_a)::

        index_a = R̂_a + sqrt(2 ln t / n_a)          (+inf while n_a = 0)
        draw the per_step arms of largest index (ties: lower index first)
        after a step, for each drawn arm a, with r_a = cos(g_target, g_a):
            R̂_a ← r_a on its first play,  (1 − β) R̂_a + β r_a after;   n_a ← n_a + 1

    Defaults as in FLAD: smoothing ``beta = 0.1``, reward the cosine between the target's
    gradient and the arm's, over the shared parameters, measured by the engine in the same step
    (``Need.TARGET_ROW``, ``Need.NORMS``). Arms not drawn keep their statistics. The rule is
    deterministic (the state holds no RNG).

    Departures from FLAD and why:

    * FLAD initialises every arm with its gradient alignment at θ_0 (K extra gradient
      computations before training, ``n_a = 1``, t counting those K rounds). Here unplayed arms
      are played first, as in standard UCB1 (Auer et al. 2002): the first K/per_step steps go
      through the arms in order, and the first reward of an arm is its R̂ (no smoothing), which
      is FLAD's initialisation measured during training instead of before it. No step costs K.
    * FLAD picks one arm per gradient-accumulation micro-batch (an arm may repeat within a
      step); here the ``per_step`` arms of largest index are drawn together, distinct, and each
      counts one play.
    * FLAD's g_target is the gradient over the whole few-shot training set after the optimiser
      step, on the LM head only; here it is the target batch's gradient at the step's
      parameters, over the shared parameters, as the engine measures it.

    The cost per step is O(K) vector operations (a sort of K numbers), no Python loop over arms.
    """
    if per_step < 1:
        raise StrategyError(f"ucb1 sampler: per_step must be >= 1, got {per_step}")
    if not (0.0 < beta <= 1.0):
        raise StrategyError(f"ucb1 sampler: beta must be in (0, 1], got {beta}")

    def init(num_sources: int, seed: int) -> SamplerState:
        del seed
        return {
            "num_sources": torch.tensor(num_sources),
            "estimated": torch.zeros(num_sources, dtype=torch.float64),  # R̂
            "plays": torch.zeros(num_sources, dtype=torch.int64),  # n
        }

    def draw(state: SamplerState, coefficients: torch.Tensor) -> tuple[torch.Tensor, SamplerState]:
        del coefficients
        num_sources = int(state["num_sources"])
        mask = target_mask(num_sources)
        arms = num_sources - 1
        if per_step >= arms:
            mask[1:] = True
            return mask, state
        order = torch.sort(ucb1_index(state), descending=True, stable=True).indices
        mask[order[:per_step] + 1] = True
        return mask, state

    def observe(state: SamplerState, stats: Statistics, drawn: torch.Tensor) -> SamplerState:
        played = played_arms(stats, drawn)
        if not bool(played.any()):
            return state
        rewards = stats.cosines().to(torch.float64)
        estimated = smoothed_rewards(state["estimated"], rewards, state["plays"], played, beta)
        return {
            **state,
            "estimated": estimated,
            "plays": state["plays"] + played.to(torch.int64),
        }

    return Sampler(
        "ucb1",
        init,
        draw,
        {"per_step": per_step, "beta": beta},
        frozenset({Need.TARGET_ROW, Need.NORMS}),
        observe,
    )
