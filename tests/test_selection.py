"""Sample selection (``auxilia select``): each method's exact rule on a hand-checked case, that
the methods rank helpful samples above harmful ones, the ranking's invariants, streamed file
pools, the written files (which ``auxilia run`` trains on), and torchrun's merged ranking."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

from auxilia.data.files import load_array_file, save_array_file
from auxilia.data.sources import Target
from auxilia.errors import ConfigError, DataError
from auxilia.models import build_model, build_trunk
from auxilia.selection import (
    ClassifierLearner,
    Pool,
    SelectSettings,
    get_method,
    select,
    write_selection,
)
from auxilia.selection.methods import Context, spread
from auxilia.selection.warmup import Group, checkpoint_steps, warm_up
from tiny_problem import assert_one_line_error, run_auxilia_process, torchrun, write_tiny_problem

FEATURES, CLASSES = 6, 3


def rule(x: torch.Tensor) -> torch.Tensor:
    return x[:, :CLASSES].argmax(dim=1)


def problem(
    seed: int = 0, rows: int = 60, dtype: torch.dtype = torch.float32
) -> tuple[Target, list[Pool]]:
    """A 3-class target (argmax of the first three features); ``helpful`` follows the target's
    rule, ``harmful`` has every label moved to the next class (a derangement)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, FEATURES, generator=g, dtype=dtype)
    target = Target("t", (x, rule(x)), num_classes=CLASSES, batch_size=16)
    good = torch.randn(rows, FEATURES, generator=g, dtype=dtype)
    bad = torch.randn(rows, FEATURES, generator=g, dtype=dtype)
    pools = [
        Pool("helpful", data=(good, rule(good))),
        Pool("harmful", data=(bad, (rule(bad) + 1) % CLASSES)),
    ]
    return target, pools


def learner_factory(
    dtype: torch.dtype = torch.float32, heads: dict[str, int] | None = None
) -> Callable[[], ClassifierLearner]:
    heads = heads or {"t": CLASSES}

    def make() -> ClassifierLearner:
        trunk = build_trunk("mlp", (FEATURES,), {"hidden": [8]})
        model = build_model(trunk, torch.zeros(1, FEATURES), heads).to(dtype)
        return ClassifierLearner(model, "t", dict.fromkeys(heads, "classification"))

    return make


def context_for(
    target: Target, pools: list[Pool], make: Callable[[], ClassifierLearner], **kw: Any
) -> Context:
    """The method's context as :func:`select` builds it, with the warm-up run here."""
    torch.manual_seed(0)
    learner = make()
    tgroup = Group("t", "t", *target.train)
    warm = [Group(p.name, "t", *p.data) for p in pools if p.data is not None]
    checkpoints = warm_up(
        learner,
        [tgroup, *warm],
        steps=kw.get("steps", 30),
        checkpoints=kw.get("checkpoints", 3),
        lr=0.05,
        batch_size=16,
        seed=0,
        device=torch.device("cpu"),
    )
    return Context(
        learner=learner,
        checkpoints=checkpoints,
        target=tgroup,
        heads={p.name: "t" for p in pools},
        warm_groups=warm,
        make_learner=seeded(make),
        device=torch.device("cpu"),
        batch_size=kw.get("batch_size", 25),
        lr=0.05,
        seed=0,
        pool_index={p.name: k for k, p in enumerate(pools)},
    )


def seeded(make: Callable[[], ClassifierLearner]) -> Callable[[], ClassifierLearner]:
    """The same fresh initialisation at every call (as :func:`select` gives the methods)."""

    def fresh() -> ClassifierLearner:
        torch.manual_seed(1)
        return make()

    return fresh


