"""The ``jvp`` and ``batched`` engine modes against ``exact``: statistics and final ``.grad``.

Every fast mode must match ``exact`` in float64 to 1e-5 relative error, on MLP, CNN and
transformer-encoder trunks, in both layouts, with random K, absent sources, frozen
parameters, parameters some sources never reach, a head per source and gradient accumulation
over micro-batches. Under ``torch.autocast`` (bfloat16, CPU) the tolerance is looser (below).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from auxilia import strategies
from auxilia.engine import MODES, Engine
from auxilia.engine.batched import BatchedRunner
from auxilia.engine.jvp import JvpMeasurement, JvpRunner
from auxilia.errors import EngineError
from auxilia.statistics import Need, Statistics
from auxilia.strategies import Strategy, stateless
from auxilia.strategies.base import no_state

F64 = torch.float64
RTOL = 1e-5  # float64, relative to the largest entry of the reference
# bfloat16 autocast (CPU): ``batched`` runs the same bf16 operators, batched by vmap, and
# stays within 1e-5 (measured ~1e-7); ``jvp`` differentiates the recorded bf16 backward once
# more, so its row carries bf16 rounding: within 2e-2 (measured up to 5e-3 on the row, α and
# the gradients that depend on α).
AUTOCAST_RTOL = {"jvp": 2e-2, "batched": 1e-5}
FAST_MODES = ("jvp", "batched")


def assert_rel(got: torch.Tensor | None, want: torch.Tensor | None, rtol: float = RTOL) -> None:
    """|got − want| ≤ rtol · max|want| entrywise (both None, or both tensors)."""
    assert (got is None) == (want is None), (got, want)
    if got is None or want is None:
        return
    assert got.shape == want.shape
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    error = float((got.detach() - want.detach()).abs().max()) if want.numel() else 0.0
    assert error <= rtol * max(scale, 1e-12), f"error {error:.3g} against scale {scale:.3g}"


# --------------------------------------------------------------------------- models


class Model(nn.Module):
    """A trunk shared by every source, a head per source, and an optional parameter that only
    the auxiliary sources use (the target never reaches it)."""

    def __init__(self, kind: str, num_sources: int, seed: int, aux_only: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        width = 4
        if kind == "mlp":
            self.trunk: nn.Module = nn.Sequential(
                nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, width), nn.Tanh()
            )
        elif kind == "cnn":
            self.trunk = nn.Sequential(
                nn.Conv2d(1, 2, 3),
                nn.Tanh(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(2 * 2 * 2, width),
                nn.Tanh(),
            )
        else:
            self.embed = nn.Embedding(7, 8)
            self.block = nn.TransformerEncoderLayer(
                d_model=8, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=True
            )
            self.trunk = nn.Sequential(self.embed, self.block)
            self.pool = nn.Linear(8, width)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_sources))
        self.aux_scale = nn.Parameter(torch.rand(width) + 0.5) if aux_only else None
        self.to(F64)

    def shared(self) -> list[torch.Tensor]:
        """Everything but the heads, in the order of ``parameters()``."""
        heads = {id(p) for p in self.heads.parameters()}
        return [p for p in self.parameters() if id(p) not in heads]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "transformer-math":  # attention that can be differentiated twice
            with sdpa_kernel(SDPBackend.MATH):
                h = self.trunk(x)
        else:
            h = self.trunk(x)
        if self.kind.startswith("transformer"):
            h = torch.tanh(self.pool(h.mean(dim=1)))
        return h

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K+1]: every head on every sample; auxiliary heads see the scaled features."""
        h = self.features(x)
        target = self.heads[0](h)
        aux_h = h if self.aux_scale is None else h * self.aux_scale
        others = [head(aux_h) for head in self.heads[1:]]
        return torch.cat([target, *others], dim=1)


