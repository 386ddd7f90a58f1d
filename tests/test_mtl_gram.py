"""MGDA, CAGrad and Nash-MTL: symmetric multi-task baselines solved on the Gram matrix.

Hand-checked updates, brute-force checks of the solvers, invariances, degenerate inputs,
parameter validation, and one purpose test per method (what the method exists for).
"""

from __future__ import annotations

import inspect
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
from auxilia.statistics import Need
from auxilia.strategies.base import Strategy
from auxilia.strategies.cagrad import cagrad, cagrad_direction
from auxilia.strategies.mgda import mgda
from auxilia.strategies.nash_mtl import nash_mtl, nash_solve
from auxilia.strategies.simplex import min_norm_weights, simplex_qp
from helpful_vs_harmful import train_helpful_vs_harmful
from strategy_checks import (
    apply,
    expected,
    stats_from,
)

F64 = torch.float64
PROPERTY = settings(max_examples=30, deadline=None)
CONSTRUCTORS: dict[str, Callable[..., Strategy]] = {
    "mgda": mgda,
    "cagrad": cagrad,
    "nash-mtl": nash_mtl,
}


def simplex_grid(n: int, steps: int) -> torch.Tensor:
    """Every point of the simplex in R^n with coordinates in multiples of 1/steps."""
    points = [
        [*(b - a - 1 for a, b in itertools.pairwise((-1, *cuts, steps + n - 1)))]
        for cuts in itertools.combinations(range(steps + n - 1), n - 1)
    ]
    return torch.tensor(points, dtype=F64) / steps


def quarter_grads(min_rows: int = 1, max_rows: int = 4, max_dim: int = 4) -> st.SearchStrategy:
    """Gradients [n, d] with entries in multiples of 1/4: the Gram matrix is exact."""
    return hnp.arrays(
        np.float64,
        st.tuples(st.integers(min_rows, max_rows), st.integers(1, max_dim)),
        elements=st.integers(-8, 8).map(lambda v: v / 4),
    )


def generic_grads(min_rows: int = 2, max_rows: int = 5) -> st.SearchStrategy:
    """Gradients [n, 4] with continuous entries (solutions unique with probability one)."""
    return hnp.arrays(
        np.float64,
        st.tuples(st.integers(min_rows, max_rows), st.just(4)),
        elements=st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=False),
    )


def bargaining_grads() -> st.SearchStrategy:
    """Gradients with a positive first coordinate: 0 is far from their convex hull."""

    def lift(g: np.ndarray) -> np.ndarray:
        g = g.copy()
        g[:, 0] = 1.0 + np.abs(g[:, 0])
        return g

    return quarter_grads(1, 5, 4).map(lift)


def hull_margin(grads: np.ndarray) -> float:
    """Norm of the min-norm point of the hull of the unit gradients (0 if one is zero)."""
    g = torch.from_numpy(grads)
    norms = g.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        return 0.0
    unit = g / norms
    w = min_norm_weights(unit @ unit.T)
    return float((w @ unit).norm())


