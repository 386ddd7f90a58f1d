"""Loss-based multi-task baselines: uncertainty weighting, DWA and GradNorm.

Hand-checked updates, a direct implementation (autograd + torch.optim.Adam, or the paper's
per-epoch loss buffer) under hypothesis, invariances, absent sources, degenerate inputs, state
round-trips, parameter errors and what each method exists for.

These three are symmetric multi-task baselines: the target is one more task and no weight
depends on agreement with it. They are therefore exempt from the helpful-above-harmful purpose
test that the target-aware strategies pass; each is tested instead for its own purpose
(uncertainty: a noisier task weighs less; DWA: a task whose loss falls slower weighs more;
GradNorm: weighted gradient norms move towards balance).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.testing import assert_close

from auxilia.errors import StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.base import State, Strategy
from auxilia.strategies.dwa import dwa
from auxilia.strategies.gradnorm import gradnorm
from auxilia.strategies.uncertainty import LOG_VARIANCE_BOUND, uncertainty
from strategy_checks import (
    assert_not_mutated,
    assert_round_trip,
    clone_state,
    expected,
)

F64 = torch.float64
PROPERTY = settings(max_examples=30, deadline=None)


def stats_of(
    losses: list[float] | torch.Tensor,
    norms: list[float] | torch.Tensor | None = None,
    present: list[bool] | torch.Tensor | None = None,
    step: int = 0,
) -> Statistics:
    """Statistics with losses (and norms) given by hand."""
    loss = torch.as_tensor(losses, dtype=F64)
    num = int(loss.shape[0])
    return Statistics(
        present=(
            torch.ones(num, dtype=torch.bool)
            if present is None
            else torch.as_tensor(present, dtype=torch.bool)
        ),
        losses=loss,
        norms=None if norms is None else torch.as_tensor(norms, dtype=F64),
        step=step,
    )


def run(strategy: Strategy, sequence: list[Statistics]) -> tuple[list[torch.Tensor], State]:
    """Feed ``sequence`` from a fresh state; return every step's α and the final state."""
    state = strategy.init(sequence[0].num_sources)
    alphas = []
    for stats in sequence:
        alpha, state = strategy.update(stats, state)
        alphas.append(alpha)
    return alphas, state


@st.composite
def loss_sequences(draw: st.DrawFn, min_sources: int = 2, max_steps: int = 12) -> list[list[float]]:
    """Positive losses [steps, K+1] on a coarse grid (no denormals, exact ratios)."""
    num = draw(st.integers(min_sources, 5))
    steps = draw(st.integers(1, max_steps))
    values = st.integers(1, 400).map(lambda n: n / 16)
    array = draw(hnp.arrays(np.float64, (steps, num), elements=values))
    return [list(map(float, row)) for row in array]


# =========================================================================== uncertainty


def test_uncertainty_needs_params_and_initial_state() -> None:
    strategy = uncertainty()
    assert strategy.name == "uncertainty"
    assert strategy.needs == frozenset({Need.LOSSES})
    assert strategy.params == {"lr": 0.01}
    assert isinstance(strategy.params["lr"], float)
    state = strategy.init(3)
    assert_close(state["log_variance"], expected(0.0, 0.0, 0.0))


def test_uncertainty_exact_first_steps() -> None:
    # s = 0, so the first step weighs every source 1. ds L = 1 - exp(-s) L = (-1, 0.5, 0).
    # Adam's first step moves each s by lr * sign(grad) (m_hat = g, v_hat = g^2): s = (.1, -.1, 0).
    strategy = uncertainty(lr=0.1)
    stats = stats_of([2.0, 0.5, 1.0])
    alphas, state = run(strategy, [stats, stats])
    assert_close(alphas[0], expected(1.0, 1.0, 1.0))
    assert_close(state["log_variance"][2], torch.tensor(0.0, dtype=F64))
    # Second step: alpha = exp(-s) = (e^-0.1, e^0.1, 1), to Adam's eps (1e-8 relative).
    assert_close(
        alphas[1], expected(0.9048374180359595, 1.1051709180756477, 1.0), atol=1e-8, rtol=0
    )
    # Source 2 sits at its equilibrium s = log 1 = 0 from the start and never moves.
    assert float(state["log_variance"][2]) == 0.0
    assert int(state["adam_t"][0]) == 2


