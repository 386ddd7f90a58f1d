"""Tests for auxilia.engine: the exact mode against hand-computed gradients, and its errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from auxilia import strategies
from auxilia.engine import MODES, Engine
from auxilia.engine.source_losses import split_by_source
from auxilia.errors import EngineError
from auxilia.statistics import Need
from auxilia.strategies import Strategy, stateless

F64 = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}


class TrunkHeads(nn.Module):
    """A small MLP trunk shared by every source and one linear head per source."""

    def __init__(self, num_sources: int, seed: int, dim: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_sources))
        self.to(F64)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))

    def losses(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Squared error per sample, each sample through the head of its own source only."""
        h = self.trunk(x)
        losses = torch.zeros(x.shape[0], dtype=F64)
        for k, head in enumerate(self.heads):
            idx = (ids == k).nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            losses = losses.index_put((idx,), (head(h[idx]).squeeze(1) - y[idx]) ** 2)
        return losses


def make_batch(num_sources: int, ids: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(ids)
    x = torch.randn(n, 3, generator=gen, dtype=F64)
    y = torch.randn(n, generator=gen, dtype=F64)
    return x, y, torch.tensor(ids, dtype=torch.int64)


def hand_gradients(
    model: TrunkHeads, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor
) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """grads[k][i]: gradient of source k's mean loss on parameter i (zeros if absent); means."""
    params = list(model.parameters())
    losses = model.losses(x, y, ids)
    grads, means = [], []
    for k in range(len(model.heads)):
        mask = ids == k
        if not bool(mask.any()):
            grads.append([torch.zeros_like(p) for p in params])
            means.append(0.0)
            continue
        mean = losses[mask].mean()
        g = torch.autograd.grad(mean, params, retain_graph=True, allow_unused=True)
        grads.append(
            [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params, strict=True)]
        )
        means.append(float(mean.detach()))
    return grads, torch.tensor(means, dtype=F64)


@st.composite
def problems(draw: st.DrawFn) -> tuple[int, list[int], list[float], int]:
    """(number of sources K+1, source id per sample, fixed coefficients, seed)."""
    num = draw(st.integers(2, 5))
    ids = draw(st.lists(st.integers(0, num - 1), min_size=1, max_size=10))
    weights = draw(st.lists(st.floats(0.0, 3.0), min_size=num, max_size=num))
    seed = draw(st.integers(0, 2**16))
    return num, ids, weights, seed


@settings(max_examples=30, deadline=None)
@given(problem=problems(), lr=st.floats(1e-3, 1.0))
def test_exact_mode_matches_hand_gradients(
    problem: tuple[int, list[int], list[float], int], lr: float
) -> None:
    num, ids_list, weights, seed = problem
    model = TrunkHeads(num, seed)
    x, y, ids = make_batch(num, ids_list, seed)
    trunk = list(model.trunk.parameters())
    engine = Engine(
        model.parameters(),
        strategy=strategies.fixed(weights),
        num_sources=num,
        shared=trunk,
        extra_needs={Need.GRAM, Need.LOSSES},
    )
    alpha = engine.backward(model.losses(x, y, ids), ids, lr=lr)

    params = list(model.parameters())
    grads, means = hand_gradients(model, x, y, ids)
    present = torch.tensor([k in ids_list for k in range(num)])
    n_trunk = len(trunk)  # the trunk's parameters come first in model.parameters()
    flat = torch.stack([torch.cat([g.reshape(-1) for g in grads[k][:n_trunk]]) for k in range(num)])
    gram = flat @ flat.T
    expected_alpha = torch.tensor(weights, dtype=F64) * present

    assert alpha.dtype == F64
    assert_close(alpha, expected_alpha, **TOL)
    assert bool((alpha[~present] == 0).all())
    stats = engine.last_statistics
    assert stats is not None
    assert torch.equal(stats.present, present)
    assert stats.step == 0
    assert stats.lr == lr
    assert_close(stats.losses, means, **TOL)
    assert_close(stats.gram, gram, **TOL)
    assert_close(stats.target_row, gram[0], **TOL)
    assert_close(stats.norms, flat.norm(dim=1), **TOL)
    for k in range(num):
        if not bool(present[k]):
            assert stats.gram is not None
            assert bool((stats.gram[k] == 0).all())
            assert bool((stats.gram[:, k] == 0).all())
            assert stats.losses is not None
            assert float(stats.losses[k]) == 0.0
    # Shared parameters: sum_k alpha_k g_k.
    for i in range(n_trunk):
        expected = sum(float(expected_alpha[k]) * grads[k][i] for k in range(num))
        assert params[i].grad is not None
        assert_close(params[i].grad, expected, **TOL)
    # Heads: their own source's gradient, unweighted (absent sources: nothing or zeros).
    for k, head in enumerate(model.heads):
        own = {id(p): j for j, p in enumerate(params)}
        for p in head.parameters():
            g = grads[k][own[id(p)]]
            if not bool(present[k]):
                assert p.grad is None or bool((p.grad == 0).all())
            else:
                assert p.grad is not None
                assert_close(p.grad, g, **TOL)
    assert engine.step == 1


