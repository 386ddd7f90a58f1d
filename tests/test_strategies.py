"""Tests for auxilia.strategies and auxilia.statistics.

Exact updates on hand-checked cases, purpose tests, hypothesis properties and the registry.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

from auxilia import strategies
from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies import Strategy
from helpful_vs_harmful import train_helpful_vs_harmful

F64 = torch.float64
SQRT1_2 = 1.0 / math.sqrt(2.0)
PROPERTY = settings(max_examples=40, deadline=None)

# The hand-checked case: g0 = (1, 0), g1 = (1, 1), g2 = (-1, 0), g3 = (0, 1).
# <g_k, g0> = (1, 1, -1, 0); ||g_k|| = (1, sqrt2, 1, 1); cos(g_k, g0) = (1, 1/sqrt2, -1, 0).
HAND_G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]], dtype=F64)


def stats_from(
    grads: torch.Tensor,
    *,
    losses: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
    lr: float = 1.0,
    step: int = 0,
) -> Statistics:
    """Statistics of gradients ``grads`` [K+1, D], built by hand the way the engine defines them."""
    grads = grads.to(F64)
    gram = grads @ grads.T
    num = grads.shape[0]
    return Statistics(
        present=torch.ones(num, dtype=torch.bool) if present is None else present,
        losses=torch.ones(num, dtype=F64) if losses is None else losses.to(F64),
        target_row=gram[0].clone(),
        gram=gram,
        norms=gram.diagonal().clamp_min(0).sqrt(),
        step=step,
        lr=lr,
    )


def hand_stats(**kwargs: object) -> Statistics:
    stats = stats_from(HAND_G, **kwargs)  # type: ignore[arg-type]
    # The numbers the docstring above checks on paper.
    assert_close(stats.target_row, torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=F64))
    assert_close(stats.norms, torch.tensor([1.0, math.sqrt(2.0), 1.0, 1.0], dtype=F64))
    return stats


def apply(strategy: Strategy, stats: Statistics) -> torch.Tensor:
    alpha, _ = strategy.update(stats, strategy.init(stats.num_sources))
    return alpha


# --------------------------------------------------------------------------- exact updates


def test_statistics_cosines_hand_checked() -> None:
    assert_close(hand_stats().cosines(), torch.tensor([1.0, SQRT1_2, -1.0, 0.0], dtype=F64))


def test_target_only_exact() -> None:
    alpha = apply(strategies.target_only(), hand_stats())
    assert alpha.dtype == F64
    assert_close(alpha, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64))


def test_equal_exact() -> None:
    alpha = apply(strategies.equal(), hand_stats())
    assert_close(alpha, torch.ones(4, dtype=F64))


def test_fixed_exact_and_constant_over_steps() -> None:
    strategy = strategies.fixed([1.0, 0.5, 0.0, 2.0])
    state = strategy.init(4)
    for step in range(3):
        alpha, state = strategy.update(hand_stats(step=step), state)
        assert_close(alpha, torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=F64))
    # The returned tensor is a copy: mutating it does not change the next step.
    alpha[1] = 99.0
    again, _ = strategy.update(hand_stats(), state)
    assert float(again[1]) == 0.5


def test_gcs_weighted_exact() -> None:
    alpha = apply(strategies.gcs(variant="weighted"), hand_stats())
    assert_close(alpha, torch.tensor([1.0, SQRT1_2, 0.0, 0.0], dtype=F64))


def test_gcs_default_variant_is_weighted() -> None:
    strategy = strategies.gcs()
    assert strategy.params == {"variant": "weighted"}
    assert strategy.needs == frozenset({Need.TARGET_ROW, Need.NORMS})
    assert_close(apply(strategy, hand_stats()), torch.tensor([1.0, SQRT1_2, 0.0, 0.0], dtype=F64))


def test_gcs_unweighted_exact() -> None:
    strategy = strategies.gcs(variant="unweighted")
    assert strategy.needs == frozenset({Need.TARGET_ROW})
    # cos = 0 (g3 orthogonal) is not > 0, so the gate is closed for it.
    assert_close(apply(strategy, hand_stats()), torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64))


def test_gcs_unweighted_runs_on_target_row_alone() -> None:
    full = hand_stats()
    stats = Statistics(present=full.present, target_row=full.target_row)
    alpha = apply(strategies.gcs(variant="unweighted"), stats)
    assert_close(alpha, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64))


def test_gcs_target_coefficient_is_one_even_for_zero_target_gradient() -> None:
    grads = HAND_G.clone()
    grads[0] = 0.0
    for variant in ("weighted", "unweighted"):
        alpha = apply(strategies.gcs(variant=variant), stats_from(grads))
        assert_close(alpha, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64))


def test_olaux_horizon_exact() -> None:
    horizon, beta = 3, 2.0
    strategy = strategies.olaux(horizon=horizon, beta=beta, initial=0.5)
    assert strategy.needs == frozenset({Need.TARGET_ROW})
    state = strategy.init(4)
    initial = torch.tensor([1.0, 0.5, 0.5, 0.5], dtype=F64)
    assert_close(state["weights"], initial)
    lrs = [0.1, 0.2, 0.3]
    # Steps 1..N-1: weights unchanged, the dot products accumulate (scaled by lr).
    for step, lr in enumerate(lrs[:-1]):
        alpha, state = strategy.update(hand_stats(lr=lr, step=step), state)
        assert_close(alpha, initial)
        assert int(state["count"]) == step + 1
    assert_close(state["accumulated"], 0.3 * torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=F64))
    # Step N: w_k <- max(0, w_k + beta * sum_j lr_j <g_k, g0>_j); sum_j lr_j = 0.6.
    alpha, state = strategy.update(hand_stats(lr=lrs[-1], step=2), state)
    expected = torch.tensor([1.0, 0.5 + 2.0 * 0.6, max(0.0, 0.5 - 2.0 * 0.6), 0.5], dtype=F64)
    assert_close(alpha, expected)
    assert float(alpha[2]) == 0.0  # clipped at 0
    assert float(alpha[0]) == 1.0  # the target weight stays 1
    assert_close(state["weights"], expected)
    assert_close(state["accumulated"], torch.zeros(4, dtype=F64))  # reset
    # The next horizon starts from the new weights and a fresh accumulator.
    for step in range(3, 5):
        alpha, state = strategy.update(hand_stats(lr=0.5, step=step), state)
        assert_close(alpha, expected)
    alpha, state = strategy.update(hand_stats(lr=0.5, step=5), state)
    second = expected + beta * 1.5 * torch.tensor([0.0, 1.0, -1.0, 0.0], dtype=F64)
    second = second.clamp_min(0.0)
    assert_close(alpha, second)
    assert float(alpha[0]) == 1.0


def test_olaux_ignores_absent_sources() -> None:
    strategy = strategies.olaux(horizon=1, beta=1.0, initial=1.0)
    present = torch.tensor([True, True, True, False])
    # Even if an absent source carried a (bogus) dot product, it must not be accumulated.
    stats = Statistics(
        present=present,
        target_row=torch.tensor([1.0, 1.0, -1.0, 7.0], dtype=F64),
        lr=0.5,
    )
    alpha = apply(strategy, stats)
    assert_close(alpha, torch.tensor([1.0, 1.5, 0.5, 1.0], dtype=F64))


def test_olaux_log_losses_divides_by_both_losses() -> None:
    strategy = strategies.olaux(horizon=1, beta=1.0, initial=1.0, log_losses=True)
    assert strategy.needs == frozenset({Need.TARGET_ROW, Need.LOSSES})
    losses = torch.tensor([2.0, 4.0, 0.5, 1.0], dtype=F64)
    alpha = apply(strategy, hand_stats(losses=losses))
    # dots / (L_k * L_0) = (1/4, 1/8, -1/1, 0/2)
    assert_close(alpha, torch.tensor([1.0, 1.0 + 0.125, 0.0, 1.0], dtype=F64))
    # With lr and beta: w_1 = 1 + beta * lr * 1/8.
    strategy = strategies.olaux(horizon=1, beta=4.0, initial=1.0, log_losses=True)
    alpha = apply(strategy, hand_stats(losses=losses, lr=0.5))
    assert_close(alpha, torch.tensor([1.0, 1.25, 0.0, 1.0], dtype=F64))


def test_olaux_needs_losses_when_log_losses() -> None:
    strategy = strategies.olaux(horizon=1, log_losses=True)
    full = hand_stats()
    stats = Statistics(present=full.present, target_row=full.target_row)
    with pytest.raises(ValueError, match="losses"):
        strategy.update(stats, strategy.init(4))


def test_olaux_state_is_not_mutated_in_place() -> None:
    strategy = strategies.olaux(horizon=1, beta=1.0)
    state = strategy.init(4)
    before = {k: v.clone() for k, v in state.items()}
    strategy.update(hand_stats(), state)
    for key, value in before.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize(
    ("params", "fragment"),
    [({"horizon": 0}, "horizon"), ({"beta": -1.0}, "beta"), ({"initial": -1.0}, "initial")],
)
def test_olaux_bad_params(params: dict[str, float], fragment: str) -> None:
    with pytest.raises(StrategyError, match=fragment):
        strategies.olaux(**params)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- purpose
# Purpose tests apply to target-aware strategies only. The symmetric / baseline strategies
# (`equal`, `fixed`, `target-only`) weight sources regardless of how they relate to the target,
# so they are exempt: their exact updates above are their whole specification.


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["weighted", "unweighted"])
def test_gcs_purpose_prefers_helpful_source(variant: str, seed: int) -> None:
    alpha = train_helpful_vs_harmful(strategies.gcs(variant=variant), seed=seed)
    assert float(alpha[0]) == 1.0
    assert float(alpha[1]) > float(alpha[2])
    assert float(alpha[2]) == 0.0  # the opposed gradient is gated off


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_olaux_purpose_prefers_helpful_source(seed: int) -> None:
    # beta = 1 keeps SGD stable here (with the paper's beta = 5 the helpful weight grows until
    # lr * sum(alpha) diverges on this quadratic).
    strategy = strategies.olaux(horizon=5, beta=1.0)
    alpha = train_helpful_vs_harmful(strategy, steps=20, seed=seed)
    assert float(alpha[0]) == 1.0
    assert float(alpha[1]) > 1.0  # raised from its initial 1
    assert float(alpha[2]) == 0.0  # driven to the clip at 0
    assert float(alpha[1]) > float(alpha[2])


# --------------------------------------------------------------------------- properties


@st.composite
def gradient_matrices(draw: st.DrawFn, min_aux: int = 1) -> torch.Tensor:
    """A random [K+1, D] gradient matrix, K in 1..6."""
    k = draw(st.integers(min_aux, 6))
    d = draw(st.integers(1, 6))
    elements = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
    array = draw(hnp.arrays(np.float64, (k + 1, d), elements=elements))
    return torch.from_numpy(array)


TARGET_AWARE = [
    strategies.gcs(variant="weighted"),
    strategies.gcs(variant="unweighted"),
    strategies.olaux(horizon=1, beta=2.0),
    strategies.olaux(horizon=3),
    strategies.olaux(horizon=1, log_losses=True),
    strategies.target_only(),
]


@PROPERTY
@given(grads=gradient_matrices(), lr=st.floats(1e-4, 1.0))
def test_coefficients_finite_shaped_target_one(grads: torch.Tensor, lr: float) -> None:
    num = grads.shape[0]
    losses = torch.linspace(0.5, 2.0, num, dtype=F64)
    stats = stats_from(grads, losses=losses, lr=lr)
    for strategy in [*TARGET_AWARE, strategies.equal(), strategies.fixed([0.5] * num)]:
        alpha = apply(strategy, stats)
        assert alpha.shape == (num,), strategy.name
        assert bool(torch.isfinite(alpha).all()), strategy.name
        assert bool((alpha >= 0).all()), strategy.name
    for strategy in TARGET_AWARE:
        assert float(apply(strategy, stats)[0]) == 1.0, strategy.name


@PROPERTY
@given(grads=gradient_matrices(), lr=st.floats(1e-4, 1.0), beta=st.floats(0.0, 10.0))
def test_olaux_one_step_horizon_formula(grads: torch.Tensor, lr: float, beta: float) -> None:
    stats = stats_from(grads, lr=lr)
    alpha = apply(strategies.olaux(horizon=1, beta=beta, initial=1.0), stats)
    expected = (1.0 + beta * lr * stats.target_row).clamp_min(0.0)  # type: ignore[operator]
    expected[0] = 1.0
    assert_close(alpha, expected)


@PROPERTY
@given(grads=gradient_matrices())
def test_gcs_weighted_in_unit_interval(grads: torch.Tensor) -> None:
    stats = stats_from(grads)
    alpha = apply(strategies.gcs(variant="weighted"), stats)
    assert bool((alpha >= 0).all())
    assert bool((alpha <= 1.0).all()), alpha
    # Matches max(0, cos) source by source (cos = 0 where a gradient is exactly zero).
    denominator = stats.norms * stats.norms[0]  # type: ignore[index]
    cos = torch.where(denominator > 0, stats.target_row / denominator, 0.0)  # type: ignore[operator]
    expected = cos.clamp(0.0, 1.0)
    expected[0] = 1.0
    assert_close(alpha, expected)


def test_gcs_weighted_never_exceeds_one_for_parallel_source() -> None:
    grads = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64)
    alpha = apply(strategies.gcs(variant="weighted"), stats_from(grads))
    assert float(alpha[1]) <= 1.0


def test_gcs_weighted_is_scale_invariant() -> None:
    for scale in (1.0, 1e-7):
        alpha = apply(strategies.gcs(variant="weighted"), stats_from(HAND_G * scale))
        assert_close(alpha, torch.tensor([1.0, SQRT1_2, 0.0, 0.0], dtype=F64))


@PROPERTY
@given(grads=gradient_matrices(), data=st.data())
def test_gcs_permuting_sources_permutes_coefficients(
    grads: torch.Tensor, data: st.DataObject
) -> None:
    k = grads.shape[0] - 1
    perm = data.draw(st.permutations(list(range(1, k + 1))))
    order = torch.tensor([0, *perm])
    stats = stats_from(grads)
    assert stats.gram is not None
    assert stats.norms is not None
    gram = stats.gram[order][:, order]
    permuted = Statistics(
        present=stats.present[order],
        target_row=gram[0].clone(),
        gram=gram,
        norms=stats.norms[order],
    )
    for variant in ("weighted", "unweighted"):
        strategy = strategies.gcs(variant=variant)
        assert torch.equal(apply(strategy, permuted), apply(strategy, stats)[order]), variant


@PROPERTY
@given(grads=gradient_matrices(min_aux=2), data=st.data())
def test_gcs_copy_of_target_gets_one_and_beats_orthogonal(
    grads: torch.Tensor, data: st.DataObject
) -> None:
    g0 = grads[0]
    assume(float(g0.norm()) > 1e-2)
    k = grads.shape[0] - 1
    copy, orthogonal = data.draw(st.lists(st.integers(1, k), min_size=2, max_size=2, unique=True))
    grads = grads.clone()
    grads[copy] = g0
    v = grads[orthogonal]
    residual = v - (v @ g0) / (g0 @ g0) * g0
    assume(float(residual.norm()) > 1e-2)  # else "orthogonal" is rounding noise (e.g. D = 1)
    grads[orthogonal] = residual
    stats = stats_from(grads)
    for variant in ("weighted", "unweighted"):
        alpha = apply(strategies.gcs(variant=variant), stats)
        assert_close(alpha[copy], torch.tensor(1.0, dtype=F64), atol=1e-12, rtol=0)
        assert float(alpha[copy]) >= float(alpha[orthogonal]), variant
        assert float(alpha[orthogonal]) <= 1e-6 or variant == "unweighted"


@PROPERTY
@given(grads=gradient_matrices(), data=st.data())
def test_gcs_absent_sources_get_zero(grads: torch.Tensor, data: st.DataObject) -> None:
    num = grads.shape[0]
    present = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num, max_size=num)))
    present[0] = True
    grads = grads * present.to(F64).unsqueeze(1)  # absent sources have zero statistics
    stats = stats_from(grads, present=present)
    for variant in ("weighted", "unweighted"):
        alpha = apply(strategies.gcs(variant=variant), stats)
        assert bool((alpha[~present] == 0).all()), variant


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert strategies.names() == sorted(CATALOGUE)
    for name in CATALOGUE:
        params = {"weights": [1.0, 1.0]} if name == "fixed" else None
        assert strategies.get(name, params).name == name


# Every strategy the README's table lists; issue 4's catalogue.
CATALOGUE = [
    "target-only",
    "equal",
    "fixed",
    "gcs",
    "olaux",
    "arml",
    "tawt",
    "pcgrad-aux",
    "bloop",
    "auxilearn",
    "auxinash",
    "mgda",
    "uncertainty",
    "dwa",
    "gradnorm",
    "pcgrad",
    "cagrad",
    "nash-mtl",
    "auto",
]


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("target-only", {}, [1.0, 0.0, 0.0, 0.0]),
        ("equal", None, [1.0, 1.0, 1.0, 1.0]),
        ("fixed", {"weights": [1, 2, 3, 4]}, [1.0, 2.0, 3.0, 4.0]),
        ("gcs", {"variant": "unweighted"}, [1.0, 1.0, 0.0, 0.0]),
        ("gcs", {}, [1.0, SQRT1_2, 0.0, 0.0]),
        ("olaux", {"horizon": 2}, [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_get_builds_by_name(
    name: str, params: dict[str, object] | None, expected: list[float]
) -> None:
    strategy = strategies.get(name, params)
    assert strategy.name == name
    assert_close(apply(strategy, hand_stats()), torch.tensor(expected, dtype=F64))


def test_get_unknown_name_lists_names() -> None:
    with pytest.raises(StrategyError) as info:
        strategies.get("cosine")
    message = str(info.value)
    assert "'cosine'" in message
    for name in strategies.names():
        assert name in message


def test_get_unknown_parameter_names_key() -> None:
    with pytest.raises(StrategyError, match="'horizn'") as info:
        strategies.get("olaux", {"horizn": 3})
    assert "horizon" in str(info.value)  # lists what is accepted


def test_get_missing_required_parameter() -> None:
    with pytest.raises(StrategyError, match="'weights'"):
        strategies.get("fixed", {})


def test_fixed_wrong_number_of_weights_raises_at_init() -> None:
    strategy = strategies.get("fixed", {"weights": [1.0, 0.5]})
    with pytest.raises(StrategyError, match="2 weights for 3 sources"):
        strategy.init(3)
    assert strategy.init(2) == {}


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_fixed_rejects_negative_or_non_finite_weight(bad: float) -> None:
    with pytest.raises(StrategyError, match="finite and >= 0"):
        strategies.fixed([1.0, bad])
    with pytest.raises(StrategyError):
        strategies.get("fixed", {"weights": [1.0, bad]})


def test_gcs_bad_variant_raises() -> None:
    with pytest.raises(StrategyError, match="'cosine'"):
        strategies.gcs(variant="cosine")  # type: ignore[arg-type]
    with pytest.raises(StrategyError, match="variant"):
        strategies.get("gcs", {"variant": "cosine"})


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("need", list(Need))
def test_statistics_require_names_missing_statistic(need: Need) -> None:
    stats = Statistics(present=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=f"'{need.value}'") as info:
        stats.require(need)
    assert f"Need.{need.name}" in str(info.value)


def test_statistics_require_returns_present_statistic() -> None:
    stats = hand_stats()
    assert stats.require(Need.GRAM) is stats.gram
    assert stats.num_sources == 4


def test_need_closure() -> None:
    assert Need.closure({Need.GRAM}) == {Need.GRAM, Need.TARGET_ROW, Need.NORMS}
    assert Need.closure({Need.LOSSES}) == {Need.LOSSES}
    assert Need.closure(set()) == frozenset()
