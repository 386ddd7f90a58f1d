"""Gradient surgery and TAWT: pcgrad, pcgrad-aux and tawt.

Hand-checked updates, direct implementations on explicit gradient vectors under hypothesis,
invariances, absent sources, degenerate inputs, state round-trips, parameter errors and
purpose tests. ``pcgrad`` is a symmetric multi-task baseline (the target is one more task) and
is exempt from the helpful-above-harmful test; it is tested for what it exists for: after
projection no two tasks' gradients conflict. ``pcgrad-aux`` and ``tawt`` are target-aware and
must favour the helpful source over the harmful one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy
from auxilia.strategies.pcgrad import pcgrad, project_gram
from auxilia.strategies.pcgrad_aux import pcgrad_aux
from auxilia.strategies.tawt import tawt
from helpful_vs_harmful import train_helpful_vs_harmful
from strategy_checks import (
    apply,
    assert_not_mutated,
    assert_round_trip,
    expected,
    stats_from,
)

F64 = torch.float64
PROPERTY = settings(max_examples=40, deadline=None)
SQRT1_2 = 1.0 / math.sqrt(2.0)


def combined(alpha: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The engine's direction Σ_k α_k g_k."""
    return alpha @ grads.to(F64)


def random_sequence(num: int, steps: int, seed: int) -> list[Statistics]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        present = torch.ones(num, dtype=torch.bool)
        present[1 + i % (num - 1)] = i % 3 != 0
        grads = torch.randn(num, 4, generator=gen, dtype=F64) * present.unsqueeze(1)
        out.append(stats_from(grads, present))
    return out


@st.composite
def gradient_matrices(draw: st.DrawFn, min_sources: int = 2, max_sources: int = 6) -> torch.Tensor:
    """A random [K+1, D] gradient matrix on a grid of quarters (exact Gram, no denormals)."""
    num = draw(st.integers(min_sources, max_sources))
    dim = draw(st.integers(1, 5))
    elements = st.integers(-12, 12).map(lambda n: n / 4)
    return torch.from_numpy(draw(hnp.arrays(np.float64, (num, dim), elements=elements)))


def recording(strategy: Strategy) -> tuple[Strategy, list[tuple[Statistics, torch.Tensor]]]:
    """The same strategy, keeping every step's statistics and coefficients."""
    log: list[tuple[Statistics, torch.Tensor]] = []

    def update(stats: Statistics, state: State) -> tuple[torch.Tensor, State]:
        alpha, state = strategy.update(stats, state)
        log.append((stats, alpha))
        return alpha, state

    wrapped = Strategy(strategy.name, strategy.needs, strategy.init, update, strategy.params)
    return wrapped, log


# =========================================================================== pcgrad


