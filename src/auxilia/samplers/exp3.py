"""``exp3``: EXP3-FLAD, an adversarial bandit over the auxiliary datasets (FLAD, §8).

Albalak, Raffel and Wang, "Improving Few-Shot Generalization by Exploring and Exploiting
Auxiliary Data", NeurIPS 2023 (code: github.com/alon-albalak/FLAD, ``Exp3BatchedFLADTrainer``).
"""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.samplers.base import (
    Sampler,
    SamplerState,
    generator_from,
    inclusion_probabilities,
    played_arms,
    seeded_rng_state,
    smoothed_rewards,
    systematic_sample,
    target_mask,
)
from auxilia.statistics import Need, Statistics


def exploration(arms: int, steps: int, rounds: int) -> float:
    """ε_t = min(1/K, sqrt(ln K / (K t'))) with t' = t · rounds · 10 + 1 (FLAD's code scaling,
    ``rounds`` arms per step in the place of its gradient-accumulation micro-batches)."""
    if arms <= 1:
        return 0.0
    scaled = steps * rounds * 10 + 1
    return min(1.0 / arms, math.sqrt(math.log(arms) / (arms * scaled)))


def exp3_probabilities(estimated: torch.Tensor, steps: int, rounds: int) -> torch.Tensor:
    """The policy π over K arms after ``steps`` observed steps, R̂ = ``estimated`` [K]:
    ``π = (1 − K ε_t) softmax(ε_{t−1} R̂) + ε_t`` (uniform before any reward)."""
    arms = int(estimated.shape[0])
    epsilon = exploration(arms, steps, rounds)
    previous = exploration(arms, max(steps - 1, 0), rounds)
    return (1.0 - arms * epsilon) * torch.softmax(previous * estimated, dim=0) + epsilon


def exp3(per_step: int = 4, beta: float = 1.0) -> Sampler:
    r"""EXP3-FLAD: draw ``per_step`` auxiliary datasets per step from the EXP3 policy π.

    Rule (K auxiliary arms, m = min(per_step, K) drawn per step, t steps observed so far;
    R̂ = 0 at the start, so π starts uniform)::

        ε_t = min(1/K, sqrt(ln K / (K t'))),   t' = t · m · 10 + 1
        π_a = (1 − K ε_t) · exp(ε_{t−1} R̂_a) / Σ_b exp(ε_{t−1} R̂_b) + ε_t
        p_a = min(1, m π_a)     (capped arms' excess spread over the others in proportion to π)
        after the step, for each drawn arm a, with r_a = cos(g_target, g_a):
            R_a ← (1 − β) R_a + β r_a
            R̂_a ← R̂_a + m · R_a / p_a

    Defaults as in FLAD: ``beta = 1`` (no smoothing: R_a is the latest reward); the reward is
    the cosine between the target's gradient and the arm's over the shared parameters, which
    the engine measures in the same step (``needs``: ``Need.TARGET_ROW``, ``Need.NORMS``).
    Arms not drawn keep their statistics. The target (index 0) is always drawn.

    Several arms per step: the m arms are drawn *without replacement*, arm a with probability
    exactly ``p_a`` (randomised systematic sampling). The importance weight ``m / p_a`` equals
    FLAD's ``1 / π_a`` for every uncapped arm, and ``m R_a / p_a`` is an unbiased estimate of
    the reward of the step's m rounds; t' counts m rounds per step as FLAD's code counts its
    gradient-accumulation micro-batches. With ``per_step = 1`` this is FLAD's rule exactly.

    Departures from FLAD and why:

    * FLAD draws one dataset per micro-batch *with* replacement and credits a dataset drawn
      several times in a step once, with weight 1/π_a (biased once m π_a is not small); here
      the m draws are distinct (a step never spends its budget twice on one dataset) and the
      weight uses the exact inclusion probability.
    * FLAD's g_target is the gradient over the whole few-shot training set after the optimiser
      step, on the LM head only; here it is the target batch's gradient at the step's
      parameters, over the shared parameters, which the engine has already measured: no extra
      pass over the target set.
    * With ``beta < 1`` the first reward of an arm initialises R_a (FLAD starts it at 1, or at
      the alignment at θ_0 when it precomputes one).

    Cost per step: O(K) vector operations (softmax, cumulative sum), no Python loop over arms;
    the gradient work is that of the m drawn datasets, whatever K is.
    """
    if per_step < 1:
        raise StrategyError(f"exp3 sampler: per_step must be >= 1, got {per_step}")
    if not (0.0 < beta <= 1.0):
        raise StrategyError(f"exp3 sampler: beta must be in (0, 1], got {beta}")

    def init(num_sources: int, seed: int) -> SamplerState:
        arms = num_sources - 1
        inclusion = torch.ones(num_sources, dtype=torch.float64)
        if arms > 0:
            inclusion[1:] = min(per_step, arms) / arms
        return {
            "num_sources": torch.tensor(num_sources),
            "rng": seeded_rng_state(seed),
            "steps": torch.tensor(0, dtype=torch.int64),  # t
            "estimated": torch.zeros(num_sources, dtype=torch.float64),  # R̂
            "smoothed": torch.zeros(num_sources, dtype=torch.float64),  # R
            "plays": torch.zeros(num_sources, dtype=torch.int64),
            "inclusion": inclusion,  # p of the latest draw (1 for the target)
        }

    def draw(state: SamplerState, coefficients: torch.Tensor) -> tuple[torch.Tensor, SamplerState]:
        del coefficients
        num_sources = int(state["num_sources"])
        arms = num_sources - 1
        if per_step >= arms:  # every arm, with probability 1
            return torch.ones(num_sources, dtype=torch.bool), state
        policy = exp3_probabilities(state["estimated"][1:], int(state["steps"]), per_step)
        inclusion = torch.ones(num_sources, dtype=torch.float64)
        inclusion[1:] = inclusion_probabilities(policy, per_step)
        generator = generator_from(state)
        mask = target_mask(num_sources)
        mask[systematic_sample(inclusion[1:], per_step, generator) + 1] = True
        return mask, {**state, "rng": generator.get_state(), "inclusion": inclusion}

    def observe(state: SamplerState, stats: Statistics, drawn: torch.Tensor) -> SamplerState:
        played = played_arms(stats, drawn)
        steps = state["steps"] + 1
        if not bool(played.any()):
            return {**state, "steps": steps}
        rounds = min(per_step, int(state["num_sources"]) - 1)
        rewards = stats.cosines().to(torch.float64)
        smoothed = smoothed_rewards(state["smoothed"], rewards, state["plays"], played, beta)
        gain = torch.where(played, rounds * smoothed / state["inclusion"], 0.0)
        return {
            **state,
            "steps": steps,
            "estimated": state["estimated"] + gain,
            "smoothed": smoothed,
            "plays": state["plays"] + played.to(torch.int64),
        }

    return Sampler(
        "exp3",
        init,
        draw,
        {"per_step": per_step, "beta": beta},
        frozenset({Need.TARGET_ROW, Need.NORMS}),
        observe,
    )
