"""``uniform``: a fixed number of auxiliary sources per step, drawn uniformly, no replacement."""

from __future__ import annotations

import torch

from auxilia.errors import StrategyError
from auxilia.samplers.base import Sampler, SamplerState, generator_from, seeded_rng_state


def uniform(per_step: int = 4) -> Sampler:
    """Draw the target plus ``per_step`` auxiliary sources chosen uniformly at random.

    Step cost then depends on ``per_step``, not on the number of sources.
    """
    if per_step < 1:
        raise StrategyError(f"uniform sampler: per_step must be >= 1, got {per_step}")

    def init(num_sources: int, seed: int) -> SamplerState:
        return {"num_sources": torch.tensor(num_sources), "rng": seeded_rng_state(seed)}

    def draw(state: SamplerState, coefficients: torch.Tensor) -> tuple[torch.Tensor, SamplerState]:
        del coefficients
        num_sources = int(state["num_sources"])
        generator = generator_from(state)
        mask = torch.zeros(num_sources, dtype=torch.bool)
        mask[0] = True
        auxiliaries = num_sources - 1
        if auxiliaries > 0:
            chosen = torch.randperm(auxiliaries, generator=generator)[: min(per_step, auxiliaries)]
            mask[chosen + 1] = True
        return mask, {"num_sources": state["num_sources"], "rng": generator.get_state()}

    return Sampler("uniform", init, draw, {"per_step": per_step})