def vector_pcgrad(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Yu et al.'s Algorithm 1 on explicit vectors: d = Σ_i g_i' with the given orders."""
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0 and grads[j] @ grads[j] > 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


def all_order_choices(num: int) -> list[list[list[int]]]:
    per_task = [
        [list(p) for p in itertools.permutations([j for j in range(num) if j != i])]
        for i in range(num)
    ]
    return [list(choice) for choice in itertools.product(*per_task)]


def test_pcgrad_needs_params_and_state() -> None:
    strategy = pcgrad()
    assert strategy.name == "pcgrad"
    assert strategy.needs == frozenset({Need.GRAM})
    assert strategy.params == {"seed": 0}
    state = strategy.init(3)
    assert state["rng"].dtype == torch.uint8


def test_pcgrad_exact_two_tasks() -> None:
    # g0 = (1, 0), g1 = (-1, 1), <g0, g1> = -1. g0' = g0 + (1/2) g1 = (0.5, 0.5) and
    # g1' = g1 + g0 = (0, 1); d = (0.5, 1.5) = 2 g0 + 1.5 g1.
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    alpha = apply(pcgrad(), stats_from(grads))
    assert_close(alpha, expected(2.0, 1.5))
    assert_close(combined(alpha, grads), expected(0.5, 1.5))
    # Without conflict nothing is projected: alpha = 1 everywhere.
    assert_close(apply(pcgrad(), stats_from([[1.0, 0.0], [1.0, 1.0]])), expected(1.0, 1.0))


def test_pcgrad_exact_three_tasks_order_matters() -> None:
    # g0 = (1, 0), g1 = (0, 1), g2 = (-1, -1). g2 conflicts with both; in either order it is
    # projected to 0 (c2 = (1, 1, 1)). g0 meets g1 (no conflict) and g2 (dot -1, + g2/2):
    # order (g1, g2) gives (0.5, -0.5), c0 = (1, 0, 0.5); order (g2, g1) then finds
    # <(0.5, -0.5), g1> = -0.5 and adds g1/2: c0 = (1, 0.5, 0.5). Symmetrically
    # c1 = (0, 1, 0.5) or (0.5, 1, 0.5). So alpha = (2, 2, 2) + 0.5 e_0 or not + 0.5 e_1 or not.
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=F64)
    stats = stats_from(grads)
    possible = {(2.0, 2.0, 2.0), (2.5, 2.0, 2.0), (2.0, 2.5, 2.0), (2.5, 2.5, 2.0)}
    seen = set()
    for seed in range(24):
        alpha = apply(pcgrad(seed=seed), stats)
        key = tuple(round(float(a), 12) for a in alpha)
        assert key in possible
        seen.add(key)
        assert torch.equal(alpha, apply(pcgrad(seed=seed), stats))  # same seed, same orders
    assert len(seen) > 1  # the order is random


@PROPERTY
@given(grads=gradient_matrices(max_sources=5), data=st.data())
def test_pcgrad_gram_equals_vector_projection(grads: torch.Tensor, data: st.DataObject) -> None:
    num = grads.shape[0]
    orders = [data.draw(st.permutations([j for j in range(num) if j != i])) for i in range(num)]
    rows = project_gram(grads @ grads.T, orders)
    direction = rows.sum(dim=0) @ grads
    scale = 1.0 + float(grads.abs().max()) ** 2
    assert_close(direction, vector_pcgrad(grads, orders), atol=1e-9 * scale, rtol=1e-9)


@PROPERTY
@given(grads=gradient_matrices(max_sources=3), seed=st.integers(0, 2**32))
def test_pcgrad_strategy_is_vector_pcgrad_for_some_order(grads: torch.Tensor, seed: int) -> None:
    num = grads.shape[0]
    direction = combined(apply(pcgrad(seed=seed), stats_from(grads)), grads)
    scale = 1.0 + float(grads.abs().max()) ** 2
    candidates = [vector_pcgrad(grads, orders) for orders in all_order_choices(num)]
    assert any(torch.allclose(direction, c, atol=1e-9 * scale, rtol=1e-9) for c in candidates)


@PROPERTY
@given(grads=gradient_matrices(min_sources=2, max_sources=2))
def test_pcgrad_purpose_no_conflict_left_for_two_tasks(grads: torch.Tensor) -> None:
    """PCGrad is a symmetric baseline, exempt from the helpful-above-harmful test. What it is
    for: after projection the two tasks' gradients no longer conflict, with each other nor
    with the other task's original gradient."""
    gram = grads @ grads.T
    rows = project_gram(gram, [[1], [0]])
    scale = 1.0 + float(gram.abs().max()) ** 2
    tol = 1e-12 * scale
    assert float(rows[0] @ gram @ rows[1]) >= -tol  # <g0', g1'> >= 0
    assert float(rows[0] @ gram[:, 1]) >= -tol  # <g0', g1> >= 0
    assert float(rows[1] @ gram[:, 0]) >= -tol  # <g1', g0> >= 0
    # The combined direction is then no worse than orthogonal to either task.
    alpha = apply(pcgrad(), stats_from(grads))
    d = combined(alpha, grads)
    assert float(d @ grads[0]) >= -tol
    assert float(d @ grads[1]) >= -tol


@PROPERTY
@given(grads=gradient_matrices(), seed=st.integers(0, 100), scale=st.sampled_from([0.25, 4.0]))
def test_pcgrad_scale_invariant(grads: torch.Tensor, seed: int, scale: float) -> None:
    # Scaling every gradient by c scales the Gram by c^2: the projections (ratios) stay put.
    base = apply(pcgrad(seed=seed), stats_from(grads))
    assert_close(apply(pcgrad(seed=seed), stats_from(grads * scale)), base, atol=1e-12, rtol=0)


def test_pcgrad_two_tasks_swap() -> None:
    grads = torch.tensor([[2.0, 1.0], [-1.0, 0.5]], dtype=F64)
    alpha = apply(pcgrad(), stats_from(grads))
    assert_close(apply(pcgrad(), stats_from(grads.flip(0))), alpha.flip(0))


def test_pcgrad_absent_sources_take_no_part() -> None:
    # Source 1 is absent; its entries hold garbage that must be ignored. Over the present
    # sources g0 = (1, 0), g2 = (-1, 1) this is the two-task case above: (2, 1.5).
    g = torch.tensor([[1.0, 0.0], [-5.0, -5.0], [-1.0, 1.0]], dtype=F64)
    alpha = apply(pcgrad(), stats_from(g, present=[True, False, True]))
    assert_close(alpha, expected(2.0, 0.0, 1.5))
    # An absent target: the auxiliaries are projected among themselves only.
    alpha = apply(pcgrad(), stats_from(g, present=[False, True, True]))
    assert float(alpha[0]) == 0.0


@pytest.mark.parametrize(
    ("grads", "present", "result"),
    [
        ([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], None, (1.0, 1.0, 1.0)),  # all zero
        (
            [[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]],
            None,
            (2.0, 1.0, 2.0),
        ),  # one zero gradient; g0, g2 cancel
        ([[1.0, 2.0], [3.0, 4.0]], [False, True], (0.0, 1.0)),  # a single present source
        ([[1.0, 2.0], [3.0, 4.0]], [False, False], (0.0, 0.0)),  # none present
    ],
)
def test_pcgrad_degenerate_inputs(
    grads: list[list[float]], present: list[bool] | None, result: tuple[float, ...]
) -> None:
    assert_close(apply(pcgrad(), stats_from(grads, present)), expected(*result))


def test_pcgrad_random_state_round_trip() -> None:
    sequence = [stats_from([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])] * 12
    assert_round_trip(pcgrad(seed=7), sequence, split=5)
    assert_round_trip(pcgrad(seed=1), random_sequence(4, 10, seed=0), split=3)
    assert_not_mutated(pcgrad(), sequence[0])
    # The orders change from step to step: one seed visits several of the four outcomes.
    strategy = pcgrad(seed=3)
    state = strategy.init(3)
    outcomes = set()
    for stats in sequence:
        alpha, state = strategy.update(stats, state)
        outcomes.add(tuple(alpha.tolist()))
    assert len(outcomes) > 1


# =========================================================================== pcgrad-aux


def vector_pcgrad_aux(grads: torch.Tensor, lam: float) -> torch.Tensor:
    """d = g0 + Σ_k λ (g_k − min(0, <g_k, g0>)/‖g0‖² g0) on explicit vectors."""
    g0 = grads[0]
    d = g0.clone()
    for g in grads[1:]:
        dot = float(g @ g0)
        norm2 = float(g0 @ g0)
        d = d + lam * (g - (min(0.0, dot) / norm2 * g0 if norm2 > 0 else 0.0))
    return d


def test_pcgrad_aux_needs_and_params() -> None:
    strategy = pcgrad_aux()
    assert strategy.name == "pcgrad-aux"
    assert strategy.needs == frozenset({Need.TARGET_ROW})
    assert strategy.params == {"weight": 1.0}
    assert isinstance(strategy.params["weight"], float)


def test_pcgrad_aux_exact() -> None:
    # g0 = (1, 0); g1 = (1, 1) agrees, g2 = (-1, 0) and g3 = (-1, 1) conflict (<g_k, g0> = -1).
    # lam = 1: alpha0 = 1 - (-1 - 1) / 1 = 3, alpha_k = 1. By vectors: g1 kept, g2 + g0 = (0, 0),
    # g3 + g0 = (0, 1); d = (1, 0) + (1, 1) + (0, 0) + (0, 1) = (2, 2) = 3 g0 + g1 + g2 + g3.
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    alpha = apply(pcgrad_aux(), stats_from(grads))
    assert_close(alpha, expected(3.0, 1.0, 1.0, 1.0))
    assert_close(combined(alpha, grads), expected(2.0, 2.0))
    # lam = 0.5: alpha0 = 1 + 0.5 * 2 = 2.
    assert_close(apply(pcgrad_aux(weight=0.5), stats_from(grads)), expected(2.0, 0.5, 0.5, 0.5))
    # A longer target, g0 = (2, 0): <g_k, g0> = (2, -2, -2), ‖g0‖² = 4, alpha0 = 1 + 4/4 = 2.
    grads[0] = torch.tensor([2.0, 0.0])
    assert_close(apply(pcgrad_aux(), stats_from(grads)), expected(2.0, 1.0, 1.0, 1.0))
    # lam = 0: the target alone.
    assert_close(apply(pcgrad_aux(weight=0.0), stats_from(grads)), expected(1.0, 0.0, 0.0, 0.0))


@PROPERTY
@given(grads=gradient_matrices(), lam=st.floats(0.0, 3.0))
def test_pcgrad_aux_equals_vector_surgery(grads: torch.Tensor, lam: float) -> None:
    alpha = apply(pcgrad_aux(weight=lam), stats_from(grads))
    scale = 1.0 + float(grads.abs().max()) ** 2
    assert_close(
        combined(alpha, grads), vector_pcgrad_aux(grads, lam), atol=1e-9 * scale, rtol=1e-9
    )
    assert float(alpha[0]) >= 1.0  # the target's gradient is only ever scaled up
    assert bool((alpha[1:] == lam).all())


@PROPERTY
@given(grads=gradient_matrices(), lam=st.floats(0.0, 1.0))
def test_pcgrad_aux_never_against_the_target(grads: torch.Tensor, lam: float) -> None:
    stats = stats_from(grads)
    alpha = apply(pcgrad_aux(weight=lam), stats)
    g0 = grads[0]
    d = combined(alpha, grads)
    tol = 1e-9 * (1.0 + float(grads.abs().max()) ** 2)
    assert float(d @ g0) >= -tol
    # <d, g0> = ‖g0‖² + lam Σ_k max(0, <g_k, g0>): every conflicting part is gone.
    row = grads @ g0
    assert_close(d @ g0, row[0] + lam * row[1:].clamp_min(0).sum(), atol=tol, rtol=1e-9)
    # Each conflicting auxiliary, once projected, is orthogonal to g0.
    norm2 = float(g0 @ g0)
    assume(norm2 > 0)
    for k in range(1, grads.shape[0]):
        if float(row[k]) < 0:
            projected = grads[k] - float(row[k]) / norm2 * g0
            assert abs(float(projected @ g0)) <= tol


@PROPERTY
@given(grads=gradient_matrices(), data=st.data(), scale=st.sampled_from([0.25, 8.0]))
def test_pcgrad_aux_invariances(grads: torch.Tensor, data: st.DataObject, scale: float) -> None:
    strategy = pcgrad_aux(weight=0.7)
    alpha = apply(strategy, stats_from(grads))
    assert_close(apply(strategy, stats_from(grads * scale)), alpha, atol=1e-12, rtol=1e-12)
    perm = data.draw(st.permutations(list(range(1, grads.shape[0]))))
    order = torch.tensor([0, *perm])
    assert_close(apply(strategy, stats_from(grads[order])), alpha[order], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("lam", [1.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_aux_purpose_removes_harmful_conflict(lam: float, seed: int) -> None:
    strategy, log = recording(pcgrad_aux(weight=lam))
    alpha = train_helpful_vs_harmful(strategy, steps=20, seed=seed)
    stats, logged = log[-1]
    assert torch.equal(alpha, logged)
    row = stats.require(Need.TARGET_ROW)
    assert float(row[1]) > 0 > float(row[2])  # helpful agrees, harmful conflicts
    # The harmful source's conflicting component is removed: the correction on g0 cancels
    # exactly its inner product with g0, so it contributes 0 to <d, g0>, the helpful lam G10.
    assert_close(alpha[0] - 1.0, -lam * row[2] / row[0])
    inner = float(alpha @ row)  # <d, g0>
    assert inner >= float(row[0]) > 0
    assert_close(torch.tensor(inner, dtype=F64), row[0] + lam * row[1])
    # Credit: the helpful source adds to descent on the target, the harmful one nothing.
    helpful_credit = float(alpha[1] * row[1])
    harmful_credit = float(alpha[2] * row[2] + (alpha[0] - 1.0) * row[0])
    assert helpful_credit > 0
    assert abs(harmful_credit) < 1e-9 * float(row[0])


def test_pcgrad_aux_absent_and_degenerate() -> None:
    g = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [-1.0, 0.0]], dtype=F64)
    # The absent source's conflict is not counted: alpha0 = 1 + 1 = 2.
    alpha = apply(pcgrad_aux(), stats_from(g, present=[True, False, True]))
    assert_close(alpha, expected(2.0, 0.0, 1.0))
    # Absent target: no projection, alpha0 = 0.
    alpha = apply(pcgrad_aux(), stats_from(g, present=[False, True, True]))
    assert_close(alpha, expected(0.0, 1.0, 1.0))
    # Zero target gradient: nothing to project on, alpha0 = 1.
    g[0] = 0.0
    assert_close(apply(pcgrad_aux(), stats_from(g)), expected(1.0, 1.0, 1.0))
    # Target only, and a tiny target gradient against a huge conflicting one: finite.
    assert_close(apply(pcgrad_aux(), stats_from([[1.0, 2.0]])), expected(1.0))
    tiny = stats_from(torch.tensor([[1e-200, 0.0], [-1e200, 0.0]], dtype=F64))
    assert bool(torch.isfinite(apply(pcgrad_aux(), tiny)).all())


# =========================================================================== tawt

HAND_G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], dtype=F64)  # cos = (1, 1/√2, -1)


