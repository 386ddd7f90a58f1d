"""``auxilia bench select``: the harmful share and weights on hand-made numbers, top-k nesting,
the aggregation of a hand-made grid, a smoke run that writes its three files, the ranking
cache, and one-line errors for unknown methods and out-of-range budgets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from auxilia.bench import select as select_module
from auxilia.bench.runs import build_problem, keep_rows
from auxilia.bench.scenarios import get_scenario
from auxilia.bench.select import (
    Ranking,
    SelectBenchSettings,
    aggregate_scenario,
    goal_checks,
    harmful_ratio,
    harmful_share,
    largest_class_share,
    method_spec,
    pool_sources,
    run_select,
    source_weights,
    wrong_share,
)
from auxilia.bench.select_report import write_report
from auxilia.data.sources import Source, head_outputs
from auxilia.errors import ConfigError
from tiny_problem import Outcome

DIGITS_POOL = ("clean", "noisy80", "permuted", "pixels")
HARMFUL = frozenset({"noisy80", "permuted"})

# ---- hand-made numbers --------------------------------------------------------------------


def test_harmful_share_and_ratio_on_a_hand_checked_selection() -> None:
    # 8 clean and 2 permuted selected: 2 of 10 harmful; the pool is half harmful (500 of 1000)
    selected = {"clean": 8, "permuted": 2}
    pool = dict.fromkeys(DIGITS_POOL, 250)
    assert harmful_share(selected, HARMFUL) == pytest.approx(0.2)
    assert harmful_share(pool, HARMFUL) == pytest.approx(0.5)
    assert harmful_ratio(0.2, 0.5) == pytest.approx(0.4)  # 2.5 times fewer than in the pool
    assert harmful_share({"clean": 10}, HARMFUL) == 0.0
    assert harmful_share({}, HARMFUL) is None
    assert harmful_ratio(0.2, 0.0) is None  # a pool without harmful samples: no ratio
    assert harmful_ratio(None, 0.5) is None


def test_wrong_share_counts_wrongly_labelled_rows_whatever_their_source() -> None:
    # noisy80 rows 0 and 2 are wrong, permuted's every row; clean is not marked
    wrong = {"noisy80": np.array([True, False, True, False]), "permuted": np.ones(4, bool)}
    selected = {"clean": (0, 1, 2), "noisy80": (1, 3), "permuted": (0,)}  # 1 wrong of 6
    assert wrong_share(selected, wrong, 6) == pytest.approx(1 / 6)
    assert wrong_share({"noisy80": (0, 2)}, wrong, 2) == 1.0
    assert wrong_share(selected, {}, 6) is None  # no truth per row in this scenario
    assert wrong_share({}, wrong, 0) is None


def test_scenarios_mark_wrong_labels_by_construction(tmp_path: Path) -> None:
    """digits: noisy80 about 80 % wrong, permuted all; synthetic: the identical task none,
    the adversarial one all."""
    digits = get_scenario("digits").build(0, tmp_path)
    assert set(digits.wrong) == {"noisy80", "permuted"}
    assert 0.7 < digits.wrong["noisy80"].mean() < 0.9
    assert digits.wrong["permuted"].all()
    synthetic = get_scenario("synthetic").build(0, tmp_path)
    assert not synthetic.wrong["rho+1.00"].any()
    assert synthetic.wrong["rho-1.00"].all()


def test_count_weighting_counts_every_selected_sample_the_same() -> None:
    pool = list(DIGITS_POOL)
    rows = {"clean": (0, 1, 2), "permuted": (7,)}
    # K = 4 sources, 4 samples selected: weight 4 * n_k / 4, target first
    assert source_weights(rows, pool, "count") == (1.0, 3.0, 1.0)
    assert source_weights(rows, pool, "source") is None  # equal weights
    whole = {name: tuple(range(250)) for name in pool}
    assert source_weights(whole, pool, "count") == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_largest_class_share() -> None:
    labels = {"a": torch.tensor([0, 1, 2, 3]), "b": torch.tensor([1, 1, 1, 0])}
    assert largest_class_share({"a": (0, 1, 2, 3)}, labels) == pytest.approx(0.25)
    assert largest_class_share({"a": (1,), "b": (0, 1, 2)}, labels) == pytest.approx(1.0)
    assert largest_class_share({"own-head": (0, 1)}, labels) is None


def _ranking(order: list[tuple[int, int]]) -> Ranking:
    return Ranking(
        DIGITS_POOL,
        (250, 250, 250, 250),
        tuple(k for k, _ in order),
        tuple(i for _, i in order),
        tuple(float(len(order) - r) for r in range(len(order))),
    )


def test_top_k_is_a_prefix_so_smaller_budgets_nest() -> None:
    generator = torch.Generator().manual_seed(0)
    every = [(k, i) for k in range(4) for i in range(250)]
    order = [every[int(j)] for j in torch.randperm(1000, generator=generator)]
    ranking = _ranking(order)
    counts = [ranking.count(b) for b in (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)]
    assert counts == [10, 50, 100, 250, 500, 1000]
    assert ranking.count(0.01) == 1  # at least one sample
    tops = [ranking.top(c) for c in counts]
    for smaller, larger, count in zip(tops, tops[1:], counts, strict=False):
        assert sum(len(r) for r in smaller.values()) == count
        for name, rows in smaller.items():
            assert set(rows) <= set(larger[name])
            assert list(rows) == sorted(rows)
    assert tops[-1] == {name: tuple(range(250)) for name in DIGITS_POOL}
    assert Ranking.from_json(json.loads(json.dumps(ranking.as_json()))) == ranking


def test_keep_rows_keeps_an_own_heads_width() -> None:
    source = Source("other", data=(torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 4, 0])))
    kept = keep_rows(source, [0, 1, 2])
    assert kept.data is not None
    assert kept.data[1].tolist() == [0, 1, 2]
    assert head_outputs(kept) == 5


def test_aggregation_of_a_hand_made_grid() -> None:
    """Two seeds of hand-made rankings and accuracies: the numbers the report must show."""
    scenario = get_scenario("digits")
    problem = build_problem("digits", 0, "unused")
    state = select_module._State(scenario, problem, 10, pool_sources(problem))
    assert [s.name for s in state.pool] == list(DIGITS_POOL)  # parity (a task) is left out
    assert state.harmful == HARMFUL
    clean = [(0, i) for i in range(250)]
    rest = [(k, i) for k in (1, 2, 3) for i in range(250)]
    # gradient: seed 0 puts 9 clean + 1 permuted first (1 of 10 harmful), seed 1 10 clean
    others = [r for r in rest if r != (2, 0)]
    state.rankings[("gradient", 0)] = _ranking([*clean[:9], (2, 0), *clean[9:], *others])
    state.rankings[("gradient", 1)] = _ranking(clean + rest)
    state.rankings[("random", 0)] = _ranking(rest + clean)  # 10 noisy80 first: all harmful
    state.rankings[("random", 1)] = _ranking(rest + clean)
    state.runs[("gradient", 1.0)] = {0: _run(0.80), 1: _run(0.84)}
    state.runs[("random", 1.0)] = {0: _run(0.60), 1: _run(0.62)}
    state.baselines = {"target-only": {0: 0.70, 1: 0.72}, "whole-pool": {0: 0.75, 1: 0.77}}
    described, records = aggregate_scenario(state, ["random", "gradient"], [1.0], [0, 1])
    by = {(r["method"], r["budget"]): r for r in records}
    gradient = by[("gradient", 1.0)]
    assert gradient["count"] == 10
    assert gradient["mean"] == pytest.approx(0.82)
    assert gradient["per_seed"] == [0.80, 0.84]
    assert gradient["delta_random"] == pytest.approx(100 * (0.82 - 0.61))
    assert gradient["delta_whole_pool"] == pytest.approx(100 * (0.82 - 0.76))
    assert gradient["delta_target_only"] == pytest.approx(100 * (0.82 - 0.71))
    assert gradient["harmful_share_per_seed"] == pytest.approx([0.1, 0.0])
    assert gradient["harmful_share"] == pytest.approx(0.05)
    assert gradient["harmful_ratio"] == pytest.approx(0.1)  # 0.05 of 0.5
    assert gradient["harmful_ratio_worst"] == pytest.approx(0.2)  # seed 0: 0.1 of 0.5
    assert gradient["source_share"] == pytest.approx(
        {"clean": 0.95, "noisy80": 0.0, "permuted": 0.05, "pixels": 0.0}
    )
    assert by[("random", 1.0)]["harmful_ratio_worst"] == pytest.approx(2.0)
    assert by[("whole-pool", 100.0)]["mean"] == pytest.approx(0.76)
    assert by[("target-only", 0.0)]["mean"] == pytest.approx(0.71)
    assert described["pool"]["harmful_share"] == pytest.approx(0.5)
    assert described["pool"]["left_out"] == ["parity"]
    # the goal is measured at 10 %: not in this grid, so nothing to check
    assert goal_checks(described, records, ["random", "gradient"]) == []
    at_ten = [{**r, "budget": 10.0} for r in records if r["budget"] == 1.0]
    checks = {c["method"]: c for c in goal_checks(described, at_ten, ["random", "gradient"])}
    assert checks["gradient"]["beats_random"]
    assert checks["gradient"]["beats_whole_pool"]
    assert checks["gradient"]["under_represented"]  # 0.2 <= 1/3
    assert not checks["random"]["under_represented"]


def _run(value: float) -> dict[str, Any]:
    return {"ok": True, "value": value, "wall_seconds": 0.1, "metric": "accuracy"}


# ---- settings and errors ------------------------------------------------------------------


def test_unknown_method_and_out_of_range_budgets_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown selection method 'nope'; expected one of"):
        SelectBenchSettings(scenarios=("digits",), methods=("nope",))
    for budget in (0.0, -5.0, 150.0):
        with pytest.raises(
            ConfigError, match=r"out of range: budgets are percentages in \(0, 100\]"
        ):
            SelectBenchSettings(scenarios=("digits",), budgets=(budget,))
    settings = SelectBenchSettings(scenarios=("digits",), methods=("loss",), budgets=(50, 5, 100))
    assert settings.method_names() == ["random", "loss"]  # the random baseline always runs
    assert settings.budget_list() == [5.0, 50.0]  # 100 % is the whole pool, run anyway


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gradient,nope"], "--method: unknown selection method 'nope'"),
        (["--budgets", "5,0"], "--budgets: 0 is out of range; budgets are in (0, 100]"),
        (["--budgets", "101"], "--budgets: 101 is out of range"),
        (["--budgets", "ten"], "--budgets: expected percentages, got 'ten'"),
        (["--scenario", "nope"], "--scenario: unknown scenario 'nope'"),
        (["--weighting", "nope"], "--weighting: expected 'count' or 'source'"),
    ],
)
def test_cli_errors_are_one_line(
    auxilia_main: Callable[..., Outcome], args: list[str], message: str
) -> None:
    outcome = auxilia_main("bench", "select", *args)
    assert outcome.code != 0
    assert message in outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1


# ---- a smoke run --------------------------------------------------------------------------

SMOKE = {"scenarios": ("digits",), "methods": ("gradient", "loss"), "budgets": (5.0, 10.0)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    cache = tmp_path_factory.mktemp("cache")
    settings = SelectBenchSettings(**SMOKE, seeds=(0,), steps=6, cache=cache)  # type: ignore[arg-type]
    return run_select(settings), cache


def test_smoke_run_measures_every_cell(smoke: tuple[dict[str, Any], Path]) -> None:
    report, cache = smoke
    assert report["schema"] == "auxilia.bench.select/1"
    assert report["methods"] == ["random", "gradient", "loss"]
    assert report["skipped"] == []
    cells = {(r["method"], r["budget"]): r for r in report["records"]}
    expected = {(m, b) for m in report["methods"] for b in (5.0, 10.0)}
    assert expected | {("target-only", 0.0), ("whole-pool", 100.0)} == set(cells)
    for r in cells.values():
        assert r["status"] == "ok"
        assert 0.0 <= r["mean"] <= 1.0
        assert r["seeds"] == 1
    assert cells[("gradient", 5.0)]["count"] == 50
    assert cells[("gradient", 10.0)]["count"] == 100
    shares = cells[("loss", 10.0)]["source_share"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert cells[("loss", 10.0)]["harmful_share"] == pytest.approx(
        shares["noisy80"] + shares["permuted"]
    )
    assert cells[("whole-pool", 100.0)]["harmful_ratio"] == 1.0
    # the goal's budget was measured: one check per method on the scenario
    assert {c["method"] for c in report["goal"]["checks"]} == set(report["methods"])
    assert report["goal"]["met"] in (True, False)
    # rankings and the target-alone run are cached; every ranking covers the whole pool once
    rankings = list((cache / "selection" / "digits").glob("*.json"))
    assert len(rankings) == 3
    for path in rankings:
        ranking = Ranking.from_json(json.loads(path.read_text())["ranking"])
        assert sorted(zip(ranking.source, ranking.index, strict=True)) == [
            (k, i) for k in range(4) for i in range(250)
        ]
        for k in range(4):  # best first within each source (`gradient` ranks sources first)
            own = [x for j, x in zip(ranking.source, ranking.score, strict=True) if j == k]
            assert own == sorted(own, reverse=True)
    assert len(list((cache / "ground-truth" / "digits").glob("*.json"))) == 1


def test_report_files_are_written_and_well_formed(
    smoke: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    report, _ = smoke
    json_path, md_path, png_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png_path.read_bytes()) > 5_000
    markdown = md_path.read_text()
    assert "## Standing at 10 % of the pool" in markdown
    assert "## Scenario `digits`" in markdown
    assert "| noisy80 | mostly harmful: 80% of labels wrong | target | 250 | **yes** |" in markdown
    metric_head = next(line for line in markdown.splitlines() if "target test accuracy" in line)
    assert metric_head.count("|") == 6  # method, 5 %, 10 %, whole pool, s/ranking
    for method in ("random", "gradient", "loss"):
        rows = [line for line in markdown.splitlines() if line.startswith(f"| `{method}` |")]
        assert len(rows) == 5  # standing, metric, harmful share, wrong labels, class balance
        assert rows[1].count("|") == metric_head.count("|")
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_second_run_reuses_the_cached_rankings(
    smoke: tuple[dict[str, Any], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    report, cache = smoke

    def no_ranking(spec: Any, cache: str) -> dict[str, Any]:
        raise AssertionError(f"ranked again: {spec}")

    monkeypatch.setattr(select_module, "rank", no_ranking)
    settings = SelectBenchSettings(**SMOKE, seeds=(0,), steps=6, cache=cache)  # type: ignore[arg-type]
    again = run_select(settings)
    first = {(r["method"], r["budget"]): r for r in report["records"]}
    for r in again["records"]:
        assert r["count"] == first[(r["method"], r["budget"])]["count"]
        assert r.get("harmful_share") == first[(r["method"], r["budget"])].get("harmful_share")


def test_a_failing_method_is_recorded_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(spec: Any, cache: str) -> dict[str, Any]:
        return {"ok": False, "error": "RuntimeError: boom"}

    monkeypatch.setattr(select_module, "rank", failing)
    settings = SelectBenchSettings(
        scenarios=("digits",),
        methods=("loss",),
        budgets=(10.0,),
        seeds=(0,),
        steps=2,
        cache=tmp_path,
    )
    report = run_select(settings)
    rows = {r["method"]: r for r in report["records"]}
    assert rows["loss"]["status"] == "failed"
    assert rows["loss"]["reason"] == "RuntimeError: boom"
    assert rows["whole-pool"]["status"] == "ok"
    assert "loss on digits: RuntimeError: boom" in report["skipped"]
    assert report["goal"]["met"] is None  # gradient did not run


def test_cli_writes_the_three_files(
    smoke: tuple[dict[str, Any], Path], tmp_path: Path, auxilia_main: Callable[..., Outcome]
) -> None:
    _, cache = smoke
    out = tmp_path / "bench"
    outcome = auxilia_main(
        "bench", "select", "--scenario", "digits", "--method", "gradient", "--budgets", "10",
        "--seeds", "1", "--steps", "6", "--jobs", "1", "--cache", cache, "--out", out, "--quiet",
    )  # fmt: skip
    assert outcome.code == 0, outcome.stderr
    assert {p.name for p in out.iterdir()} == {"select.json", "select.md", "select.png"}
    written = json.loads((out / "select.json").read_text())
    assert written["command"].startswith("auxilia bench select --scenario digits")
    assert written["budgets"] == [10.0]
    assert "goal (gradient):" in outcome.stdout


def test_method_specs_carry_options() -> None:
    """NAME:KEY=VALUE runs a method's variant beside the default, with its options checked."""
    assert method_spec("gradient") == ("gradient", {})
    assert method_spec("gradient:contrast=true:dim=64") == (
        "gradient",
        {"contrast": True, "dim": 64},
    )
    with pytest.raises(ConfigError, match="options are KEY=VALUE, got 'contrast'"):
        method_spec("gradient:contrast")
    with pytest.raises(ConfigError, match="unknown selection method 'nope'"):
        method_spec("nope:x=1")
    with pytest.raises(ConfigError, match="'contrast' expects true or false"):
        SelectBenchSettings(scenarios=("digits",), methods=("gradient:contrast=7",))


def test_a_method_variant_runs_beside_the_default(tmp_path: Path) -> None:
    settings = SelectBenchSettings(
        scenarios=("digits",),
        methods=("gradient", "gradient:contrast=true"),
        budgets=(10.0,),
        seeds=(0,),
        steps=6,
        cache=tmp_path,
    )
    report = run_select(settings)
    assert report["methods"] == ["random", "gradient", "gradient:contrast=true"]
    cells = {(r["method"], r["budget"]): r for r in report["records"]}
    assert cells[("gradient:contrast=true", 10.0)]["status"] == "ok"
    assert len(list((tmp_path / "selection" / "digits").glob("*.json"))) == 3  # own rankings
