"""``sketch``: projected per-sample gradients, unbiased statistics, exact ``.grad``."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from auxilia import strategies
from auxilia.engine import Engine
from auxilia.engine.exact import measure_exact
from auxilia.engine.mode import ModeContext
from auxilia.engine.sketch import SketchMeasurement, SketchRunner, allocate, projection_for
from auxilia.engine.source_losses import split_by_source
from auxilia.errors import EngineError
from auxilia.statistics import Need
from per_sample_models import (
    CNN,
    F64,
    MLP,
    ConvSpec,
    Encoder,
    cnn_batch,
    encoder_batch,
    mlp_batch,
    relative_error,
)

ALL = frozenset({Need.LOSSES, Need.TARGET_ROW, Need.GRAM, Need.NORMS})
IDS = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sketch_step(
    model: nn.Module,
    losses: Callable[[nn.Module], torch.Tensor],
    ids: torch.Tensor,
    num: int,
    dim: int,
    seed: int = 0,
    alpha: torch.Tensor | None = None,
    verify: bool = False,
) -> SketchMeasurement:
    params = [p for p in model.parameters() if p.requires_grad]
    runner = SketchRunner(
        ModeContext(model, params, None, "partitioned"), dim=dim, seed=seed, verify=verify
    )
    batch = split_by_source(losses(model), ids, num)
    measurement = runner.measure(batch, ALL)
    if alpha is not None:
        measurement.combine(alpha)
    runner.close()
    return measurement


def exact_step(
    model: nn.Module,
    losses: Callable[[nn.Module], torch.Tensor],
    ids: torch.Tensor,
    num: int,
    alpha: torch.Tensor | None = None,
) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    measurement = measure_exact(split_by_source(losses(model), ids, num), params, None, ALL)
    if alpha is not None:
        measurement.combine(alpha)
    return measurement


def models() -> list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]]:
    mlp = mlp_batch(8, 3, IDS.tolist(), 0)
    spec = ConvSpec(2, 4, 4, 3, 1, "same", "reflect", 1, 2, True, "group", 5)
    cnn = cnn_batch(spec, IDS.tolist(), 1)
    wide = ConvSpec(2, 16, 4, 3, 2, 1, "zeros", 1, 2, True, "group", 5)  # channels-last patches
    wide_batch = cnn_batch(wide, IDS.tolist(), 1)
    enc = encoder_batch(9, 4, IDS.tolist(), 2)
    return [
        ("mlp", lambda: MLP([3, 5, 4], [True, False], heads=2, seed=0), lambda m: m.losses(mlp)),  # type: ignore[operator]
        ("cnn", lambda: CNN(spec, 1), lambda m: m.losses(cnn)),  # type: ignore[operator]
        ("cnn-channels-last", lambda: CNN(wide, 1), lambda m: m.losses(wide_batch)),  # type: ignore[operator]
        ("encoder", lambda: Encoder(9, 4, 2, False, 2), lambda m: m.losses(enc)),  # type: ignore[operator]
    ]


@pytest.mark.parametrize(("name", "make", "losses"), models(), ids=[m[0] for m in models()])
def test_full_dimension_equals_exact(
    name: str, make: Callable[[], nn.Module], losses: Callable[[nn.Module], torch.Tensor]
) -> None:
    """dim ≥ number of parameters: every projection is the identity, statistics are exact."""
    model = make()
    reference = copy.deepcopy(model)
    alpha = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    got = sketch_step(model, losses, IDS, 3, dim=10**7, alpha=alpha, verify=True)
    want = exact_step(reference, losses, IDS, 3, alpha=alpha)
    total = sum(p.numel() for p in model.parameters())
    assert got.features.shape == (8, total)
    for field in ("losses", "target_row", "gram", "norms"):
        assert (
            relative_error(getattr(got.statistics, field), getattr(want.statistics, field)) < 1e-10
        )
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None
        assert q.grad is not None
        assert relative_error(p.grad, q.grad) < 1e-10


def test_features_are_projected_per_sample_gradients() -> None:
    """With the identity, row i is the gradient of sample i's own loss, parameters in order."""
    model = MLP([3, 4, 2], [True, True], seed=3)
    batch = mlp_batch(8, 3, IDS.tolist(), 3)
    got = sketch_step(model, lambda m: m.losses(batch), IDS, 3, dim=10**6)  # type: ignore[operator]
    losses = model.losses(batch)
    for i in range(8):
        grads = torch.autograd.grad(losses[i], list(model.parameters()), retain_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        assert relative_error(got.features[i], flat) < 1e-12
    assert torch.equal(got.ids, IDS)


@pytest.mark.parametrize("kind", ["mlp", "cnn-channels-last"])
def test_projected_features_match_projecting_the_gradient(kind: str) -> None:
    """Kronecker projection of factors == the projection applied to the full gradient."""
    model: nn.Module
    if kind == "mlp":
        model = MLP([6, 5, 4], [True, True], seed=4)
        batch = mlp_batch(8, 6, IDS.tolist(), 4)
    else:
        spec = ConvSpec(2, 16, 4, 3, 2, 1, "zeros", 1, 2, True, "group", 5)
        model, batch = CNN(spec, 4), cnn_batch(spec, IDS.tolist(), 4)
    dim, seed = 20, 9
    got = sketch_step(model, lambda m: m.losses(batch), IDS, 3, dim=dim, seed=seed)  # type: ignore[operator]
    params = list(model.parameters())
    dims = allocate([p.numel() for p in params], dim)
    losses = model.losses(batch)  # type: ignore[operator]
    for i in range(8):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        parts = [
            projection_for(p.shape, d, seed, index).vector(g.unsqueeze(0))
            for index, (p, g, d) in enumerate(zip(params, grads, dims, strict=True))
        ]
        assert relative_error(got.features[i], torch.cat(parts, 1)[0]) < 1e-12


def test_reproducible_for_a_seed_and_different_across_seeds() -> None:
    batch = mlp_batch(8, 3, IDS.tolist(), 5)

    def features(seed: int, weights_seed: int = 5) -> torch.Tensor:
        model = MLP([3, 6, 5], [True, True], seed=weights_seed)
        return sketch_step(model, lambda m: m.losses(batch), IDS, 3, dim=12, seed=seed).features  # type: ignore[operator]

    assert torch.equal(features(1), features(1))
    assert not torch.allclose(features(1), features(2))
    # The projections depend on the seed and the shapes only, not on the parameter values.
    runners = [
        SketchRunner(ModeContext(m, list(m.parameters()), None, "partitioned"), dim=12, seed=1)
        for m in (MLP([3, 6, 5], [True, True], seed=5), MLP([3, 6, 5], [True, True], seed=77))
    ]
    for index in range(4):
        a, b = (r.projection(index, F64, torch.device("cpu")) for r in runners)
        assert a.dim == b.dim
        assert a.scale == b.scale
        for x, y in ((a.rows, b.rows), (a.cols, b.cols), (a.dense, b.dense)):
            assert (x is None and y is None) or (
                x is not None and y is not None and torch.equal(x, y)
            )
    for r in runners:
        r.close()


def _checksum(dim: int, seed: int) -> str:
    digest = hashlib.sha256()
    for index, shape in enumerate([(6, 3), (6,), (40, 30), (7, 2, 3, 3)]):
        p = projection_for(torch.Size(shape), dim, seed, index)
        for t in (p.rows, p.cols, p.dense):
            if t is not None:
                digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def test_projection_reproducible_across_processes() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from test_sketch import _checksum; print(_checksum(5, 42))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(__import__("pathlib").Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == _checksum(5, 42)
    assert _checksum(5, 42) != _checksum(5, 43)


def test_gram_estimate_is_unbiased() -> None:
    """The mean of the sketched Gram over many seeds converges to the exact Gram."""
    model = MLP([4, 5, 3], [True, True], seed=6)
    batch = mlp_batch(8, 4, IDS.tolist(), 6)

    def losses(m: nn.Module) -> torch.Tensor:
        return m.losses(batch)  # type: ignore[operator]

    exact = exact_step(copy.deepcopy(model), losses, IDS, 3).statistics.gram
    total = sum(p.numel() for p in model.parameters())
    seeds = 400
    estimates = torch.stack(
        [sketch_step(model, losses, IDS, 3, dim=14, seed=s).statistics.gram for s in range(seeds)]
    )
    assert total > 14
    mean, spread = estimates.mean(0), estimates.std(0)
    assert bool((spread > 0).all())  # a genuine estimate, not the exact value
    z = (mean - exact).abs() / (spread / seeds**0.5)
    assert float(z.max()) < 4.5, z
    assert relative_error(mean, exact) < 0.1


def test_gradient_is_exact_with_a_small_sketch() -> None:
    model = MLP([4, 5, 3], [True, True], seed=7)
    reference = copy.deepcopy(model)
    batch = mlp_batch(8, 4, IDS.tolist(), 7)
    alpha = torch.tensor([1.0, 0.0, 3.0], dtype=F64)
    sketch_step(model, lambda m: m.losses(batch), IDS, 3, dim=5, alpha=alpha)  # type: ignore[operator]
    exact_step(reference, lambda m: m.losses(batch), IDS, 3, alpha=alpha)  # type: ignore[operator]
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert relative_error(p.grad, q.grad) < 1e-12  # type: ignore[arg-type]


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (elements) any operation allocates (views share theirs)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                size = t.untyped_storage().nbytes() // t.element_size()
                self.largest = max(self.largest, size)
        return out


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_memory_does_not_grow_with_parameters_per_sample(layer: str) -> None:
    """The per-sample gradient (N × P numbers) is never formed: the largest allocation of a
    measurement is activation-sized (N·T·(d_in + d_out)), far below N·P for a wide layer;
    the identity projection, the positive control, does form it."""
    torch.manual_seed(0)
    n = 16
    model: nn.Module
    if layer == "linear":
        model = nn.Linear(512, 512)
        x = torch.randn(n, 512)
    else:
        model = nn.Conv2d(64, 256, 3)  # activations N·T·(C·k + C_out) ≪ N·P
        x = torch.randn(n, 64, 5, 5)
    numel = sum(p.numel() for p in model.parameters())

    def largest(dim: int) -> int:
        runner = SketchRunner(
            ModeContext(model, list(model.parameters()), None, "partitioned"), dim=dim, verify=False
        )
        batch = split_by_source(model(x).reshape(n, -1).pow(2).sum(1), IDS.repeat(2), 3)
        with LargestTensor() as probe:
            runner.measure(batch, ALL)
        runner.close()
        return probe.largest

    assert largest(256) < n * numel / 16
    assert largest(10**8) >= n * numel  # the positive control: identity materialises


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 500), min_size=1, max_size=8), dim=st.integers(1, 3000))
def test_allocation(sizes: list[int], dim: int) -> None:
    if dim < len(sizes) and dim < sum(sizes):
        with pytest.raises(EngineError, match="smaller than the number of shared parameter"):
            allocate(sizes, dim)
        return
    dims = allocate(sizes, dim)
    assert sum(dims) == min(dim, sum(sizes))
    assert all(1 <= d <= s for d, s in zip(dims, sizes, strict=True))


def test_engine_mode_and_errors() -> None:
    model = MLP([3, 4], [True], heads=3, head_mode="subset", seed=8)
    batch = mlp_batch(8, 3, IDS.tolist(), 8)
    engine = Engine(model, strategy=strategies.gcs(), num_sources=3, mode="sketch")
    with pytest.raises(EngineError, match=r"'sketch' needs per-sample gradients.*'heads.0'"):
        engine.backward(model.losses(batch), batch[2])
    engine.close()
    # With the heads not shared, the subset calls are not hooked: fine.
    engine = Engine(
        model,
        strategy=strategies.gcs(),
        num_sources=3,
        mode="sketch",
        shared=model.layers.parameters(),
    )
    engine.backward(model.losses(batch), batch[2])
    assert engine.last_statistics is not None
    assert engine.last_statistics.target_row is not None
    engine.close()
    with pytest.raises(EngineError, match="dim must be >= 1"):
        SketchRunner(ModeContext(model, list(model.parameters()), None, "partitioned"), dim=0)