def test_tawt_needs_params_and_initial_weights() -> None:
    strategy = tawt()
    assert strategy.name == "tawt"
    assert strategy.needs == frozenset({Need.TARGET_ROW, Need.NORMS})
    assert strategy.params == {"variant": "joint", "lr": 1.0, "update_every": 100}
    assert isinstance(strategy.params["lr"], float)
    assert_close(strategy.init(4)["omega"], torch.full((4,), 0.25, dtype=F64))
    assert_close(tawt("pre-training").init(3)["omega"], expected(0.0, 0.5, 0.5))


def test_tawt_joint_exact() -> None:
    # cos = (1, 1/√2, -1). ω ∝ (1/3)(e, e^0.7071, e^-1) = (2.718282, 2.028115, 0.367879) / 5.114276
    # and alpha = 3 ω = (1.594526, 1.189679, 0.215796).
    strategy = tawt(update_every=1)
    stats = stats_from(HAND_G)
    alpha, state = strategy.update(stats, strategy.init(3))
    assert_close(alpha, expected(1.5945258106343776, 1.1896785871553293, 0.21579560221029295))
    assert_close(state["omega"].sum(), torch.tensor(1.0, dtype=F64))
    # A second update multiplies by the same factors: ω ∝ (e^2, e^1.4142, e^-2).
    alpha, _ = strategy.update(stats, state)
    assert_close(alpha, expected(1.904781806497371, 1.0603308977729924, 0.0348872957296366))


