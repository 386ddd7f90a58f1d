"""Shared by strategy tests: statistics built from explicit gradients, and state checks."""

from __future__ import annotations

import io

import torch

from auxilia.statistics import Statistics
from auxilia.strategies.base import State, Strategy

F64 = torch.float64


def stats_from(grads: object, present: list[bool] | torch.Tensor | None = None) -> Statistics:
    """Statistics of gradients ``grads`` [K+1, D] (row 0 the target), as the engine defines them."""
    g = torch.as_tensor(grads, dtype=F64)
    gram = g @ g.T
    num = int(g.shape[0])
    return Statistics(
        present=(
            torch.ones(num, dtype=torch.bool)
            if present is None
            else torch.as_tensor(present, dtype=torch.bool)
        ),
        target_row=gram[0].clone(),
        gram=gram,
        norms=gram.diagonal().clamp_min(0).sqrt(),
    )


def apply(strategy: Strategy, stats: Statistics) -> torch.Tensor:
    """The coefficients of one update from the initial state."""
    alpha, _ = strategy.update(stats, strategy.init(stats.num_sources))
    return alpha


def expected(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def clone_state(state: State) -> State:
    return {key: value.clone() for key, value in state.items()}


def saved_and_loaded(state: State) -> State:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: State = torch.load(buffer, weights_only=True)
    return loaded


def assert_round_trip(strategy: Strategy, sequence: list[Statistics], split: int) -> None:
    """Resuming from a cloned or a saved-and-loaded state gives bit-identical coefficients."""
    state = strategy.init(sequence[0].num_sources)
    for stats in sequence[:split]:
        _, state = strategy.update(stats, state)
    restored = [clone_state(state), saved_and_loaded(state)]
    reference = []
    for stats in sequence[split:]:
        alpha, state = strategy.update(stats, state)
        reference.append(alpha)
    for other in restored:
        for stats, alpha_ref in zip(sequence[split:], reference, strict=True):
            alpha, other = strategy.update(stats, other)
            assert torch.equal(alpha, alpha_ref)
        for key in state:
            assert torch.equal(other[key], state[key]), key


def assert_not_mutated(strategy: Strategy, stats: Statistics) -> None:
    """``update`` returns a new state and leaves the one it was given unchanged."""
    state = strategy.init(stats.num_sources)
    for _ in range(3):  # move the state off its initial values first
        _, state = strategy.update(stats, state)
    before = clone_state(state)
    strategy.update(stats, state)
    for key, value in before.items():
        assert torch.equal(state[key], value), key