def direction_gap(gram: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """‖Σ (a_k − b_k) g_k‖, the distance between two combined directions."""
    diff = a - b
    return math.sqrt(max(float(diff @ gram @ diff), 0.0))


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_name_needs_and_params_echo_defaults(name: str) -> None:
    constructor = CONSTRUCTORS[name]
    strategy = constructor()
    assert strategy.name == name
    assert strategy.needs == frozenset({Need.GRAM})
    signature = inspect.signature(constructor).parameters
    assert dict(strategy.params) == {k: p.default for k, p in signature.items()}
    for key, parameter in signature.items():  # every parameter has a default of its own type
        assert parameter.default is not inspect.Parameter.empty, key
        assert type(strategy.params[key]) is type(parameter.default), key


def test_defaults() -> None:
    assert dict(mgda().params) == {"scale": "sources"}
    assert dict(cagrad().params) == {"c": 0.5, "rescale": 1, "scale": "sources"}
    assert dict(nash_mtl().params) == {"update_weights_every": 1, "max_norm": 1.0}
    state = nash_mtl().init(3)
    assert_close(state["weights"], expected(1.0, 1.0, 1.0))
    assert int(state["count"]) == 0


# --------------------------------------------------------------------------- MGDA: exact


def test_mgda_two_tasks_closed_form() -> None:
    # g1 = (1, 0), g2 = (0, 2): w1 = <g2 - g1, g2> / ||g1 - g2||^2 = 4/5, d = (0.8, 0.4),
    # <d, g1> = <d, g2> = ||d||^2 = 0.8.
    stats = stats_from([[1, 0], [0, 2]])
    assert_close(apply(mgda("one"), stats), expected(0.8, 0.2), atol=1e-14, rtol=0)
    assert_close(apply(mgda(), stats), expected(1.6, 0.4), atol=1e-14, rtol=0)


def test_mgda_two_tasks_clipped_closed_form() -> None:
    # g2 = 2 g1: w1 = <g2 - g1, g2> / ||g1 - g2||^2 = 2, clipped to 1: d = g1, the shorter one.
    assert_close(apply(mgda("one"), stats_from([[1, 0], [2, 0]])), expected(1.0, 0.0))


def test_mgda_three_tasks_by_hand() -> None:
    # Orthonormal: the centroid. (1,0), (0,1), (1,1): the min-norm point (1/2, 1/2) lies on
    # the segment g1 g2; g3 is dominated (<d, g3> = 1 > ||d||^2 = 1/2) and gets 0.
    eye = stats_from(np.eye(3))
    assert_close(apply(mgda(), eye), expected(1.0, 1.0, 1.0), atol=1e-14, rtol=0)
    alpha = apply(mgda(), stats_from([[1, 0], [0, 1], [1, 1]]))
    assert_close(alpha, expected(1.5, 1.5, 0.0), atol=1e-14, rtol=0)


def test_mgda_opposed_tasks_give_zero_direction() -> None:
    # 0 is in the hull: Pareto-stationary, d = 0 with w = (1/2, 1/2).
    alpha = apply(mgda("one"), stats_from([[1, 0], [-1, 0]]))
    assert_close(alpha, expected(0.5, 0.5), atol=1e-14, rtol=0)


@PROPERTY
@given(
    hnp.arrays(np.float64, (2, 3), elements=st.integers(-8, 8).map(lambda v: v / 4)),
)
def test_mgda_matches_two_task_closed_form(grads: np.ndarray) -> None:
    g = torch.from_numpy(grads)
    diff = g[0] - g[1]
    assume(float(diff @ diff) > 0)
    w1 = float(((g[1] - g[0]) @ g[1]) / (diff @ diff))
    w1 = min(max(w1, 0.0), 1.0)
    alpha = apply(mgda("one"), stats_from(grads))
    assert_close(alpha, expected(w1, 1.0 - w1), atol=1e-12, rtol=0)


@PROPERTY
@given(quarter_grads(2, 4, 4))
def test_mgda_beats_dense_simplex_grid(grads: np.ndarray) -> None:
    g = torch.from_numpy(grads)
    gram = g @ g.T
    alpha = apply(mgda("one"), stats_from(grads))
    assert bool((alpha >= 0).all())
    assert abs(float(alpha.sum()) - 1.0) < 1e-12
    grid = simplex_grid(gram.shape[0], 24)
    brute = float(torch.einsum("pi,ij,pj->p", grid, gram, grid).min())
    scale = 1.0 + float(gram.abs().max())
    assert float(alpha @ gram @ alpha) <= brute + 1e-12 * scale
    # KKT certificate of the min-norm point: <d, g_k> >= ||d||^2 for every k.
    assert bool((gram @ alpha >= alpha @ gram @ alpha - 1e-12 * scale).all())


@PROPERTY
@given(
    hnp.arrays(np.float64, st.integers(1, 5), elements=st.integers(-8, 8).map(lambda v: v / 4)),
    hnp.arrays(np.float64, (5, 5), elements=st.integers(-8, 8).map(lambda v: v / 4)),
)
def test_simplex_qp_with_linear_term_beats_grid(lin: np.ndarray, factor: np.ndarray) -> None:
    n = lin.shape[0]
    a = torch.from_numpy(factor[:n])
    quad = a @ a.T
    q = torch.from_numpy(lin)
    w = simplex_qp(quad, q)
    assert bool((w >= 0).all())
    assert abs(float(w.sum()) - 1.0) < 1e-12
    grid = simplex_grid(n, 20)
    values = 0.5 * torch.einsum("pi,ij,pj->p", grid, quad, grid) + grid @ q
    scale = 1.0 + float(quad.abs().max()) + float(q.abs().max())
    assert float(0.5 * w @ quad @ w + q @ w) <= float(values.min()) + 1e-12 * scale


def test_simplex_qp_degenerate() -> None:
    assert_close(simplex_qp(torch.zeros(3, 3)), torch.full((3,), 1.0 / 3, dtype=F64))
    assert simplex_qp(torch.zeros(0, 0)).shape == (0,)
    assert_close(simplex_qp(torch.ones(1, 1)), expected(1.0))


# --------------------------------------------------------------------------- CAGrad: exact


def test_cagrad_c_zero_is_the_mean() -> None:
    stats = stats_from([[1, 0], [2, 3], [-1, 1]])
    assert_close(apply(cagrad(c=0.0), stats), expected(1.0, 1.0, 1.0))
    assert_close(apply(cagrad(c=0.0, scale="one"), stats), torch.full((3,), 1.0 / 3, dtype=F64))


def test_cagrad_orthogonal_pair_by_hand() -> None:
    # g1 = (1,0), g2 = (0,1): <g_w, g_0> = 1/2 for every w, so w = (1/2, 1/2), g_w = g_0 and
    # d = g_0 (1 + c). With n = 2 and rescale 1: alpha = 2 (1 + c)/2 / (1 + c^2) = 1.2 at c = 0.5.
    alpha = apply(cagrad(), stats_from([[1, 0], [0, 1]]))
    assert_close(alpha, expected(1.2, 1.2), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("rescale", "scale", "values"),
    [
        (1, "sources", (0.8, 1.2)),
        (0, "sources", (1.0, 1.5)),
        (2, "sources", (2.0 / 3.0, 1.0)),
        (0, "one", (0.5, 0.75)),
    ],
)
def test_cagrad_conflicting_pair_by_hand(
    rescale: int, scale: str, values: tuple[float, float]
) -> None:
    # 1-D: g1 = 2, g2 = -1; g_0 = 0.5, r = c ||g_0|| = 0.25. F(w) = 0.5 x + 0.25 |x| with
    # x = g_w = 3 w1 - 1 in [-1, 2] is minimal at x = -1 (w = e2): d = g_0 - r = 0.25,
    # beta = (1/2, 1/2) + (r / |g_w|) (0, 1) = (0.5, 0.75). Check: max over d in [0.25, 0.75]
    # of min(2d, -d) is -0.25, at d = 0.25.
    alpha = apply(cagrad(rescale=rescale, scale=scale), stats_from([[2.0], [-1.0]]))  # type: ignore[arg-type]
    assert_close(alpha, expected(*values), atol=1e-12, rtol=0)


def test_cagrad_optimum_at_zero_combination_by_hand() -> None:
    # g1 = (1,0), g2 = (-1,0), g3 = (0,1): 0 is in the hull and F >= 0 there, so the optimum is
    # at g_w = 0 (the formula is 0/0); g_0 = (0, 1/3) already has <g_k, g_0> >= 0: d = g_0.
    stats = stats_from([[1, 0], [-1, 0], [0, 1]])
    assert_close(apply(cagrad(scale="one", rescale=0), stats), torch.full((3,), 1.0 / 3, dtype=F64))
    # g3 = (1,1), c = 2: g_0 = (1/3, 1/3), r = 2 sqrt(2)/3; the projection of g_0 onto
    # {d : d1 = 0, d2 >= 0} is (0, 1/3), at distance 1/3 <= r: d = (0, 1/3), value 0.
    grads = [[1, 0], [-1, 0], [1, 1]]
    alpha = apply(cagrad(c=2.0, scale="one", rescale=0), stats_from(grads))
    assert_close(
        alpha @ torch.tensor(grads, dtype=F64), expected(0.0, 1.0 / 3.0), atol=1e-12, rtol=0
    )


@PROPERTY
@given(quarter_grads(1, 3, 3), st.sampled_from([0.1, 0.5, 0.9, 2.0]))
def test_cagrad_is_optimal_against_brute_force(grads: np.ndarray, c: float) -> None:
    g = torch.from_numpy(grads)
    n = g.shape[0]
    gram = g @ g.T
    g0 = g.mean(dim=0)
    radius = c * float(g0.norm())
    beta = cagrad_direction(gram, c)
    d = beta @ g
    scale = 1.0 + float(gram.abs().max())
    assert float((d - g0).norm()) <= radius + 1e-9 * math.sqrt(scale)  # feasible
    value = float((g @ d).min())
    # Weak duality: every F(w) = <g_w, g_0> + r ||g_w|| bounds the optimum from above; a fine
    # grid of w gets within the grid's Lipschitz error of it.
    grid = simplex_grid(n, 120)
    gw = grid @ g
    dual = gw @ g0 + radius * gw.norm(dim=1)
    assert value <= float(dual.min()) + 1e-9 * scale
    lipschitz = (float(g0.norm()) + radius) * float(g.norm(dim=1).max()) * n / 120
    assert value >= float(dual.min()) - lipschitz - 1e-9 * scale
    # Every sampled feasible direction does no better.
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(200, g.shape[1], generator=gen, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True) * torch.rand(200, 1, generator=gen, dtype=F64)
    samples = g0 + radius * u
    assert value >= float((samples @ g.T).min(dim=1).values.max()) - 1e-9 * scale


# --------------------------------------------------------------------------- Nash-MTL: exact


def test_nash_orthogonal_gradients_get_inverse_norms() -> None:
    # G diagonal: alpha_k^2 ||g_k||^2 = 1.
    stats = stats_from([[2, 0, 0], [0, 0.5, 0], [0, 0, 4]])
    assert_close(apply(nash_mtl(max_norm=0.0), stats), expected(0.5, 2.0, 0.25), atol=1e-12, rtol=0)
    # ||d||^2 = alpha^T G alpha = n = 3; the default clip scales d to norm 1.
    alpha = apply(nash_mtl(), stats)
    assert_close(alpha, expected(0.5, 2.0, 0.25) / math.sqrt(3.0), atol=1e-12, rtol=0)


def test_nash_two_tasks_by_hand() -> None:
    # With cosine rho, beta = (a, a) solves a (a + rho a) = 1: a = 1/sqrt(1 + rho), and
    # alpha_k = beta_k / ||g_k||. Here ||g|| = (2, 0.5), rho = 0.6.
    stats = stats_from([[2, 0], [0.3, 0.4]])
    a = 1.0 / math.sqrt(1.6)
    assert_close(apply(nash_mtl(max_norm=0.0), stats), expected(a / 2, a / 0.5), atol=1e-12, rtol=0)


def test_nash_tiny_gradients_stay_finite() -> None:
    """Gradients of norm ~3e-161 (a Gram matrix of ~1e-321, subnormal): β's starting scale is
    normalised before βᵀCβ is formed, so nothing underflows; α = 1 / (‖g‖ √n) for identical
    gradients (found by hypothesis in CI)."""
    grads = np.full((3, 4), 1.5792359e-161)
    alpha = apply(nash_mtl(max_norm=0.0), stats_from(grads))
    assert bool(torch.isfinite(alpha).all())
    norm = math.sqrt(float(stats_from(grads).gram[0, 0]))  # as the engine's Gram matrix gives it
    assert_close(alpha, expected(*[1.0 / (norm * math.sqrt(3.0))] * 3), rtol=1e-6, atol=0)


def test_nash_single_source_is_inverse_norm() -> None:
    assert_close(apply(nash_mtl(max_norm=0.0), stats_from([[3, 4]])), expected(0.2))
    assert_close(apply(nash_mtl(), stats_from([[3, 4]])), expected(0.2))  # ||d|| = 1: no clip


def test_nash_max_norm_larger_than_update_leaves_it() -> None:
    stats = stats_from([[2, 0], [0, 1]])
    assert_close(apply(nash_mtl(max_norm=10.0), stats), expected(0.5, 1.0), atol=1e-12, rtol=0)


def test_nash_update_cadence_and_warm_state() -> None:
    strategy = nash_mtl(update_weights_every=2, max_norm=0.0)
    first = stats_from([[2, 0], [0, 1]])
    other = stats_from([[1, 0], [0, 4]])
    alpha, state = strategy.update(first, strategy.init(2))  # count 0: solved
    assert_close(alpha, expected(0.5, 1.0), atol=1e-12, rtol=0)
    alpha, state = strategy.update(other, state)  # count 1: kept
    assert_close(alpha, expected(0.5, 1.0), atol=1e-12, rtol=0)
    alpha, state = strategy.update(other, state)  # count 2: solved again
    assert_close(alpha, expected(1.0, 0.25), atol=1e-12, rtol=0)
    assert int(state["count"]) == 3


def test_nash_clip_between_updates_uses_current_gram() -> None:
    strategy = nash_mtl(update_weights_every=2, max_norm=1.0)
    alpha, state = strategy.update(stats_from([[2, 0], [0, 1]]), strategy.init(2))
    # Stored alpha (0.5, 1); the new gradients make ||d|| = ||(1.5, 4)|| > 1: scaled to 1.
    alpha, state = strategy.update(stats_from([[3, 0], [0, 4]]), state)
    assert_close(alpha, expected(0.5, 1.0) / math.hypot(1.5, 4.0), atol=1e-12, rtol=0)
    assert_close(state["weights"], expected(0.5, 1.0), atol=1e-12, rtol=0)  # stored unclipped


def test_nash_no_solution_keeps_previous_weights() -> None:
    strategy = nash_mtl(max_norm=0.0)
    alpha, state = strategy.update(stats_from([[2, 0], [0, 1]]), strategy.init(2))
    # Exactly opposed: 0 is in the hull, G alpha = 1/alpha has no positive solution.
    alpha, state = strategy.update(stats_from([[1, 0], [-1, 0]]), state)
    assert_close(alpha, expected(0.5, 1.0), atol=1e-12, rtol=0)
    assert nash_solve(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64), expected(1, 1)) is None


