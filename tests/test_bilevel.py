"""AuxiLearn and AuxiNash: the held-out target hypergradient, hand-checked updates, purpose."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from auxilia.errors import EngineError, StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.auxilearn import auxilearn
from auxilia.strategies.auxinash import auxinash
from auxilia.strategies.nash_mtl import nash_solve
from helpful_vs_harmful import train_helpful_vs_harmful

F64 = torch.float64


def stats(
    validation: list[float],
    gram: list[list[float]] | None = None,
    losses: list[float] | None = None,
    present: list[bool] | None = None,
) -> Statistics:
    num = len(validation)
    g = None if gram is None else torch.tensor(gram, dtype=F64)
    return Statistics(
        present=torch.ones(num, dtype=torch.bool) if present is None else torch.tensor(present),
        losses=None if losses is None else torch.tensor(losses, dtype=F64),
        target_row=None if g is None else g[0].clone(),
        gram=g,
        validation_row=torch.tensor(validation, dtype=F64),
    )


# ------------------------------------------------------------------------------ auxilearn


def test_auxilearn_linear_one_meta_step_by_hand() -> None:
    strategy = auxilearn(update_every=1, meta_lr=0.1, momentum=0.0, weight_decay=0.0, clip=0.0)
    assert strategy.needs == frozenset({Need.VALIDATION})
    alpha, state = strategy.update(stats([9.0, 0.5, -0.2]), strategy.init(3))
    # ∂L_val/∂φ = -(0.5, -0.2); φ = 1 - 0.1 (-0.5, 0.2) = (1.05, 0.98)
    assert_close(alpha, torch.tensor([1.0, 1.05, 0.98], dtype=F64))
    # Momentum 0.9 on a second identical step: velocity 1.9 g.
    strategy = auxilearn(update_every=1, meta_lr=0.1, weight_decay=0.0, clip=0.0)
    state = strategy.init(3)
    _, state = strategy.update(stats([0.0, 0.5, -0.2]), state)
    alpha, _ = strategy.update(stats([0.0, 0.5, -0.2]), state)
    assert_close(alpha, torch.tensor([1.0, 1.0 + 0.05 + 0.095, 1.0 - 0.02 - 0.038], dtype=F64))


def test_auxilearn_clip_accumulation_clamp_and_cadence() -> None:
    strategy = auxilearn(update_every=2, meta_lr=0.1, momentum=0.0, weight_decay=0.0, clip=0.1)
    state = strategy.init(3)
    alpha, state = strategy.update(stats([0.0, 0.3, 0.4]), state)
    assert_close(alpha, torch.tensor([1.0, 1.0, 1.0], dtype=F64))  # no update on step 1
    alpha, state = strategy.update(stats([0.0, 0.9, 0.0]), state)
    # mean hypergradient -(0.6, 0.2), norm 0.632 > 0.1: scaled to norm 0.1
    g = torch.tensor([-0.6, -0.2], dtype=F64)
    expected = 1.0 - 0.1 * g * (0.1 / math.sqrt(0.4))
    assert_close(alpha[1:], expected)
    strategy = auxilearn(update_every=1, meta_lr=0.1, momentum=0.0, weight_decay=0.0, clip=0.0)
    alpha, _ = strategy.update(stats([0.0, 1.0, -20.0]), strategy.init(3))
    assert_close(alpha, torch.tensor([1.0, 1.1, 0.0], dtype=F64))  # clamped at 0: monotone


def test_auxilearn_absent_source_gets_zero_and_no_hypergradient() -> None:
    strategy = auxilearn(update_every=1, meta_lr=0.1, momentum=0.0, weight_decay=0.0, clip=0.0)
    step = stats([0.0, 0.5, 3.0], present=[True, True, False])
    alpha, _ = strategy.update(step, strategy.init(3))
    assert_close(alpha, torch.tensor([1.0, 1.05, 0.0], dtype=F64))


def test_auxilearn_mlp_coefficients_are_the_combiner_derivatives() -> None:
    strategy = auxilearn(combiner="mlp", hidden=4, update_every=1000, seed=3)
    state = strategy.init(3)
    losses = [0.7, 1.3, 0.4]
    alpha, _ = strategy.update(stats([0.0, 0.0, 0.0], losses=losses), state)
    w0, b0, w1 = state["phi.w0"], state["phi.b0"], state["phi.w1"]

    def net(x: torch.Tensor) -> float:
        return float(w1 @ torch.nn.functional.softplus(w0 @ x + b0))

    x = torch.tensor(losses[1:], dtype=F64)
    for k in range(2):
        step = torch.zeros(2, dtype=F64)
        step[k] = 1e-6
        numeric = (net(x + step) - net(x - step)) / 2e-6
        assert float(alpha[k + 1]) == pytest.approx(numeric, rel=1e-6)
        assert float(alpha[k + 1]) > 0  # monotone combiner


def test_auxilearn_mlp_hypergradient_matches_finite_differences() -> None:
    strategy = auxilearn(
        combiner="mlp",
        hidden=3,
        update_every=1,
        meta_lr=1e-3,
        momentum=0.0,
        weight_decay=0.0,
        clip=0.0,
        seed=1,
    )
    state = strategy.init(3)
    row = [0.0, 0.8, -0.5]
    losses = [0.5, 1.0, 2.0]
    _, new = strategy.update(stats(row, losses=losses), state)

    def objective(w0: torch.Tensor) -> float:
        s = dict(state)
        s["phi.w0"] = w0
        probe = auxilearn(combiner="mlp", hidden=3, update_every=10**6, seed=1)
        a, _ = probe.update(stats(row, losses=losses), s)
        return -float((torch.tensor(row[1:], dtype=F64) * a[1:]).sum())

    w0 = state["phi.w0"]
    i, j = 1, 0
    step = torch.zeros_like(w0)
    step[i, j] = 1e-6
    numeric = (objective(w0 + step) - objective(w0 - step)) / 2e-6
    taken = float((w0 - new["phi.w0"])[i, j]) / 1e-3
    if float(new["phi.w0"][i, j]) > 0:  # not clamped
        assert taken == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_auxilearn_purpose_helpful_above_harmful() -> None:
    alpha = train_helpful_vs_harmful(auxilearn(), steps=100)
    assert alpha[1] > alpha[2]
    alpha = train_helpful_vs_harmful(auxilearn(update_every=5, meta_lr=0.1), steps=100)
    assert alpha[1] > 1.0 > alpha[2]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"combiner": "cnn"}, "combiner"),
        ({"hidden": 0}, "hidden"),
        ({"update_every": 0}, "update_every"),
        ({"meta_lr": -1.0}, "meta_lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"clip": float("inf")}, "clip"),
    ],
)
def test_auxilearn_parameter_errors(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(StrategyError, match=key):
        auxilearn(**kwargs)  # type: ignore[arg-type]


def test_validation_losses_are_required() -> None:
    from auxilia.engine import Engine

    model = torch.nn.Linear(2, 1).to(F64)
    engine = Engine(model.parameters(), strategy=auxilearn(), num_sources=2)
    losses = model(torch.ones(4, 2, dtype=F64)).squeeze(1)
    with pytest.raises(EngineError, match="needs held-out target losses"):
        engine.backward(losses, torch.tensor([0, 0, 1, 1]))


# ------------------------------------------------------------------------------- auxinash


def test_nash_solve_orthogonal_by_hand() -> None:
    # α_i² m_i = p_i for a diagonal M.
    ones = torch.ones(2, dtype=F64)
    alpha = nash_solve(torch.diag(torch.tensor([1.0, 4.0], dtype=F64)), ones)
    assert alpha is not None
    assert_close(alpha, torch.tensor([1.0, 0.5], dtype=F64))
    powers = torch.tensor([2.0, 0.5], dtype=F64)
    alpha = nash_solve(torch.diag(torch.tensor([2.0, 8.0], dtype=F64)), ones, powers)
    assert alpha is not None
    assert_close(alpha, torch.tensor([1.0, 0.25], dtype=F64))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.integers(1, 6),
    start=st.sampled_from([None, 1e-3, 50.0]),
)
def test_nash_solve_satisfies_the_bargaining_condition(
    seed: int, size: int, start: float | None
) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(size, size + 2, generator=gen, dtype=F64)
    gram = g @ g.T + 1e-3 * torch.eye(size, dtype=F64)
    powers = torch.rand(size, generator=gen, dtype=F64) * 3 + 0.01
    init = torch.ones(size, dtype=F64) if start is None else torch.full((size,), start, dtype=F64)
    alpha = nash_solve(gram, init, powers)
    assert alpha is not None
    assert bool((alpha > 0).all())
    assert_close(alpha * (gram @ alpha), powers, rtol=1e-7, atol=1e-9)


def test_auxinash_coefficients_and_power_update_by_hand() -> None:
    # g_0 = (1, 0), g_1 = (0, 2): M = diag(1, 4), ‖M‖_F = √17, M̃ = M / √17.
    strategy = auxinash(update_every=1, meta_lr=0.1, momentum=0.0, ridge=0.0)
    gram = [[1.0, 0.0], [0.0, 4.0]]
    alpha, state = strategy.update(stats([0.0, 0.4], gram=gram), strategy.init(2))
    m = torch.tensor([1.0, 4.0], dtype=F64) / math.sqrt(17.0)
    assert_close(alpha, (1.0 / m).sqrt())  # α_i = √(p_i / m̃_i) with p = 1
    # dα_i/dp_i = 1 / (2 √(p_i m̃_i)); ∂L_val/∂α = -(0, 0.4)
    grad = -torch.tensor([0.0, 0.4], dtype=F64) / (2 * m.sqrt())
    grad = grad / grad.norm() if float(grad.norm()) > 1 else grad
    powers = 1.0 - 0.1 * grad
    assert_close(state["powers"], powers * (2 / powers.sum()))
    assert float(state["powers"][1]) > float(state["powers"][0])  # the more helpful one gains


def test_auxinash_absent_and_degenerate() -> None:
    strategy = auxinash(ridge=0.0)
    gram = [[1.0, 0.0, 5.0], [0.0, 1.0, 5.0], [5.0, 5.0, 50.0]]
    alpha, _ = strategy.update(
        stats([0.0, 0.0, 0.0], gram=gram, present=[True, True, False]), strategy.init(3)
    )
    assert float(alpha[2]) == 0.0
    assert_close(alpha[:2], torch.full((2,), 2.0**0.25, dtype=F64))  # M̃ = I/√2
    strategy = auxinash()
    zero = [[0.0] * 3 for _ in range(3)]
    alpha, _ = strategy.update(stats([0.0, 0.0, 0.0], gram=zero), strategy.init(3))
    assert bool(torch.isfinite(alpha).all())
    opposed = [[1.0, -1.0], [-1.0, 1.0]]  # collinear, opposed: the ridge keeps it solvable
    alpha, _ = strategy.update(stats([0.0, 0.0], gram=opposed), strategy.init(2))
    assert bool(torch.isfinite(alpha).all())
    assert bool((alpha > 0).all())


def test_auxinash_purpose_helpful_above_harmful() -> None:
    alpha = train_helpful_vs_harmful(auxinash(), steps=100)
    assert alpha[1] > alpha[2]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"update_every": 0}, "update_every"),
        ({"meta_lr": -1.0}, "meta_lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"min_power": 0.0}, "min_power"),
        ({"ridge": float("nan")}, "ridge"),
    ],
)
def test_auxinash_parameter_errors(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(StrategyError, match=key):
        auxinash(**kwargs)  # type: ignore[arg-type]
