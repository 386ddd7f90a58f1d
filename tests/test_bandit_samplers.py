"""Tests for the samplers ``proportional``, ``exp3`` (EXP3-FLAD) and ``ucb1`` (UCB1-FLAD), the
sampler feedback interface, and ``auxilia bench sources``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from auxilia import samplers, strategies
from auxilia.bench.many_sources import synthetic_problem
from auxilia.cli import app
from auxilia.errors import StrategyError
from auxilia.samplers.base import inclusion_probabilities, systematic_sample
from auxilia.samplers.exp3 import exp3_probabilities, exploration
from auxilia.samplers.proportional import proportional_probabilities
from auxilia.samplers.ucb1 import ucb1_index
from auxilia.statistics import Need, Statistics
from auxilia.train import Trainer, TrainSettings
from tiny_problem import assert_same

F64 = torch.float64
PROPERTY = settings(max_examples=40, deadline=None)
BANDITS = ("exp3", "ucb1")
DRAWING = ("proportional", "exp3", "ucb1")


def _stats(mask: torch.Tensor, cosines: list[float]) -> Statistics:
    """Statistics of a step where source k (k >= 1) has cos(g_k, g_0) = cosines[k - 1]:
    unit norms, so the target row holds the cosines; absent sources have zeros."""
    row = torch.tensor([1.0, *cosines], dtype=F64)
    zero = torch.zeros_like(row)
    return Statistics(
        present=mask.clone(),
        target_row=torch.where(mask, row, zero),
        norms=torch.where(mask, torch.ones_like(row), zero),
    )


def _mask(num_sources: int, drawn: list[int]) -> torch.Tensor:
    mask = torch.zeros(num_sources, dtype=torch.bool)
    mask[[0, *drawn]] = True
    return mask


def _simulate(
    sampler: samplers.Sampler,
    rewards: list[float],
    rounds: int,
    seed: int = 0,
    coefficients: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw/observe ``rounds`` times with a fixed reward per arm; return how often each source
    (target included) was drawn."""
    num = len(rewards) + 1
    state = sampler.init(num, seed)
    counts = torch.zeros(num, dtype=F64)
    coefficients = coefficients if coefficients is not None else torch.ones(num, dtype=F64)
    for _ in range(rounds):
        mask, state = sampler.draw(state, coefficients)
        counts += mask
        state = sampler.observe(state, _stats(mask, rewards), mask)
    return counts


# --------------------------------------------------------------------------- the interface