def test_nash_zero_gradient_is_left_out() -> None:
    # Source 1 has no gradient: it keeps its stored weight (1) and the others bargain alone.
    alpha = apply(nash_mtl(max_norm=0.0), stats_from([[1, 0], [0, 0], [0, 2]]))
    assert_close(alpha, expected(1.0, 1.0, 0.5), atol=1e-12, rtol=0)


def test_nash_state_is_not_mutated_in_place() -> None:
    strategy = nash_mtl()
    state = strategy.init(2)
    before = {k: v.clone() for k, v in state.items()}
    strategy.update(stats_from([[2, 0], [0, 1]]), state)
    for key, value in before.items():
        assert torch.equal(state[key], value), key


def _nash_by_lbfgs(gram: torch.Tensor) -> torch.Tensor:
    """An independent solver: L-BFGS on f(exp(x)) = ½ e^xᵀ G e^x − Σ x."""
    x = (-0.5 * gram.diagonal().log()).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [x],
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        alpha = x.exp()
        loss = 0.5 * alpha @ gram @ alpha - x.sum()
        (x.grad,) = torch.autograd.grad(loss, [x])
        return loss.detach()

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return x.detach().exp()


@PROPERTY
@given(bargaining_grads())
def test_nash_matches_independent_solver(grads: np.ndarray) -> None:
    g = torch.from_numpy(grads)
    gram = g @ g.T
    alpha = apply(nash_mtl(max_norm=0.0), stats_from(grads))
    assert_close(alpha, _nash_by_lbfgs(gram), rtol=1e-6, atol=0)
    # Warm-started from anything positive, the solve lands on the same (unique) point.
    again = nash_solve(gram, torch.linspace(0.1, 5.0, g.shape[0], dtype=F64))
    assert again is not None
    assert_close(again, alpha, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- purpose


@PROPERTY
@given(quarter_grads(1, 5, 4))
def test_mgda_purpose_no_task_gets_worse(grads: np.ndarray) -> None:
    """MGDA's d = Σ α_k g_k is a common descent direction: <d, g_k> >= 0 for every task (> 0
    when 0 is not in the hull); d = 0 only at a Pareto-stationary point."""
    g = torch.from_numpy(grads)
    alpha = apply(mgda(), stats_from(grads))
    d = alpha @ g
    scale = 1.0 + float((g @ g.T).abs().max())
    assert bool((g @ d >= -1e-12 * scale).all())
    if float(d @ d) > 1e-9 * scale:
        assert bool((g @ d > 0).all())


@PROPERTY
@given(quarter_grads(1, 5, 4), st.sampled_from([0.1, 0.5, 0.9, 2.0]))
def test_cagrad_purpose_worst_task_no_worse_than_mean(grads: np.ndarray, c: float) -> None:
    """CAGrad's d is at least as good as the mean gradient for the worst task."""
    g = torch.from_numpy(grads)
    d = apply(cagrad(c=c, rescale=0, scale="one"), stats_from(grads)) @ g
    scale = 1.0 + float((g @ g.T).abs().max())
    assert float((g @ d).min()) >= float((g @ g.mean(dim=0)).min()) - 1e-12 * scale


@PROPERTY
@given(bargaining_grads())
def test_nash_purpose_each_task_improves_in_inverse_proportion_to_its_weight(
    grads: np.ndarray,
) -> None:
    """Nash-MTL's bargaining solution: α_k <g_k, d> = 1 for every task."""
    g = torch.from_numpy(grads)
    alpha = apply(nash_mtl(max_norm=0.0), stats_from(grads))
    assert bool((alpha > 0).all())
    assert_close(alpha * (g @ (alpha @ g)), torch.ones(g.shape[0], dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "strategy",
    [mgda(), mgda("one"), cagrad(), nash_mtl(), nash_mtl(update_weights_every=3, max_norm=0.0)],
    ids=["mgda", "mgda-one", "cagrad", "nash-mtl", "nash-mtl-every-3"],
)
def test_helpful_vs_harmful_runs_finite(strategy: Strategy, seed: int) -> None:
    """These are symmetric baselines: they treat the target as one more task and do not aim
    to weight the helpful source above the harmful one, so they are exempt from the "helpful
    above harmful" purpose test. They must still run through the engine with finite,
    non-negative coefficients."""
    alpha = train_helpful_vs_harmful(strategy, steps=20, seed=seed)
    assert alpha.shape == (3,)
    assert alpha.dtype == F64
    assert bool(torch.isfinite(alpha).all())
    assert bool((alpha >= 0).all())


# --------------------------------------------------------------------------- invariances


STRATEGIES = [mgda(), cagrad(), nash_mtl(max_norm=0.0), nash_mtl()]
STRATEGY_IDS = ["mgda", "cagrad", "nash-mtl-unclipped", "nash-mtl"]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
@PROPERTY
@given(grads=generic_grads(3, 5), data=st.data())
def test_permuting_auxiliaries_permutes_coefficients(
    strategy: Strategy, grads: np.ndarray, data: st.DataObject
) -> None:
    g = torch.from_numpy(grads)
    n = g.shape[0]
    perm = [0, *data.draw(st.permutations(list(range(1, n))))]
    alpha = apply(strategy, stats_from(grads))
    permuted = apply(strategy, stats_from(grads[perm]))
    assert bool(torch.isfinite(permuted).all())
    # The combined direction is unique; the coefficients are, whenever the gradients are
    # affinely independent (generic for MGDA and CAGrad; always for Nash-MTL's solution).
    gram = g @ g.T
    back = torch.empty_like(permuted)
    back[perm] = permuted
    scale = 1.0 + float(gram.abs().max())
    assert direction_gap(gram, back, alpha) <= 1e-7 * math.sqrt(scale) * (
        1 + float(alpha.abs().sum())
    )
    if strategy.name == "nash-mtl" and hull_margin(grads) >= 1e-2:  # well conditioned
        assert_close(back, alpha, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_IDS)
@PROPERTY
@given(grads=quarter_grads(3, 5, 4), data=st.data())
def test_absent_sources_get_zero_and_are_excluded(
    strategy: Strategy, grads: np.ndarray, data: st.DataObject
) -> None:
    n = grads.shape[0]
    absent = data.draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=n - 2))
    present = [k not in absent for k in range(n)]
    bogus = grads.copy()
    bogus[sorted(absent)] = 7.0  # the engine writes zeros; anything must be ignored
    alpha = apply(strategy, stats_from(bogus, present))
    assert all(float(alpha[k]) == 0.0 for k in absent)
    keep = [k for k in range(n) if present[k]]
    alone = apply(strategy, stats_from(grads[keep]))
    assert_close(alpha[keep], alone, atol=1e-12, rtol=1e-12)