def test_tawt_pre_training_exact() -> None:
    # Over the auxiliaries only: ω ∝ (e^0.7071, e^-1) = (2.028115, 0.367879) / 2.395994,
    # alpha = 2 ω = (1.692921, 0.307079); the target keeps alpha0 = 1.
    alpha = apply(tawt("pre-training", update_every=1), stats_from(HAND_G))
    assert_close(alpha, expected(1.0, 1.6929212875724244, 0.3070787124275756))


def test_tawt_update_cadence() -> None:
    strategy = tawt(update_every=3)
    first = stats_from(HAND_G)
    other = stats_from([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])  # would reverse the weights
    state = strategy.init(3)
    alpha0, state = strategy.update(first, state)  # count 0: an update, the first step included
    assert_close(alpha0, expected(1.5945258106343776, 1.1896785871553293, 0.21579560221029295))
    for _ in range(2):  # counts 1, 2: constant whatever the statistics
        alpha, state = strategy.update(other, state)
        assert torch.equal(alpha, alpha0)
    alpha3, state = strategy.update(other, state)  # count 3: updated again
    assert float(alpha3[2]) > float(alpha0[2])
    assert int(state["count"]) == 4


def vector_tawt(grads_per_update: list[torch.Tensor], lr: float, joint: bool) -> list[np.ndarray]:
    """The TAWT code's weight loop (numpy): ĝ_t = -cos(g_target, g_t), ω ← ω e^{-η ĝ} / Σ."""
    num = grads_per_update[0].shape[0]
    tasks = list(range(num)) if joint else list(range(1, num))
    weights = np.full(len(tasks), 1.0 / len(tasks))
    out = []
    for grads in grads_per_update:
        g = grads.numpy()
        target = g[0]
        cos = []
        for t in tasks:
            denominator = np.linalg.norm(target) * np.linalg.norm(g[t])
            cos.append(np.dot(target, g[t]) / denominator if denominator > 0 else 0.0)
        gradient = -np.array(cos)
        weights = weights * np.exp(-lr * gradient)
        weights = weights / weights.sum()
        alpha = weights * len(tasks)
        out.append(alpha if joint else np.concatenate([[1.0], alpha]))
    return out


