"""One training run of the quality benchmark, as a picklable spec and a function that never
raises (so one failing strategy cannot stop the grid).

A :class:`RunSpec` names a scenario (looked up by name in the worker, so nothing but the spec
crosses a process boundary), a seed, a number of steps and either a strategy with a sampler, a
``subset`` of the scenario's ground-truth groups trained with ``equal`` weights (the ground-
truth and oracle runs), or the ``rows`` of some dataset sources (the selection benchmark's
runs: every other source is left out), with ``equal`` or ``fixed`` weights. :func:`execute`
builds the problem (memoised per process), trains it with the :class:`~auxilia.train.Trainer`
(no run directory) and returns the target's test metric, the wall time of training and each
source's credit and coefficients.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from auxilia import samplers, strategies
from auxilia.bench.scenarios import Problem, Scenario, get_scenario
from auxilia.data.sources import Source, head_outputs
from auxilia.train import Trainer, TrainSettings

RunKind = Literal["strategy", "subset", "rows"]
Rows = tuple[tuple[str, tuple[int, ...]], ...]  # (source, its rows kept), in source order


@dataclass(frozen=True)
class RunSpec:
    """What to train: a strategy run, an ``equal``-weights run on a subset of groups, or a run
    on some rows of some dataset sources (kind ``rows``: ``fixed`` ``weights``, target first,
    or ``equal`` ones when ``weights`` is None); subset and rows runs use the scenario's
    ground-truth sampler."""

    scenario: str
    seed: int
    steps: int
    kind: RunKind = "strategy"
    strategy: str = "equal"
    sampler: str = "all"
    subset: tuple[str, ...] | None = None  # ground-truth groups kept; None keeps every source
    rows: Rows | None = None  # kind "rows": the sources kept and their rows
    weights: tuple[float, ...] | None = None  # kind "rows": one per kept source, target first


@functools.lru_cache(maxsize=16)
def build_problem(scenario: str, seed: int, cache: str) -> Problem:
    """The scenario's problem for ``seed`` (memoised: a worker builds each one once)."""
    return get_scenario(scenario).build(seed, Path(cache))


def first_problem(scenario: Scenario, seed: int, cache: Path) -> tuple[Problem | None, str]:
    """The scenario's problem for ``seed`` after its ``prepare`` step, or ``None`` and the
    one-line reason it cannot run here (what to install, or the error building it raised)."""
    reason = scenario.unavailable(cache)
    if reason is not None:
        return None, reason
    try:
        if scenario.prepare is not None:
            scenario.prepare(cache)
        return build_problem(scenario.name, seed, str(cache)), ""
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


def keep_rows(source: Source, rows: Sequence[int]) -> Source:
    """``source`` (a dataset) with only ``rows``; an own head keeps its width."""
    assert source.data is not None, f"source '{source.name}' is not a dataset"
    index = torch.as_tensor(list(rows), dtype=torch.int64)
    x, y = source.data
    classes = head_outputs(source) if source.kind == "classification" else source.num_classes
    return dataclasses.replace(source, data=(x[index], y[index]), num_classes=classes)


def execute(spec: RunSpec, cache: str) -> dict[str, Any]:
    """Train ``spec``; return ``{"ok": True, "value", "metric", "wall_seconds", "sources"}``
    or ``{"ok": False, "error"}`` (the exception's type and message, and its traceback)."""
    try:
        return _execute(spec, cache)
    except Exception as error:  # a failing strategy is recorded, not fatal
        return {
            "ok": False,
            "error": f"{type(error).__name__}: {error}".strip(),
            "traceback": traceback.format_exc(limit=6),
        }


def _execute(spec: RunSpec, cache: str) -> dict[str, Any]:
    scenario = get_scenario(spec.scenario)
    problem = build_problem(spec.scenario, spec.seed, cache)
    sources = problem.sources
    if spec.subset is not None:
        groups = problem.group_of()
        keep = set(spec.subset)
        sources = [s for s in sources if groups[s.name] in keep]
    if spec.kind == "rows":
        assert spec.rows is not None, "a rows run names its rows"
        by_name = {s.name: s for s in problem.sources}
        sources = [keep_rows(by_name[name], rows) for name, rows in spec.rows]
    if spec.kind in ("subset", "rows"):
        weights = None if spec.kind == "subset" else spec.weights
        strategy = (
            strategies.get("equal")
            if weights is None
            else strategies.get("fixed", {"weights": list(weights)})
        )
        sampler_name = scenario.ground_truth_sampler
    else:
        strategy = strategies.from_spec(spec.strategy)
        sampler_name = spec.sampler
    sampler = (
        samplers.get("all")
        if sampler_name == "all"
        else samplers.get(sampler_name, scenario.sampler_params)
    )
    settings = TrainSettings(
        steps=spec.steps,
        lr=scenario.lr,
        eval_every=spec.steps,
        log_every=spec.steps,
        checkpoint_every=spec.steps,
        seed=spec.seed,
    )
    began = time.perf_counter()
    trainer = Trainer(
        problem.target,
        sources,
        strategy=strategy,
        sampler=sampler,
        trunk=scenario.trunk,
        trunk_params=dict(scenario.trunk_params),
        settings=settings,
        quiet=True,
    )
    results = trainer.fit()
    wall = time.perf_counter() - began
    per_source = {
        row["name"]: {
            "credit": row.get("credit"),
            "value": row.get("value"),
            "mean_coefficient": row.get("mean_coefficient"),
            "final_coefficient": row.get("final_coefficient"),
            "drawn_steps": row.get("drawn_steps"),
        }
        for row in results["sources"][1:]
    }
    return {
        "ok": True,
        "metric": results["target"]["metric"],
        "value": float(results["target"]["value"]),
        "wall_seconds": wall,
        "sources": per_source,
    }