def per_sample_grads(
    learner: ClassifierLearner, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> torch.Tensor:
    """[N, P]: each sample's own-loss gradient on the parameters ``names``, by torch.func."""
    model = learner.model
    fixed = {n: p.detach() for n, p in model.named_parameters()}

    def loss(chosen: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        features = functional_call(model.trunk, _sub(fixed, chosen, "trunk."), (xi.unsqueeze(0),))
        head = functional_call(model.heads["t"], _sub(fixed, chosen, "heads.t."), (features,))
        return torch.nn.functional.cross_entropy(head, yi.unsqueeze(0))

    chosen = {n: fixed[n] for n in names}
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(chosen, x, y)
    return torch.cat([grads[n].reshape(len(x), -1) for n in names], dim=1)


def _sub(fixed: dict[str, torch.Tensor], chosen: dict[str, torch.Tensor], prefix: str) -> Any:
    merged = {**fixed, **chosen}
    return {n[len(prefix) :]: v for n, v in merged.items() if n.startswith(prefix)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b) / (a.norm(dim=1) * b.norm())


def scored(method: Any, pool: Pool, batch_size: int = 25) -> dict[str, torch.Tensor]:
    method.start_pool(pool)
    parts = [method.score(pool, batch) for batch in pool.batches(batch_size)]
    method.end_pool(pool)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


TRUNK_AND_HEAD = [
    "trunk.1.weight",
    "trunk.1.bias",
    "heads.t.weight",
    "heads.t.bias",
]


# ---- each method's rule --------------------------------------------------------------------


EVERY = {"checkpoints_per_sample": 0}  # TracIn's sum itself: every sample at every checkpoint


def test_gradient_is_lr_weighted_sum_of_checkpoint_cosines() -> None:
    """score = Σ_c lr_c cos(g_c(x), mean target gradient at c), with a sketch wide enough to be
    the identity, equals the cosines of exact per-sample gradients (float64)."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make)
    method = get_method("gradient", {"dim": 10_000, "subtasks": "none", **EVERY})
    method.prepare(ctx)
    got = scored(method, pools[1])
    x, y = pools[1].data  # type: ignore[misc]
    expected = torch.zeros(len(y), dtype=torch.float64)
    for i, checkpoint in enumerate(ctx.checkpoints):
        model = make()
        model.module.load_state_dict(checkpoint.state)
        g = per_sample_grads(model, x, y, TRUNK_AND_HEAD)
        tx, ty = target.train
        gt = per_sample_grads(model, tx, ty, TRUNK_AND_HEAD).mean(dim=0)
        c = cosine(g, gt)
        torch.testing.assert_close(got[f"cos_step{checkpoint.step}"], c, rtol=1e-9, atol=1e-9)
        expected += checkpoint.lr * c
        assert i < len(ctx.checkpoints)
    torch.testing.assert_close(got["score"], expected, rtol=1e-9, atol=1e-9)


def test_gradient_contrast_subtracts_the_pools_mean_gradient() -> None:
    """contrast: score = Σ_c lr_c cos(g_c(x), mean target gradient − mean gradient of the
    pools' warm-up samples at c), checked against exact per-sample gradients (float64)."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make)
    method = get_method("gradient", {"dim": 10_000, "subtasks": "none", "contrast": True, **EVERY})
    method.prepare(ctx)
    got = scored(method, pools[1])
    x, y = pools[1].data  # type: ignore[misc]
    expected = torch.zeros(len(y), dtype=torch.float64)
    for checkpoint in ctx.checkpoints:
        model = make()
        model.module.load_state_dict(checkpoint.state)
        g = per_sample_grads(model, x, y, TRUNK_AND_HEAD)
        gt = per_sample_grads(model, *target.train, TRUNK_AND_HEAD).mean(dim=0)
        warm = torch.cat(
            [per_sample_grads(model, w.x, w.y, TRUNK_AND_HEAD) for w in ctx.warm_groups]
        )
        expected += checkpoint.lr * cosine(g, gt - warm.mean(dim=0))
    torch.testing.assert_close(got["score"], expected, rtol=1e-9, atol=1e-9)


def test_gradient_contrast_needs_warm_up_samples() -> None:
    target, pools = problem()
    ctx = context_for(target, pools, learner_factory())
    ctx.warm_groups = []
    method = get_method("gradient", {"contrast": True})
    method.prepare(ctx)
    with pytest.raises(ConfigError, match=r"warm-up samples .*select.warmup_samples"):
        method.start_pool(pools[0])
    with pytest.raises(ConfigError, match="'contrast' expects true or false"):
        get_method("gradient", {"contrast": "yes"})


def test_gradient_adam_preconditions_the_sample_side_only() -> None:
    """LESS's Adam transform: Γ = (β₁m + (1−β₁)g) / √(β₂v + (1−β₂)g² + ε) on the pool sample,
    the target's gradient plain."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make, checkpoints=2)
    method = get_method("gradient", {"dim": 10_000, "adam": True, "subtasks": "none", **EVERY})
    method.prepare(ctx)
    got = scored(method, pools[0])
    x, y = pools[0].data  # type: ignore[misc]
    expected = torch.zeros(len(y), dtype=torch.float64)
    for checkpoint in ctx.checkpoints:
        model = make()
        model.module.load_state_dict(checkpoint.state)
        g = per_sample_grads(model, x, y, TRUNK_AND_HEAD)
        m = torch.cat([checkpoint.moments[n][0].reshape(-1) for n in TRUNK_AND_HEAD])
        v = torch.cat([checkpoint.moments[n][1].reshape(-1) for n in TRUNK_AND_HEAD])
        gamma = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8)
        tx, ty = target.train
        gt = per_sample_grads(model, tx, ty, TRUNK_AND_HEAD).mean(dim=0)
        expected += checkpoint.lr * cosine(gamma, gt)
    torch.testing.assert_close(got["score"], expected, rtol=1e-9, atol=1e-9)


def test_gradient_subtasks_take_the_best_target_class() -> None:
    """``subtasks: auto`` on a classification target: score = max over the target's classes j
    of Σ_c lr_c cos(g_c(x), mean gradient of the target's class-j samples at c)."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make)
    method = get_method("gradient", {"dim": 10_000, **EVERY})
    method.prepare(ctx)
    got = scored(method, pools[0])
    x, y = pools[0].data  # type: ignore[misc]
    tx, ty = target.train
    per_class = torch.zeros(len(y), CLASSES, dtype=torch.float64)
    for checkpoint in ctx.checkpoints:
        model = make()
        model.module.load_state_dict(checkpoint.state)
        g = per_sample_grads(model, x, y, TRUNK_AND_HEAD)
        gt = per_sample_grads(model, tx, ty, TRUNK_AND_HEAD)
        for j in range(CLASSES):
            per_class[:, j] += checkpoint.lr * cosine(g, gt[ty == j].mean(dim=0))
    best, chosen = per_class.max(dim=1)
    torch.testing.assert_close(got["score"], best, rtol=1e-9, atol=1e-9)
    assert torch.equal(got["subtask"], chosen)


def test_gradient_subtasks_need_a_classification_target() -> None:
    target, pools = problem()
    ctx = context_for(target, pools, learner_factory())
    ctx.target_kind = "regression"
    with pytest.raises(ConfigError, match="subtasks 'classes' needs a classification target"):
        get_method("gradient", {"subtasks": "classes"}).prepare(ctx)
    with pytest.raises(ConfigError, match="subtasks must be"):
        get_method("gradient", {"subtasks": "labels"})


@pytest.mark.parametrize(("batch_size", "each"), [(7, 1), (25, 1), (7, 0)])
def test_gradient_source_score_is_the_cosine_of_the_pools_mean_gradient(
    batch_size: int, each: int
) -> None:
    """by_source: source_score = Σ_c lr_c cos(mean per-sample gradient of the pool's rows
    measured at c, mean target gradient over all classes) at each checkpoint c, from exact
    per-sample gradients (float64), whatever the batches; with one checkpoint per sample the
    rows at c are those :func:`spread` gives it, with every checkpoint (0) all of them."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make, batch_size=batch_size)
    method = get_method("gradient", {"dim": 10_000, "checkpoints_per_sample": each})
    method.prepare(ctx)
    got = {p.name: scored(method, p, batch_size) for p in pools}
    method.absorb(method.tally())
    for k, pool in enumerate(pools):
        x, y = pool.data  # type: ignore[misc]
        rows = torch.arange(len(y))
        at = spread(rows, len(ctx.checkpoints), each, ctx.seed, k) if each else None
        expected = 0.0
        for c, checkpoint in enumerate(ctx.checkpoints):
            chosen = rows if at is None else (at == c).any(dim=1)
            model = make()
            model.module.load_state_dict(checkpoint.state)
            g = per_sample_grads(model, x[chosen], y[chosen], TRUNK_AND_HEAD).mean(dim=0)
            gt = per_sample_grads(model, *target.train, TRUNK_AND_HEAD).mean(dim=0)
            expected += checkpoint.lr * float(cosine(g[None], gt)[0])
        finished = method.finish({"source": torch.full((len(y),), k), **got[pool.name]})
        torch.testing.assert_close(
            finished["source_score"], torch.full((len(y),), expected, dtype=torch.float64)
        )
    assert method.source_scores[0] > 0 > method.source_scores[1]  # helpful, deranged labels
    plain = get_method("gradient", {"by_source": False, **EVERY})
    alone = plain.finish(got["helpful"])
    assert "source_score" not in alone
    assert alone["score"] is got["helpful"]["score"]
    with pytest.raises(ConfigError, match="'by_source' expects true or false"):
        get_method("gradient", {"by_source": "yes"})


@pytest.mark.parametrize(
    ("checkpoints", "each", "subtasks"), [(3, 1, "none"), (3, 2, "none"), (2, 1, "auto")]
)
def test_gradient_estimates_the_checkpoint_sum_from_m_checkpoints_per_sample(
    checkpoints: int, each: int, subtasks: str
) -> None:
    """checkpoints_per_sample m of C: a sample is measured only at the m checkpoints
    :func:`spread` gives it, and its score is max_j (C/m) Σ_{c ∈ at(x)} lr_c (cos_cj(x) − μ_cj)
    + Σ_c lr_c μ_cj, μ_cj its pool's mean cosine at c over the rows measured there (exact
    per-sample gradients, float64); ``cos_step`` columns hold the measured cosines, NaN
    elsewhere."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make, checkpoints=checkpoints, batch_size=7)
    params = {"dim": 10_000, "subtasks": subtasks, "checkpoints_per_sample": each}
    method = get_method("gradient", params)
    method.prepare(ctx)
    assert method.rows_per_batch(7) == 7 * checkpoints // each
    got = {p.name: scored(method, p, 7) for p in pools}
    method.absorb(method.tally())
    tx, ty = target.train
    lrs = torch.tensor([c.lr for c in ctx.checkpoints], dtype=torch.float64)
    for k, pool in enumerate(pools):
        x, y = pool.data  # type: ignore[misc]
        rows = torch.arange(len(y))
        at = spread(rows, checkpoints, each, ctx.seed, k)
        measured = torch.zeros(len(y), checkpoints, dtype=torch.bool)
        measured[rows[:, None], at] = True
        columns = []  # per checkpoint: [N, J] cosines with each subtask's target gradient
        for checkpoint in ctx.checkpoints:
            model = make()
            model.module.load_state_dict(checkpoint.state)
            g = per_sample_grads(model, x, y, TRUNK_AND_HEAD)
            gt = per_sample_grads(model, tx, ty, TRUNK_AND_HEAD)
            means = (
                [gt.mean(dim=0)]
                if subtasks == "none"
                else [gt[ty == j].mean(0) for j in range(CLASSES)]
            )
            columns.append(torch.stack([cosine(g, m) for m in means], dim=1))
        cos = torch.stack(columns, dim=1)  # [N, C, J]
        mask = measured[:, :, None].to(torch.float64)
        mu = (cos * mask).sum(dim=0) / mask.sum(dim=0)  # [C, J]
        weighted = ((cos - mu) * mask * lrs[None, :, None]).sum(dim=1)
        best, chosen = ((checkpoints / each) * weighted + (lrs[:, None] * mu).sum(0)).max(dim=1)
        finished = method.finish({"source": torch.full((len(y),), k), **got[pool.name]})
        torch.testing.assert_close(finished["score"], best, rtol=1e-9, atol=1e-9)
        assert "_at" not in finished
        assert "_cosines" not in finished
        if subtasks == "auto":
            assert torch.equal(finished["subtask"], chosen)
        for c, checkpoint in enumerate(ctx.checkpoints):
            column = finished[f"cos_step{checkpoint.step}"]
            assert torch.isnan(column[~measured[:, c]]).all()
            expected = cos[measured[:, c], c].gather(1, chosen[measured[:, c], None])[:, 0]
            torch.testing.assert_close(column[measured[:, c]], expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    checkpoints=st.integers(1, 6),
    each=st.integers(1, 6),
    seed=st.integers(0, 2**40),
    pool=st.integers(0, 200),
    start=st.integers(0, 10_000),
    rows=st.integers(0, 40),
    cut=st.integers(0, 40),
)
def test_spread_gives_every_checkpoint_its_share_of_each_block(
    checkpoints: int, each: int, seed: int, pool: int, start: int, rows: int, cut: int
) -> None:
    """Each row gets ``each`` distinct checkpoints; within every full block of C consecutive
    rows each checkpoint is chosen ``each`` times; a row's checkpoints do not depend on the
    other rows scored with it (batches, processes)."""
    each = min(each, checkpoints)
    index = torch.arange(start, start + rows)
    at = spread(index, checkpoints, each, seed, pool)
    assert at.shape == (rows, each)
    assert at.dtype == torch.int64
    if rows:
        assert int(at.min()) >= 0
        assert int(at.max()) < checkpoints
    for row in at.tolist():
        assert len(set(row)) == each
    cut = min(cut, rows)
    apart = torch.cat(
        [
            spread(index[:cut], checkpoints, each, seed, pool),
            spread(index[cut:], checkpoints, each, seed, pool),
        ]
    )
    assert torch.equal(apart, at)
    for block in sorted({int(r) // checkpoints for r in index}):
        inside = (index // checkpoints == block).nonzero()[:, 0]
        if len(inside) == checkpoints:
            counts = torch.bincount(at[inside].reshape(-1), minlength=checkpoints)
            assert counts.tolist() == [each] * checkpoints


def test_gradient_scores_do_not_depend_on_the_batches() -> None:
    """One checkpoint per sample: which checkpoint measures a row depends on the row alone, so
    the scores and the source scores are the same whatever the scoring batch size."""
    target, pools = problem(rows=30)
    tables = []
    for batch in (5, 16, 64):
        s = SelectSettings(method="gradient", warmup_steps=20, checkpoints=3, batch_size=batch)
        table = select(target, pools, learner_factory(), s).table
        tables.append(table.sort_values(["source", "index"]).reset_index(drop=True))
    for table in tables[1:]:
        for column in ("score", "source_score"):
            np.testing.assert_allclose(table[column], tables[0][column], rtol=1e-5, atol=1e-9)
        steps = [c for c in table.columns if c.startswith("cos_step")]
        assert len(steps) == 3
        assert table[steps].notna().sum(axis=1).eq(1).all()  # each row measured once


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("gradient", {}, 1),
        ("gradient", {"checkpoints_per_sample": 2}, 2),
        ("gradient", {"checkpoints_per_sample": 0}, 3),
        ("tawt", {}, 3),
        ("loss", {}, 1),
    ],
)
def test_timing_reports_the_passes_per_sample(
    method: str, params: dict[str, Any], expected: int
) -> None:
    """``timing["passes_per_sample"]``: how many checkpoints measured each sample (one forward
    and one backward each) for the gradient methods, 1 for the others."""
    target, pools = problem(rows=12)
    s = SelectSettings(method=method, params=params, warmup_steps=6, checkpoints=3)
    assert select(target, pools, learner_factory(), s).timing["passes_per_sample"] == expected


def fails_if_built() -> ClassifierLearner:
    raise AssertionError("the model was built: the config was not checked first")


def test_checkpoints_per_sample_is_checked() -> None:
    target, pools = problem()
    ctx = context_for(target, pools, learner_factory(), checkpoints=2)
    with pytest.raises(ConfigError, match=r"checkpoints_per_sample 3 exceeds the 2 warm-up"):
        get_method("gradient", {"checkpoints_per_sample": 3}).prepare(ctx)
    with pytest.raises(ConfigError, match=r"checkpoints_per_sample must be >= 0"):
        get_method("gradient", {"checkpoints_per_sample": -1})
    with pytest.raises(ConfigError, match="'checkpoints_per_sample' expects an integer"):
        get_method("gradient", {"checkpoints_per_sample": "all"})
    settings = SelectSettings(
        method="gradient", checkpoints=2, params={"checkpoints_per_sample": 4}
    )
    with pytest.raises(ConfigError, match="checkpoints_per_sample 4 exceeds the 2 warm-up"):
        select(target, pools, fails_if_built, settings)  # before the warm-up: no model built
    every = get_method("gradient", {"checkpoints_per_sample": 2})  # m = C: the sum itself
    every.prepare(ctx)
    assert every.rows_per_batch(16) == 16


def test_gradient_ranks_pools_by_their_mean_then_samples_within() -> None:
    """The ranking orders by the pool's source score, then by the sample's own: every helpful row
    comes before every harmful one, each pool best first; with one pool (or ``by_source:
    false``) it is the samples' order alone."""
    target, pools = problem(rows=40)
    s = SelectSettings(method="gradient", budget=0.25, warmup_steps=30, checkpoints=2, lr=0.02)
    table = select(target, pools, learner_factory(), s).table
    assert list(table["source"]) == ["helpful"] * 40 + ["harmful"] * 40
    for _, rows in table.groupby("source", sort=False):
        assert list(rows["score"]) == sorted(rows["score"], reverse=True)
        assert rows["source_score"].nunique() == 1
    summary = select(target, pools, learner_factory(), s).counts()
    assert list(summary) == ["helpful", "harmful"]  # best pool first, as the ranking
    assert summary["helpful"]["source_score"] > summary["harmful"]["source_score"]
    assert summary["helpful"]["source_score"] == float(table["source_score"].iloc[0])
    alone = select(target, pools[1:], learner_factory(), s).table
    samples = dataclasses.replace(s, params={"by_source": False})
    plain = select(target, pools[1:], learner_factory(), samples).table
    assert list(alone["index"]) == list(plain["index"])
    assert "source_score" not in plain
    mixed = select(target, pools, learner_factory(), samples).table
    assert list(mixed["score"]) == sorted(mixed["score"], reverse=True)


def test_tawt_uses_encoder_cosines_and_normalises_weights_over_the_pool() -> None:
    """TAWT: score = η Σ_c cos on the trunk only; ``weight`` = softmax of the scores over all
    pool samples (mirror descent from uniform)."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make)
    method = get_method("tawt", {"lr": 0.5, "dim": 10_000})
    method.prepare(ctx)
    got = scored(method, pools[0])
    x, y = pools[0].data  # type: ignore[misc]
    trunk = TRUNK_AND_HEAD[:2]
    expected = torch.zeros(len(y), dtype=torch.float64)
    for checkpoint in ctx.checkpoints:
        model = make()
        model.module.load_state_dict(checkpoint.state)
        g = per_sample_grads(model, x, y, trunk)
        tx, ty = target.train
        gt = per_sample_grads(model, tx, ty, trunk).mean(dim=0)
        expected += 0.5 * cosine(g, gt)
    torch.testing.assert_close(got["score"], expected, rtol=1e-9, atol=1e-9)
    finished = method.finish({"score": got["score"]})
    weights = torch.exp(expected) / torch.exp(expected).sum()
    torch.testing.assert_close(finished["weight"], weights, rtol=1e-9, atol=1e-12)
    assert float(finished["weight"].sum()) == pytest.approx(1.0)


def test_color_filter_is_prior_loss_minus_conditional_loss() -> None:
    """CoLoR-Filter: the prior trains from a fresh model on the pools only; the conditional
    model is the prior fine-tuned on the target; score = ℓ_prior − ℓ_conditional."""
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make, steps=20)
    method = get_method("color-filter", {"prior_steps": 15, "finetune_steps": 10})
    method.prepare(ctx)
    got = scored(method, pools[0])
    x, y = pools[0].data  # type: ignore[misc]
    # Rebuild both models by hand: same fresh start, same warm-up routine.
    fresh = ctx.make_learner()
    groups = ctx.warm_groups
    dev = torch.device("cpu")
    warm_up(fresh, groups, steps=15, checkpoints=1, lr=0.05, batch_size=32, seed=0, device=dev)
    conditional = fresh.clone()
    warm_up(
        conditional,
        [ctx.target],
        steps=10,
        checkpoints=1,
        lr=0.05,
        batch_size=32,
        seed=0,
        device=dev,
    )
    with torch.no_grad():
        lp = fresh.losses(x, y, "t")
        lc = conditional.losses(x, y, "t")
    torch.testing.assert_close(got["loss_prior"], lp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["loss_conditional"], lc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["score"], lp - lc, rtol=1e-9, atol=1e-9)


def test_embedding_and_loss_baselines() -> None:
    target, pools = problem(dtype=torch.float64)
    make = learner_factory(torch.float64)
    ctx = context_for(target, pools, make)
    x, y = pools[0].data  # type: ignore[misc]
    with torch.no_grad():
        rep = ctx.learner.representation(x)
        mean = ctx.learner.representation(target.train[0]).mean(dim=0)
        loss = ctx.learner.losses(x, y, "t")
    embedding = get_method("embedding")
    embedding.prepare(ctx)
    torch.testing.assert_close(scored(embedding, pools[0])["score"], cosine(rep, mean))
    lowest, highest = get_method("loss"), get_method("loss", {"order": "highest"})
    lowest.prepare(ctx)
    highest.prepare(ctx)
    torch.testing.assert_close(scored(lowest, pools[0])["score"], -loss)
    torch.testing.assert_close(scored(highest, pools[0])["score"], loss)


def test_random_is_seeded_uniform_and_needs_no_warmup() -> None:
    target, pools = problem()
    settings_ = SelectSettings(method="random", budget=10, seed=3)
    a = select(target, pools, learner_factory(), settings_)
    b = select(target, pools, learner_factory(), settings_)
    c = select(target, pools, learner_factory(), SelectSettings(method="random", seed=4))
    assert a.table["score"].tolist() == b.table["score"].tolist()
    assert a.table["score"].tolist() != c.table["score"].tolist()
    assert a.table["score"].between(0.0, 1.0).all()
    assert a.timing["warmup_seconds"] < 5  # no warm-up run: only the model is built
    assert not get_method("random").needs_warmup


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("nope", {}, "unknown selection method 'nope'"),
        ("loss", {"order": "middle"}, "order must be 'lowest' or 'highest'"),
        ("gradient", {"dims": 8}, "dims"),
        ("tawt", {"lr": -1.0}, "lr must be a positive number"),
    ],
)
def test_bad_method_names_and_params(name: str, params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        get_method(name, params)


# ---- what selection is for -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "factor"),
    [
        ("gradient", 3),
        ("gradient:contrast", 3),
        ("gradient:samples", 3),
        ("tawt", 3),
        ("color-filter", 3),
        ("loss", 1.5),
    ],
)
def test_helpful_samples_rank_above_harmful_ones(method: str, factor: float) -> None:
    """With a pool of half correct and half deranged labels, the top quarter is mostly correct:
    harmful samples are under-represented by ``factor`` (their share of the pool: 1/2); the
    ``loss`` baseline, which only sees how well the warm-up model fits, by less."""
    target, pools = problem(rows=80)
    name, _, variant = method.partition(":")
    selection = select(
        target,
        pools,
        learner_factory(),
        SelectSettings(
            method=name,
            params={"contrast": {"contrast": True}, "samples": {"by_source": False}}.get(
                variant, {}
            ),
            budget=0.25,
            warmup_steps=60,
            checkpoints=3,
            lr=0.02,
        ),
    )
    top = selection.table[selection.table["selected"]]
    assert len(top) == 40
    harmful_share = float((top["source"] == "harmful").mean())
    assert harmful_share <= 0.5 / factor, f"{method}: {harmful_share:.2f} of the top 25 % harmful"


# ---- the ranking ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    batch=st.integers(1, 17),
    budget=st.one_of(st.integers(1, 200), st.floats(0.01, 1.0)),
)
def test_ranking_covers_every_sample_once(sizes: list[int], batch: int, budget: Any) -> None:
    """Every pool row appears once; ranks run 1..N by descending score; the budget's best are
    selected (a count is capped at the pool; a fraction rounds, at least one)."""
    target, _ = problem()
    pools = [
        Pool(f"p{k}", data=(torch.randn(n, FEATURES), torch.randint(0, CLASSES, (n,))))
        for k, n in enumerate(sizes)
    ]
    s = SelectSettings(method="random", budget=budget, batch_size=batch)
    table = select(target, pools, learner_factory(), s).table
    total = sum(sizes)
    assert len(table) == total
    assert table["rank"].tolist() == list(range(1, total + 1))
    assert table["score"].is_monotonic_decreasing
    for k, n in enumerate(sizes):
        assert sorted(table[table["source"] == f"p{k}"]["index"]) == list(range(n))
    kept = (
        min(total, budget) if isinstance(budget, int) else max(1, min(total, round(budget * total)))
    )
    assert int(table["selected"].sum()) == kept
    assert table["selected"].tolist() == [r <= kept for r in table["rank"]]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"budget": 0}, "a count must be >= 1"),
        ({"budget": 1.5}, "a fraction must be in"),
        ({"budget": True}, "expected a count or a fraction"),
        ({"warmup_steps": 0}, "select.warmup_steps"),
        ({"lr": 0.0}, "select.lr"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        SelectSettings(**kwargs)


def test_bad_pools() -> None:
    target, pools = problem()
    with pytest.raises(DataError, match="no auxiliary pool"):
        select(target, [], learner_factory())
    with pytest.raises(DataError, match="must be unique"):
        select(target, [pools[0], pools[0]], learner_factory())
    with pytest.raises(DataError, match="has no samples"):
        Pool("empty", data=(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(DataError, match="x has 3 rows but y has 2"):
        Pool("odd", data=(torch.zeros(3, 3), torch.zeros(2, dtype=torch.int64)))
    bad = Pool("bad", data=(torch.randn(4, FEATURES), torch.tensor([0, 1, 2, 7])))
    with pytest.raises(DataError, match=r"pool 'bad': label 7 outside the target head's \[0, 3\)"):
        select(target, [bad], learner_factory(), SelectSettings(method="random"))


def test_non_finite_scores_name_the_pool_row() -> None:
    target, pools = problem()
    x, y = pools[0].data  # type: ignore[misc]
    x = x.clone()
    x[7, 0] = float("inf")
    bad = Pool("bad", data=(x, y))
    settings_ = SelectSettings(method="loss", warmup_steps=5, checkpoints=1, warmup_samples=3)
    message = "pool 'bad': method 'loss' gave a non-finite score to row 7"
    with pytest.raises(DataError, match=message):
        select(target, [bad], learner_factory(), settings_)


# ---- streamed file pools ---------------------------------------------------------------------


def _frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame["y"] = y
    return frame


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".npz"])
def test_file_pools_stream_the_same_rows(tmp_path: Path, suffix: str) -> None:
    """A file pool yields batches of at most ``size`` rows with their global row index, the
    same samples as the in-memory pool; the ranking from the file equals the in-memory one."""
    target, pools = problem(rows=2500)
    x, y = (t.numpy() for t in pools[0].data)  # type: ignore[union-attr]
    path = tmp_path / f"pool{suffix}"
    if suffix == ".parquet":
        _frame(x, y).to_parquet(path, index=False, row_group_size=700)
    elif suffix == ".csv":
        _frame(x, y).to_csv(path, index=False)
    else:
        save_array_file(path, x, y)
    pool = Pool("helpful", path=path)
    assert pool.size() == 2500
    batches = list(pool.batches(300))
    assert all(len(b.y) <= 300 for b in batches)
    assert [b.start for b in batches] == list(np.cumsum([0] + [len(b.y) for b in batches[:-1]]))
    torch.testing.assert_close(
        torch.cat([b.x for b in batches]), torch.from_numpy(x), atol=1e-6, rtol=0
    )
    assert torch.equal(torch.cat([b.y for b in batches]), torch.from_numpy(y))
    rows = torch.tensor([0, 5, 1999, 2499])
    got_x, _ = pool.rows(rows)
    torch.testing.assert_close(got_x, torch.from_numpy(x)[rows], atol=1e-6, rtol=0)
    s = SelectSettings(method="loss", budget=0.1, warmup_steps=10, checkpoints=1, batch_size=300)
    from_file = select(target, [pool], learner_factory(), s).table
    in_memory = select(target, [pools[0]], learner_factory(), s).table
    assert from_file["index"].tolist() == in_memory["index"].tolist()


def test_file_pool_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file does not exist"):
        Pool("p", path=tmp_path / "missing.parquet")
    text = tmp_path / "pool.csv"
    text.write_text("a,y\nhello,1\n")
    with pytest.raises(DataError, match="column 'a' is not numeric"):
        list(Pool("p", path=text).batches(8))
    with pytest.raises(DataError, match="label column 'label' not found"):
        list(Pool("p", path=text, label_column="label").batches(8))


# ---- the written files and the command --------------------------------------------------------


def test_write_selection_files(tmp_path: Path) -> None:
    target, pools = problem()
    selection = select(
        target, pools, learner_factory(), SelectSettings(method="loss", budget=30, warmup_steps=20)
    )
    paths = write_selection(selection, pools, tmp_path)
    parquet = pd.read_parquet(paths["parquet"])
    csv = pd.read_csv(paths["csv"])
    assert list(parquet.columns[:5]) == ["rank", "source", "index", "score", "selected"]
    assert "loss" in parquet.columns
    assert parquet["index"].tolist() == csv["index"].tolist()
    summary = json.loads(paths["summary"].read_text())
    assert summary["budget"] == 30
    assert sum(c["selected"] for c in summary["sources"].values()) == 30
    for pool in pools:
        rows = selection.selected_rows(pool.name)
        if len(rows) == 0:
            assert not (tmp_path / "selected" / f"{pool.name}.npz").exists()
            continue
        loaded = load_array_file(tmp_path / "selected" / f"{pool.name}.npz")
        assert pool.data is not None
        np.testing.assert_array_equal(loaded.x, pool.data[0][rows].numpy())
        np.testing.assert_array_equal(loaded.y, pool.data[1][rows].numpy())


def _select_config(folder: Path, **select_: Any) -> Path:
    changes = {"select": {"warmup_steps": 30, "checkpoints": 2, "budget": 0.25, **select_}}
    return write_tiny_problem(folder, changes)


def test_select_command_writes_a_run_config_that_trains(tmp_path: Path) -> None:
    """``auxilia select`` ranks the dataset sources; ``auxilia run`` trains on its run.yaml:
    the selected samples as sources, task sources kept, the select section dropped."""
    config = _select_config(tmp_path)
    out = tmp_path / "sel"
    done = run_auxilia_process("select", config, "--out", out, "--method", "gradient")
    assert done.code == 0, done.stderr
    assert "gradient: selected 20 samples" in done.stdout
    assert "[source score " in done.stdout  # each pool's, as selection.json holds it
    assert "samples/s" in done.stdout
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert "select" not in run
    names = [s["name"] for s in run["sources"]]
    assert "parity" in names  # a task source is not a pool: kept as it was
    summary = json.loads((out / "selection.json").read_text())
    for source in run["sources"]:
        if source["granularity"] == "dataset":
            data = out / source["data"]
            assert data.parent == out / "selected"
            rows = len(load_array_file(data).y)  # type: ignore[arg-type]
            assert rows == summary["sources"][source["name"]]["selected"]
            assert isinstance(summary["sources"][source["name"]]["source_score"], float)
    trained = run_auxilia_process("run", out / "run.yaml", "--out", tmp_path / "run", "--quiet")
    assert trained.code == 0, trained.stderr
    assert (tmp_path / "run" / "results.json").exists()


def test_select_command_errors(tmp_path: Path) -> None:
    config = _select_config(tmp_path, method="magic")
    assert_one_line_error(run_auxilia_process("select", config), "select.method", "magic")
    config = _select_config(tmp_path / "b")
    assert_one_line_error(
        run_auxilia_process("select", config, "--budget", "0"), "select.budget", "got 0"
    )
    no_pools = write_tiny_problem(
        tmp_path / "c",
        {"sources": [{"name": "parity", "granularity": "task", "labels": "data/parity.npz"}]},
    )
    assert_one_line_error(run_auxilia_process("select", no_pools), "no dataset source")


def test_torchrun_merged_ranking_equals_one_process(tmp_path: Path) -> None:
    """Two processes score alternate batches and rank 0 merges: the same ranking, the same
    scores (to float rounding) and the same selected files as one process."""
    config = _select_config(tmp_path, batch_size=8, method="gradient")
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_auxilia_process("select", config, "--out", one)
    assert done.code == 0, done.stderr
    many = torchrun("-m", "auxilia", "select", config, "--out", two)
    assert many.returncode == 0, many.stderr[-3000:]
    a, b = pd.read_parquet(one / "ranking.parquet"), pd.read_parquet(two / "ranking.parquet")
    assert a[["source", "index", "selected"]].equals(b[["source", "index", "selected"]])
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-6, atol=1e-9)
    assert a["source"].nunique() > 1  # each pool's source score, added up over the processes
    np.testing.assert_allclose(a["source_score"], b["source_score"], rtol=1e-6, atol=1e-9)
    assert json.loads((two / "selection.json").read_text())["timing"]["world"] == 2.0
    assert sorted(p.name for p in (two / "selected").iterdir()) == sorted(
        p.name for p in (one / "selected").iterdir()
    )


def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step() -> None:
    assert checkpoint_steps(200, 4) == [50, 100, 150, 200]
    assert checkpoint_steps(3, 5) == [1, 2, 3]
    assert checkpoint_steps(10, 1) == [10]


def test_select_speed_bench_writes_one_record_per_case(tmp_path: Path) -> None:
    """``python -m auxilia.bench.select_speed`` on a tiny grid: one record per trunk, method,
    checkpoint count and batch size, with both throughputs and their ratio."""
    from auxilia.bench.select_speed import main

    out = tmp_path / "speed.json"
    main(
        [
            "--trunks", "mlp", "--methods", "gradient,gradient:checkpoints_per_sample=0,loss",
            "--checkpoints", "1,2",
            "--batch-sizes", "64", "--pool", "192", "--json", str(out),
        ]
    )  # fmt: skip
    records = json.loads(out.read_text())["records"]
    cases = [(r["method"], r["checkpoints"]) for r in records]
    every = "gradient:checkpoints_per_sample=0"
    assert cases == [("gradient", 1), ("gradient", 2), (every, 1), (every, 2), ("loss", None)]
    assert [r["passes"] for r in records] == [1, 1, 1, 2, 1]
    for r in records:
        assert r["scoring_samples_per_second"] > 0
        assert r["plain_samples_per_second"] > 0
        assert r["ratio"] == pytest.approx(
            r["scoring_samples_per_second"] / r["plain_samples_per_second"]
        )
    assert records[1]["ratio_per_pass"] == pytest.approx(records[1]["ratio"])
    assert records[3]["ratio_per_pass"] == pytest.approx(2 * records[3]["ratio"])
