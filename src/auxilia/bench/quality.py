"""The quality benchmark's grid runner: scenarios × strategies × seeds, plus ground truth.

For each available scenario it schedules, per seed, the ground-truth subset runs (see
:mod:`auxilia.bench.ground_truth`; cached runs are not retrained), then one run per strategy
(and per sampler, for scenarios that draw sources with a sampler); when a scenario's ground
truth is complete it schedules the oracle runs. Runs go to
:class:`~auxilia.bench.workers.Workers` (``jobs`` spawned processes, one torch thread each, or
this process when ``jobs = 1``); a :class:`~auxilia.bench.workers.Progress` counts them. A run
that raises is recorded with its reason; the strategy's remaining runs on that scenario are
dropped, and the grid goes on.

:func:`run_quality` returns the report (a JSON-ready dict, schema ``auxilia.bench.quality/1``,
built by :func:`aggregate_scenario` and :func:`auxilia.bench.aggregate.standing`);
:func:`write_report` writes ``quality.json`` and ``quality.md`` atomically.
"""

from __future__ import annotations

import os
import platform
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auxilia import __version__, strategies
from auxilia.atomic import write_json, write_text
from auxilia.bench.aggregate import (
    Bar,
    better_sign,
    correlation_with,
    mean_or_none,
    oracle_fraction,
    points_scale,
    render_markdown,
    standing,
    std,
)
from auxilia.bench.ground_truth import (
    GroundTruthCache,
    cache_key,
    group_truth,
    loo_reliability,
    oracle_subset,
    subsets,
    truth_json,
)
from auxilia.bench.runs import RunSpec, execute, first_problem
from auxilia.bench.scenarios import Problem, Scenario, get_scenario
from auxilia.bench.workers import Progress, Workers

SCHEMA = "auxilia.bench.quality/1"
BASELINE = "target-only"


@dataclass(frozen=True)
class QualitySettings:
    """What ``auxilia bench quality`` runs."""

    scenarios: tuple[str, ...]
    strategies: tuple[str, ...] = ()  # empty: every registered strategy
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int | None = None  # overrides every scenario's number of steps
    jobs: int = 1
    cache: Path = Path(".auxilia-cache")
    samplers: tuple[str, ...] = ()  # overrides the samplers of scenarios that use one
    bar: Bar = field(default_factory=Bar)
    suite: str = "custom"
    command: str = "auxilia bench quality"

    def strategy_names(self) -> list[str]:
        """The strategies to run, ``target-only`` (the baseline) first."""
        chosen = list(self.strategies) if self.strategies else strategies.names()
        return [BASELINE] + [s for s in dict.fromkeys(chosen) if s != BASELINE]

    def steps_of(self, scenario: Scenario) -> int:
        return self.steps if self.steps is not None else scenario.steps

    def samplers_of(self, scenario: Scenario) -> tuple[str, ...]:
        if scenario.samplers == ("all",) or not self.samplers:
            return scenario.samplers
        return self.samplers


def default_cache() -> Path:
    """``$AUXILIA_CACHE``, else ``$XDG_CACHE_HOME/auxilia``, else ``~/.cache/auxilia``."""
    if os.environ.get("AUXILIA_CACHE"):
        return Path(os.environ["AUXILIA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "auxilia"


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}), {platform.system()}"