def test_statistics_only_what_is_needed() -> None:
    model = TrunkHeads(3, seed=0)
    x, y, ids = make_batch(3, [0, 1, 2, 0], seed=0)
    engine = Engine(
        model.parameters(),
        strategy=strategies.gcs(variant="unweighted"),
        num_sources=3,
        shared=model.trunk.parameters(),
    )
    engine.backward(model.losses(x, y, ids), ids)
    stats = engine.last_statistics
    assert stats is not None
    assert stats.target_row is not None
    assert stats.gram is None
    assert stats.norms is None
    assert stats.losses is None
    assert engine.needs == frozenset({Need.TARGET_ROW})


def test_gram_need_implies_row_and_norms() -> None:
    engine = Engine(
        nn.Linear(2, 1).parameters(),
        strategy=strategies.equal(),
        num_sources=2,
        extra_needs={Need.GRAM},
    )
    assert engine.needs == frozenset({Need.GRAM, Need.TARGET_ROW, Need.NORMS})


def test_gradient_accumulates_across_calls() -> None:
    model = TrunkHeads(3, seed=3)
    reference = copy.deepcopy(model)
    x, y, ids = make_batch(3, [0, 1, 1, 2, 0, 2], seed=3)

    def engine_for(m: TrunkHeads) -> Engine:
        return Engine(
            m.parameters(), strategy=strategies.gcs(), num_sources=3, shared=m.trunk.parameters()
        )

    once = engine_for(reference)
    once.backward(reference.losses(x, y, ids), ids)
    twice = engine_for(model)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)  # a gradient already there is added to
    for _ in range(2):
        twice.backward(model.losses(x, y, ids), ids)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert q.grad is not None
        assert p.grad is not None
        assert_close(p.grad, 0.25 + 2 * q.grad, **TOL)
    assert twice.step == 2


def test_inferred_shared_single_trunk_matches_explicit() -> None:
    gen = torch.Generator().manual_seed(7)
    lin = nn.Linear(3, 1).to(F64)
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    grads = []
    for shared in (None, list(lin.parameters())):
        lin.zero_grad(set_to_none=True)
        engine = Engine(lin.parameters(), strategy=strategies.gcs(), num_sources=3, shared=shared)
        alpha = engine.backward(lin(x).squeeze(1) ** 2, ids)
        grads.append((alpha, [p.grad.clone() for p in lin.parameters()]))  # type: ignore[union-attr]
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.equal(a, b)


def test_default_shares_every_parameter_and_shared_exempts_heads() -> None:
    model = TrunkHeads(3, seed=11)
    x, y, ids = make_batch(3, [0, 0, 1, 1, 2, 2], seed=11)
    # A strategy that zeroes source 1's coefficient.
    coefficients = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    zero_one = stateless("zero-one", frozenset(), lambda s: coefficients.clone())
    grads, _ = hand_gradients(model, x, y, ids)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    for shared in (None, list(model.trunk.parameters())):
        model.zero_grad(set_to_none=True)
        engine = Engine(
            model.parameters(),
            strategy=zero_one,
            num_sources=3,
            shared=shared,
            extra_needs={Need.TARGET_ROW},
        )
        engine.backward(model.losses(x, y, ids), ids)
        for k in (1, 2):
            # Without shared=, heads are weighted like everything else; with it, each head
            # gets its own source's gradient, unweighted.
            scale = float(coefficients[k]) if shared is None else 1.0
            for p in model.heads[k].parameters():
                assert p.grad is not None
                assert_close(p.grad, scale * grads[k][index[id(p)]], **TOL)
    # With shared= the statistics are over the trunk only.
    n_trunk = len(list(model.trunk.parameters()))
    flat = torch.stack([torch.cat([g.reshape(-1) for g in grads[k][:n_trunk]]) for k in range(3)])
    stats = engine.last_statistics
    assert stats is not None
    assert_close(stats.target_row, (flat @ flat.T)[0], **TOL)