def direct_uncertainty(
    sequence: list[list[float]], lr: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Kendall et al. as usually written: s is a parameter, loss Σ exp(-s) L + s, torch Adam."""
    s = torch.zeros(len(sequence[0]), dtype=F64, requires_grad=True)
    optimizer = torch.optim.Adam([s], lr=lr)
    alphas = []
    for row in sequence:
        losses = torch.tensor(row, dtype=F64)
        alphas.append(torch.exp(-s).detach().clone())
        optimizer.zero_grad()
        (torch.exp(-s) * losses + s).sum().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return alphas, s.detach()


@PROPERTY
@given(sequence=loss_sequences(), lr=st.sampled_from([0.001, 0.01, 0.1]))
def test_uncertainty_matches_autograd_and_torch_adam(
    sequence: list[list[float]], lr: float
) -> None:
    alphas, state = run(uncertainty(lr=lr), [stats_of(row) for row in sequence])
    reference, s = direct_uncertainty(sequence, lr)
    for alpha, alpha_ref in zip(alphas, reference, strict=True):
        assert_close(alpha, alpha_ref, atol=1e-12, rtol=1e-10)
    assert_close(state["log_variance"], s, atol=1e-12, rtol=1e-10)


def test_uncertainty_purpose_noisier_task_weighs_less() -> None:
    """Regression losses L_k = mean(eps^2), eps ~ N(0, sigma_k^2): at equilibrium s_k = log
    E[L_k] = log sigma_k^2, so alpha_k = 1 / sigma_k^2 and the noisiest task weighs least."""
    sigma2 = torch.tensor([0.25, 1.0, 4.0], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    strategy = uncertainty(lr=0.05)
    state = strategy.init(3)
    alpha = torch.empty(0)
    for _ in range(600):
        eps = torch.randn(3, 64, generator=gen, dtype=F64) * sigma2.sqrt().unsqueeze(1)
        alpha, state = strategy.update(stats_of((eps**2).mean(dim=1)), state)
    assert float(alpha[0]) > float(alpha[1]) > float(alpha[2])
    assert_close(state["log_variance"], sigma2.log(), atol=0.15, rtol=0)
    assert_close(alpha * sigma2, torch.ones(3, dtype=F64), atol=0.2, rtol=0)


def test_uncertainty_constant_losses_converge_to_log_loss() -> None:
    strategy = uncertainty(lr=0.05)
    losses = [4.0, 1.0, 0.25]
    _, state = run(strategy, [stats_of(losses)] * 800)
    assert_close(state["log_variance"], torch.tensor(losses, dtype=F64).log(), atol=0.02, rtol=0)


@PROPERTY
@given(sequence=loss_sequences(), data=st.data())
def test_uncertainty_permuting_sources_permutes_everything(
    sequence: list[list[float]], data: st.DataObject
) -> None:
    num = len(sequence[0])
    order = torch.tensor(data.draw(st.permutations(list(range(num)))))
    strategy = uncertainty(lr=0.1)
    alphas, state = run(strategy, [stats_of(row) for row in sequence])
    permuted, state_p = run(strategy, [stats_of(torch.tensor(row)[order]) for row in sequence])
    for alpha, alpha_p in zip(alphas, permuted, strict=True):
        assert torch.equal(alpha[order], alpha_p)
    assert torch.equal(state["log_variance"][order], state_p["log_variance"])


@PROPERTY
@given(sequence=loss_sequences(), scale=st.sampled_from([0.125, 0.5, 2.0, 8.0]))
def test_uncertainty_loss_scale_shifts_log_variance(
    sequence: list[list[float]], scale: float
) -> None:
    """Losses c·L from s_0 = log c follow exactly s + log c, so alpha becomes alpha / c."""
    strategy = uncertainty(lr=0.1)
    alphas, state = run(strategy, [stats_of(row) for row in sequence])
    shifted = strategy.init(len(sequence[0]))
    shifted["log_variance"] = torch.full_like(shifted["log_variance"], math.log(scale))
    for row, alpha in zip(sequence, alphas, strict=True):
        alpha_c, shifted = strategy.update(stats_of([scale * v for v in row]), shifted)
        assert_close(alpha_c, alpha / scale, atol=1e-12, rtol=1e-6)
    assert_close(shifted["log_variance"], state["log_variance"] + math.log(scale))


def test_uncertainty_absent_sources_get_zero_and_keep_state() -> None:
    strategy = uncertainty(lr=0.1)
    state = strategy.init(3)
    _, state = strategy.update(stats_of([2.0, 2.0, 2.0]), state)
    before = clone_state(state)
    # Source 1 absent: its (bogus) loss is ignored, its s and Adam moments are kept.
    alpha, state = strategy.update(stats_of([2.0, 1e9, 2.0], present=[True, False, True]), state)
    assert float(alpha[1]) == 0.0
    assert float(alpha[0]) > 0.0
    for key in ("log_variance", "adam_m", "adam_v", "adam_t"):
        assert torch.equal(state[key][1], before[key][1]), key
        assert not torch.equal(state[key][0], before[key][0]), key


@pytest.mark.parametrize(
    "losses",
    [[0.0, 0.0, 0.0], [-3.0, 1.0, -0.5], [1e300, 1e-300, 1.0], [0.0, 1e12, 5.0]],
    ids=["zero", "negative", "extreme", "mixed"],
)
def test_uncertainty_degenerate_losses_stay_finite(losses: list[float]) -> None:
    strategy = uncertainty(lr=1.0)  # large steps reach the bounds quickly
    alphas, state = run(strategy, [stats_of(losses)] * 60)
    for alpha in alphas:
        assert bool(torch.isfinite(alpha).all())
        assert bool((alpha > 0).all())
    s = state["log_variance"]
    assert bool((s.abs() <= LOG_VARIANCE_BOUND).all())
    if losses[0] <= 0:  # the optimum s -> -inf is stopped at the bound
        assert float(s[0]) == -LOG_VARIANCE_BOUND


def test_uncertainty_single_present_source() -> None:
    alphas, _ = run(uncertainty(), [stats_of([2.0, 5.0], present=[True, False])] * 3)
    for alpha in alphas:
        assert float(alpha[1]) == 0.0
        assert bool(torch.isfinite(alpha).all())


def test_uncertainty_state_round_trip_and_no_mutation() -> None:
    gen = torch.Generator().manual_seed(1)
    sequence = [
        stats_of(torch.rand(3, generator=gen, dtype=F64) * 3, present=[True, bool(i % 3), True])
        for i in range(10)
    ]
    assert_round_trip(uncertainty(lr=0.1), sequence, split=4)
    assert_not_mutated(uncertainty(lr=0.1), sequence[0])


# =========================================================================== dwa


def test_dwa_needs_params_and_initial_state() -> None:
    strategy = dwa()
    assert strategy.name == "dwa"
    assert strategy.needs == frozenset({Need.LOSSES})
    assert strategy.params == {"temperature": 2.0, "period": 50}
    assert isinstance(strategy.params["temperature"], float)
    assert int(strategy.init(3)["count"]) == 0


def test_dwa_exact_two_periods_then_softmax() -> None:
    # period 2, T = 2. Period 0: source 0 sees 3, 5 (mean 4), source 1 sees 4, 4 (mean 4).
    # Period 1: source 0 sees 1, 3 (mean 2), source 1 sees 3.6, 3.6 (mean 3.6).
    # Period 2: r = (2/4, 3.6/4) = (0.5, 0.9); alpha = 2 softmax(r / 2) = 2 softmax(.25, .45)
    #   = (2 / (1 + e^0.2), 2 / (1 + e^-0.2)) = (0.9003320053750443, 1.099667994624956).
    strategy = dwa(temperature=2.0, period=2)
    losses = [[3.0, 4.0], [5.0, 4.0], [1.0, 3.6], [3.0, 3.6], [9.0, 9.0], [0.1, 7.0]]
    alphas, state = run(strategy, [stats_of(row) for row in losses])
    for alpha in alphas[:4]:  # the first two periods: equal weights
        assert_close(alpha, expected(1.0, 1.0))
    for alpha in alphas[4:]:  # constant within period 2, whatever its losses
        assert_close(alpha, expected(0.9003320053750443, 1.099667994624956))
    # Period 2's means (4.55, 8) are now the last ones; period 1's the ones before.
    assert_close(state["last"], expected(4.55, 8.0))
    assert_close(state["before_last"], expected(2.0, 3.6))
    # Period 3: r = (4.55 / 2, 8 / 3.6); the source whose loss rose more weighs more.
    alpha, _ = strategy.update(stats_of([1.0, 1.0]), state)
    r = torch.tensor([4.55 / 2.0, 8.0 / 3.6], dtype=F64)
    assert_close(alpha, 2 * torch.softmax(r / 2, dim=0))
    assert float(alpha[1]) < float(alpha[0])  # 2.275 > 2.222: source 0 rose more


def direct_dwa(sequence: list[list[float]], temperature: float, period: int) -> list[torch.Tensor]:
    """The MTAN training loop: a buffer of per-epoch mean losses, lambda from epochs t-1, t-2."""
    num = len(sequence[0])
    epoch_means: list[torch.Tensor] = []
    alphas = []
    for step in range(len(sequence)):
        epoch = step // period
        if epoch >= 2:
            w = epoch_means[epoch - 1] / epoch_means[epoch - 2]
            alphas.append(num * torch.softmax(w / temperature, dim=0))  # exp(w/T) / Σ, stably
        else:
            alphas.append(torch.ones(num, dtype=F64))
        if (step + 1) % period == 0:
            block = torch.tensor(sequence[step + 1 - period : step + 1], dtype=F64)
            epoch_means.append(block.mean(dim=0))
    return alphas


@PROPERTY
@given(
    sequence=loss_sequences(max_steps=16),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    period=st.integers(1, 4),
)
def test_dwa_matches_per_epoch_buffer(
    sequence: list[list[float]], temperature: float, period: int
) -> None:
    alphas, _ = run(dwa(temperature=temperature, period=period), [stats_of(r) for r in sequence])
    for alpha, alpha_ref in zip(alphas, direct_dwa(sequence, temperature, period), strict=True):
        assert_close(alpha, alpha_ref, atol=1e-12, rtol=1e-10)


def test_dwa_purpose_slower_falling_loss_weighs_more() -> None:
    # Losses fall by 10%, 30% and 50% per period: the slowest gets the most weight.
    strategy = dwa(period=5)
    factors = torch.tensor([0.9, 0.7, 0.5], dtype=F64)
    state = strategy.init(3)
    alpha = torch.empty(0)
    for step in range(40):
        alpha, state = strategy.update(stats_of(factors ** (step // 5)), state)
    assert float(alpha[0]) > float(alpha[1]) > float(alpha[2])
    assert_close(alpha, 3 * torch.softmax(factors / 2, dim=0))


@PROPERTY
@given(sequence=loss_sequences(max_steps=16), data=st.data())
def test_dwa_invariances(sequence: list[list[float]], data: st.DataObject) -> None:
    num = len(sequence[0])
    strategy = dwa(period=2)
    alphas, _ = run(strategy, [stats_of(row) for row in sequence])
    # Scaling one source's losses by a power of two leaves every ratio, so alpha, unchanged.
    k = data.draw(st.integers(0, num - 1))
    scale = data.draw(st.sampled_from([0.25, 2.0, 1024.0]))
    scaled = [[v * scale if j == k else v for j, v in enumerate(row)] for row in sequence]
    for alpha, alpha_s in zip(alphas, run(strategy, [stats_of(r) for r in scaled])[0], strict=True):
        assert torch.equal(alpha, alpha_s)
    # Permuting sources permutes alpha; alpha sums to the number of sources.
    order = torch.tensor(data.draw(st.permutations(list(range(num)))))
    permuted = run(strategy, [stats_of(torch.tensor(row)[order]) for row in sequence])[0]
    for alpha, alpha_p in zip(alphas, permuted, strict=True):
        assert_close(alpha[order], alpha_p, atol=1e-13, rtol=0)
        assert_close(alpha.sum(), torch.tensor(float(num), dtype=F64))


def test_dwa_absent_sources() -> None:
    strategy = dwa(period=2)
    state = strategy.init(3)
    every = [True, True, True]
    for losses in ([4.0, 4.0, 4.0], [4.0, 4.0, 4.0], [2.0, 2.0, 3.0], [2.0, 2.0, 3.0]):
        _, state = strategy.update(stats_of(losses, present=every), state)
    before = clone_state(state)
    # Source 2 absent for the whole of period 2: it adds no mean and keeps its two last ones.
    no_two = [True, True, False]
    alpha, state = strategy.update(stats_of([1.0, 2.0, 77.0], present=no_two), state)
    # r = (0.5, 0.5) over the two present sources: equal weights 1, and 0 for the absent one.
    assert_close(alpha, expected(1.0, 1.0, 0.0))
    _, state = strategy.update(stats_of([1.0, 2.0, 77.0], present=no_two), state)
    assert_close(state["last"], expected(1.0, 2.0, 3.0))
    assert_close(state["before_last"], expected(2.0, 2.0, 4.0))
    assert state["periods"].tolist() == [3, 3, 2]
    assert int(state["seen"][2]) == 0
    assert float(state["sum"][2]) == 0.0
    assert torch.equal(state["last"][2], before["last"][2])
    # Period 3: r = (0.5, 1, 0.75) over all three again.
    alpha, _ = strategy.update(stats_of([1.0, 1.0, 1.0]), state)
    assert_close(alpha, 3 * torch.softmax(expected(0.5, 1.0, 0.75) / 2, dim=0))
    # A source present only in some steps of a period: its mean is over those steps only.
    state = strategy.init(2)
    _, state = strategy.update(stats_of([5.0, 3.0], present=[True, False]), state)
    _, state = strategy.update(stats_of([1.0, 1.0]), state)
    assert_close(state["last"], expected(3.0, 1.0))


@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],  # zero denominators
        [[-2.0, 1.0], [3.0, -1.0], [1.0, 1.0]],  # negative losses
        [[1e-300, 1.0], [1e300, 1.0], [1.0, 1.0]],  # an overflowing ratio
    ],
    ids=["zero", "negative", "overflow"],
)
@pytest.mark.parametrize("temperature", [2.0, 1e-300])
def test_dwa_degenerate_losses_stay_finite(rows: list[list[float]], temperature: float) -> None:
    strategy = dwa(temperature=temperature, period=1)
    alphas, _ = run(strategy, [stats_of(row) for row in rows * 3])
    for alpha in alphas:
        assert bool(torch.isfinite(alpha).all())
        assert_close(alpha.sum(), torch.tensor(2.0, dtype=F64))
    # Zero or negative denominators count as ratio 1: zero losses give equal weights.
    alphas, _ = run(dwa(period=1), [stats_of([0.0, 0.0])] * 4)
    assert_close(alphas[-1], expected(1.0, 1.0))


def test_dwa_single_and_no_present_source() -> None:
    alphas, _ = run(dwa(period=1), [stats_of([1.0, 2.0], present=[True, False])] * 4)
    assert_close(alphas[-1], expected(1.0, 0.0))
    alphas, _ = run(dwa(period=1), [stats_of([1.0, 2.0], present=[False, False])] * 2)
    assert_close(alphas[-1], expected(0.0, 0.0))


def test_dwa_state_round_trip_and_no_mutation() -> None:
    gen = torch.Generator().manual_seed(2)
    sequence = [
        stats_of(torch.rand(3, generator=gen, dtype=F64) + 0.1, present=[True, bool(i % 4), True])
        for i in range(14)
    ]
    assert_round_trip(dwa(period=3), sequence, split=5)
    assert_not_mutated(dwa(period=2), sequence[0])


# =========================================================================== gradnorm


def test_gradnorm_needs_params_and_initial_state() -> None:
    strategy = gradnorm()
    assert strategy.name == "gradnorm"
    assert strategy.needs == frozenset({Need.NORMS, Need.LOSSES})
    assert strategy.params == {"alpha": 1.5, "lr": 0.01}
    assert all(isinstance(v, float) for v in strategy.params.values())
    assert_close(strategy.init(3)["weights"], expected(1.0, 1.0, 1.0))


def test_gradnorm_exact_norm_balancing_step() -> None:
    # norms (1, 3), equal losses so r = 1: G = w * norms = (1, 3), mean 2, goal (2, 2).
    # dL/dw = sign(G - goal) * norms = (-1, 3); Adam's first step is lr * sign: w = (1.01, 0.99),
    # already summing to 2. The step itself is weighted by w before the update: (1, 1).
    strategy = gradnorm(lr=0.01)
    stats = stats_of([1.0, 1.0], norms=[1.0, 3.0])
    alphas, state = run(strategy, [stats, stats])
    assert_close(alphas[0], expected(1.0, 1.0))
    assert_close(alphas[1], expected(1.01, 0.99), atol=1e-9, rtol=0)
    # Step 2: G = (1.01, 2.97), goal (1.99, 1.99), the same gradient (-1, 3); with a constant
    # gradient Adam's m_hat = g and v_hat = g^2 again, so w moves by lr once more.
    assert_close(state["weights"], expected(1.02, 0.98), atol=1e-9, rtol=0)


def test_gradnorm_exact_training_rate_step() -> None:
    # Step 1: losses (2, 1) are L(0); r = (1, 1), G = goal = (1, 1): zero gradient, w stays 1
    # (Adam counts the step). Step 2: losses (1, 1), L~ = (0.5, 1), r = (2/3, 4/3); alpha = 1
    # gives goal (2/3, 4/3) against G = (1, 1): dL/dw = (1, -1). Adam at t = 2 with m = 0.1 g,
    # v = 0.001 g^2: step = lr (0.1/0.19) / sqrt(0.001/0.001999) = lr * 0.7441368235669872.
    strategy = gradnorm(alpha=1.0, lr=0.01)
    norms = [1.0, 1.0]
    alphas, state = run(strategy, [stats_of([2.0, 1.0], norms), stats_of([1.0, 1.0], norms)])
    assert_close(alphas[1], expected(1.0, 1.0))
    # The source that trained less (its loss did not fall) gains weight.
    assert_close(state["weights"], expected(0.9925586317643301, 1.0074413682356698))
    assert_close(state["initial_loss"], expected(2.0, 1.0))


def direct_gradnorm(
    losses: list[list[float]], norms: list[list[float]], alpha: float, lr: float
) -> list[torch.Tensor]:
    """GradNorm as usually written: w a parameter in torch Adam, L_grad by autograd with the
    target detached, then w clipped at 0 and renormalised to sum to the number of tasks."""
    num = len(losses[0])
    w = torch.ones(num, dtype=F64, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=lr)
    initial = torch.tensor(losses[0], dtype=F64)
    alphas = []
    for row, norm_row in zip(losses, norms, strict=True):
        alphas.append(w.detach().clone())
        rate = torch.tensor(row, dtype=F64) / initial
        rate = rate / rate.mean()
        weighted = w * torch.tensor(norm_row, dtype=F64)
        goal = (weighted.mean() * rate**alpha).detach()
        optimizer.zero_grad()
        (weighted - goal).abs().sum().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        with torch.no_grad():
            w.clamp_(min=0.0)
            w.mul_(num / w.sum())
    return alphas


@PROPERTY
@given(
    losses=loss_sequences(),
    data=st.data(),
    alpha=st.sampled_from([0.0, 0.5, 1.5]),
    lr=st.sampled_from([0.01, 0.1]),
)
def test_gradnorm_matches_autograd_and_torch_adam(
    losses: list[list[float]], data: st.DataObject, alpha: float, lr: float
) -> None:
    shape = (len(losses), len(losses[0]))
    values = st.integers(1, 200).map(lambda n: n / 8)
    norms = data.draw(hnp.arrays(np.float64, shape, elements=values)).tolist()
    sequence = [stats_of(row, n) for row, n in zip(losses, norms, strict=True)]
    alphas, _ = run(gradnorm(alpha=alpha, lr=lr), sequence)
    for mine, ref in zip(alphas, direct_gradnorm(losses, norms, alpha, lr), strict=True):
        assert_close(mine, ref, atol=1e-10, rtol=1e-9)


def test_gradnorm_purpose_weighted_norms_move_to_balance() -> None:
    # Norms (1, 4, 2) and equal losses (r = 1): balance is w_k * norm_k equal for all k, i.e.
    # w_k ∝ 1 / norm_k = (1, 1/4, 1/2), which sums to 1.75; rescaled to sum 3: that times 3/1.75.
    strategy = gradnorm(lr=0.01)
    norms = torch.tensor([1.0, 4.0, 2.0], dtype=F64)
    stats = stats_of([1.0, 1.0, 1.0], norms)
    state = strategy.init(3)
    spreads = []
    for _ in range(400):
        alpha, state = strategy.update(stats, state)
        weighted = alpha * norms
        spreads.append(float(weighted.max() - weighted.min()))
    assert spreads[0] == 3.0
    assert spreads[100] < spreads[50] < spreads[0]
    assert spreads[-1] < 0.1
    assert_close(
        state["weights"], 3 * torch.tensor([1.0, 0.25, 0.5], dtype=F64) / 1.75, atol=0.02, rtol=0
    )


def test_gradnorm_purpose_slower_training_task_gets_larger_norm() -> None:
    # Equal norms; source 0's loss falls 4x, source 1's 2x, source 2's not at all. With a = 1
    # the balance point is w ∝ r = (0.25, 0.5, 1) / mean: the slowest task weighs most.
    strategy = gradnorm(alpha=1.0, lr=0.01)
    norms = [1.0, 1.0, 1.0]
    state = strategy.init(3)
    _, state = strategy.update(stats_of([1.0, 1.0, 1.0], norms), state)
    for _ in range(400):
        _, state = strategy.update(stats_of([0.25, 0.5, 1.0], norms), state)
    w = state["weights"]
    assert float(w[2]) > float(w[1]) > float(w[0])
    assert_close(w, 3 * torch.tensor([0.25, 0.5, 1.0], dtype=F64) / 1.75, atol=0.02, rtol=0)


@PROPERTY
@given(losses=loss_sequences(), data=st.data())
def test_gradnorm_invariances(losses: list[list[float]], data: st.DataObject) -> None:
    num = len(losses[0])
    values = st.integers(8, 200).map(lambda n: n / 8)
    norms = data.draw(hnp.arrays(np.float64, (len(losses), num), elements=values))
    strategy = gradnorm(lr=0.05)

    def alphas_of(loss_rows: list[list[float]], norm_rows: np.ndarray) -> list[torch.Tensor]:
        return run(
            strategy, [stats_of(r, n.tolist()) for r, n in zip(loss_rows, norm_rows, strict=True)]
        )[0]

    base = alphas_of(losses, norms)
    # One source's losses times a power of two: L / L(0) is unchanged, so is everything.
    k = data.draw(st.integers(0, num - 1))
    scaled = [[v * 4.0 if j == k else v for j, v in enumerate(row)] for row in losses]
    for a, b in zip(base, alphas_of(scaled, norms), strict=True):
        assert torch.equal(a, b)
    # All norms times c: the weight gradient scales by c, which Adam ignores (up to eps).
    for a, b in zip(base, alphas_of(losses, norms * 8.0), strict=True):
        assert_close(a, b, atol=1e-7, rtol=0)
    # Permuting sources permutes alpha.
    order = data.draw(st.permutations(list(range(num))))
    permuted = alphas_of([[row[j] for j in order] for row in losses], norms[:, order])
    for a, b in zip(base, permuted, strict=True):
        assert_close(a[torch.tensor(order)], b, atol=1e-12, rtol=0)


def test_gradnorm_absent_sources_get_zero_and_keep_state() -> None:
    strategy = gradnorm(lr=0.1)
    state = strategy.init(3)
    _, state = strategy.update(stats_of([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), state)
    before = clone_state(state)
    mask = [True, False, True]
    alpha, state = strategy.update(stats_of([1.0, 9.0, 1.0], [1.0, 50.0, 3.0], mask), state)
    assert float(alpha[1]) == 0.0
    for key in ("weights", "adam_m", "adam_v", "adam_t", "initial_loss"):
        assert torch.equal(state[key][1], before[key][1]), key
    # The present ones are rescaled among themselves: they sum to 2.
    assert_close(state["weights"][0] + state["weights"][2], torch.tensor(2.0, dtype=F64))
    # A source first present late takes its first loss as L(0).
    state = strategy.init(2)
    _, state = strategy.update(stats_of([1.0, 0.0], [1.0, 0.0], [True, False]), state)
    assert state["has_initial"].tolist() == [True, False]
    _, state = strategy.update(stats_of([1.0, 3.0], [1.0, 1.0]), state)
    assert_close(state["initial_loss"], expected(1.0, 3.0))


def test_gradnorm_single_present_source_is_left_alone() -> None:
    strategy = gradnorm(lr=0.1)
    alphas, state = run(strategy, [stats_of([1.0, 5.0], [2.0, 1.0], [True, False])] * 3)
    for alpha in alphas:
        assert_close(alpha, expected(1.0, 0.0))
    assert int(state["adam_t"][0]) == 0


@pytest.mark.parametrize(
    ("losses", "norms"),
    [
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),  # zero gradients
        ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]),  # zero losses from the start
        ([-1.0, 2.0, -3.0], [1.0, 2.0, 3.0]),  # negative losses
        ([1e-300, 1e300, 1.0], [1e-300, 1e300, 1.0]),  # extreme scales
    ],
    ids=["zero-grad", "zero-loss", "negative", "extreme"],
)
@pytest.mark.parametrize("alpha", [1.5, 0.0, 50.0])
def test_gradnorm_degenerate_inputs_stay_finite(
    losses: list[float], norms: list[float], alpha: float
) -> None:
    strategy = gradnorm(alpha=alpha, lr=1.0)
    sequence = [stats_of(losses, norms), stats_of([0.0, 1.0, 0.0], norms)] * 5
    alphas, _ = run(strategy, sequence)
    for a in alphas:
        assert bool(torch.isfinite(a).all())
        assert bool((a >= 0).all())
        assert_close(a.sum(), torch.tensor(3.0, dtype=F64))


def test_gradnorm_state_round_trip_and_no_mutation() -> None:
    gen = torch.Generator().manual_seed(3)
    sequence = [
        stats_of(
            torch.rand(3, generator=gen, dtype=F64) + 0.1,
            torch.rand(3, generator=gen, dtype=F64) * 4,
            present=[True, bool(i % 3), True],
        )
        for i in range(12)
    ]
    assert_round_trip(gradnorm(lr=0.05), sequence, split=5)
    assert_not_mutated(gradnorm(lr=0.05), sequence[1])


# =========================================================================== parameters

Constructor = Callable[..., Strategy]


@pytest.mark.parametrize(
    ("constructor", "params", "fragment"),
    [
        (uncertainty, {"lr": 0.0}, "lr"),
        (uncertainty, {"lr": -0.1}, "lr"),
        (uncertainty, {"lr": float("inf")}, "lr"),
        (uncertainty, {"lr": True}, "lr"),
        (dwa, {"temperature": 0.0}, "temperature"),
        (dwa, {"temperature": float("nan")}, "temperature"),
        (dwa, {"period": 0}, "period"),
        (dwa, {"period": 2.5}, "period"),
        (dwa, {"period": True}, "period"),
        (gradnorm, {"alpha": -0.5}, "alpha"),
        (gradnorm, {"alpha": float("inf")}, "alpha"),
        (gradnorm, {"lr": 0.0}, "lr"),
        (gradnorm, {"lr": float("nan")}, "lr"),
    ],
)
def test_bad_params(constructor: Constructor, params: dict[str, object], fragment: str) -> None:
    with pytest.raises(StrategyError, match=fragment):
        constructor(**params)


@pytest.mark.parametrize(
    ("constructor", "params"),
    [
        (uncertainty, {"lr": 0.5}),
        (dwa, {"temperature": 1, "period": 7}),
        (gradnorm, {"alpha": 0, "lr": 0.2}),
    ],
)
def test_params_echo_keyword_arguments(constructor: Constructor, params: dict[str, object]) -> None:
    assert constructor(**params).params == params
