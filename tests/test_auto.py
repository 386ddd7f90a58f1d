"""``auto``: the evidence-weighted gate (hand-checked updates, purpose, state, errors)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from auxilia import strategies
from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.auto import auto
from helpful_vs_harmful import train_helpful_vs_harmful

F64 = torch.float64


def cosines(values: list[float], present: list[bool] | None = None) -> Statistics:
    """Statistics whose cos(g_k, g_0) are ``values`` (unit norms; values[0] must be 1)."""
    return Statistics(
        present=torch.ones(len(values), dtype=torch.bool)
        if present is None
        else torch.tensor(present),
        target_row=torch.tensor(values, dtype=F64),
        norms=torch.ones(len(values), dtype=F64),
    )


def test_registered_with_its_needs() -> None:
    strategy = strategies.get("auto")
    assert strategy.name == "auto"
    assert strategy.needs == frozenset({Need.TARGET_ROW, Need.NORMS})
    assert strategy.params == {"rate": 0.1}


def test_two_steps_by_hand() -> None:
    strategy = auto(rate=0.5)
    state = strategy.init(4)
    # Step 1: one observation each: the standard error is 0, the gate is the cosine's sign.
    alpha, state = strategy.update(cosines([1.0, 0.5, 0.5, -0.3]), state)
    assert_close(alpha, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64))
    # Step 2 for source 1 (cos -0.1): EMA mean 0.075, square 0.0675, weight 0.75, so the mean is
    # 0.1, the variance 0.09 - 0.01 = 0.08, two observations: se = 0.2, gate 0.5. Source 2 is
    # absent (0, state kept); source 3 (cos -0.3 then 0.9): EMA mean 0.375, square 0.4275, so
    # the mean is 0.5, the variance 0.57 - 0.25 = 0.32, se 0.4: 1.25 standard errors, gate 1.
    alpha, state = strategy.update(cosines([1.0, -0.1, 0.0, 0.9], [True, True, False, True]), state)
    assert_close(alpha[:3], torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    assert float(alpha[3]) == 1.0
    assert float(state["count"][2]) == 1.0
    alpha, state = strategy.update(cosines([1.0, 0.0, 0.0, -0.9]), state)
    # Source 3 (cos -0.9): mean (0.1875 - 0.45) / 0.875 = -0.3: gate 0.
    assert float(alpha[3]) == 0.0


def test_purpose_helpful_full_weight_harmful_none() -> None:
    alpha = train_helpful_vs_harmful(auto(), steps=30)
    assert float(alpha[1]) == 1.0
    assert float(alpha[2]) == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3), min_size=1, max_size=30))
def test_coefficients_in_unit_interval_and_state_round_trips(steps: list[list[float]]) -> None:
    strategy = auto()
    state = strategy.init(4)
    for row in steps:
        stats = cosines([1.0, *row])
        alpha, new = strategy.update(stats, state)
        again, _ = strategy.update(stats, {k: v.clone() for k, v in state.items()})
        assert torch.equal(alpha, again)
        assert float(alpha[0]) == 1.0
        assert bool(((alpha >= 0) & (alpha <= 1)).all())
        state = new


def test_a_consistently_negative_source_never_enters() -> None:
    strategy = auto()
    state = strategy.init(2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        cos = float(-0.2 + 0.1 * torch.randn((), generator=gen).clamp(-1.5, 1.5))
        alpha, state = strategy.update(cosines([1.0, cos]), state)
        assert float(alpha[1]) == 0.0


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan"), True])
def test_rate_errors(rate: float) -> None:
    with pytest.raises(StrategyError, match="rate"):
        auto(rate=rate)