def test_registry_and_needs() -> None:
    assert {"proportional", "exp3", "ucb1"} <= set(samplers.names())
    for name in BANDITS:
        sampler = samplers.get(name)
        assert sampler.needs == frozenset({Need.TARGET_ROW, Need.NORMS})
        assert sampler.params["per_step"] == 4
    assert samplers.get("exp3").params["beta"] == 1.0
    assert samplers.get("ucb1").params["beta"] == 0.1
    assert samplers.get("proportional").params == {"per_step": 4, "floor": 0.1}
    # Samplers without feedback: no needs, observe keeps the state.
    for name in ("all", "uniform", "proportional"):
        sampler = samplers.get(name)
        assert sampler.needs == frozenset()
        state = sampler.init(4, 0)
        mask = torch.ones(4, dtype=torch.bool)
        assert sampler.observe(state, _stats(mask, [0.1, 0.2, 0.3]), mask) is state


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("exp3", {"per_step": 0}, "per_step"),
        ("exp3", {"beta": 0.0}, "beta"),
        ("exp3", {"beta": 1.5}, "beta"),
        ("ucb1", {"per_step": -1}, "per_step"),
        ("ucb1", {"beta": -0.1}, "beta"),
        ("proportional", {"per_step": 0}, "per_step"),
        ("proportional", {"floor": 0.0}, "floor"),
        ("proportional", {"floor": 1.5}, "floor"),
        ("exp3", {"per_step": 2.5}, "per_step"),
        ("ucb1", {"beta": "high"}, "beta"),
        ("proportional", {"gamma": 0.1}, "gamma"),
    ],
)
def test_parameter_errors_name_the_parameter(name: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(StrategyError, match=f"'{name}'|{name} sampler") as info:
        samplers.get(name, params)
    assert key in str(info.value)


# --------------------------------------------------------------------------- exact updates


def test_exp3_first_policy_and_importance_weighted_update_by_hand() -> None:
    sampler = samplers.exp3(per_step=1)  # beta = 1
    state = sampler.init(5, seed=0)  # K = 4 arms
    # ε_0 = min(1/4, sqrt(ln 4 / 4)) = 1/4, so π = (1 - 4/4) softmax + 1/4: uniform.
    assert exploration(4, 0, 1) == 0.25
    assert exp3_probabilities(state["estimated"][1:], 0, 1).tolist() == [0.25] * 4
    _, state = sampler.draw(state, torch.ones(5, dtype=F64))
    assert state["inclusion"].tolist() == [1.0, 0.25, 0.25, 0.25, 0.25]
    # Arm 2 played with reward cos = 0.6: R̂_2 = 0 + 1 · 0.6 / 0.25 = 2.4, the others stay 0.
    drawn = _mask(5, [2])
    state = sampler.observe(state, _stats(drawn, [0.9, 0.6, -0.4, 0.1]), drawn)
    assert state["estimated"].tolist() == pytest.approx([0.0, 0.0, 2.4, 0.0, 0.0], abs=1e-12)
    assert state["plays"].tolist() == [0, 0, 1, 0, 0]
    assert int(state["steps"]) == 1
    # t = 1: ε_1 = sqrt(ln 4 / (4 · 11)) = 0.1775012, ε_0 = 1/4 scales R̂: logits (0, .6, 0, 0);
    # softmax e^.6 / (3 + e^.6) = 0.3778659, 1 / (3 + e^.6) = 0.2073780;
    # π_2 = (1 - 4 · 0.1775012) · 0.3778659 + 0.1775012 = 0.2870808, others 0.2376397.
    assert exploration(4, 1, 1) == pytest.approx(0.1775012, abs=1e-7)
    policy = exp3_probabilities(state["estimated"][1:], 1, 1)
    assert policy.tolist() == pytest.approx([0.2376397, 0.2870808, 0.2376397, 0.2376397], abs=1e-7)


def test_exp3_several_arms_per_step_weight_by_inclusion_probability() -> None:
    sampler = samplers.exp3(per_step=2)
    state = sampler.init(5, seed=1)
    _, state = sampler.draw(state, torch.ones(5, dtype=F64))
    # Uniform π = 1/4, two arms per step: each arm is in the draw with p = 2 · 1/4 = 1/2.
    assert state["inclusion"].tolist() == [1.0, 0.5, 0.5, 0.5, 0.5]
    drawn = _mask(5, [2, 4])
    state = sampler.observe(state, _stats(drawn, [0.9, 0.6, 0.3, -0.2]), drawn)
    # R̂_a += m · r_a / p_a = 2 r_a / 0.5: arm 2: 2.4, arm 4: -0.8; arms 1 and 3 keep 0.
    assert state["estimated"].tolist() == pytest.approx([0.0, 0.0, 2.4, 0.0, -0.8], abs=1e-12)


def test_exp3_smoothing_with_beta_below_one() -> None:
    sampler = samplers.exp3(per_step=1, beta=0.5)
    state = sampler.init(3, seed=0)  # K = 2, p = 1/2
    drawn = _mask(3, [1])
    _, state = sampler.draw(state, torch.ones(3, dtype=F64))
    state = sampler.observe(state, _stats(drawn, [0.8, 0.0]), drawn)
    assert float(state["smoothed"][1]) == pytest.approx(0.8)  # first reward: R_1 = r_1
    _, state = sampler.draw(state, torch.ones(3, dtype=F64))
    p = float(state["inclusion"][1])
    before = float(state["estimated"][1])
    state = sampler.observe(state, _stats(drawn, [0.2, 0.0]), drawn)
    assert float(state["smoothed"][1]) == pytest.approx(0.5 * 0.8 + 0.5 * 0.2)
    assert float(state["estimated"][1]) == pytest.approx(before + 0.5 / p)


def test_inclusion_probabilities_cap_and_spread_by_hand() -> None:
    # 2 · (0.7, 0.1, 0.1, 0.1) = (1.4, 0.2, 0.2, 0.2): the first is capped at 1 and the
    # remaining 1 is spread over the others in proportion to π: 1/3 each.
    p = inclusion_probabilities(torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=F64), 2)
    assert p.tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    # Capping can cascade: 3 · (0.5, 0.3, 0.1, 0.1) -> (1, 1, .5, .5).
    p = inclusion_probabilities(torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=F64), 3)
    assert p.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5])