def test_frozen_parameters_untouched() -> None:
    model = TrunkHeads(3, seed=5)
    frozen = model.trunk[0].bias
    frozen.requires_grad_(False)
    reference = copy.deepcopy(model)
    reference.trunk[0].bias.requires_grad_(True)
    x, y, ids = make_batch(3, [0, 1, 2, 1, 0], seed=5)
    engine = Engine(
        model.parameters(),
        strategy=strategies.gcs(),
        num_sources=3,
        shared=model.trunk.parameters(),  # includes the frozen bias: it is skipped
        extra_needs={Need.GRAM},
    )
    engine.backward(model.losses(x, y, ids), ids)
    assert frozen.grad is None
    assert all(p is not frozen for p in engine.params)
    # Statistics exclude the frozen parameter.
    grads, _ = hand_gradients(reference, x, y, ids)
    params = list(reference.parameters())
    trunk_ids = {id(p) for p in reference.trunk.parameters()} - {id(reference.trunk[0].bias)}
    keep = [i for i, p in enumerate(params) if id(p) in trunk_ids]
    flat = torch.stack([torch.cat([grads[k][i].reshape(-1) for i in keep]) for k in range(3)])
    assert engine.last_statistics is not None
    assert_close(engine.last_statistics.gram, flat @ flat.T, **TOL)


# --------------------------------------------------------------------------- errors


def _linear_engine(num: int = 3, **kwargs: object) -> tuple[Engine, nn.Linear]:
    lin = nn.Linear(2, 1).to(F64)
    strategy = kwargs.pop("strategy", strategies.equal())
    engine = Engine(lin.parameters(), strategy=strategy, num_sources=num, **kwargs)  # type: ignore[arg-type]
    return engine, lin


def _losses(lin: nn.Linear, n: int = 6) -> torch.Tensor:
    x = torch.arange(2 * n, dtype=F64).reshape(n, 2) / 10
    return lin(x).squeeze(1) ** 2


IDS = torch.tensor([0, 1, 2, 0, 1, 2])


def test_error_two_dimensional_losses() -> None:
    engine, lin = _linear_engine()
    with pytest.raises(EngineError, match=r"1-D.*\(6, 1\)"):
        engine.backward(_losses(lin).unsqueeze(1), IDS)


