"""``proportional``: draw auxiliary sources in proportion to the strategy's coefficients."""

from __future__ import annotations

import math

import torch

from auxilia.errors import StrategyError
from auxilia.samplers.base import (
    Sampler,
    SamplerState,
    generator_from,
    inclusion_probabilities,
    seeded_rng_state,
    systematic_sample,
    target_mask,
)


def proportional_probabilities(coefficients: torch.Tensor, floor: float) -> torch.Tensor:
    """π over the K auxiliary sources (index 0 of the result is source 1):
    ``π_a = (1 − floor) · c⁺_a / Σ_b c⁺_b + floor / K``, uniform where Σ c⁺ is 0."""
    weights = coefficients[1:].detach().to(torch.float64).cpu().clamp(min=0.0)
    arms = weights.shape[0]
    total = float(weights.sum())
    if not (total > 0.0 and math.isfinite(total)):
        return torch.full((arms,), 1.0 / arms, dtype=torch.float64)
    return (1.0 - floor) * (weights / total) + floor / arms  # normalise first: no underflow


def proportional(per_step: int = 4, floor: float = 0.1) -> Sampler:
    r"""Draw ``per_step`` auxiliary sources per step, in proportion to their coefficients.

    Rule (c the strategy's latest coefficient of each source, as the trainer keeps it: the last
    value of the steps it was drawn, 1 before its first draw; K auxiliary sources)::

        π_a = (1 − floor) · max(c_a, 0) / Σ_b max(c_b, 0) + floor / K
        p_a = min(1, per_step · π_a)   (the excess of capped sources spread over the others)

    and the ``per_step`` sources are drawn without replacement, source a with probability
    exactly ``p_a`` (randomised systematic sampling). ``floor`` (default 0.1, in (0, 1]) is the
    share of π spread uniformly: every source keeps at least ``floor / K`` of it, so a source
    whose coefficient fell to 0 is still drawn now and then and can earn its weight back
    (``floor = 1`` is the ``uniform`` sampler). Coefficients of the target and negative ones are
    ignored; all-zero coefficients give uniform draws.

    Not from a paper: a way to spend the step's budget on the sources the strategy values, as
    importance sampling of the weighted loss. The draw does not reweight the losses: the
    strategy's coefficients apply to the drawn sources as they are.
    """
    if per_step < 1:
        raise StrategyError(f"proportional sampler: per_step must be >= 1, got {per_step}")
    if not (0.0 < floor <= 1.0):
        raise StrategyError(f"proportional sampler: floor must be in (0, 1], got {floor}")

    def init(num_sources: int, seed: int) -> SamplerState:
        return {"num_sources": torch.tensor(num_sources), "rng": seeded_rng_state(seed)}

    def draw(state: SamplerState, coefficients: torch.Tensor) -> tuple[torch.Tensor, SamplerState]:
        num_sources = int(state["num_sources"])
        mask = target_mask(num_sources)
        arms = num_sources - 1
        if per_step >= arms:
            mask[1:] = True
            return mask, state
        generator = generator_from(state)
        p = inclusion_probabilities(proportional_probabilities(coefficients, floor), per_step)
        mask[systematic_sample(p, per_step, generator) + 1] = True
        return mask, {**state, "rng": generator.get_state()}

    return Sampler("proportional", init, draw, {"per_step": per_step, "floor": floor})
