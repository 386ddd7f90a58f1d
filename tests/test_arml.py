"""ARML (Shi et al., NeurIPS 2020): hand-checked updates, cadence, purpose, params, registry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

from auxilia import strategies
from auxilia.errors import StrategyError
from auxilia.statistics import Need
from auxilia.strategies import Strategy
from auxilia.strategies.arml import nnls_gram
from helpful_vs_harmful import train_helpful_vs_harmful
from strategy_checks import (
    apply,
    expected,
    stats_from,
)

F64 = torch.float64


# --------------------------------------------------------------------------- exact updates


def test_needs_gram_and_initial_weights() -> None:
    strategy = strategies.arml()
    assert strategy.name == "arml"
    assert strategy.needs == frozenset({Need.GRAM})
    assert strategy.params == {"variant": "nnls", "update_every": 20, "lr": 0.05}
    state = strategy.init(3)
    assert_close(state["weights"], expected(1.0, 1.0, 1.0))
    assert int(state["count"]) == 0


def test_nnls_exact_unconstrained_solution() -> None:
    # g0 = g1 + g2: the unconstrained solution (1, 1) is non-negative and already sums to K = 2.
    alpha = apply(strategies.arml("nnls"), stats_from([[1, 1], [1, 0], [0, 1]]))
    assert_close(alpha, expected(1.0, 1.0, 1.0), atol=1e-12, rtol=0)


def test_nnls_exact_rescaled_to_sum_k() -> None:
    # g0 = 2 g1 + 2 g2: NNLS gives (2, 2), rescaled so that the sum is K = 2.
    alpha = apply(strategies.arml("nnls"), stats_from([[2, 2], [1, 0], [0, 1]]))
    assert_close(alpha, expected(1.0, 1.0, 1.0), atol=1e-12, rtol=0)


def test_nnls_exact_opposed_source_gets_zero() -> None:
    # g3 = -g0 only hurts: NNLS (1, 1, 0), rescaled to sum K = 3 -> (1.5, 1.5, 0).
    alpha = apply(strategies.arml("nnls"), stats_from([[1, 1], [1, 0], [0, 1], [-1, -1]]))
    assert_close(alpha, expected(1.0, 1.5, 1.5, 0.0), atol=1e-12, rtol=0)
    assert float(alpha[3]) == 0.0
    # K = 2 with one opposed source: ||(1 - a1 + a2, 1 + a2)|| is minimal at (1, 0) -> (2, 0).
    alpha = apply(strategies.arml("nnls"), stats_from([[1, 1], [1, 0], [-1, -1]]))
    assert_close(alpha, expected(1.0, 2.0, 0.0), atol=1e-12, rtol=0)


def test_nnls_all_zero_keeps_previous_weights() -> None:
    # Every source opposed to the target: the NNLS solution is 0, so alpha stays at its 1s.
    alpha = apply(strategies.arml("nnls"), stats_from([[1, 0], [-1, 0], [-2, 0]]))
    assert_close(alpha, expected(1.0, 1.0, 1.0))


def test_sgd_exact_step_with_shift() -> None:
    # g0 = (3, 1), g1 = (1, 0), g2 = (0, 1), alpha = (1, 1): residual r = g0 - g1 - g2 = (2, 0);
    # dJ/dalpha_k = -2 <r, g_k> = (-4, 0); lr = 0.25 -> (2, 1); shift (2 - 3) / 2 -> (1.5, 0.5).
    strategy = strategies.arml("sgd", update_every=1, lr=0.25)
    alpha = apply(strategy, stats_from([[3, 1], [1, 0], [0, 1]]))
    assert_close(alpha, expected(1.0, 1.5, 0.5))


def test_sgd_exact_step_with_clip() -> None:
    # g0 = (1, 1), g1 = (1, 0), g2 = (-1, 0): r = (1, 1), dJ/dalpha = (-2, 2).
    stats = stats_from([[1, 1], [1, 0], [-1, 0]])
    # lr = 0.05 (the default): (1.1, 0.9), sum already K = 2.
    assert_close(apply(strategies.arml("sgd", update_every=1), stats), expected(1.0, 1.1, 0.9))
    # lr = 1: (3, -1), sum 2 (no shift), clipped at 0 -> (3, 0).
    alpha = apply(strategies.arml("sgd", update_every=1, lr=1.0), stats)
    assert_close(alpha, expected(1.0, 3.0, 0.0))


def test_sgd_two_consecutive_steps() -> None:
    strategy = strategies.arml("sgd", update_every=1, lr=0.25)
    stats = stats_from([[3, 1], [1, 0], [0, 1]])
    alpha, state = strategy.update(stats, strategy.init(3))
    assert_close(alpha, expected(1.0, 1.5, 0.5))
    # r = (3, 1) - (1.5, 0.5) = (1.5, 0.5); step (2.25, 0.75); sum 3, shift -0.5 -> (1.75, 0.25).
    alpha, state = strategy.update(stats, state)
    assert_close(alpha, expected(1.0, 1.75, 0.25))
    assert int(state["count"]) == 2


@pytest.mark.parametrize("variant", ["nnls", "sgd"])
def test_update_cadence_constant_between_updates(variant: str) -> None:
    strategy = strategies.arml(variant, update_every=3, lr=0.25)  # type: ignore[arg-type]
    first = stats_from([[3, 1], [1, 0], [0, 1]])
    other = stats_from([[1, 1], [1, 0], [-1, -1]])
    state = strategy.init(3)
    alpha0, state = strategy.update(first, state)  # count 0: an update step
    assert not torch.equal(alpha0, expected(1.0, 1.0, 1.0))
    for _ in range(2):  # counts 1, 2: constant even though the statistics changed
        alpha, state = strategy.update(other, state)
        assert_close(alpha, alpha0)
    alpha3, state = strategy.update(other, state)  # count 3: updated again
    assert not torch.equal(alpha3, alpha0)
    assert int(state["count"]) == 4


@pytest.mark.parametrize("variant", ["nnls", "sgd"])
def test_absent_sources_get_zero_and_are_excluded(variant: str) -> None:
    strategy = strategies.arml(variant, update_every=1, lr=0.25)  # type: ignore[arg-type]
    # Source 2 is absent (its bogus gradient must be ignored); K = 2 present auxiliaries.
    stats = stats_from([[3, 1], [1, 0], [5, 5], [0, 1]], present=[True, True, False, True])
    alpha, state = strategy.update(stats, strategy.init(4))
    if variant == "sgd":
        assert_close(alpha, expected(1.0, 1.5, 0.0, 0.5))
    else:  # NNLS (3, 1), rescaled to sum 2
        assert_close(alpha, expected(1.0, 1.5, 0.0, 0.5), atol=1e-12, rtol=0)
    assert float(state["weights"][2]) == 1.0  # the absent source keeps its stored weight


def test_state_is_not_mutated_in_place() -> None:
    strategy = strategies.arml("sgd", update_every=1)
    state = strategy.init(3)
    before = {k: v.clone() for k, v in state.items()}
    strategy.update(stats_from([[3, 1], [1, 0], [0, 1]]), state)
    for key, value in before.items():
        assert torch.equal(state[key], value), key


# --------------------------------------------------------------------------- NNLS solver


def brute_force_nnls(gram: torch.Tensor, rhs: torch.Tensor) -> float:
    """Minimum of x^T G x - 2 b^T x over x >= 0, by trying every support."""
    k = rhs.shape[0]
    best = 0.0
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = torch.tensor(support)
            x = torch.zeros(k, dtype=F64)
            x[idx] = torch.linalg.pinv(gram[idx][:, idx], hermitian=True) @ rhs[idx]
            if bool((x >= 0).all()):
                best = min(best, float(x @ gram @ x - 2 * rhs @ x))
    return best


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(2, 5), st.integers(1, 5)),
        elements=st.integers(-10, 10).map(lambda n: n / 4),  # exact Gram, no denormals
    )
)
def test_nnls_gram_is_optimal(grads: np.ndarray) -> None:
    g = torch.from_numpy(grads)
    gram = g @ g.T
    g_aa, g_a0 = gram[1:, 1:], gram[1:, 0]
    x = nnls_gram(g_aa, g_a0)
    assert bool((x >= 0).all())
    value = float(x @ g_aa @ x - 2 * g_a0 @ x)
    scale = 1.0 + float(gram.abs().max())
    assert value <= brute_force_nnls(g_aa, g_a0) + 1e-9 * scale


# --------------------------------------------------------------------------- purpose


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "strategy",
    [strategies.arml("nnls", update_every=5), strategies.arml("sgd", update_every=1, lr=0.002)],
    ids=["nnls", "sgd"],
)
def test_purpose_prefers_helpful_source(strategy: Strategy, seed: int) -> None:
    alpha = train_helpful_vs_harmful(strategy, steps=20, seed=seed)
    assert float(alpha[0]) == 1.0
    assert float(alpha[1]) > 1.0 > float(alpha[2])
    assert float(alpha[1]) > float(alpha[2])


# --------------------------------------------------------------------------- params, registry


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"variant": "adam"}, "variant"),
        ({"update_every": 0}, "update_every"),
        ({"update_every": 2.5}, "update_every"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_bad_params(params: dict[str, object], fragment: str) -> None:
    with pytest.raises(StrategyError, match=fragment):
        strategies.arml(**params)  # type: ignore[arg-type]


def test_registry_builds_arml() -> None:
    assert "arml" in strategies.names()
    strategy = strategies.get("arml", {"variant": "sgd"})
    assert strategy.name == "arml"
    assert strategy.params == {"variant": "sgd", "update_every": 20, "lr": 0.05}
    alpha = apply(strategy, stats_from([[1, 1], [1, 0], [-1, 0]]))
    assert_close(alpha, expected(1.0, 1.1, 0.9))
    default = strategies.get("arml")
    assert default.params["variant"] == "nnls"
