"""The selection benchmark: what training on the best k % of an auxiliary pool does for the
target, per scoring method, against the same k % at random and against the whole pool.

For each scenario of the quality benchmark (:mod:`auxilia.bench.scenarios`) the **pool** is
its dataset sources, those that share the target's head and those with their own head (each
sample goes through its source's head, in the scoring and in the training); task sources
(labels on the target's own inputs, e.g. ``digits``' parity) hold no samples to select and are
left out of every run here, the whole-pool run included. For each scenario × method × seed,
one call of :func:`auxilia.selection.select` ranks every pool sample (its warm-up is as long
as a training run, at the scenario's learning rate); the top k for **every** budget are
prefixes of that one ranking, so a smaller budget's selection is inside every larger one's.
The ranking is cached (``CACHE/selection/<scenario>/<key>.json``, keyed by the scenario, the
seed, the method, the selection settings and a digest of the ``auxilia.selection`` source).

Each budget's selection is trained like a ground-truth run of the quality benchmark (the
Trainer, the scenario's steps, learning rate, trunk and ground-truth sampler): the target plus
each source restricted to its selected rows, as its own source. ``count`` weighting (the
default) gives source k the fixed weight ``K · n_k / n`` (K pool sources, n_k of the n
selected samples from k): the auxiliary loss is then K times the mean loss over the selected
samples, so every sample counts the same whichever source it came from, the total auxiliary
weight is the whole pool's, and with equal-sized sources the 100 % selection is exactly the
``equal`` run on the whole pool. ``source`` weighting trains the same sources with ``equal``
weights, as ``auxilia run`` does with the ``run.yaml`` that ``auxilia select`` writes (its
config's strategy; ``equal`` there): every source's selection then weighs as much as any
other's, however few samples it kept. Baselines, per seed: ``random`` (the method) at the same
k; the whole pool (k = 100 %, the same for every method); the target alone (the quality
benchmark's ``none`` ground-truth run, shared through its cache).

Reported, per scenario, method and budget, over seeds: the target's test metric (mean ± std),
its difference to the target alone, to the whole pool and to ``random`` at the same k, and the
**harmful share**: the fraction of the selected samples that come from sources harmful by
construction (:attr:`~auxilia.bench.scenarios.Problem.harmful`), with its ratio to their share
of the pool (1: as many as at random; below 1/3: under-represented by a factor of 3 or more).
:func:`run_select` returns the report (schema ``auxilia.bench.select/1``);
:func:`auxilia.bench.select_report.write_report` writes ``select.json``, ``select.md`` and
``select.png``.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from auxilia import __version__
from auxilia.bench.aggregate import better_sign, mean_or_none, points_scale, std
from auxilia.bench.cache import RecordCache
from auxilia.bench.ground_truth import GroundTruthCache, cache_key
from auxilia.bench.quality import machine
from auxilia.bench.runs import RunSpec, build_problem, execute, first_problem
from auxilia.bench.scenarios import Problem, Scenario, get_scenario
from auxilia.bench.workers import Progress, Workers
from auxilia.data.sources import Source, Target, head_outputs
from auxilia.errors import ConfigError
from auxilia.models import build_model, build_trunk
from auxilia.selection import (
    METHODS,
    ClassifierLearner,
    Pool,
    SelectSettings,
    get_method,
    select,
)

SCHEMA = "auxilia.bench.select/1"
BUDGETS = (1.0, 5.0, 10.0, 25.0, 50.0)  # percent of the pool
WHOLE = 100.0  # the whole pool: one run per seed, the same for every method
BASELINE = "random"  # always run: the "same k at random" every method is compared with
GOAL_METHOD = "gradient"
GOAL_BUDGET = 10.0
GOAL_FACTOR = 3.0  # harmful samples under-represented at least this much in the selection
RULE_VERSION = 2  # bump when what a ranking means changes: it keys the cache
Weighting = Literal["count", "source"]


@dataclass(frozen=True)
class SelectBenchSettings:
    """What ``auxilia bench select`` runs."""

    scenarios: tuple[str, ...]
    methods: tuple[str, ...] = ()  # empty: every selection method
    budgets: tuple[float, ...] = BUDGETS  # percent of the pool, in (0, 100]
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # overrides every scenario's training (and warm-up) steps
    jobs: int = 1
    cache: Path = Path(".auxilia-cache")
    weighting: Weighting = "count"
    suite: str = "custom"
    command: str = "auxilia bench select"

    def __post_init__(self) -> None:
        for spec in self.methods:
            method_spec(spec)  # names and options checked before anything runs
        for budget in self.budgets:
            if not 0.0 < budget <= WHOLE:
                raise ConfigError(
                    f"budget {budget:g} % is out of range: budgets are percentages in (0, 100]"
                )
        if not self.budgets:
            raise ConfigError("no budget: give at least one percentage in (0, 100]")
        if not self.seeds:
            raise ConfigError("no seed: give at least one")
        if self.weighting not in ("count", "source"):
            raise ConfigError(f"weighting: expected 'count' or 'source', got {self.weighting!r}")

    def method_names(self) -> list[str]:
        """The methods to run, ``random`` (the baseline) first."""
        chosen = list(self.methods) if self.methods else list(METHODS)
        return [BASELINE] + [m for m in dict.fromkeys(chosen) if m != BASELINE]

    def budget_list(self) -> list[float]:
        """The budgets below the whole pool, ascending (100 % is always the whole pool)."""
        return sorted({float(b) for b in self.budgets if b < WHOLE})

    def steps_of(self, scenario: Scenario) -> int:
        return self.steps if self.steps is not None else scenario.steps


# ---- the pool and its ranking ----------------------------------------------------------------


def pool_sources(problem: Problem) -> list[Source]:
    """The scenario's pool: its dataset sources (either head), in the scenario's order."""
    return [s for s in problem.sources if s.granularity == "dataset"]


@dataclass(frozen=True)
class Ranking:
    """Every pool sample, best first: ``source[i]`` (an index into ``sources``) and ``index[i]``
    (its row in that source) of the i-th best, and its score."""

    sources: tuple[str, ...]
    sizes: tuple[int, ...]
    source: tuple[int, ...]
    index: tuple[int, ...]
    score: tuple[float, ...]

    @property
    def total(self) -> int:
        return len(self.source)

    def count(self, budget: float) -> int:
        """Samples kept by ``budget`` percent of the pool (at least one), as ``auxilia select``
        counts a fractional budget."""
        return SelectSettings(budget=min(1.0, budget / 100.0)).count(self.total)

    def top(self, count: int) -> dict[str, tuple[int, ...]]:
        """The best ``count`` samples: per source that has any, its rows, sorted."""
        rows: dict[str, list[int]] = {}
        for k, row in zip(self.source[:count], self.index[:count], strict=True):
            rows.setdefault(self.sources[k], []).append(row)
        return {name: tuple(sorted(rows[name])) for name in self.sources if name in rows}

    def as_json(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "sizes": list(self.sizes),
            "source": list(self.source),
            "index": list(self.index),
            "score": list(self.score),
        }

    @staticmethod
    def from_json(record: Mapping[str, Any]) -> Ranking:
        return Ranking(
            tuple(record["sources"]),
            tuple(int(n) for n in record["sizes"]),
            tuple(int(k) for k in record["source"]),
            tuple(int(i) for i in record["index"]),
            tuple(float(s) for s in record["score"]),
        )


def harmful_share(counts: Mapping[str, int], harmful: frozenset[str] | set[str]) -> float | None:
    """The fraction of the samples counted in ``counts`` (per source) that come from a
    ``harmful`` source; ``None`` for no samples."""
    total = sum(counts.values())
    if total == 0:
        return None
    return sum(n for name, n in counts.items() if name in harmful) / total


def wrong_share(
    rows: Mapping[str, Sequence[int] | range], wrong: Mapping[str, np.ndarray], count: int
) -> float | None:
    """The fraction of ``count`` selected samples (``rows`` per source) whose label is wrong for
    the target by construction (:attr:`~auxilia.bench.scenarios.Problem.wrong`); ``None``
    where the scenario marks no row of its pool or nothing is selected."""
    if not wrong or count == 0:
        return None
    hits = sum(int(wrong[n][list(r)].sum()) for n, r in rows.items() if n in wrong and len(r))
    return hits / count


def harmful_ratio(selected: float | None, pool: float | None) -> float | None:
    """The harmful share of a selection over that of the pool (1: as at random, 0: none);
    ``None`` where the pool has no harmful sample."""
    if selected is None or pool is None or pool <= 0.0:
        return None
    return selected / pool


def largest_class_share(
    rows: Mapping[str, Sequence[int]], labels: Mapping[str, torch.Tensor]
) -> float | None:
    """The share of the most frequent label among the selected ``rows`` of the sources in
    ``labels`` (those sharing the target's head): 1/C for a class-balanced selection of C
    classes, 1 when every selected sample has one label; ``None`` for none selected."""
    chosen = [labels[name][list(r)] for name, r in rows.items() if name in labels and len(r)]
    if not chosen:
        return None
    ys = torch.cat(chosen)
    return float(torch.bincount(ys).max()) / len(ys)


def source_weights(
    rows: Mapping[str, Sequence[int]], pool: Sequence[str], weighting: Weighting
) -> tuple[float, ...] | None:
    """The ``fixed`` weights (target first, then each source in ``rows``) of a selection run,
    or ``None`` for ``equal`` ones; see the module docstring."""
    if weighting == "source":
        return None
    selected = sum(len(r) for r in rows.values())
    return (1.0, *(len(pool) * len(r) / selected for r in rows.values()))


def _learner_factory(
    scenario: Scenario, target: Target, sources: Sequence[Source]
) -> Callable[[], ClassifierLearner]:
    """Fresh models as the Trainer builds them for the scenario (same trunk, same heads)."""
    heads = {target.name: target.outputs}
    kinds = {target.name: target.kind}
    for s in sources:
        if s.head == "own":
            heads[s.name] = head_outputs(s)
            kinds[s.name] = s.kind

    def make() -> ClassifierLearner:
        trunk = build_trunk(
            scenario.trunk, tuple(target.train[0].shape[1:]), dict(scenario.trunk_params)
        )
        return ClassifierLearner(build_model(trunk, target.train[0][0], heads), target.name, kinds)

    return make


@dataclass(frozen=True)
class RankSpec:
    """One ranking: a scenario's pool for a seed, by a method, after ``steps`` warm-up steps."""

    scenario: str
    seed: int
    steps: int
    method: str


def method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]`` (values read as YAML scalars: ``true``,
    ``8``, ``none``) → the method's name and its parameters, checked as ``auxilia select``
    checks them. The whole spec labels the method's rows, so variants run side by side."""
    name, *options = spec.split(":")
    if name not in METHODS:
        raise ConfigError(
            f"unknown selection method {name!r}; expected one of: {', '.join(METHODS)}"
        )
    params: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ConfigError(f"method {spec!r}: options are KEY=VALUE, got {option!r}")
        params[key] = yaml.safe_load(value)
    get_method(name, params)
    return name, params