def test_ucb1_unplayed_first_then_index_order_and_smoothed_reward() -> None:
    sampler = samplers.ucb1(per_step=1)  # beta = 0.1
    assert sampler.params["beta"] == 0.1
    state = sampler.init(4, seed=0)  # K = 3 arms
    rewards = [0.5, -0.2, 0.1]
    order = []
    for _ in range(3):  # unplayed arms first, lower index first
        mask, state = sampler.draw(state, torch.ones(4, dtype=F64))
        order.append(int(mask[1:].nonzero()))
        state = sampler.observe(state, _stats(mask, rewards), mask)
    assert order == [0, 1, 2]
    # First play sets R̂ to the reward (FLAD's initial alignment), unsmoothed.
    assert state["estimated"][1:].tolist() == pytest.approx(rewards)
    assert state["plays"].tolist() == [0, 1, 1, 1]
    # t = 3, n = 1: index = R̂ + sqrt(2 ln 3) = R̂ + 1.4823038; arm 1 (0.5) wins.
    assert ucb1_index(state).tolist() == pytest.approx(
        [0.5 + 1.4823038, -0.2 + 1.4823038, 0.1 + 1.4823038], abs=1e-7
    )
    mask, state = sampler.draw(state, torch.ones(4, dtype=F64))
    assert mask.tolist() == [True, True, False, False]
    state = sampler.observe(state, _stats(mask, [0.0, 9.0, 9.0]), mask)
    # Smoothed: R̂_1 = 0.9 · 0.5 + 0.1 · 0.0 = 0.45; arms 2 and 3 (not drawn) keep theirs.
    assert state["estimated"][1:].tolist() == pytest.approx([0.45, -0.2, 0.1])
    # t = 4: arm 1 = 0.45 + sqrt(2 ln 4 / 2) = 1.6274100, arm 2 = -0.2 + sqrt(2 ln 4) =
    # 1.4651092, arm 3 = 0.1 + sqrt(2 ln 4) = 1.7651092: the exploration bonus picks arm 3.
    assert ucb1_index(state).tolist() == pytest.approx([1.6274100, 1.4651092, 1.7651092], abs=1e-7)
    mask, _ = sampler.draw(state, torch.ones(4, dtype=F64))
    assert mask.tolist() == [True, False, False, True]


def test_ucb1_several_arms_take_the_largest_indices() -> None:
    sampler = samplers.ucb1(per_step=2)
    state = sampler.init(6, seed=0)
    mask, state = sampler.draw(state, torch.ones(6, dtype=F64))
    assert mask.tolist() == [True, True, True, False, False, False]  # unplayed, in order
    state = sampler.observe(state, _stats(mask, [0.3, 0.2, 0, 0, 0]), mask)
    mask, state = sampler.draw(state, torch.ones(6, dtype=F64))
    assert mask.tolist() == [True, False, False, True, True, False]
    state = sampler.observe(state, _stats(mask, [0, 0, -0.5, 0.9, 0]), mask)
    mask, _ = sampler.draw(state, torch.ones(6, dtype=F64))
    assert mask[5]  # the last unplayed arm
    assert mask.tolist() == [True, False, False, False, True, True]  # then the best, 0.9


def test_proportional_probabilities_by_hand() -> None:
    # c = (target, 4, 2, 1, 1, 0), floor 0.1, K = 5: π = 0.9 c / 8 + 0.02.
    coefficients = torch.tensor([7.0, 4.0, 2.0, 1.0, 1.0, 0.0], dtype=F64)
    policy = proportional_probabilities(coefficients, 0.1)
    assert policy.tolist() == pytest.approx([0.47, 0.245, 0.1325, 0.1325, 0.02])
    # Negative coefficients count as 0; all zero gives uniform.
    policy = proportional_probabilities(torch.tensor([1.0, -3.0, 1.0], dtype=F64), 0.5)
    assert policy.tolist() == pytest.approx([0.25, 0.75])
    assert proportional_probabilities(torch.zeros(4, dtype=F64), 0.1).tolist() == [1 / 3] * 3


# --------------------------------------------------------------------------- purpose