@dataclass
class _ScenarioState:
    scenario: Scenario
    problem: Problem
    steps: int
    samplers: tuple[str, ...]
    groups: list[str]
    values: dict[int, dict[tuple[str, ...], float]] = field(default_factory=dict)
    walls: dict[tuple[str, ...], list[float]] = field(default_factory=dict)
    truth_pending: int = 0
    oracle: tuple[str, ...] | None = None
    runs: dict[tuple[str, str], dict[int, dict[str, Any]]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    truth_errors: list[str] = field(default_factory=list)


def run_quality(settings: QualitySettings, progress: Progress | None = None) -> dict[str, Any]:
    """Run the grid and return the report (see the module docstring)."""
    progress = progress or Progress()
    began = time.perf_counter()
    cache = GroundTruthCache(settings.cache)
    names = settings.strategy_names()
    skipped: list[str] = []
    states: dict[str, _ScenarioState] = {}
    skipped_scenarios: dict[str, str] = {}
    queue: deque[RunSpec] = deque()

    for name in settings.scenarios:
        scenario = get_scenario(name)
        problem, reason = first_problem(scenario, settings.seeds[0], settings.cache)
        if problem is None:
            skipped_scenarios[name] = reason
            skipped.append(f"scenario {name}: {skipped_scenarios[name]}")
            continue
        groups = sorted(set(problem.group_of().values()))
        state = _ScenarioState(
            scenario, problem, settings.steps_of(scenario), settings.samplers_of(scenario), groups
        )
        states[name] = state
        unique = sorted(set(subsets(groups).values()))
        for seed in settings.seeds:
            for subset in unique:
                key = cache_key(scenario, state.steps, seed, subset)
                record = cache.get(name, key)
                if record is not None:
                    state.values.setdefault(seed, {})[subset] = float(record["value"])
                else:
                    state.truth_pending += 1
                    queue.append(RunSpec(name, seed, state.steps, "subset", subset=subset))
    for name, state in states.items():
        for strategy in names:
            for sampler in state.samplers[:1] if strategy == BASELINE else state.samplers:
                for seed in settings.seeds:
                    queue.append(RunSpec(name, seed, state.steps, "strategy", strategy, sampler))
    progress.add(len(queue))
    for state in states.values():
        if state.truth_pending == 0:
            queue.extend(_schedule_oracle(state, settings, cache, progress))

    inflight: dict[Future[dict[str, Any]], RunSpec] = {}
    with Workers(settings.jobs).running() as pool:
        while queue or inflight:
            while queue and len(inflight) < pool.capacity:
                spec = queue.popleft()
                state = states[spec.scenario]
                if spec.kind == "strategy" and (spec.strategy, spec.sampler) in state.failures:
                    progress.advance(f"{spec.scenario}/{spec.strategy}: skipped")
                    continue
                inflight[pool.start(execute, spec, str(settings.cache))] = spec
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for future in done:
                spec = inflight.pop(future)
                result = future.result()
                state = states[spec.scenario]
                progress.advance(_label(spec, result))
                if spec.kind == "subset":
                    queue.extend(_record_subset(state, spec, result, settings, cache, progress))
                else:
                    _record_strategy(state, spec, result)

    scenarios_out: list[dict[str, Any]] = []
    for name in settings.scenarios:
        if name in skipped_scenarios:
            scenario = get_scenario(name)
            scenarios_out.append(
                {
                    "name": name,
                    "summary": scenario.summary,
                    "status": "skipped",
                    "skip_reason": skipped_scenarios[name],
                }
            )
            continue
        state = states[name]
        scenarios_out.append(aggregate_scenario(state, names, settings))
        for (strategy, sampler), reason in state.failures.items():
            skipped.append(f"{strategy} [{sampler}] on {name}: {reason}")
        skipped += [f"ground truth of {name}: {e}" for e in state.truth_errors]

    ran = [s for s in scenarios_out if s["status"] == "ran"]
    standings = []
    for strategy in names:
        rows = []
        for sc in ran:
            default = sc["samplers"][0]
            rows.append(
                next(
                    (
                        r
                        for r in sc["rows"]
                        if r["strategy"] == strategy and r["sampler"] == default
                    ),
                    None,
                )
            )
        standings.append(standing(strategy, rows, [sc["name"] for sc in ran], settings.bar))
    return {
        "schema": SCHEMA,
        "command": settings.command,
        "suite": settings.suite,
        "seeds": list(settings.seeds),
        "jobs": settings.jobs,
        "strategies": names,
        "machine": machine(),
        "auxilia_version": __version__,
        "torch_version": torch.__version__,
        "wall_seconds": time.perf_counter() - began,
        "bar": settings.bar.as_dict(),
        "standing": standings,
        "scenarios": scenarios_out,
        "skipped": skipped,
    }


def _label(spec: RunSpec, result: Mapping[str, Any]) -> str:
    what = spec.strategy if spec.kind == "strategy" else "ground truth"
    status = "" if result.get("ok") else " (failed)"
    return f"{spec.scenario}/{what}/seed {spec.seed}{status}"


def _record_subset(
    state: _ScenarioState,
    spec: RunSpec,
    result: Mapping[str, Any],
    settings: QualitySettings,
    cache: GroundTruthCache,
    progress: Progress,
) -> list[RunSpec]:
    assert spec.subset is not None
    if result.get("ok"):
        key = cache_key(state.scenario, spec.steps, spec.seed, spec.subset)
        cache.put(state.scenario.name, key, {**result, "subset": list(spec.subset)})
        state.values.setdefault(spec.seed, {})[spec.subset] = float(result["value"])
        state.walls.setdefault(spec.subset, []).append(float(result["wall_seconds"]))
    else:
        state.truth_errors.append(f"subset {list(spec.subset)} seed {spec.seed}: {result['error']}")
    if state.oracle is None:
        state.truth_pending -= 1
        if state.truth_pending == 0:
            return _schedule_oracle(state, settings, cache, progress)
    return []


def _metric(state: _ScenarioState) -> str:
    return "accuracy" if state.problem.target.kind == "classification" else "mse"


def _schedule_oracle(
    state: _ScenarioState, settings: QualitySettings, cache: GroundTruthCache, progress: Progress
) -> list[RunSpec]:
    sign = better_sign(_metric(state))
    signed = {seed: {k: sign * v for k, v in by.items()} for seed, by in state.values.items()}
    state.oracle = oracle_subset(group_truth(state.groups, signed))
    out = []
    for seed in settings.seeds:
        if state.oracle in state.values.get(seed, {}):
            continue
        key = cache_key(state.scenario, state.steps, seed, state.oracle)
        record = cache.get(state.scenario.name, key)
        if record is not None:
            state.values.setdefault(seed, {})[state.oracle] = float(record["value"])
        else:
            out.append(
                RunSpec(state.scenario.name, seed, state.steps, "subset", subset=state.oracle)
            )
    progress.add(len(out))
    return out


def _record_strategy(state: _ScenarioState, spec: RunSpec, result: Mapping[str, Any]) -> None:
    key = (spec.strategy, spec.sampler)
    if key in state.failures:
        return
    if not result.get("ok"):
        state.failures[key] = str(result["error"]).splitlines()[0][:300]
        state.runs.pop(key, None)
        return
    state.runs.setdefault(key, {})[spec.seed] = dict(result)


def _source_means(
    runs: Mapping[int, Mapping[str, Any]], field_name: str, names: Sequence[str]
) -> dict[str, float | None]:
    return {
        n: mean_or_none([run["sources"].get(n, {}).get(field_name) for run in runs.values()])
        for n in names
    }


def aggregate_scenario(
    state: _ScenarioState, strategy_names: Sequence[str], settings: QualitySettings
) -> dict[str, Any]:
    """One scenario's part of the report: ground truth, oracle, and a row per strategy."""
    metric = _metric(state)
    sign, scale = better_sign(metric), points_scale(metric)
    signed = {seed: {k: sign * v for k, v in by.items()} for seed, by in state.values.items()}
    truth = group_truth(state.groups, signed)
    truth_out = truth_json(truth, scale)
    oracle = state.oracle if state.oracle is not None else oracle_subset(truth)
    problem = state.problem
    group_of = problem.group_of()
    source_names = [s.name for s in problem.sources]
    loo = {n: truth_out[group_of[n]]["loo"] for n in source_names}

    def subset_values(subset: tuple[str, ...]) -> list[float]:
        return [by[subset] for by in state.values.values() if subset in by]

    everything = tuple(state.groups)
    oracle_values = subset_values(oracle)
    alone_values = subset_values(())
    baseline_runs = state.runs.get((BASELINE, state.samplers[0]), {})
    baseline_values = [r["value"] for r in baseline_runs.values()] or alone_values
    baseline = mean_or_none(baseline_values)
    oracle_mean = mean_or_none(oracle_values)

    def delta(value: float | None) -> float | None:
        if value is None or baseline is None:
            return None
        return sign * scale * (value - baseline)

    rows: list[dict[str, Any]] = []
    for strategy in strategy_names:
        for sampler in state.samplers[:1] if strategy == BASELINE else state.samplers:
            key = (strategy, sampler)
            if key in state.failures:
                rows.append(
                    {
                        "strategy": strategy,
                        "sampler": sampler,
                        "status": "failed",
                        "reason": state.failures[key],
                    }
                )
                continue
            runs = state.runs.get(key, {})
            if not runs:
                continue
            values = [runs[s]["value"] for s in sorted(runs)]
            mean = mean_or_none(values)
            credit = _source_means(runs, "credit", source_names)
            value = _source_means(runs, "value", source_names)
            coefficient = _source_means(runs, "mean_coefficient", source_names)
            d = delta(mean)
            gain = delta(oracle_mean)
            rows.append(
                {
                    "strategy": strategy,
                    "sampler": sampler,
                    "status": "ok",
                    "seeds": len(values),
                    "mean": mean,
                    "std": std(values),
                    "delta": d,
                    "oracle_fraction": None
                    if d is None or gain is None
                    else oracle_fraction(d, 0.0, gain, settings.bar.min_oracle_gain),
                    "spearman_credit": correlation_with(credit, loo),
                    "spearman_coefficient": correlation_with(coefficient, loo),
                    "spearman_value": correlation_with(value, loo),
                    "spearman_credit_relevance": None
                    if problem.relevance is None
                    else correlation_with(credit, dict(problem.relevance)),
                    "spearman_coefficient_relevance": None
                    if problem.relevance is None
                    else correlation_with(coefficient, dict(problem.relevance)),
                    "wall_seconds": mean_or_none([runs[s]["wall_seconds"] for s in runs]),
                    "harm": d is not None and d < -settings.bar.harm,
                    "per_seed": values,
                    "credit": credit,
                    "value": value,
                    "mean_coefficient": coefficient,
                }
            )
    sources = []
    for s in problem.sources:
        g = group_of[s.name]
        sources.append(
            {
                "name": s.name,
                "role": problem.roles.get(s.name, ""),
                "group": g,
                "relevance": None if problem.relevance is None else problem.relevance.get(s.name),
                **{k: truth_out[g][k] for k in ("loo", "loo_std", "add_one_in", "add_one_in_std")},
                "loo_per_seed": truth_out[g]["loo_per_seed"],
                "add_one_in_per_seed": truth_out[g]["add_one_in_per_seed"],
                "in_oracle": g in oracle,
            }
        )
    scenario = state.scenario
    return {
        "name": scenario.name,
        "summary": scenario.summary,
        "status": "ran",
        "metric": metric,
        "unit": "points" if metric == "accuracy" else metric,
        "steps": state.steps,
        "lr": scenario.lr,
        "trunk": scenario.trunk,
        "trunk_params": dict(scenario.trunk_params),
        "samplers": list(state.samplers),
        "ground_truth_level": "group" if problem.groups else "source",
        "sources": sources,
        "target_only": {"mean": baseline, "std": std(baseline_values)},
        "all_equal": {"mean": mean_or_none(subset_values(everything))},
        "target_alone_equal": {"mean": mean_or_none(alone_values)},
        "oracle": {
            "sources": list(oracle),
            "mean": oracle_mean,
            "std": std(oracle_values),
            "gain": delta(oracle_mean),
        },
        "truth_reliability": loo_reliability(state.groups, signed),
        "rows": rows,
    }


def write_report(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``quality.json`` and ``quality.md`` into ``out`` atomically; return both paths."""
    json_path, md_path = out / "quality.json", out / "quality.md"
    write_json(json_path, dict(report))
    write_text(md_path, render_markdown(report))
    return json_path, md_path