@PROPERTY
@given(quarter_grads(1, 4, 4), st.sampled_from([0.25, 3.0, 1e3]))
def test_scaling_all_gradients(grads: np.ndarray, s: float) -> None:
    # MGDA and CAGrad are invariant; Nash-MTL's alpha scales by 1/s (G alpha = 1/alpha).
    stats, scaled = stats_from(grads), stats_from(grads * s)
    g = torch.from_numpy(grads)
    gram = g @ g.T
    tol = 1e-9 * math.sqrt(1.0 + float(gram.abs().max())) * g.shape[0]
    for strategy in (mgda(), cagrad()):  # the direction is unique, the weights may not be
        alpha = apply(strategy, stats)
        assert direction_gap(gram, apply(strategy, scaled), alpha) <= tol
    if nash_solve(gram, torch.ones(g.shape[0], dtype=F64)) is None:
        return  # no bargaining solution: the stored weights are kept, whatever the scale
    unclipped = nash_mtl(max_norm=0.0)
    assert_close(apply(unclipped, scaled) * s, apply(unclipped, stats), atol=1e-12, rtol=1e-9)


def test_nash_rescaling_one_task_rescales_its_weight() -> None:
    # alpha_k depends on g_k only through the cosines and 1/||g_k||.
    grads = np.array([[1.0, 0.5], [0.5, 1.0], [1.0, -0.2]])
    alpha = apply(nash_mtl(max_norm=0.0), stats_from(grads))
    grads[1] *= 10.0
    rescaled = apply(nash_mtl(max_norm=0.0), stats_from(grads))
    assert_close(rescaled, alpha * expected(1.0, 0.1, 1.0), rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- degenerate


DEGENERATE = {
    "all-zero": [[0, 0], [0, 0], [0, 0]],
    "single-present": [[1, 2]],
    "duplicates": [[1, 1], [1, 1], [1, 1]],
    "collinear": [[1, 0], [2, 0], [-3, 0]],
    "opposed": [[1, 2], [-1, -2], [0, 0]],
    "rank-one-mixed": [[1, 1], [2, 2], [1, 1]],
    "tiny": [[1e-150, 0], [0, 1e-150], [1e-150, 1e-150]],
    "huge": [[1e150, 0], [0, 1e150], [-1e150, 1e150]],
    "near-opposed": [[1, 0], [-1, 1e-9], [0, 0]],
}


@pytest.mark.parametrize("strategy", [*STRATEGIES, mgda("one"), cagrad(c=2.0)])
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_inputs_give_finite_coefficients(strategy: Strategy, case: str) -> None:
    stats = stats_from(DEGENERATE[case])
    state = strategy.init(stats.num_sources)
    for _ in range(2):  # twice: the second call also uses any stored state
        alpha, state = strategy.update(stats, state)
        assert alpha.shape == (stats.num_sources,)
        assert alpha.dtype == F64
        assert bool(torch.isfinite(alpha).all()), alpha
        assert bool((alpha >= 0).all()), alpha


@pytest.mark.parametrize("strategy", [*STRATEGIES, mgda("one"), cagrad(c=2.0)])
def test_no_present_source_gives_zeros(strategy: Strategy) -> None:
    stats = stats_from([[1, 0], [0, 1]], present=[False, False])
    assert torch.equal(apply(strategy, stats), torch.zeros(2, dtype=F64))


def test_degenerate_values_by_hand() -> None:
    zero = stats_from(DEGENERATE["all-zero"])
    assert_close(apply(mgda(), zero), expected(1.0, 1.0, 1.0))  # the centre of the simplex
    assert_close(apply(cagrad(), zero), expected(1.0, 1.0, 1.0) / 1.25)  # the mean, rescaled
    assert_close(apply(nash_mtl(), zero), expected(1.0, 1.0, 1.0))  # initial weights kept
    single = stats_from(DEGENERATE["single-present"])
    assert_close(apply(mgda(), single), expected(1.0))
    assert_close(apply(cagrad(), single), expected(1.5 / 1.25))  # d = (1 + c) g_1


def test_min_norm_weights_of_duplicates_give_the_unique_point() -> None:
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=F64)
    w = min_norm_weights(g @ g.T)
    assert_close(w @ g, expected(0.5, 0.5), atol=1e-14, rtol=0)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("mgda", {"scale": "sum"}, "scale"),
        ("cagrad", {"c": -0.1}, "c must"),
        ("cagrad", {"c": float("nan")}, "c must"),
        ("cagrad", {"c": float("inf")}, "c must"),
        ("cagrad", {"c": True}, "c must"),
        ("cagrad", {"rescale": 3}, "rescale"),
        ("cagrad", {"rescale": 1.0}, "rescale"),
        ("cagrad", {"rescale": True}, "rescale"),
        ("cagrad", {"scale": "mean"}, "scale"),
        ("nash-mtl", {"update_weights_every": 0}, "update_weights_every"),
        ("nash-mtl", {"update_weights_every": 1.5}, "update_weights_every"),
        ("nash-mtl", {"update_weights_every": True}, "update_weights_every"),
        ("nash-mtl", {"max_norm": -1.0}, "max_norm"),
        ("nash-mtl", {"max_norm": float("nan")}, "max_norm"),
        ("nash-mtl", {"max_norm": float("inf")}, "max_norm"),
    ],
)
def test_bad_params(name: str, params: dict[str, object], fragment: str) -> None:
    with pytest.raises(StrategyError, match=f"{name}: .*{fragment}"):
        CONSTRUCTORS[name](**params)


def test_integer_params_accepted_where_floats_expected() -> None:
    assert dict(cagrad(c=1).params)["c"] == 1
    assert dict(nash_mtl(max_norm=2).params)["max_norm"] == 2
    assert_close(apply(cagrad(c=1), stats_from([[1, 0], [0, 1]])), expected(1.0, 1.0))