def _select_settings(spec: RankSpec, scenario: Scenario, target: Target) -> SelectSettings:
    name, params = method_spec(spec.method)
    return SelectSettings(
        method=name,
        params=params,
        budget=1.0,
        warmup_steps=spec.steps,
        warmup_batch=target.batch_size,
        lr=scenario.lr,
        seed=spec.seed,
    )


def rank(spec: RankSpec, cache: str) -> dict[str, Any]:
    """Rank the pool of ``spec``; ``{"ok": True, "ranking", "seconds"}`` or, as
    :func:`auxilia.bench.runs.execute`, ``{"ok": False, "error", "traceback"}``."""
    try:
        scenario = get_scenario(spec.scenario)
        problem = build_problem(spec.scenario, spec.seed, cache)
        sources = pool_sources(problem)
        pools = [Pool(s.name, head=s.head, data=s.data) for s in sources]
        began = time.perf_counter()
        selection = select(
            problem.target,
            pools,
            _learner_factory(scenario, problem.target, sources),
            _select_settings(spec, scenario, problem.target),
        )
        seconds = time.perf_counter() - began
        table = selection.table
        names = [s.name for s in sources]
        position = {name: k for k, name in enumerate(names)}
        ranking = Ranking(
            tuple(names),
            tuple(len(s.y) for s in sources),
            tuple(position[str(name)] for name in table["source"]),
            tuple(int(i) for i in table["index"]),
            tuple(float(x) for x in table["score"]),
        )
        return {"ok": True, "ranking": ranking.as_json(), "seconds": seconds}
    except Exception as error:  # a failing method is recorded, not fatal
        return {
            "ok": False,
            "error": f"{type(error).__name__}: {error}".strip(),
            "traceback": traceback.format_exc(limit=6),
        }