@PROPERTY
@given(
    data=st.data(),
    num=st.integers(2, 5),
    lr=st.sampled_from([0.1, 1.0, 3.0]),
    joint=st.booleans(),
)
def test_tawt_matches_code_loop(data: st.DataObject, num: int, lr: float, joint: bool) -> None:
    steps = data.draw(st.integers(1, 4))
    elements = st.integers(-12, 12).map(lambda n: n / 4)
    grads = [
        torch.from_numpy(data.draw(hnp.arrays(np.float64, (num, 3), elements=elements)))
        for _ in range(steps)
    ]
    strategy = tawt("joint" if joint else "pre-training", lr=lr, update_every=1)
    state = strategy.init(num)
    for g, reference in zip(grads, vector_tawt(grads, lr, joint), strict=True):
        alpha, state = strategy.update(stats_from(g), state)
        assert_close(alpha, torch.from_numpy(reference), atol=1e-12, rtol=1e-10)


@PROPERTY
@given(grads=gradient_matrices(), data=st.data(), scale=st.sampled_from([0.25, 8.0]))
def test_tawt_invariances(grads: torch.Tensor, data: st.DataObject, scale: float) -> None:
    num = grads.shape[0]
    perm = data.draw(st.permutations(list(range(1, num))))
    order = torch.tensor([0, *perm])
    for variant in ("joint", "pre-training"):
        strategy = tawt(variant, update_every=1)  # type: ignore[arg-type]
        alpha, state = strategy.update(stats_from(grads), strategy.init(num))
        # On the simplex, alpha sums to the number of weighted tasks, all >= 0.
        assert_close(state["omega"].sum(), torch.tensor(1.0, dtype=F64))
        assert bool((alpha >= 0).all())
        # Cosines ignore the gradients' scale; permuting auxiliaries permutes alpha.
        assert_close(apply(strategy, stats_from(grads * scale)), alpha, atol=1e-12, rtol=1e-12)
        assert_close(
            apply(strategy, stats_from(grads[order])), alpha[order], atol=1e-12, rtol=1e-12
        )
        # A source aligned with the target never gets less than one opposed to it.
        cos = stats_from(grads).cosines()
        for k, j in itertools.permutations(range(1, num), 2):
            if float(cos[k]) > float(cos[j]):
                assert float(alpha[k]) >= float(alpha[j])