def test_error_mismatched_source_ids() -> None:
    engine, lin = _linear_engine()
    with pytest.raises(EngineError, match=r"one id per loss \(6\).*\(5,\)"):
        engine.backward(_losses(lin), IDS[:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_error_non_integer_source_ids(dtype: torch.dtype) -> None:
    engine, lin = _linear_engine()
    with pytest.raises(EngineError, match="integers"):
        engine.backward(_losses(lin), (IDS > 0).to(dtype))


@pytest.mark.parametrize(("bad", "shown"), [(3, "source id 3"), (-1, "source id -1")])
def test_error_source_id_out_of_range(bad: int, shown: str) -> None:
    engine, lin = _linear_engine()
    ids = IDS.clone()
    ids[4] = bad
    with pytest.raises(EngineError, match=rf"{shown} outside \[0, 3\)"):
        engine.backward(_losses(lin), ids)


def test_error_empty_losses() -> None:
    engine, lin = _linear_engine()
    with pytest.raises(EngineError, match="empty"):
        engine.backward(_losses(lin)[:0], IDS[:0])


def test_error_nan_loss_names_source() -> None:
    engine, lin = _linear_engine(names=["digits", "rotated", "noisy"])
    losses = _losses(lin).clone()
    losses[5] = math.nan  # a sample of source 2
    with pytest.raises(EngineError, match="'noisy'") as info:
        engine.backward(losses, IDS)
    assert "nan" in str(info.value)
    assert lin.weight.grad is None  # nothing written
    engine, lin = _linear_engine()
    losses = _losses(lin).clone()
    losses[1] = math.inf
    with pytest.raises(EngineError, match="source '1'"):
        engine.backward(losses, IDS)


def test_error_unknown_mode() -> None:
    with pytest.raises(EngineError, match="unknown engine mode 'fast'") as info:
        _linear_engine(mode="fast")
    for mode in MODES:
        assert mode in str(info.value)


def test_error_constructor_checks() -> None:
    with pytest.raises(EngineError, match="num_sources"):
        _linear_engine(num=0)
    with pytest.raises(EngineError, match="2 names for 3 sources"):
        _linear_engine(names=["a", "b"])
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(EngineError, match="requires grad"):
        Engine(frozen.parameters(), strategy=strategies.equal(), num_sources=2)


def test_error_strategy_wrong_number_of_coefficients() -> None:
    bad = stateless("short", frozenset(), lambda s: torch.ones(2, dtype=F64))
    engine, lin = _linear_engine(strategy=bad)
    with pytest.raises(EngineError, match=r"'short' returned \(2,\) coefficients for 3 sources"):
        engine.backward(_losses(lin), IDS)
    assert lin.weight.grad is None
    assert engine.step == 0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_error_strategy_non_finite_coefficients(value: float) -> None:
    bad = stateless("broken", frozenset(), lambda s: torch.tensor([1.0, value, 1.0], dtype=F64))
    engine, lin = _linear_engine(strategy=bad)
    with pytest.raises(EngineError, match="'broken' returned non-finite coefficients"):
        engine.backward(_losses(lin), IDS)
    assert lin.weight.grad is None


# --------------------------------------------------------------------------- state


def _train(model: nn.Linear, engine: Engine, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    ids = torch.arange(3).repeat_interleave(5)
    sign = torch.tensor([1.0, 1.0, -1.0], dtype=F64)[ids]
    alphas = []
    for _ in range(steps):
        x = torch.randn(15, 3, generator=gen, dtype=F64)
        losses = (model(x).squeeze(1) - sign * (x @ w_star)) ** 2
        model.zero_grad()
        alphas.append(engine.backward(losses, ids, lr=0.05))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad  # type: ignore[operator]
    return alphas


def _olaux_engine(model: nn.Linear) -> Engine:
    strategy: Strategy = strategies.olaux(horizon=2, beta=1.0)
    return Engine(model.parameters(), strategy=strategy, num_sources=3)


def test_state_dict_round_trip_reproduces_stateful_strategy() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).to(F64)
    engine = _olaux_engine(model)
    _train(model, engine, steps=3, seed=0)
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    saved_model = copy.deepcopy(model)
    fresh_model = copy.deepcopy(model)

    expected = _train(model, engine, steps=4, seed=1)

    restored = _olaux_engine(saved_model)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.step == 3
    got = _train(saved_model, restored, steps=4, seed=1)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    assert restored.step == engine.step == 7

    # Without the restored state the coefficients differ (the state matters).
    unrestored = _train(fresh_model, _olaux_engine(fresh_model), steps=4, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(expected, unrestored, strict=True))


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    weights=st.lists(st.floats(-2.0, 2.0), min_size=4, max_size=4),
)
def test_per_sample_combination_is_the_weighted_means_gradient(
    ids: list[int], weights: list[float]
) -> None:
    """The backward modes' combine from per-sample losses (weights α_k/n_k) gives the gradient
    of Σ_k α_k mean_k; the detached means agree whichever is formed first."""
    gen = torch.Generator().manual_seed(len(ids))
    w = torch.randn(len(ids), 3, dtype=torch.float64, generator=gen)
    theta = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    source = torch.tensor(ids)
    alpha = torch.tensor(weights, dtype=torch.float64)

    batch = split_by_source((w @ theta) ** 2, source, 4)
    values = batch.mean_values  # formed from the detached losses, no graph
    assert "mean_vector" not in batch.__dict__
    combination = batch.weighted()
    (got,) = torch.autograd.grad(combination.outputs, theta, combination.grads(alpha))
    expected_means = split_by_source((w @ theta) ** 2, source, 4).mean_vector
    (expected,) = torch.autograd.grad((alpha * expected_means).sum(), theta)
    assert_close(got, expected)
    assert_close(values, expected_means.detach())