@pytest.mark.parametrize("name", BANDITS)
@pytest.mark.parametrize("per_step", [1, 2])
def test_bandits_draw_the_best_arm_most_often(name: str, per_step: int) -> None:
    rewards = [0.1, -0.3, 0.2, 0.9, 0.0, -0.5, 0.3, 0.05]  # arm 4 (index 3) is the best
    counts = _simulate(samplers.get(name, {"per_step": per_step}), rewards, rounds=300)
    arms = counts[1:]
    assert int(arms.argmax()) == 3, arms.tolist()
    others = torch.cat([arms[:3], arms[4:]])
    assert float(arms[3]) > 2.5 * float(others.mean()), arms.tolist()
    assert float(counts[0]) == 300.0


def test_proportional_draws_in_proportion_to_coefficients() -> None:
    coefficients = torch.tensor([1.0, 4.0, 2.0, 1.0, 1.0, 0.0], dtype=F64)
    rounds = 3000
    counts = _simulate(
        samplers.proportional(per_step=2, floor=0.1), [0.0] * 5, rounds, coefficients=coefficients
    )
    # p = 2 π = (0.94, 0.49, 0.265, 0.265, 0.04): the zero-coefficient source is not starved.
    frequency = counts[1:] / rounds
    expected = torch.tensor([0.94, 0.49, 0.265, 0.265, 0.04], dtype=F64)
    assert bool(((frequency - expected).abs() < 0.03).all()), frequency.tolist()
    assert float(frequency[4]) > 0.02


def test_systematic_sample_has_exact_inclusion_probabilities() -> None:
    p = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.2, 0.1], dtype=F64)  # sums to 3
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, dtype=F64)
    for _ in range(3000):
        picked = systematic_sample(p, 3, generator)
        assert len(set(picked.tolist())) == 3
        counts[picked] += 1
    assert bool(((counts / 3000 - p).abs() < 0.03).all()), (counts / 3000).tolist()
    assert float(counts[0]) == 3000.0  # p = 1: in every draw


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(
    name=st.sampled_from(DRAWING),
    num=st.integers(1, 12),
    per_step=st.integers(1, 14),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_masks_hold_the_target_and_min_per_step_k(
    name: str, num: int, per_step: int, seed: int, data: st.DataObject
) -> None:
    sampler = samplers.get(name, {"per_step": per_step})
    state = sampler.init(num, seed)
    arms = num - 1
    reward = st.floats(-1.0, 1.0, allow_nan=False)
    for _ in range(6):
        coefficients = torch.tensor(
            data.draw(st.lists(st.floats(-2.0, 5.0), min_size=num, max_size=num)), dtype=F64
        )
        mask, state = sampler.draw(state, coefficients)
        assert mask.dtype == torch.bool
        assert mask.shape == (num,)
        assert bool(mask[0])
        assert int(mask.sum()) == min(per_step, arms) + 1
        rewards = data.draw(st.lists(reward, min_size=arms, max_size=arms))
        state = sampler.observe(state, _stats(mask, rewards), mask)


@PROPERTY
@given(
    estimated=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=30),
    steps=st.integers(0, 10**6),
    rounds=st.integers(1, 8),
)
def test_exp3_policy_sums_to_one_and_explores(
    estimated: list[float], steps: int, rounds: int
) -> None:
    policy = exp3_probabilities(torch.tensor(estimated, dtype=F64), steps, rounds)
    epsilon = exploration(len(estimated), steps, rounds)
    assert bool(torch.isfinite(policy).all())
    assert float(policy.sum()) == pytest.approx(1.0, abs=1e-9)
    assert float(policy.min()) >= epsilon - 1e-12
    assert 0.0 <= epsilon <= 1.0 / len(estimated)
    count = min(rounds, len(estimated))
    p = inclusion_probabilities(policy, count)
    assert float(p.sum()) == pytest.approx(count, abs=1e-9)
    assert float(p.max()) <= 1.0
    assert float(p.min()) >= 0.0


@PROPERTY
@given(
    coefficients=st.lists(st.floats(-5.0, 50.0), min_size=2, max_size=30),
    floor=st.floats(0.001, 1.0),
)
@example(coefficients=[0.0, 5e-324], floor=0.5)  # found by hypothesis: (1 − f)·c underflowed
def test_proportional_policy_sums_to_one_with_a_floor(
    coefficients: list[float], floor: float
) -> None:
    policy = proportional_probabilities(torch.tensor(coefficients, dtype=F64), floor)
    arms = len(coefficients) - 1
    assert float(policy.sum()) == pytest.approx(1.0, abs=1e-9)
    assert float(policy.min()) >= floor / arms - 1e-12