@pytest.mark.parametrize("variant", ["joint", "pre-training"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("update_every", [100, 5])
def test_tawt_purpose_prefers_helpful_source(variant: str, seed: int, update_every: int) -> None:
    strategy = tawt(variant, update_every=update_every)  # type: ignore[arg-type]
    alpha = train_helpful_vs_harmful(strategy, steps=20, seed=seed)
    assert float(alpha[1]) > float(alpha[2])
    assert float(alpha[1]) > 2 * float(alpha[2])
    assert float(alpha[2]) < 1.0  # the harmful source lost weight from its initial 1


def test_tawt_absent_sources() -> None:
    strategy = tawt(update_every=1)
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]], dtype=F64)
    state = strategy.init(4)
    # Source 3 absent: it gets 0 and keeps ω = 1/4; the others share their mass 3/4.
    alpha, state = strategy.update(stats_from(grads, [True, True, True, False]), state)
    assert float(alpha[3]) == 0.0
    assert float(state["omega"][3]) == 0.25
    assert_close(
        state["omega"][:3],
        0.75
        * expected(2.718281828459045, 2.028114981647472, 0.36787944117144233)
        / 5.114276251277962,
    )
    # The absent target: alpha0 = 0 and ω does not move at all.
    before = state["omega"].clone()
    alpha, state = strategy.update(stats_from(grads, [False, True, True, True]), state)
    assert float(alpha[0]) == 0.0
    assert torch.equal(state["omega"], before)
    # Pre-training with the target absent: alpha0 = 0 too.
    alpha = apply(tawt("pre-training"), stats_from(grads, [False, True, True, True]))
    assert float(alpha[0]) == 0.0


