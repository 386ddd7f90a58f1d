"""``auto``: the evidence-weighted gate (hand-checked updates, purpose, state, errors)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from auxilia import strategies
from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.auto import auto, signal_weight
from helpful_vs_harmful import train_helpful_vs_harmful

F64 = torch.float64


def cosines(
    values: list[float], present: list[bool] | None = None, ema_norm: float = 1.0
) -> Statistics:
    """Statistics whose cos(g_k, g_0) are ``values`` (unit norms; values[0] must be 1) and
    whose target-gradient EMA has norm ``ema_norm`` (1: successive target gradients agree)."""
    return Statistics(
        present=torch.ones(len(values), dtype=torch.bool)
        if present is None
        else torch.tensor(present),
        target_row=torch.tensor(values, dtype=F64),
        norms=torch.ones(len(values), dtype=F64),
        ema_sqnorm=torch.tensor(ema_norm**2, dtype=F64),
    )


def noise_level(rate: float) -> float:
    """‖ĝ‖ / ‖g_0‖ expected when successive target gradients are independent noise."""
    return math.sqrt(rate / (2 - rate))


def test_registered_with_its_needs() -> None:
    strategy = strategies.get("auto")
    assert strategy.name == "auto"
    # ‖ĝ‖ alone: no inner products with ĝ, and one coefficient per source (none for ĝ).
    assert strategy.needs == frozenset({Need.TARGET_ROW, Need.NORMS, Need.TARGET_EMA_NORM})
    assert strategy.params == {"rate": 0.1, "variant": "cosine"}
    assert strategy.target_ema == 0.1
    # The projection reads the target row alone (and ‖ĝ‖): no norms.
    projection = strategies.get("auto", {"variant": "projection"})
    assert projection.needs == frozenset({Need.TARGET_ROW, Need.TARGET_EMA_NORM})
    assert projection.params == {"rate": 0.1, "variant": "projection"}


def test_projection_two_steps_by_hand() -> None:
    strategy = auto(rate=0.5, variant="projection")
    state = strategy.init(3)
    # ‖g_0‖ = sqrt(<g_0, g_0>) = 2, so the evidence is <g_k, g_0> / 2 = [2, 1, -0.5]; ‖ĝ‖ = ‖g_0‖
    # (w = 1). One observation each: the gate is the sign. No norms are given.
    step = Statistics(
        present=torch.ones(3, dtype=torch.bool),
        target_row=torch.tensor([4.0, 2.0, -1.0], dtype=F64),
        ema_sqnorm=torch.tensor(4.0, dtype=F64),
    )
    alpha, state = strategy.update(step, state)
    assert_close(alpha, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    # Step 2: evidence [.., 0.2, 0.5], rate 0.5. Source 1: mean 0.5 + 0.5 (0.2 − 0.5) = 0.35
    # over weight 0.75, m = 0.4667; square 0.5 + 0.5 (0.04 − 0.5) = 0.27, E[x²] = 0.36,
    # variance 0.36 − 0.4667² = 0.1422; Kish n = 0.75² / (0.5² · 0.5² + 0.5²) = 1.8; gate
    # 0.4667 / sqrt(0.1422 / 1.8) = 1.66, clipped to 1. Source 2 (−0.5, then 0.5): mean
    # 0.125, m = 0.1667; square 0.1875, E[x²] = 0.25, variance 0.2222: gate 0.4743.
    step = dataclasses.replace(step, target_row=torch.tensor([4.0, 0.4, 1.0], dtype=F64))
    alpha, state = strategy.update(step, state)
    m, var = 0.125 / 0.75, 0.25 - (0.125 / 0.75) ** 2
    assert_close(alpha, torch.tensor([1.0, 1.0, m / math.sqrt(var / 1.8)], dtype=F64))
    assert float(alpha[2]) == pytest.approx(0.4743, abs=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=2), min_size=1, max_size=20))
def test_projection_is_the_cosine_when_every_norm_is_one(steps: list[list[float]]) -> None:
    cosine, projection = auto(), auto(variant="projection")
    a, b = cosine.init(3), projection.init(3)
    for row in steps:
        stats = cosines([1.0, *row])
        alpha, a = cosine.update(stats, a)
        beta, b = projection.update(stats, b)
        assert_close(alpha, beta)


def test_projection_ignores_how_long_each_gradient_is() -> None:
    """Scaling a source's loss by the same factor every step (its gradients, and so its
    projections) leaves the projection gate unchanged: it is scale-free per source."""
    gen = torch.Generator().manual_seed(1)
    rows = [[1.0, float(torch.randn((), generator=gen)) + 0.4] for _ in range(30)]
    for scale in (1.0, 1e-3, 1e3):
        strategy = auto(variant="projection")
        state = strategy.init(2)
        for row in rows:
            stats = Statistics(
                present=torch.ones(2, dtype=torch.bool),
                target_row=torch.tensor([row[0], scale * row[1]], dtype=F64),
                ema_sqnorm=torch.tensor(1.0, dtype=F64),
            )
            alpha, state = strategy.update(stats, state)
        if scale == 1.0:
            reference = alpha
        assert_close(alpha, reference)


def test_signal_weight_by_hand() -> None:
    # rate 0.5: noise level sqrt(0.5 / 1.5) = 0.57735; r = 1 -> 1, r at the noise level -> 0,
    # halfway between -> 0.5; below the noise level -> 0; no target gradient yet -> 0.
    r0 = noise_level(0.5)
    assert signal_weight(2.0, 2.0, 0.5) == 1.0
    assert signal_weight(r0, 1.0, 0.5) == pytest.approx(0.0, abs=1e-12)
    assert signal_weight((1 + r0) / 2, 1.0, 0.5) == pytest.approx(0.5)
    assert signal_weight(0.1, 1.0, 0.5) == 0.0
    assert signal_weight(1.0, 0.0, 0.5) == 0.0
    assert signal_weight(0.01, 1.0, 1.0) == 1.0  # rate 1 keeps no history: ĝ is g_0


def test_three_steps_by_hand() -> None:
    strategy = auto(rate=0.5)
    state = strategy.init(4)
    # Step 1: ‖ĝ‖ = ‖g_0‖, weight w = 1; one observation each: the standard error is 0, the gate
    # is the cosine's sign.
    alpha, state = strategy.update(cosines([1.0, 0.5, 0.5, -0.3]), state)
    assert_close(alpha, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64))
    # Step 2: ‖ĝ‖ / n̄ halfway between the noise level and 1, so w = 0.5 and the EMA rate is
    # 0.25. Source 1 (cos 0.5, then -0.3): mean 0.75·0.25 - 0.25·0.3 = 0.1125 over gathered
    # weight 0.75·0.5 + 0.25 = 0.625, i.e. m = 0.18; square (0.75·0.125 + 0.25·0.09) / 0.625
    # = 0.186, variance 0.186 - 0.0324 = 0.1536; observation weights 0.375 and 0.25, Kish
    # n = 0.625² / (0.375² + 0.25²) = 1.923; gate 0.18 / sqrt(0.1536 / 1.923) = 0.637.
    # Source 2 is absent (0, state kept); source 3 (cos -0.3, then 0.9): m = (-0.1125 + 0.225)
    # / 0.625 = 0.18, square (0.03375 + 0.2025) / 0.625 = 0.378, variance 0.3456: gate 0.425.
    half = (1 + noise_level(0.5)) / 2
    alpha, state = strategy.update(
        cosines([1.0, -0.3, 0.0, 0.9], [True, True, False, True], ema_norm=half), state
    )
    kish = 0.625**2 / (0.375**2 + 0.25**2)
    expected = [1.0, 0.18 / math.sqrt(0.1536 / kish), 0.0, 0.18 / math.sqrt(0.3456 / kish)]
    assert_close(alpha, torch.tensor(expected, dtype=F64))
    assert float(state["weight"][2]) == 0.5  # absent: its one observation at step 1 only
    # Step 3: the target gradient is pure noise (‖ĝ‖ / n̄ at the noise level): w = 0, the
    # evidence is left as it was, whatever the cosines say (source 2, drawn again, keeps the
    # full weight of its one observation at step 1).
    again, state = strategy.update(
        cosines([1.0, -0.9, -0.9, -0.9], ema_norm=noise_level(0.5)), state
    )
    expected[2] = 1.0
    assert_close(again, torch.tensor(expected, dtype=F64))


def test_a_source_first_seen_on_noise_steps_gets_nothing() -> None:
    strategy = auto(rate=0.5)
    state = strategy.init(2)
    for _ in range(3):
        alpha, state = strategy.update(cosines([1.0, 0.8], ema_norm=0.1), state)
        assert float(alpha[1]) == 0.0


def test_purpose_evidence_survives_a_fitted_target() -> None:
    """A source aligned with the target while it learns (cos 0.3 ± 0.1) keeps its full weight
    through 300 steps in which the target's gradient is noise and the cosines scatter around
    0; the same cosines against a target gradient that carries signal close the gate."""
    gen = torch.Generator().manual_seed(0)
    learning = [0.3 + 0.1 * float(torch.randn((), generator=gen)) for _ in range(40)]
    fitted = [0.3 * float(torch.randn((), generator=gen)) for _ in range(300)]
    finals = {}
    for label, late_norm in (("noise", noise_level(0.1)), ("signal", 1.0)):
        strategy = auto()
        state = strategy.init(2)
        for cos in learning:
            alpha, state = strategy.update(cosines([1.0, cos]), state)
        assert float(alpha[1]) == 1.0
        for cos in fitted:
            alpha, state = strategy.update(cosines([1.0, cos], ema_norm=late_norm), state)
        finals[label] = float(alpha[1])
    assert finals["noise"] == 1.0
    assert finals["signal"] < 0.9


@pytest.mark.parametrize("variant", ["cosine", "projection"])
def test_purpose_helpful_full_weight_harmful_none(variant: str) -> None:
    alpha = train_helpful_vs_harmful(auto(variant=variant), steps=30)  # type: ignore[arg-type]
    assert float(alpha[1]) == 1.0
    assert float(alpha[2]) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3), st.floats(0.0, 1.5)),
        min_size=1,
        max_size=30,
    )
)
def test_coefficients_in_unit_interval_and_state_round_trips(
    steps: list[tuple[list[float], float]],
) -> None:
    strategy = auto()
    state = strategy.init(4)
    for row, ema_norm in steps:
        stats = cosines([1.0, *row], ema_norm=ema_norm)
        alpha, new = strategy.update(stats, state)
        again, _ = strategy.update(stats, {k: v.clone() for k, v in state.items()})
        assert torch.equal(alpha, again)
        assert float(alpha[0]) == 1.0
        assert alpha.shape == (4,)
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


def test_variant_error_names_the_choices() -> None:
    with pytest.raises(StrategyError, match="'cosine' or 'projection'"):
        auto(variant="sign")  # type: ignore[arg-type]
