"""``auxilia bench quality``: aggregation on hand-made numbers, ground truth, cache, a smoke run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auxilia.bench import quality as quality_module
from auxilia.bench.aggregate import Bar, oracle_fraction, rankdata, spearman, standing
from auxilia.bench.ground_truth import group_truth, loo_reliability, oracle_subset, subsets
from auxilia.bench.quality import QualitySettings, run_quality
from auxilia.bench.runs import RunSpec
from tiny_problem import Outcome

# ---- aggregation ---------------------------------------------------------------------------


def test_rankdata_gives_ties_their_average_rank() -> None:
    assert rankdata([10.0, 30.0, 20.0]) == [1.0, 3.0, 2.0]
    assert rankdata([1.0, 2.0, 2.0, 5.0]) == [1.0, 2.5, 2.5, 4.0]
    assert rankdata([]) == []


def test_spearman_on_hand_made_numbers() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 3, 2, 1]) == pytest.approx(-1.0)
    # monotone but not linear: ranks agree exactly
    assert spearman([1, 2, 3], [1, 100, 1000]) == pytest.approx(1.0)
    # ranks (1,2,3,4) against (2,1,4,3): 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    # a constant side (target-only's zero credit) has no correlation
    assert spearman([0, 0, 0], [1, 2, 3]) is None
    assert spearman([1], [1]) is None
    with pytest.raises(ValueError, match="values against"):
        spearman([1, 2], [1])


def test_oracle_fraction_and_its_threshold() -> None:
    assert oracle_fraction(85.0, 80.0, 90.0, 1.0) == pytest.approx(0.5)
    assert oracle_fraction(78.0, 80.0, 90.0, 1.0) == pytest.approx(-0.2)
    assert oracle_fraction(92.0, 80.0, 90.0, 1.0) == pytest.approx(1.2)
    assert oracle_fraction(85.0, 80.0, 80.5, 1.0) is None  # oracle gain under the threshold
    assert oracle_fraction(85.0, 80.0, 79.0, 1.0) is None


def _row(delta: float, fraction: float | None, rho: float | None) -> dict[str, Any]:
    return {
        "status": "ok",
        "delta": delta,
        "oracle_fraction": fraction,
        "spearman_credit": rho,
        "spearman_coefficient": rho,
    }


def test_bar_verdicts_on_hand_made_rows() -> None:
    bar = Bar()
    scenarios = ["a", "b", "c"]
    good = standing(
        "good", [_row(2.0, 0.9, 0.9), _row(-0.5, 0.8, 0.7), _row(0, None, None)], scenarios, bar
    )
    assert good["no_harm"]
    assert good["captures_gain"]
    assert good["knows_why"]
    assert good["meets_bar"]
    assert good["mean_oracle_fraction"] == pytest.approx(0.85)
    assert good["oracle_scenarios"] == 2
    assert good["worst_delta"] == pytest.approx(-0.5)

    harmful = standing("harmful", [_row(5.0, 1.0, 1.0), _row(-1.5, 1.0, 1.0), None], scenarios, bar)
    assert harmful["no_harm"] is False
    assert harmful["meets_bar"] is False
    assert harmful["missing"] == ["c"]

    weak = standing("weak", [_row(1.0, 0.5, 0.9), _row(1.0, 0.6, 0.5)], ["a", "b"], bar)
    assert weak["captures_gain"] is False
    assert weak["knows_why"] is False
    assert weak["no_harm"] is True
    assert not weak["meets_bar"]

    # no credit anywhere (target-only): "know why" is n/a and the bar is not met
    blind = standing("blind", [_row(0.0, 0.0, None)], ["a"], bar)
    assert blind["knows_why"] is None
    assert not blind["meets_bar"]

    # complete on what ran, but failed on a scenario: not met
    partial = standing("partial", [_row(2.0, 0.9, 0.9), {"status": "failed"}], ["a", "b"], bar)
    assert partial["missing"] == ["b"]
    assert not partial["meets_bar"]


# ---- ground truth --------------------------------------------------------------------------


def test_ground_truth_from_subset_runs() -> None:
    named = subsets(["b", "a"])
    assert named["all"] == ("a", "b")
    assert named["none"] == ()
    assert named["without:a"] == ("b",)
    assert named["only:a"] == ("a",)
    values = {
        0: {("a", "b"): 0.80, ("b",): 0.70, ("a",): 0.85, (): 0.75},
        1: {("a", "b"): 0.82, ("b",): 0.70, ("a",): 0.87, (): 0.77},
    }
    truth = group_truth(["a", "b"], values)
    # leave-one-out a: all - without a = 0.10, 0.12; add-one-in a: only a - none = 0.10, 0.10
    assert truth["a"].loo_mean == pytest.approx(0.11)
    assert truth["a"].add_mean == pytest.approx(0.10)
    # b: all - only a = -0.05; only b (= without a) - none = -0.05, -0.07
    assert truth["b"].loo_mean == pytest.approx(-0.05)
    assert truth["b"].add_mean == pytest.approx(-0.06)
    assert oracle_subset(truth) == ("a",)


def _runs_with_loo(loo: dict[str, list[float]]) -> dict[int, dict[tuple[str, ...], float]]:
    """Subset runs whose leave-one-out values per seed are ``loo`` (all sources at 10)."""
    named = subsets(list(loo))
    seeds = len(next(iter(loo.values())))
    return {
        seed: {
            named["all"]: 10.0,
            **{named[f"without:{g}"]: 10.0 - v[seed] for g, v in loo.items()},
        }
        for seed in range(seeds)
    }


def test_loo_reliability_on_hand_made_seeds() -> None:
    """Four seeds, three groups: the three splits into halves of two, stepped up 2r/(1+r)."""
    steady = {"a": [3, 3, 3, 3], "b": [2, 2, 2, 2], "c": [1, 1, 1, 1]}
    assert loo_reliability(list(steady), _runs_with_loo(steady)) == pytest.approx(1.0)
    # One seed drops b to a's... c's level: the half holding it ranks (3, 1.5, 1.5) against
    # (3, 2, 1): Spearman 1.5 / sqrt(2 · 1.5) = 0.866 in every split; 2r/(1+r) = 0.928.
    shaky = {"a": [3, 3, 3, 3], "b": [2, 2, 2, 0], "c": [1, 1, 1, 1]}
    r = 1.5 / math.sqrt(3.0)
    assert loo_reliability(list(shaky), _runs_with_loo(shaky)) == pytest.approx(2 * r / (1 + r))
    # The last seed reverses the order, and every split puts it in one half: r = -1.
    flipped = {"a": [3, 3, 3, 0], "b": [2, 2, 2, 2], "c": [1, 1, 1, 5]}
    assert loo_reliability(list(flipped), _runs_with_loo(flipped)) == pytest.approx(-1.0)
    # Too few seeds or groups, or a seed missing a leave-one-out run: None / left out.
    assert (
        loo_reliability(["a", "b", "c"], _runs_with_loo({g: v[:3] for g, v in steady.items()}))
        is None
    )
    assert loo_reliability(["a", "b"], _runs_with_loo({"a": [1] * 4, "b": [2] * 4})) is None
    runs = _runs_with_loo({g: [*v, 9] for g, v in shaky.items()})
    del runs[4][("a", "b")]  # seed 4 lacks "without c": only seeds 0-3 count
    assert loo_reliability(list(shaky), runs) == pytest.approx(2 * r / (1 + r))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(4, 7).flatmap(
        lambda seeds: st.tuples(
            st.lists(
                st.lists(st.integers(-20, 20), min_size=seeds, max_size=seeds),
                min_size=3,
                max_size=6,
            ),
            st.lists(st.integers(-5, 5), min_size=seeds, max_size=seeds),
        )
    )
)
def test_loo_reliability_is_a_bounded_rank_statistic(
    case: tuple[list[list[int]], list[int]],
) -> None:
    """In [-1, 1], and unchanged when a seed moves every group by the same amount (a seed on
    which every source matters more ranks them the same). Integers keep the means exact."""
    rows, shifts = case
    loo = {f"g{i}": [float(v) for v in row] for i, row in enumerate(rows)}
    value = loo_reliability(list(loo), _runs_with_loo(loo))
    shifted = {g: [v + c for v, c in zip(row, shifts, strict=True)] for g, row in loo.items()}
    moved = loo_reliability(list(shifted), _runs_with_loo(shifted))
    if value is None:
        assert moved is None
        return
    assert -1.0 <= value <= 1.0
    assert moved == pytest.approx(value)


# ---- running the grid ----------------------------------------------------------------------

TINY = [
    "--scenario",
    "digits",
    "--strategy",
    "equal,gcs,auto:projection",
    "--seeds",
    "2",
    "--steps",
    "4",
]


def test_quality_smoke_through_the_cli(
    tmp_path: Path, auxilia_main: Callable[..., Outcome]
) -> None:
    out = tmp_path / "out"
    outcome = auxilia_main(
        "bench", "quality", *TINY, "--jobs", "1", "--quiet",
        "--cache", tmp_path / "cache", "--out", out,
    )  # fmt: skip
    assert outcome.code == 0, outcome.stderr
    assert "meets bar" in outcome.stdout
    report = json.loads((out / "quality.json").read_text())
    assert report["schema"] == "auxilia.bench.quality/1"
    assert report["seeds"] == [0, 1]
    assert report["strategies"] == ["target-only", "equal", "gcs", "auto:projection"]
    for key in ("command", "machine", "wall_seconds", "bar", "standing", "skipped"):
        assert key in report
    (scenario,) = report["scenarios"]
    assert scenario["name"] == "digits"
    assert scenario["status"] == "ran"
    assert [s["name"] for s in scenario["sources"]] == [
        "clean", "noisy80", "permuted", "pixels", "parity",
    ]  # fmt: skip
    for source in scenario["sources"]:
        assert len(source["loo_per_seed"]) == 2
        assert len(source["add_one_in_per_seed"]) == 2
        assert isinstance(source["in_oracle"], bool)
    assert set(scenario["oracle"]) >= {"sources", "mean", "gain"}
    assert scenario["truth_reliability"] is None  # two seeds: no halves to compare
    rows = {r["strategy"]: r for r in scenario["rows"]}
    assert set(rows) == {"target-only", "equal", "gcs", "auto:projection"}  # NAME:VARIANT too
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["seeds"] == 2
        assert len(row["per_seed"]) == 2
        assert 0.0 <= row["mean"] <= 1.0
        assert row["wall_seconds"] > 0
        assert set(row["credit"]) == {s["name"] for s in scenario["sources"]}
        assert set(row["value"]) == {s["name"] for s in scenario["sources"]}
        assert "spearman_value" in row
    assert rows["target-only"]["delta"] == pytest.approx(0.0)
    assert rows["target-only"]["spearman_credit"] is None  # zero credit everywhere
    assert [s["strategy"] for s in report["standing"]] == [
        "target-only", "equal", "gcs", "auto:projection",
    ]  # fmt: skip
    for s in report["standing"]:
        assert isinstance(s["meets_bar"], bool)

    markdown = (out / "quality.md").read_text()
    assert "## Standing against the bar" in markdown
    assert "## Scenario `digits`" in markdown
    assert "| strategy | mean | std | Δ (pt) | oracle fraction |" in markdown
    assert "Spearman value" in markdown
    assert "| clean | helpful" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| gcs |")]
    assert len(table) == 2  # standing row and scenario row
    assert all(line.count("|") == table[0].count("|") for line in table[:1])


def test_second_run_reuses_the_cached_ground_truth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds: list[str] = []
    seeds: list[int] = []
    real = quality_module.execute

    def counting(spec: RunSpec, cache: str) -> dict[str, Any]:
        kinds.append(spec.kind)
        if spec.kind == "subset":
            seeds.append(spec.seed)
        return real(spec, cache)

    monkeypatch.setattr(quality_module, "execute", counting)
    settings = QualitySettings(
        scenarios=("digits",), strategies=("equal",), seeds=(0,), steps=3, cache=tmp_path
    )
    first = run_quality(settings)
    subset_runs = kinds.count("subset")
    assert subset_runs >= 12  # all, none, and 5 sources left out and added in
    assert len(list((tmp_path / "ground-truth" / "digits").glob("*.json"))) == subset_runs
    kinds.clear()
    second = run_quality(settings)
    assert kinds == ["strategy", "strategy"]  # target-only and equal; no ground-truth run
    assert second["scenarios"][0]["sources"] == first["scenarios"][0]["sources"]
    assert second["scenarios"][0]["oracle"] == first["scenarios"][0]["oracle"]
    # another seed trains only that seed's subsets (the oracle's may differ with two seeds)
    seeds.clear()
    run_quality(QualitySettings(**{**settings.__dict__, "seeds": (0, 1)}))
    assert 12 <= len(seeds) <= subset_runs + 1
    assert set(seeds[:12]) == {1}


def test_a_failing_strategy_is_recorded_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = quality_module.execute

    def failing(spec: RunSpec, cache: str) -> dict[str, Any]:
        if spec.kind == "strategy" and spec.strategy == "gcs":
            return {"ok": False, "error": "RuntimeError: boom"}
        return real(spec, cache)

    monkeypatch.setattr(quality_module, "execute", failing)
    report = run_quality(
        QualitySettings(
            scenarios=("digits",), strategies=("gcs",), seeds=(0, 1), steps=2, cache=tmp_path
        )
    )
    rows = {r["strategy"]: r for r in report["scenarios"][0]["rows"]}
    assert rows["gcs"] == {
        "strategy": "gcs", "sampler": "all", "status": "failed", "reason": "RuntimeError: boom",
    }  # fmt: skip
    assert rows["target-only"]["status"] == "ok"
    assert any("gcs [all] on digits: RuntimeError: boom" in s for s in report["skipped"])
    gcs = next(s for s in report["standing"] if s["strategy"] == "gcs")
    assert gcs["missing"] == ["digits"]
    assert not gcs["meets_bar"]


def test_an_unavailable_scenario_is_skipped_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auxilia_main: Callable[..., Outcome]
) -> None:
    monkeypatch.setenv("AUXILIA_FASHION_MNIST", str(tmp_path / "nowhere"))
    out = tmp_path / "out"
    outcome = auxilia_main(
        "bench", "quality", "--scenario", "fashion", "--strategy", "equal", "--seeds", "1",
        "--jobs", "1", "--quiet", "--cache", tmp_path / "cache", "--out", out,
    )  # fmt: skip
    assert outcome.code == 0, outcome.stderr
    assert "dataset-fashion-mnist" in outcome.stdout
    report = json.loads((out / "quality.json").read_text())
    (scenario,) = report["scenarios"]
    assert scenario["status"] == "skipped"
    assert "dataset-fashion-mnist" in scenario["skip_reason"]
    assert "dataset-fashion-mnist" in (out / "quality.md").read_text()
    assert all(s["scenarios"] == 0 and not s["meets_bar"] for s in report["standing"])


def test_unknown_names_are_one_line_errors(
    tmp_path: Path, auxilia_main: Callable[..., Outcome]
) -> None:
    outcome = auxilia_main("bench", "quality", "--scenario", "nope", "--out", tmp_path)
    assert outcome.code != 0
    assert "unknown scenario 'nope'" in outcome.stderr
    outcome = auxilia_main("bench", "quality", "--strategy", "nope", "--out", tmp_path)
    assert outcome.code != 0
    assert "unknown strategy 'nope'" in outcome.stderr
    outcome = auxilia_main("bench", "quality", "--strategy", "auto:sign", "--out", tmp_path)
    assert outcome.code != 0
    assert "auto: variant must be 'cosine' or 'projection', got 'sign'" in outcome.stderr


def test_scenarios_build_with_their_declared_sources() -> None:
    from auxilia.bench.scenarios import SCENARIOS

    for name in ("digits", "synthetic", "many-sources", "mnist"):
        problem = SCENARIOS[name].build(0, Path("unused"))
        names = [s.name for s in problem.sources]
        assert len(set(names)) == len(names)
        assert set(problem.roles) == set(names)
        if problem.relevance is not None:
            assert set(problem.relevance) == set(names)
    many = SCENARIOS["many-sources"].build(0, Path("unused"))
    assert len(many.sources) >= 100
    assert len(set(many.group_of().values())) == 6
    assert not math.isnan(float(many.target.train[0].sum()))