def inputs(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(n, 3, generator=gen, dtype=F64)
    if kind == "cnn":
        return torch.randn(n, 1, 6, 6, generator=gen, dtype=F64)
    return torch.randint(0, 7, (n, 5), generator=gen)


def losses_of(
    model: Model, layout: str, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    out = model.outputs(x)
    if layout == "shared-input":
        return (out - y) ** 2  # [B, K+1]
    return (out.gather(1, ids.unsqueeze(1)).squeeze(1) - y[:, 0]) ** 2  # [N], own head


# --------------------------------------------------------------------------- exactness


def run_engine(
    model: Model,
    mode: str,
    layout: str,
    strategy: Strategy,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    needs: set[Need],
    frozen: bool,
) -> tuple[list[torch.Tensor], list[Statistics], list[torch.Tensor | None]]:
    """Run one engine step per micro-batch (gradients accumulate); α, statistics, grads."""
    model = copy.deepcopy(model)
    if frozen:
        first = next(iter(model.trunk.parameters()))
        first.requires_grad_(False)
    engine = Engine(
        model,
        strategy=strategy,
        num_sources=len(model.heads),
        shared=model.shared(),
        mode=mode,
        layout=layout,  # type: ignore[arg-type]
        extra_needs=needs,
    )
    alphas, stats = [], []
    for x, y, ids in batches:
        losses = losses_of(model, layout, x, y, ids)
        alphas.append(engine.backward(losses, None if layout == "shared-input" else ids))
        assert engine.last_statistics is not None
        stats.append(engine.last_statistics)
    return alphas, stats, [p.grad for p in model.parameters()]


def compare(
    model: Model,
    layout: str,
    strategy: Strategy,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    needs: set[Need],
    mode: str,
    frozen: bool = False,
    rtol: float = RTOL,
) -> None:
    ref = run_engine(model, "exact", layout, strategy, batches, needs, frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the transformer's jvp fallback
        got = run_engine(model, mode, layout, strategy, batches, needs, frozen)
    for a, b in zip(got[0], ref[0], strict=True):
        assert_rel(a, b, rtol)
    for s, r in zip(got[1], ref[1], strict=True):
        assert torch.equal(s.present, r.present)
        names = ("losses", "target_row", "gram", "norms", "validation_row", "ema_row", "ema_sqnorm")
        for name in names:
            assert_rel(getattr(s, name), getattr(r, name), rtol)
    for g, r in zip(got[2], ref[2], strict=True):
        if r is None:
            assert g is None or bool((g == 0).all())
        elif g is None:
            assert bool((r == 0).all())
        else:
            assert_rel(g, r, rtol)


def make_batches(
    kind: str, layout: str, num: int, ids_list: list[list[int]], seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    batches = []
    for j, ids in enumerate(ids_list):
        n = len(ids)
        gen = torch.Generator().manual_seed(seed + 100 * j)
        x = inputs(kind, n, seed + j)
        y = torch.randn(n, num, generator=gen, dtype=F64)
        batches.append((x, y, torch.tensor(ids, dtype=torch.int64)))
    return batches


@st.composite
def cases(draw: st.DrawFn, kinds: tuple[str, ...]) -> dict[str, Any]:
    kind = draw(st.sampled_from(kinds))
    layout = draw(st.sampled_from(["shared-input", "partitioned"]))
    num = draw(st.integers(2, 5))
    micro = draw(st.integers(1, 2))
    ids_list = [
        draw(st.lists(st.integers(0, num - 1), min_size=1, max_size=7)) for _ in range(micro)
    ]
    return {
        "kind": kind,
        "layout": layout,
        "num": num,
        "ids_list": ids_list,
        "weights": draw(st.lists(st.floats(0.0, 2.0), min_size=num, max_size=num)),
        "seed": draw(st.integers(0, 2**16)),
        "aux_only": draw(st.booleans()),
        "frozen": draw(st.booleans()),
    }


def check_case(case: dict[str, Any], mode: str, needs: set[Need]) -> None:
    model = Model(case["kind"], case["num"], case["seed"], case["aux_only"])
    batches = make_batches(
        case["kind"], case["layout"], case["num"], case["ids_list"], case["seed"]
    )
    strategy = strategies.fixed(case["weights"])
    compare(model, case["layout"], strategy, batches, needs, mode, frozen=case["frozen"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(("mlp", "cnn", "transformer", "transformer-math")))
def test_jvp_matches_exact(case: dict[str, Any]) -> None:
    check_case(case, "jvp", {Need.TARGET_ROW, Need.LOSSES})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(("mlp", "cnn", "transformer")), full=st.booleans())
def test_batched_matches_exact(case: dict[str, Any], full: bool) -> None:
    needs = {Need.GRAM, Need.LOSSES} if full else {Need.TARGET_ROW, Need.NORMS}
    check_case(case, "batched", needs)


@pytest.mark.parametrize("mode", FAST_MODES)
@pytest.mark.parametrize("layout", ["shared-input", "partitioned"])
def test_strategies_end_to_end_match_exact(mode: str, layout: str) -> None:
    """Real strategies over several steps (stateful ones included): same α, same gradients."""
    model = Model("mlp", 4, seed=3, aux_only=True)
    batches = make_batches("mlp", layout, 4, [[0, 1, 2, 3, 0, 1], [0, 0, 2, 3, 3]] * 3, seed=3)
    chosen = [strategies.olaux(horizon=2), strategies.gcs(variant="unweighted"), strategies.equal()]
    if mode == "batched":
        chosen += [strategies.gcs(), strategies.arml(update_every=1)]
    for strategy in chosen:
        compare(model, layout, strategy, batches, set(), mode)


def test_sources_with_no_samples_and_no_target() -> None:
    """Partitioned steps where the target or most sources are absent."""
    model = Model("mlp", 5, seed=9, aux_only=False)
    ids_list = [[1, 1, 2], [0, 4], [3]]
    batches = make_batches("mlp", "partitioned", 5, ids_list, seed=9)
    for mode, needs in (("jvp", {Need.TARGET_ROW}), ("batched", {Need.GRAM})):
        compare(model, "partitioned", strategies.fixed([1, 0.5, 2, 0, 1]), batches, needs, mode)


def ema_strategy() -> Strategy:
    """A strategy that uses the target-gradient EMA row (one more coefficient, for ĝ)."""

    def update(stats: Statistics, state: dict[str, torch.Tensor]) -> Any:
        row = stats.require(Need.TARGET_EMA).to(F64)
        alpha = torch.cat([torch.ones(stats.num_sources, dtype=F64), -0.1 * row[:1]])
        return alpha, state

    return Strategy("ema-test", frozenset({Need.TARGET_EMA}), no_state, update, {}, 0.5)


@pytest.mark.parametrize("mode", FAST_MODES)
def test_target_ema_matches_exact(mode: str) -> None:
    model = Model("mlp", 3, seed=4, aux_only=True)
    batches = make_batches("mlp", "shared-input", 3, [[0, 1, 2, 0]] * 3, seed=4)
    compare(model, "shared-input", ema_strategy(), batches, set(), mode)


def ema_norm_strategy() -> Strategy:
    """A strategy that reads only ‖ĝ‖² (``Need.TARGET_EMA_NORM``): K+1 coefficients."""

    def update(stats: Statistics, state: dict[str, torch.Tensor]) -> Any:
        assert stats.ema_row is None  # no inner products with ĝ were asked for
        scale = 1.0 / (1.0 + float(stats.require(Need.TARGET_EMA_NORM)))
        return torch.full((stats.num_sources,), scale, dtype=F64), state

    return Strategy("ema-norm-test", frozenset({Need.TARGET_EMA_NORM}), no_state, update, {}, 0.5)


@pytest.mark.parametrize(
    ("layout", "mode"),
    [("shared-input", "jvp"), ("shared-input", "batched"), ("partitioned", "ghost")],
)
def test_target_ema_norm_matches_exact(layout: str, mode: str) -> None:
    model = Model("mlp", 3, seed=6, aux_only=layout == "shared-input")
    batches = make_batches("mlp", layout, 3, [[0, 1, 2, 0], [0, 2, 2, 1], [1, 0, 0, 2]], seed=6)
    compare(model, layout, ema_norm_strategy(), batches, set(), mode)


def test_auto_projection_runs_on_jvp_and_matches_exact() -> None:
    """The shared-input layout's cheap default: ``auto(variant="projection")`` needs no norms,
    so ``mode="auto"`` picks ``jvp`` (the cosine gate needs ``batched``), with exact's α."""
    model = Model("mlp", 3, seed=8, aux_only=True)
    projection = strategies.get("auto", {"variant": "projection"})
    chosen = {
        name: Engine(
            copy.deepcopy(model),
            strategy=s,
            num_sources=3,
            shared=model.shared(),
            layout="shared-input",
        ).mode.name
        for name, s in (("projection", projection), ("cosine", strategies.get("auto")))
    }
    assert chosen == {"projection": "jvp", "cosine": "batched"}
    batches = make_batches("mlp", "shared-input", 3, [[0, 1, 2, 0]] * 4, seed=8)
    compare(model, "shared-input", projection, batches, set(), "jvp")


def test_target_ema_norm_by_hand() -> None:
    """‖ĝ‖² after each step, with ĝ ← ĝ + ρ(g_0 − ĝ) from the exact target gradients."""
    model = Model("mlp", 3, seed=7, aux_only=False)
    batches = make_batches("mlp", "partitioned", 3, [[0, 1, 0, 2], [0, 0, 1, 2]], seed=7)
    engine = Engine(model, strategy=ema_norm_strategy(), num_sources=3, mode="ghost")
    params = [p for p in model.parameters() if p.requires_grad]
    ema: torch.Tensor | None = None
    for x, y, ids in batches:
        losses = losses_of(model, "partitioned", x, y, ids)
        g0 = torch.autograd.grad(
            losses[ids == 0].mean(), params, retain_graph=True, allow_unused=True
        )
        parts = [torch.zeros_like(p) if g is None else g for g, p in zip(g0, params, strict=True)]
        flat = torch.cat([g.reshape(-1) for g in parts])
        ema = flat.clone() if ema is None else ema + 0.5 * (flat - ema)
        alpha = engine.backward(losses, ids)
        assert alpha.shape == (3,)
        assert engine.last_statistics is not None
        assert_rel(engine.last_statistics.ema_sqnorm, (ema**2).sum(), 1e-10)
        for p in params:
            p.grad = None


def test_closure_of_the_ema_needs() -> None:
    assert Need.closure({Need.TARGET_EMA}) == {
        Need.TARGET_EMA,
        Need.TARGET_EMA_NORM,
        Need.TARGET_ROW,
    }
    assert Need.closure({Need.TARGET_EMA_NORM}) == {Need.TARGET_EMA_NORM, Need.TARGET_ROW}


def test_a_norm_only_strategy_returning_the_ema_coefficient_is_refused() -> None:
    def update(stats: Statistics, state: dict[str, torch.Tensor]) -> Any:
        return torch.ones(stats.num_sources + 1, dtype=F64), state

    strategy = Strategy("extra", frozenset({Need.TARGET_EMA_NORM}), no_state, update, {}, 0.5)
    model = Model("mlp", 3, seed=8, aux_only=False)
    ((x, y, ids),) = make_batches("mlp", "partitioned", 3, [[0, 1, 2]], seed=8)
    engine = Engine(model, strategy=strategy, num_sources=3, mode="ghost")
    with pytest.raises(EngineError, match=r"returned \(4,\) coefficients for 3 sources"):
        engine.backward(losses_of(model, "partitioned", x, y, ids), ids)


def test_batched_validation_row_matches_exact() -> None:
    """Held-out target losses (partitioned) through the batched mode's Gram matrix."""

    def rule(stats: Statistics) -> torch.Tensor:
        return stats.require(Need.VALIDATION).clamp_min(0) + 1

    strategy = stateless("val", frozenset({Need.VALIDATION}), rule)
    model = Model("mlp", 3, seed=5, aux_only=False)
    x, y, ids = make_batches("mlp", "partitioned", 3, [[0, 1, 2, 1, 0]], seed=5)[0]
    xv = inputs("mlp", 3, seed=50)
    results = []
    for mode in ("exact", "batched"):
        m = copy.deepcopy(model)
        engine = Engine(m, strategy=strategy, num_sources=3, shared=m.shared(), mode=mode)
        validation = (m.outputs(xv)[:, 0] - 1.0) ** 2
        alpha = engine.backward(losses_of(m, "partitioned", x, y, ids), ids, validation=validation)
        assert engine.last_statistics is not None
        results.append((alpha, engine.last_statistics, [p.grad for p in m.parameters()]))
    (a, s, g), (b, r, h) = results[1], results[0]
    assert_rel(a, b)
    assert_rel(s.validation_row, r.validation_row)
    for gi, hi in zip(g, h, strict=True):
        assert_rel(gi, hi)


@pytest.mark.parametrize("mode", FAST_MODES)
def test_autocast_bfloat16_close_to_exact(mode: str) -> None:
    """CPU bfloat16 autocast: forward in bf16, engine outside it; tolerance ``AUTOCAST_RTOL``."""
    rtol = AUTOCAST_RTOL[mode]
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    model = nn.Sequential(trunk, nn.Linear(16, 4))
    x, y = torch.randn(12, 6), torch.randn(12, 4)
    results = []
    for name in ("exact", mode):
        m = copy.deepcopy(model)
        strategy = strategies.gcs() if mode == "batched" else strategies.olaux(horizon=1)
        engine = Engine(
            m,
            strategy=strategy,
            num_sources=4,
            shared=m[0].parameters(),
            mode=name,
            layout="shared-input",
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            losses = (out - y) ** 2
        assert out.dtype == torch.bfloat16
        alpha = engine.backward(losses)
        assert engine.last_statistics is not None
        results.append((alpha, engine.last_statistics, [p.grad for p in m.parameters()]))
    (a, s, g), (b, r, h) = results[1], results[0]
    assert_rel(a, b, rtol)
    assert_rel(s.target_row, r.target_row, rtol)
    assert_rel(s.norms, r.norms, rtol)
    for gi, hi in zip(g, h, strict=True):
        assert_rel(gi, hi, rtol)


# --------------------------------------------------------------------------- fallbacks


class DataDependent(torch.autograd.Function):
    """x², whose backward reads a value (``.item()``), which vmap cannot batch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if float(grad.detach().abs().sum()) >= 0.0:  # data-dependent control flow
            return 2 * x * grad
        return grad  # pragma: no cover


class OnceDifferentiable(torch.autograd.Function):
    """x², whose backward cannot be differentiated again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class CutGraph(torch.autograd.Function):
    """x², whose backward leaves the graph (detach): a silent break of double backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return (2 * x * grad).detach()


class WithFunction(nn.Module):
    """lin2(f(lin1(x))) + lin2(lin1(x)), K+1 outputs; the second branch keeps some of the graph."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], branch: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin1 = nn.Linear(3, 4).to(F64)
        self.lin2 = nn.Linear(4, 3).to(F64)
        self.function = function
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        out = self.lin2(self.function(h))
        return out + self.lin2(h) if self.branch else out


def fallback_case(
    function: Callable[[torch.Tensor], torch.Tensor], mode: str, branch: bool = False
) -> list[str]:
    """Run ``mode`` and exact on a model with ``function``; assert equal; return warnings."""
    model = WithFunction(function, branch)
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    results = []
    caught: list[str] = []
    for name in ("exact", mode):
        m = copy.deepcopy(model)
        engine = Engine(
            m,
            strategy=strategies.olaux(horizon=1),
            num_sources=3,
            shared=m.lin1.parameters(),
            mode=name,
            layout="shared-input",
            extra_needs={Need.GRAM} if mode == "batched" else (),
        )
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            for _ in range(2):  # the second step goes straight to the fallback
                alpha = engine.backward(m(x) ** 2)
        caught += [str(r.message) for r in records]
        assert engine.last_statistics is not None
        results.append((alpha, engine.last_statistics, [p.grad for p in m.parameters()]))
    (a, s, g), (b, r, h) = results[1], results[0]
    assert_rel(a, b)
    assert_rel(s.target_row, r.target_row)
    assert_rel(s.gram, r.gram)
    for gi, hi in zip(g, h, strict=True):
        assert_rel(gi, hi)
    return caught


def test_batched_falls_back_where_vmap_cannot_run() -> None:
    caught = fallback_case(DataDependent.apply, "batched")
    assert len(caught) == 1  # said once, not every step
    assert "engine mode 'batched': torch.vmap cannot run" in caught[0]
    assert "one backward pass per source" in caught[0]


def test_jvp_works_where_vmap_cannot() -> None:
    assert fallback_case(DataDependent.apply, "jvp") == []


@pytest.mark.parametrize(
    ("function", "branch"),
    [(OnceDifferentiable.apply, False), (CutGraph.apply, False), (CutGraph.apply, True)],
    ids=["once-differentiable", "cut-whole-graph", "cut-one-branch"],
)
def test_jvp_falls_back_where_double_backward_fails(
    function: Callable[[torch.Tensor], torch.Tensor], branch: bool
) -> None:
    caught = fallback_case(function, "jvp", branch)
    said = [c for c in caught if c.startswith("engine mode 'jvp'")]
    assert len(said) == 1  # said once, not every step
    assert "the second-order pass failed" in said[0]
    assert "'batched'" in said[0]


def test_jvp_falls_back_on_flash_attention() -> None:
    """CPU flash attention has no double backward: jvp measures through batched, same numbers."""
    model = Model("transformer", 3, seed=0, aux_only=False)
    batches = make_batches("transformer", "shared-input", 3, [[0, 1, 2, 0]], seed=0)
    with pytest.warns(RuntimeWarning, match=r"second-order pass failed.*SDPBackend\.MATH"):
        run_engine(
            model, "jvp", "shared-input", strategies.olaux(), batches, {Need.TARGET_ROW}, False
        )
    compare(model, "shared-input", strategies.olaux(), batches, {Need.TARGET_ROW}, "jvp")


# --------------------------------------------------------------------------- errors, choice


@pytest.mark.parametrize(
    ("strategy", "missing"),
    [(strategies.arml(), "gram, norms"), (strategies.gcs(), "norms")],
    ids=["arml", "gcs-weighted"],
)
def test_jvp_refuses_strategies_it_cannot_serve(strategy: Strategy, missing: str) -> None:
    model = Model("mlp", 3, seed=0, aux_only=False)
    with pytest.raises(EngineError, match=f"engine mode 'jvp' cannot be used here: .*{missing}"):
        Engine(model, strategy=strategy, num_sources=3, mode="jvp", layout="shared-input")


def test_jvp_measurement_errors() -> None:
    model = Model("mlp", 3, seed=0, aux_only=False)
    engine = Engine(
        model,
        strategy=strategies.olaux(),
        num_sources=3,
        shared=model.shared(),
        mode="jvp",
        layout="shared-input",
    )
    x, y, ids = make_batches("mlp", "shared-input", 3, [[0, 1, 2]], seed=0)[0]
    batch = engine._split(losses_of(model, "shared-input", x, y, ids), None, None)
    with pytest.raises(EngineError, match="engine mode 'jvp' cannot compute gram"):
        engine.runner.measure(batch, frozenset({Need.GRAM}))
    measurement = engine.runner.measure(batch, frozenset({Need.TARGET_ROW}))
    assert isinstance(measurement, JvpMeasurement)
    with pytest.raises(EngineError, match="only the target's gradient, not source 1's"):
        measurement.source_gradient(1)
    measurement.combine(torch.ones(3, dtype=F64))
    with pytest.raises(EngineError, match=r"dots\(\) must come before combine"):
        measurement.dots(measurement.source_gradient(0))


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (strategies.olaux(), "jvp"),
        (strategies.gcs(variant="unweighted"), "jvp"),
        (strategies.equal(), "jvp"),
        (strategies.gcs(), "batched"),
        (strategies.arml(), "batched"),
    ],
)
def test_auto_prefers_jvp_then_batched_on_shared_input(strategy: Strategy, expected: str) -> None:
    assert {"jvp", "batched"} <= set(MODES)
    model = Model("mlp", 3, seed=0, aux_only=False)
    engine = Engine(model, strategy=strategy, num_sources=3, layout="shared-input")
    assert engine.mode.name == expected
    # Partitioned, given parameters rather than the module (no ghost): the same choice.
    engine = Engine(model.parameters(), strategy=strategy, num_sources=3)
    assert engine.mode.name == expected


def test_jvp_second_order_pass_runs_on_math_attention() -> None:
    """With the math attention kernel the transformer block is differentiable twice: no
    fallback, and the second-order row matches exact."""
    model = Model("transformer-math", 3, seed=2, aux_only=True)
    batches = make_batches("transformer-math", "shared-input", 3, [[0, 1, 2, 0]], seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_engine(
            model, "jvp", "shared-input", strategies.olaux(), batches, {Need.TARGET_ROW}, False
        )
    compare(model, "shared-input", strategies.olaux(), batches, {Need.TARGET_ROW}, "jvp")


def test_batched_times_vmap_against_a_loop_and_keeps_the_faster() -> None:
    """The first steps run both paths (same numbers); then one is kept."""
    model = Model("cnn", 3, seed=6, aux_only=False)
    batches = make_batches("cnn", "shared-input", 3, [[0, 1, 2, 0]] * 6, seed=6)
    compare(model, "shared-input", strategies.arml(update_every=1), batches, set(), "batched")
    engine = Engine(
        model,
        strategy=strategies.arml(),
        num_sources=3,
        shared=model.shared(),
        mode="batched",
        layout="shared-input",
    )
    runner = engine.runner
    assert isinstance(runner, BatchedRunner)
    for step, (x, y, ids) in enumerate(batches):
        assert runner.path is None or step > 2 * BatchedRunner.TRIALS
        engine.backward(losses_of(model, "shared-input", x, y, ids))
    assert runner.path in ("vmap", "loop")
    assert len(runner.timings["vmap"]) == BatchedRunner.TRIALS + 1  # one warm-up
    assert len(runner.timings["loop"]) == BatchedRunner.TRIALS


def test_the_timed_path_is_kept_across_a_checkpoint() -> None:
    """A resumed engine takes the path ``batched`` chose from the checkpoint instead of timing
    both again (so the run goes on as it was, and its results name the same path), also where
    ``jvp`` starts its ``batched`` only later; an unknown path in a checkpoint is refused."""
    model = Model("mlp", 3, seed=6, aux_only=False)
    batches = make_batches("mlp", "shared-input", 3, [[0, 1, 2, 0]] * 6, seed=6)

    def engine(mode: str) -> Engine:
        return Engine(
            model,
            strategy=strategies.arml() if mode == "batched" else strategies.olaux(),
            num_sources=3,
            shared=model.shared(),
            mode=mode,
            layout="shared-input",
        )

    first = engine("batched")
    for x, y, ids in batches:
        first.backward(losses_of(model, "shared-input", x, y, ids))
    runner = first.runner
    assert isinstance(runner, BatchedRunner)
    assert runner.path in ("vmap", "loop")
    state = first.state_dict()
    assert state["batched_path"] == runner.path
    resumed = engine("batched")
    resumed.load_state_dict(state)
    x, y, ids = batches[0]
    resumed.backward(losses_of(model, "shared-input", x, y, ids))
    assert isinstance(resumed.runner, BatchedRunner)
    assert resumed.runner.path == runner.path
    assert resumed.runner.timings == {"vmap": [], "loop": []}  # nothing timed again
    assert resumed.path() == (runner.path, [])
    later = engine("jvp")  # three sources: the second-order route, no batched yet
    later.load_state_dict({**state, "strategy": later.strategy_state})
    assert isinstance(later.runner, JvpRunner)
    assert later.runner.batched is None
    assert later.runner.batched_path == runner.path
    # ... and the batched it starts where at most two sources are present takes that path.
    two = Model("mlp", 4, seed=8, aux_only=False)
    x, y, ids = make_batches("mlp", "partitioned", 4, [[0, 0, 2, 2]], seed=8)[0]
    pair = Engine(two, strategy=strategies.olaux(), num_sources=4, shared=two.shared(), mode="jvp")
    pair.load_state_dict({**pair.state_dict(), "batched_path": "loop"})
    pair.backward(losses_of(two, "partitioned", x, y, ids), ids)
    assert isinstance(pair.runner, JvpRunner)
    assert pair.runner.batched is not None
    assert pair.runner.batched.path == "loop"
    assert pair.runner.batched.timings == {"vmap": [], "loop": []}
    with pytest.raises(EngineError, match="unknown batched path 'fast'"):
        resumed.load_state_dict({**state, "batched_path": "fast"})


def test_jvp_takes_the_gradients_of_two_sources_directly() -> None:
    """With at most two present sources their gradients cost less than the second-order route:
    jvp measures them through batched, silently, with the same numbers."""
    model = Model("mlp", 4, seed=8, aux_only=False)
    batches = make_batches("mlp", "partitioned", 4, [[0, 0, 2, 2], [0, 1, 2, 3]], seed=8)
    compare(model, "partitioned", strategies.olaux(horizon=1), batches, set(), "jvp")
    m = copy.deepcopy(model)
    engine = Engine(m, strategy=strategies.olaux(), num_sources=4, shared=m.shared(), mode="jvp")
    runner = engine.runner
    assert isinstance(runner, JvpRunner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        x, y, ids = batches[1]
        engine.backward(losses_of(m, "partitioned", x, y, ids), ids)
        assert runner.batched is None  # four sources present: the second-order route
        x, y, ids = batches[0]
        engine.backward(losses_of(m, "partitioned", x, y, ids), ids)
        assert runner.batched is not None  # two present: their gradients
    assert runner.failure is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", FAST_MODES)
@pytest.mark.parametrize("layout", ["shared-input", "partitioned"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "transformer-math"])
def test_modes_match_exact_on_cuda(kind: str, layout: str, mode: str) -> None:
    """The same comparison with model, data and gradients on the GPU (statistics on the CPU)."""
    model = Model(kind, 4, seed=12, aux_only=True).cuda()
    ids_list = [[0, 1, 2, 3, 0, 2], [0, 3, 3, 1]]
    batches = [
        tuple(t.cuda() for t in batch) for batch in make_batches(kind, layout, 4, ids_list, seed=12)
    ]
    needs = {Need.TARGET_ROW, Need.LOSSES} if mode == "jvp" else {Need.GRAM, Need.LOSSES}
    compare(model, layout, strategies.fixed([1.0, 0.5, 2.0, 0.0]), batches, needs, mode)