def test_tawt_degenerate_inputs() -> None:
    # A zero target gradient: all cosines 0, ω unchanged, alpha = 1.
    zero_target = stats_from([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert_close(apply(tawt(update_every=1), zero_target), expected(1.0, 1.0, 1.0))
    # All zero; target only (pre-training has no auxiliary to weigh); a huge step size.
    assert_close(apply(tawt(), stats_from([[0.0], [0.0], [0.0]])), expected(1.0, 1.0, 1.0))
    assert_close(apply(tawt("pre-training"), stats_from([[1.0, 0.0]])), expected(1.0))
    assert_close(apply(tawt("joint"), stats_from([[1.0, 0.0]])), expected(1.0))
    strategy = tawt(lr=1e6, update_every=1)
    state = strategy.init(3)
    for _ in range(5):
        alpha, state = strategy.update(stats_from(HAND_G), state)
        assert bool(torch.isfinite(alpha).all())
    assert_close(alpha, expected(3.0, 0.0, 0.0))


def test_tawt_state_round_trip_and_no_mutation() -> None:
    for variant in ("joint", "pre-training"):
        strategy = tawt(variant, update_every=2)  # type: ignore[arg-type]
        assert_round_trip(strategy, random_sequence(4, 12, seed=5), split=5)
        assert_not_mutated(strategy, stats_from(HAND_G))


# =========================================================================== parameters

Constructor = Callable[..., Strategy]


@pytest.mark.parametrize(
    ("constructor", "params", "fragment"),
    [
        (pcgrad, {"seed": -1}, "seed"),
        (pcgrad, {"seed": 2.5}, "seed"),
        (pcgrad, {"seed": True}, "seed"),
        (pcgrad, {"seed": 2**63}, "seed"),
        (pcgrad_aux, {"weight": -0.1}, "weight"),
        (pcgrad_aux, {"weight": float("nan")}, "weight"),
        (pcgrad_aux, {"weight": float("inf")}, "weight"),
        (tawt, {"variant": "sample"}, "variant"),
        (tawt, {"lr": 0.0}, "lr"),
        (tawt, {"lr": float("inf")}, "lr"),
        (tawt, {"update_every": 0}, "update_every"),
        (tawt, {"update_every": 1.5}, "update_every"),
    ],
)
def test_bad_params(constructor: Constructor, params: dict[str, object], fragment: str) -> None:
    with pytest.raises(StrategyError, match=fragment):
        constructor(**params)


@pytest.mark.parametrize(
    ("constructor", "params"),
    [
        (pcgrad, {"seed": 12}),
        (pcgrad_aux, {"weight": 0.25}),
        (tawt, {"variant": "pre-training", "lr": 0.5, "update_every": 7}),
    ],
)
def test_params_echo_keyword_arguments(constructor: Constructor, params: dict[str, object]) -> None:
    assert constructor(**params).params == params