def _code_digest() -> str:
    """A hash of the ``auxilia.selection`` source: a changed method invalidates its rankings."""
    import auxilia.selection

    digest = hashlib.sha256()
    for path in sorted(Path(auxilia.selection.__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ranking_key(spec: RankSpec, scenario: Scenario, problem: Problem) -> str:
    """A stable hash of everything a ranking depends on."""
    settings = _select_settings(spec, scenario, problem.target)
    described = {
        "scenario": scenario.fingerprint(spec.steps),
        "seed": spec.seed,
        "method": spec.method,
        "settings": {
            k: v
            for k, v in vars(settings).items()
            if k not in ("budget", "device") and not callable(v)
        },
        "pool": [(s.name, s.head) for s in pool_sources(problem)],
        "code": _code_digest(),
        "rule": RULE_VERSION,
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---- the grid ---------------------------------------------------------------------------------


@dataclass
class _State:
    """One scenario's jobs and results."""

    scenario: Scenario
    problem: Problem
    steps: int
    pool: list[Source]
    rankings: dict[tuple[str, int], Ranking] = field(default_factory=dict)
    rank_seconds: dict[str, list[float]] = field(default_factory=dict)
    labels: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # target-head pool
    wrong: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # wrongly labelled rows
    runs: dict[tuple[str, float], dict[int, dict[str, Any]]] = field(default_factory=dict)
    baselines: dict[str, dict[int, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return "accuracy" if self.problem.target.kind == "classification" else "mse"

    @property
    def harmful(self) -> frozenset[str]:
        names = {s.name for s in self.pool}
        return frozenset(n for n in self.problem.harmful if n in names)


JobKind = Literal["rank", "train", "target-only", "whole-pool"]


@dataclass(frozen=True)
class _Job:
    """A queued job: ``run(spec, cache)`` in a worker; the other fields say what it is for."""

    kind: JobKind
    scenario: str
    seed: int
    run: Callable[[Any, str], dict[str, Any]]
    spec: Any
    method: str = ""  # rank and train jobs
    budget: float = 0.0  # train jobs
    key: str = ""  # rank jobs: the ranking's cache key

    def label(self, result: Mapping[str, Any]) -> str:
        status = "" if result.get("ok") else " (failed)"
        what = {"rank": f"ranking by {self.method}", "train": f"{self.method} {self.budget:g} %"}
        return f"{self.scenario}/{what.get(self.kind, self.kind)}/seed {self.seed}{status}"


class _Grid:
    """Schedules the rankings, the runs on each selection and the baselines; records results."""

    def __init__(self, settings: SelectBenchSettings, progress: Progress) -> None:
        self.settings = settings
        self.progress = progress
        self.methods = settings.method_names()
        self.budgets = settings.budget_list()
        self.truth = GroundTruthCache(settings.cache)
        self.ranked = RecordCache(settings.cache, "selection")
        self.states: dict[str, _State] = {}
        self.skipped: dict[str, str] = {}
        self.queue: deque[_Job] = deque()

    def schedule(self) -> None:
        """Queue every scenario's rankings (cached ones are read, and their runs queued at
        once) and baselines; the progress total counts the runs of rankings still to come."""
        settings, cache = self.settings, str(self.settings.cache)
        pending_runs = 0
        for name in settings.scenarios:
            scenario = get_scenario(name)
            problem, reason = first_problem(scenario, settings.seeds[0], settings.cache)
            if problem is None:
                self.skipped[name] = reason
                continue
            pool = pool_sources(problem)
            if not pool:
                self.skipped[name] = "no dataset source to select samples from"
                continue
            state = _State(scenario, problem, settings.steps_of(scenario), pool)
            self.states[name] = state
            for seed in settings.seeds:
                seeded = build_problem(name, seed, cache)
                state.labels[seed] = {
                    s.name: s.y for s in pool_sources(seeded) if s.head == "target"
                }
                state.wrong[seed] = {
                    s.name: seeded.wrong[s.name]
                    for s in pool_sources(seeded)
                    if s.name in seeded.wrong
                }
                record = self.truth.get(name, cache_key(scenario, state.steps, seed, ()))
                if record is not None:
                    state.baselines.setdefault("target-only", {})[seed] = float(record["value"])
                else:
                    spec = RunSpec(name, seed, state.steps, "subset", subset=())
                    self.queue.append(_Job("target-only", name, seed, execute, spec))
                rows = {s.name: tuple(range(len(s.y))) for s in pool_sources(seeded)}
                self.queue.append(
                    _Job("whole-pool", name, seed, execute, self._spec(state, seed, rows))
                )
                for method in self.methods:
                    rank_spec = RankSpec(name, seed, state.steps, method)
                    key = ranking_key(rank_spec, scenario, seeded)
                    found = self.ranked.get(name, key)
                    if found is not None:
                        self._ranked(state, method, seed, found)
                    else:  # rankings first: each one unlocks its runs
                        job = _Job("rank", name, seed, rank, rank_spec, method=method, key=key)
                        self.queue.appendleft(job)
                        pending_runs += len(self.budgets)
        self.progress.add(len(self.queue) + pending_runs)

    def _spec(self, state: _State, seed: int, rows: Mapping[str, tuple[int, ...]]) -> RunSpec:
        """A run on the target plus ``rows`` of the pool's sources (see :func:`source_weights`)."""
        pool = [s.name for s in state.pool]
        return RunSpec(
            state.scenario.name,
            seed,
            state.steps,
            "rows",
            rows=tuple(rows.items()),
            weights=source_weights(rows, pool, self.settings.weighting),
        )

    def _ranked(self, state: _State, method: str, seed: int, record: Mapping[str, Any]) -> None:
        """Keep a ranking and queue a run on each budget's top of it."""
        ranking = Ranking.from_json(record["ranking"])
        state.rankings[(method, seed)] = ranking
        state.rank_seconds.setdefault(method, []).append(float(record["seconds"]))
        for budget in self.budgets:
            spec = self._spec(state, seed, ranking.top(ranking.count(budget)))
            job = _Job("train", state.scenario.name, seed, execute, spec, method, budget)
            self.queue.append(job)

    def skip(self, job: _Job) -> int:
        """How many counted jobs ``job`` stands for if its method already failed on its
        scenario (a ranking: itself and its runs), else 0 (run it)."""
        if (
            job.kind not in ("rank", "train")
            or job.method not in self.states[job.scenario].failures
        ):
            return 0
        return 1 + len(self.budgets) if job.kind == "rank" else 1

    def record(self, job: _Job, result: Mapping[str, Any]) -> None:
        """Keep what ``job`` returned; a failure drops its method on the scenario."""
        state = self.states[job.scenario]
        if not result.get("ok"):
            reason = str(result.get("error", "failed")).splitlines()[0][:300]
            if job.kind in ("rank", "train"):
                if job.method not in state.failures:
                    state.failures[job.method] = reason
                    state.runs = {k: v for k, v in state.runs.items() if k[0] != job.method}
                if job.kind == "rank":  # its runs will never be queued: count them as done
                    for _ in self.budgets:
                        self.progress.advance(f"{job.scenario}/{job.method}: skipped")
            else:
                state.errors.append(f"{job.kind} of {job.scenario}, seed {job.seed}: {reason}")
            return
        if job.kind == "rank":
            self.ranked.put(job.scenario, job.key, dict(result))
            self._ranked(state, job.method, job.seed, result)
        elif job.kind == "train":
            if job.method not in state.failures:
                state.runs.setdefault((job.method, job.budget), {})[job.seed] = dict(result)
        else:
            if job.kind == "target-only":  # a ground-truth run: the quality benchmark's cache
                key = cache_key(state.scenario, state.steps, job.seed, ())
                self.truth.put(job.scenario, key, {**result, "subset": []})
            state.baselines.setdefault(job.kind, {})[job.seed] = float(result["value"])


def run_select(settings: SelectBenchSettings, progress: Progress | None = None) -> dict[str, Any]:
    """Run the grid and return the report (see the module docstring)."""
    progress = progress or Progress()
    began = time.perf_counter()
    grid = _Grid(settings, progress)
    grid.schedule()
    inflight: dict[Future[dict[str, Any]], _Job] = {}
    with Workers(settings.jobs).running() as pool:
        while grid.queue or inflight:
            while grid.queue and len(inflight) < pool.capacity:
                job = grid.queue.popleft()
                dropped = grid.skip(job)
                for _ in range(dropped):
                    progress.advance(f"{job.scenario}/{job.method}: skipped")
                if not dropped:
                    inflight[pool.start(job.run, job.spec, str(settings.cache))] = job
            if not inflight:
                continue
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for future in done:
                job = inflight.pop(future)
                result = future.result()
                progress.advance(job.label(result))
                grid.record(job, result)

    scenarios_out, records, goal, skipped = [], [], [], []
    for name in settings.scenarios:
        if name in grid.skipped:
            scenario = get_scenario(name)
            scenarios_out.append(
                {
                    "name": name,
                    "summary": scenario.summary,
                    "status": "skipped",
                    "skip_reason": grid.skipped[name],
                }
            )
            skipped.append(f"scenario {name}: {grid.skipped[name]}")
            continue
        state = grid.states[name]
        described, rows = aggregate_scenario(state, grid.methods, grid.budgets, settings.seeds)
        scenarios_out.append(described)
        records += rows
        goal += goal_checks(described, rows, grid.methods)
        skipped += [f"{method} on {name}: {reason}" for method, reason in state.failures.items()]
        skipped += state.errors
    return {
        "schema": SCHEMA,
        "command": settings.command,
        "suite": settings.suite,
        "seeds": list(settings.seeds),
        "jobs": settings.jobs,
        "methods": grid.methods,
        "budgets": grid.budgets,
        "weighting": settings.weighting,
        "machine": machine(),
        "auxilia_version": __version__,
        "torch_version": torch.__version__,
        "wall_seconds": time.perf_counter() - began,
        "goal": {
            "method": GOAL_METHOD,
            "budget": GOAL_BUDGET,
            "factor": GOAL_FACTOR,
            "met": goal_met(goal),
            "checks": goal,
        },
        "scenarios": scenarios_out,
        "records": records,
        "skipped": skipped,
    }


# ---- aggregation ------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": mean_or_none(values), "std": std(values), "per_seed": list(values)}


def _seeded(values: Mapping[int, float], seeds: Sequence[int]) -> list[float]:
    return [values[s] for s in seeds if s in values]


def aggregate_scenario(
    state: _State, methods: Sequence[str], budgets: Sequence[float], seeds: Sequence[int]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One scenario's description (its pool and baselines) and its records: one per method
    and budget, plus ``target-only`` (budget 0) and ``whole-pool`` (budget 100)."""
    metric = state.metric
    sign, scale = better_sign(metric), points_scale(metric)
    name = state.scenario.name
    harmful = state.harmful
    sizes = {s.name: len(s.y) for s in state.pool}
    pool_share = harmful_share(sizes, harmful) if harmful else None
    alone = _stats(_seeded(state.baselines.get("target-only", {}), seeds))
    whole = _stats(_seeded(state.baselines.get("whole-pool", {}), seeds))

    def delta(value: float | None, base: float | None) -> float | None:
        if value is None or base is None:
            return None
        return sign * scale * (value - base)

    records: list[dict[str, Any]] = []
    for label, stats, budget in (("target-only", alone, 0.0), ("whole-pool", whole, WHOLE)):
        records.append(
            {
                "scenario": name,
                "method": label,
                "budget": budget,
                "count": 0 if budget == 0.0 else sum(sizes.values()),
                "status": "ok" if stats["per_seed"] else "failed",
                "seeds": len(stats["per_seed"]),
                **stats,
                "delta_target_only": delta(stats["mean"], alone["mean"]),
                "delta_whole_pool": delta(stats["mean"], whole["mean"]),
                "delta_random": None,
                "harmful_share": None if budget == 0.0 else pool_share,
                "harmful_ratio": None if budget == 0.0 or pool_share is None else 1.0,
                "harmful_ratio_worst": None if budget == 0.0 or pool_share is None else 1.0,
            }
        )
    means: dict[tuple[str, float], float | None] = {}
    for method in methods:
        for budget in budgets:
            record: dict[str, Any] = {"scenario": name, "method": method, "budget": budget}
            if method in state.failures:
                records.append({**record, "status": "failed", "reason": state.failures[method]})
                continue
            runs = state.runs.get((method, budget), {})
            ranked = [s for s in seeds if (method, s) in state.rankings]
            if not runs and not ranked:
                continue
            values = [float(runs[s]["value"]) for s in seeds if s in runs]
            stats = _stats(values)
            means[(method, budget)] = stats["mean"]
            shares, ratios, per_source, largest = [], [], [], []
            wrong_shares, wrong_ratios = [], []
            count = 0
            for s in ranked:
                ranking = state.rankings[(method, s)]
                count = ranking.count(budget)
                top = ranking.top(count)
                counts = {n: len(r) for n, r in top.items()}
                wrong = wrong_share(top, state.wrong.get(s, {}), count)
                wrong_pool = wrong_share(
                    {n: range(len(m)) for n, m in state.wrong.get(s, {}).items()},
                    state.wrong.get(s, {}),
                    ranking.total,
                )
                if wrong is not None:
                    wrong_shares.append(wrong)
                    ratio_w = harmful_ratio(wrong, wrong_pool)
                    if ratio_w is not None:
                        wrong_ratios.append(ratio_w)
                per_source.append({n: counts.get(n, 0) / count for n in ranking.sources})
                largest.append(largest_class_share(ranking.top(count), state.labels.get(s, {})))
                share = harmful_share(counts, harmful) if harmful else None
                pool = harmful_share(
                    dict(zip(ranking.sources, ranking.sizes, strict=True)), harmful
                )
                if share is not None:
                    shares.append(share)
                    ratio = harmful_ratio(share, pool)
                    if ratio is not None:
                        ratios.append(ratio)
            mean_share = mean_or_none(shares)
            records.append(
                {
                    **record,
                    "count": count,
                    "status": "ok",
                    "seeds": len(values),
                    **stats,
                    "delta_target_only": delta(stats["mean"], alone["mean"]),
                    "delta_whole_pool": delta(stats["mean"], whole["mean"]),
                    "delta_random": None,  # filled below, once random's means are known
                    "harmful_share": mean_share,
                    "harmful_share_per_seed": shares,
                    "harmful_ratio": harmful_ratio(mean_share, pool_share),
                    "harmful_ratio_worst": max(ratios) if ratios else None,
                    "wrong_share": mean_or_none(wrong_shares),
                    "wrong_ratio": mean_or_none(wrong_ratios),
                    "wrong_ratio_worst": max(wrong_ratios) if wrong_ratios else None,
                    "source_share": {n: mean_or_none([p[n] for p in per_source]) for n in sizes},
                    "largest_class_share": mean_or_none(largest),
                    "selection_seconds": mean_or_none(state.rank_seconds.get(method, [])),
                    "wall_seconds": mean_or_none([float(r["wall_seconds"]) for r in runs.values()]),
                }
            )
    for r in records:
        if r["method"] not in ("target-only", "whole-pool") and r["status"] == "ok":
            r["delta_random"] = delta(r["mean"], means.get((BASELINE, r["budget"])))
    described = {
        "name": name,
        "summary": state.scenario.summary,
        "status": "ran",
        "metric": metric,
        "unit": "points" if metric == "accuracy" else metric,
        "steps": state.steps,
        "warmup_steps": state.steps,
        "lr": state.scenario.lr,
        "trunk": state.scenario.trunk,
        "trunk_params": dict(state.scenario.trunk_params),
        "pool": {
            "size": sum(sizes.values()),
            "harmful_share": pool_share,
            "largest_class_share": mean_or_none(
                [
                    largest_class_share({n: range(len(y)) for n, y in by.items()}, by)
                    for by in state.labels.values()
                ]
            ),
            "sources": [
                {
                    "name": s.name,
                    "role": state.problem.roles.get(s.name, ""),
                    "head": s.head,
                    "size": len(s.y),
                    "harmful": s.name in harmful,
                }
                for s in state.pool
            ],
            "left_out": [s.name for s in state.problem.sources if s.granularity != "dataset"],
        },
        "target_only": alone,
        "whole_pool": whole,
    }
    return described, records


def goal_checks(
    scenario: Mapping[str, Any], records: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> list[dict[str, Any]]:
    """Per method, on one scenario, at the goal's budget: does it beat ``random`` and the whole
    pool, and is every seed's selection's harmful share at most 1/``GOAL_FACTOR`` of the
    pool's? (``None`` where not measured, or where the pool holds no harmful source.)"""
    at = {r["method"]: r for r in records if r["budget"] == GOAL_BUDGET and r["status"] == "ok"}
    has_harmful = bool(scenario["pool"]["harmful_share"])
    out = []
    for method in methods:
        r = at.get(method)
        if r is None:
            continue
        worst = r.get("harmful_ratio_worst")
        out.append(
            {
                "scenario": scenario["name"],
                "method": method,
                "has_harmful": has_harmful,
                "delta_random": r["delta_random"],
                "delta_whole_pool": r["delta_whole_pool"],
                "harmful_ratio_worst": worst,
                "wrong_ratio_worst": r.get("wrong_ratio_worst"),
                "beats_random": None if r["delta_random"] is None else r["delta_random"] > 0,
                "beats_whole_pool": None
                if r["delta_whole_pool"] is None
                else r["delta_whole_pool"] > 0,
                "under_represented": None if worst is None else worst <= 1.0 / GOAL_FACTOR,
            }
        )
    return out


def goal_met(checks: Sequence[Mapping[str, Any]]) -> bool | None:
    """The goal, for ``GOAL_METHOD`` on every scenario whose pool holds harmful sources:
    beats random and the whole pool, and under-represents the harmful samples; ``None`` when
    no such scenario was measured."""
    relevant = [c for c in checks if c["method"] == GOAL_METHOD and c["has_harmful"]]
    if not relevant:
        return None
    return all(
        c["beats_random"] and c["beats_whole_pool"] and c["under_represented"] for c in relevant
    )