# --------------------------------------------------------------------------- in the Trainer


def _trainer(out: Path | None, steps: int, sampler: str = "exp3") -> Trainer:
    target, sources = synthetic_problem(9, samples=12, features=6, batch_size=4, seed=3)
    return Trainer(
        target,
        sources,
        strategy=strategies.get("equal"),  # needs nothing: the sampler's needs must get through
        sampler=samplers.get(sampler, {"per_step": 2}),
        trunk_params={"hidden": [8]},
        settings=TrainSettings(
            steps=steps, log_every=5, checkpoint_every=10, eval_every=100, seed=1
        ),
        out_dir=out,
        quiet=True,
    )


@pytest.mark.parametrize("name", BANDITS)
def test_trainer_passes_needs_and_feeds_rewards_back(name: str) -> None:
    trainer = _trainer(None, steps=6, sampler=name)
    assert {Need.TARGET_ROW, Need.NORMS} <= trainer.engine.needs
    for step in range(1, 7):
        trainer.train_step(step)
    state = trainer.sampler_state
    assert int(state["plays"].sum()) == 12  # 2 arms per step, every reward observed
    assert int(state["plays"][0]) == 0  # the target is no arm
    played = state["plays"] > 0
    assert bool((state["estimated"][played] != 0).any())
    assert bool((state["estimated"][~played] == 0).all())


def _checkpoint(out: Path) -> dict[str, Any]:
    path = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("wall_seconds")
    return state


def test_exp3_run_resumed_from_a_checkpoint_is_bitwise_identical(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full", steps=20).fit()
    _trainer(tmp_path / "split", steps=10).fit()
    resumed = _trainer(tmp_path / "split", steps=20).fit(resume=True)
    for results in (full, resumed):
        results.pop("wall_seconds")
    assert resumed == full
    a, b = _checkpoint(tmp_path / "split"), _checkpoint(tmp_path / "full")
    assert a["step"] == b["step"] == 20
    assert_same(a, b)  # model, optimizer, sampler (R̂, plays, RNG), planner, ledger
    assert int(a["sampler"]["steps"]) == 20
    metrics = [
        (tmp_path / d / "metrics.jsonl").read_text(encoding="utf-8") for d in ("split", "full")
    ]
    assert metrics[0] == metrics[1]


def test_run_with_sources_never_drawn_writes_results_and_report(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "run", steps=2, sampler="ucb1")  # 4 of 9 datasets drawn
    results = trainer.fit()
    never = [row for row in results["sources"] if row["drawn_steps"] == 0]
    assert len(never) == 5
    assert all(row["mean_coefficient"] is None for row in never)
    assert (tmp_path / "run" / "report.html").is_file()


def test_batch_planner_reads_its_older_per_stream_state() -> None:
    trainer = _trainer(None, steps=1)
    planner = trainer.planner
    packed = planner.state_dict()
    assert set(packed) == {"streams", "rng", "order", "position"}
    older = {str(k): stream.state_dict() for k, stream in planner.streams.items()}
    expected = planner.next(torch.ones(10, dtype=torch.bool)).x
    planner.load_state_dict(older)
    assert torch.equal(planner.next(torch.ones(10, dtype=torch.bool)).x, expected)
    planner.load_state_dict(packed)
    assert torch.equal(planner.next(torch.ones(10, dtype=torch.bool)).x, expected)


# --------------------------------------------------------------------------- auxilia bench


def test_bench_sources_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "sources",
            "--sources",
            "2",
            "--sources",
            "5",
            "--steps",
            "6",
            "--warmup",
            "2",
            "--samples",
            "6",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "threads: 1" in result.output
    records = json.loads(out.read_text(encoding="utf-8"))
    assert [r["sources"] for r in records] == [2, 5]
    assert all(r["sampler"] == "exp3" and r["per_step"] == 4 for r in records)
    assert records[0]["ratio"] == 1.0
    for r in records:
        assert r["median_step_seconds"] > 0
        assert r["steps_timed"] == 3
        assert math.isclose(
            r["ratio"], r["median_step_seconds"] / records[0]["median_step_seconds"]
        )
    assert records[0]["sources_per_step"] == 2.0  # per_step 4 > 2 datasets: all of them
    assert records[1]["sources_per_step"] == 4.0
