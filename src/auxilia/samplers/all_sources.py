"""``all``: every source enters every step (the default while K is small)."""

from __future__ import annotations

import torch

from auxilia.samplers.base import Sampler, SamplerState


def all_sources() -> Sampler:
    """Draw every source at every step."""

    def init(num_sources: int, seed: int) -> SamplerState:
        del seed
        return {"num_sources": torch.tensor(num_sources)}

    def draw(state: SamplerState, coefficients: torch.Tensor) -> tuple[torch.Tensor, SamplerState]:
        del coefficients
        return torch.ones(int(state["num_sources"]), dtype=torch.bool), state

    return Sampler("all", init, draw)
