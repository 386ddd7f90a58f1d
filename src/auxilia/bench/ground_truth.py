"""Ground truth per source: what the target's test metric owes to it, measured by retraining.

For each seed the benchmark trains with ``equal`` weights on subsets of the scenario's
auxiliary sources (or of its source groups, where the scenario groups them):

- ``all``: every source; ``none``: the target alone;
- leave-one-out ``without:g``: every source but g, and add-one-in ``only:g``: g alone.

A source's **leave-one-out** value is ``metric(all) - metric(all without it)`` and its
**add-one-in** value is ``metric(target plus it) - metric(target alone)``, both averaged over
seeds; positive means the source helps. Accuracy deltas are reported in points (×100).

The **oracle** is the target trained with exactly the sources whose add-one-in value is
positive (mean over seeds > 0), with equal weights: the best a rule that keeps or drops whole
sources can be expected to do without search, and the reference for "capturing the gain".

Every subset run is cached on disk, one JSON file per (scenario definition, steps, seed,
subset), under ``CACHE/ground-truth/<scenario>/``: a later benchmark with more seeds or other
strategies retrains nothing already measured, and the oracle run reuses a subset run when the
oracle's subset is one of them (e.g. all sources, or the target alone).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auxilia.bench.aggregate import spearman
from auxilia.bench.cache import RecordCache
from auxilia.bench.scenarios import Scenario

RULE_VERSION = 1  # bump when what a subset run means changes: it keys the cache


def subsets(groups: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The named subsets a ground truth needs (duplicates collapse in the cache)."""
    ordered = tuple(sorted(groups))
    out: dict[str, tuple[str, ...]] = {"all": ordered, "none": ()}
    for g in ordered:
        out[f"without:{g}"] = tuple(x for x in ordered if x != g)
        out[f"only:{g}"] = (g,)
    return out


def cache_key(scenario: Scenario, steps: int, seed: int, subset: Sequence[str]) -> str:
    """A stable hash of the run: scenario definition, steps, seed, subset and this rule."""
    spec = {
        "scenario": scenario.fingerprint(steps),
        "seed": seed,
        "subset": sorted(subset),
        "rule": RULE_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


class GroundTruthCache(RecordCache):
    """Subset runs on disk: ``root/ground-truth/<scenario>/<key>.json``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "ground-truth")


@dataclass(frozen=True)
class GroupTruth:
    """Leave-one-out and add-one-in values of one group, per seed and averaged."""

    loo: list[float]
    add: list[float]

    @property
    def loo_mean(self) -> float | None:
        return statistics.fmean(self.loo) if self.loo else None

    @property
    def add_mean(self) -> float | None:
        return statistics.fmean(self.add) if self.add else None


def _std(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def group_truth(
    groups: Sequence[str],
    values: Mapping[int, Mapping[tuple[str, ...], float]],
) -> dict[str, GroupTruth]:
    """Per group, from ``values[seed][subset] = metric`` (seeds lacking a run are left out)."""
    named = subsets(groups)
    out: dict[str, GroupTruth] = {}
    for g in sorted(groups):
        loo, add = [], []
        for by_subset in values.values():
            full, without = by_subset.get(named["all"]), by_subset.get(named[f"without:{g}"])
            alone, only = by_subset.get(named["none"]), by_subset.get(named[f"only:{g}"])
            if full is not None and without is not None:
                loo.append(full - without)
            if alone is not None and only is not None:
                add.append(only - alone)
        out[g] = GroupTruth(loo, add)
    return out


def loo_reliability(
    groups: Sequence[str], values: Mapping[int, Mapping[tuple[str, ...], float]]
) -> float | None:
    """How well the leave-one-out ranking of the groups reproduces over seeds, in [-1, 1].

    The seeds with every leave-one-out run are split into two halves in every way (sizes
    ⌊n/2⌋ and ⌈n/2⌉); the mean Spearman correlation of the halves' mean values is stepped up
    to the whole set with the Spearman–Brown formula, 2r / (1 + r): the expected correlation of
    this ranking with one from as many other seeds. No credit can agree with the measured
    truth much beyond its square root (classical test theory: a perfect measure's correlation
    with a noisy one). None with fewer than 4 such seeds or 3 groups, or where no split has a
    defined correlation (every group tied).
    """
    named = subsets(groups)
    ordered = sorted(groups)
    per_seed = []
    for by_subset in values.values():
        full = by_subset.get(named["all"])
        without = [by_subset.get(named[f"without:{g}"]) for g in ordered]
        if full is not None and all(w is not None for w in without):
            per_seed.append([full - w for w in without if w is not None])
    n = len(per_seed)
    if n < 4 or len(ordered) < 3:
        return None
    correlations = []
    for first in itertools.combinations(range(n), n // 2):
        if 0 not in first and n % 2 == 0:
            continue  # each even split once: its halves swapped give the same correlation
        second = [i for i in range(n) if i not in first]
        means = [
            [statistics.fmean(per_seed[i][g] for i in half) for g in range(len(ordered))]
            for half in (first, second)
        ]
        r = spearman(means[0], means[1])
        if r is not None:
            correlations.append(r)
    if not correlations:
        return None
    half = statistics.fmean(correlations)
    return -1.0 if half <= -1.0 else max(-1.0, 2.0 * half / (1.0 + half))


def oracle_subset(truth: Mapping[str, GroupTruth]) -> tuple[str, ...]:
    """The groups whose mean add-one-in value is positive, sorted."""
    return tuple(sorted(g for g, t in truth.items() if t.add_mean is not None and t.add_mean > 0))


def truth_json(truth: Mapping[str, GroupTruth], scale: float) -> dict[str, dict[str, Any]]:
    """Per group: mean, standard deviation and per-seed values, in reporting units."""
    out = {}
    for g, t in truth.items():
        out[g] = {
            "loo": None if t.loo_mean is None else scale * t.loo_mean,
            "loo_std": None if not t.loo else scale * (_std(t.loo) or 0.0),
            "add_one_in": None if t.add_mean is None else scale * t.add_mean,
            "add_one_in_std": None if not t.add else scale * (_std(t.add) or 0.0),
            "loo_per_seed": [scale * v for v in t.loo],
            "add_one_in_per_seed": [scale * v for v in t.add],
        }
    return out
