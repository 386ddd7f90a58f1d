"""``ghost`` against ``exact``: statistics and ``.grad`` on random MLPs, CNNs and an encoder block.

Tolerances: 1e-5 relative error (to the largest entry) in float64 (observed ~1e-14); under
``torch.autocast("cpu", dtype=torch.bfloat16)`` with float32 parameters 2e-2 (observed at most
1.5e-3 on the statistics and 5e-3 on ``.grad``: exact's bf16 weight gradients round, ghost
forms its factors in float32).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from auxilia import strategies
from auxilia.engine import Engine, resolve_mode
from auxilia.engine.ghost import GhostRunner
from auxilia.engine.mode import ModeContext
from auxilia.errors import EngineError
from auxilia.statistics import Need
from per_sample_models import (
    ALL,
    CNN,
    F64,
    MLP,
    ConvSpec,
    Encoder,
    assert_matches,
    cnn_batch,
    compare,
    encoder_batch,
    mlp_batch,
    randomise,
    relative_error,
    run,
)

TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny float64 kernels: one thread avoids OpenMP stalls on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def assignments(draw: st.DrawFn, max_n: int = 9) -> tuple[int, list[int]]:
    """(K+1, source of each sample): random K, some sources possibly absent."""
    num = draw(st.integers(2, 6))
    ids = draw(st.lists(st.integers(0, num - 1), min_size=1, max_size=max_n))
    return num, ids


@settings(max_examples=30, deadline=None)
@given(
    problem=assignments(),
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    biases=st.lists(st.booleans(), min_size=3, max_size=3),
    heads=st.sampled_from([(0, "gather"), (2, "gather"), (3, "subset")]),
    trunk_only=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mlp_matches_exact(
    problem: tuple[int, list[int]],
    sizes: list[int],
    biases: list[bool],
    heads: tuple[int, str],
    trunk_only: bool,
    seed: int,
) -> None:
    num, ids = problem
    batch = mlp_batch(len(ids), sizes[0], ids, seed)

    def make() -> MLP:
        return MLP(sizes, biases, heads=heads[0], head_mode=heads[1], seed=seed)

    def shared(model: nn.Module) -> list[torch.Tensor]:
        assert isinstance(model, MLP)
        return list(model.layers.parameters())

    compare(
        make,
        lambda m: m.losses(batch),  # type: ignore[operator]
        batch[2],
        num,
        shared=shared if trunk_only else None,
        tol=TOL,
    )


@st.composite
def conv_specs(draw: st.DrawFn) -> ConvSpec:
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([0, 1, "valid"] + (["same"] if stride == 1 else [])))
    mode = (
        "zeros"
        if padding in (0, "valid")
        else draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
    )
    per_group = draw(st.sampled_from([2, 8]))  # 8: channels-last patches (see ConvUnit)
    return ConvSpec(
        dims=dims,
        channels=per_group * groups,
        out=2 * groups,
        kernel=draw(st.sampled_from([1, 2, 3])),
        stride=stride,
        padding=padding,
        padding_mode=mode,
        dilation=draw(st.sampled_from([1, 2])),
        groups=groups,
        bias=draw(st.booleans()),
        norm=draw(st.sampled_from(["none", "group", "batch-eval"])),
        size=draw(st.integers(5, 7)),
    )


@settings(max_examples=30, deadline=None)
@given(problem=assignments(max_n=6), spec=conv_specs(), seed=st.integers(0, 2**16))
# one output position of channels-last patches (found by hypothesis)
@example(problem=(2, [0]), spec=ConvSpec(1, 8, 2, 3, 1, 0, "zeros", 2, 1, False, "none", 5), seed=0)
def test_cnn_matches_exact(problem: tuple[int, list[int]], spec: ConvSpec, seed: int) -> None:
    num, ids = problem
    batch = cnn_batch(spec, ids, seed)
    compare(lambda: CNN(spec, seed), lambda m: m.losses(batch), batch[2], num, tol=TOL)  # type: ignore[operator]


@settings(max_examples=10, deadline=None)
@given(
    problem=assignments(max_n=5),
    length=st.integers(2, 5),
    batch_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_encoder_block_matches_exact(
    problem: tuple[int, list[int]], length: int, batch_first: bool, seed: int
) -> None:
    """Attention (torch.func fallback), layer norms, embeddings with a padding index, a raw
    positional parameter (fallback through the root module), linear layers on sequences."""
    num, ids = problem
    batch = encoder_batch(11, length, ids, seed)
    compare(
        lambda: Encoder(11, 4, 2, batch_first, seed),
        lambda m: m.losses(batch),  # type: ignore[operator]
        batch[-1],
        num,
        tol=TOL,
    )


# --------------------------------------------------------------------------- situations


IDS = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])


def test_frozen_parameters() -> None:
    def make() -> MLP:
        model = MLP([4, 5, 5, 3], [True, True, True], seed=1)
        model.layers[1].requires_grad_(False)  # a frozen layer in the middle
        assert model.layers[0].bias is not None
        model.layers[0].bias.requires_grad_(False)  # and a frozen bias
        return model

    batch = mlp_batch(8, 4, IDS.tolist(), 1)
    got, _ = compare(make, lambda m: m.losses(batch), IDS, 3)  # type: ignore[operator]
    assert got.grads[1] is None  # the frozen bias got nothing
    assert got.grads[2] is None
    assert got.grads[3] is None


class Branches(nn.Module):
    """A shared layer only source-1 samples reach (on all rows, masked) and one applied to the
    rows of source 2 only (a subset: the per-source path)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.only_one = nn.Linear(4, 1)
        self.only_two = nn.Linear(4, 1)
        self.head = nn.Linear(4, 1)
        self.to(F64)
        randomise(self, 3)

    def losses(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = torch.where(ids == 1, self.only_one(h).squeeze(1), self.head(h).squeeze(1))
        rows = (ids == 2).nonzero().squeeze(1)
        out = out.index_put((rows,), self.only_two(h[rows]).squeeze(1))
        return out**2


@pytest.mark.parametrize("ids", [IDS, torch.tensor([0, 0, 2, 2, 0, 0, 0, 0])])
def test_parameters_some_sources_never_reach(ids: torch.Tensor) -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    compare(Branches, lambda m: m.losses(x, ids), ids, 3)  # type: ignore[operator]


def test_heads_per_source_and_shared_heads() -> None:
    batch = mlp_batch(8, 3, IDS.tolist(), 5)
    for mode in ("gather", "subset"):
        for shared in (None, lambda m: m.layers.parameters()):
            compare(
                lambda mode=mode: MLP([3, 4], [True], heads=3, head_mode=mode, seed=5),
                lambda m: m.losses(batch),  # type: ignore[operator]
                IDS,
                3,
                shared=shared,
            )


def test_gradient_accumulation_over_micro_batches() -> None:
    """Two micro-batches, two Engine steps, gradients accumulating in ``.grad``."""
    model = MLP([3, 4, 2], [True, False], seed=9)
    reference = copy.deepcopy(model)
    halves = [mlp_batch(4, 3, IDS[:4].tolist(), 1), mlp_batch(4, 3, IDS[4:].tolist(), 2)]
    grads = []
    for m, mode in ((model, "ghost"), (reference, "exact")):
        engine = Engine(m, strategy=strategies.gcs(), num_sources=3, mode=mode)
        with torch.no_grad():
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.25)
        for batch in halves:
            engine.backward(m.losses(batch), batch[2])
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        assert relative_error(a, b) <= TOL


def test_layer_reused_and_output_modified_in_place() -> None:
    """A layer called twice per step (summed as positions) and ReLU(inplace) on its output."""

    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.to(F64)
            randomise(self, 4)

        def losses(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.lin(x), inplace=True)
            return (self.lin(h) ** 2).sum(1)

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    compare(Reuse, lambda m: m.losses(x), IDS, 3)  # type: ignore[operator]


def test_tied_embedding_and_output_weights() -> None:
    """One parameter in two layers (an embedding and the output projection)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.proj = nn.Linear(4, 7, bias=False)
            self.proj.weight = self.embed.weight
            self.to(F64)
            randomise(self, 6)

        def losses(self, tokens: torch.Tensor) -> torch.Tensor:
            logits = self.proj(torch.tanh(self.embed(tokens))).mean(1)
            return F.cross_entropy(logits, tokens[:, 0], reduction="none")

    tokens = torch.randint(0, 7, (8, 3), generator=torch.Generator().manual_seed(2))
    compare(Tied, lambda m: m.losses(tokens), IDS, 3)  # type: ignore[operator]


@pytest.mark.parametrize("strategy", ["bloop", "auxilearn", "auto"])
def test_target_ema_and_validation_strategies(strategy: str) -> None:
    """Strategies that need the target-gradient EMA (dots, source_gradient) or held-out
    validation losses (an extra source) give the same coefficients and gradients."""
    batch = mlp_batch(10, 3, [0, 1, 2, 1, 0, 2, 1, 0, 0, 0], 8)
    outcomes = []
    for mode in ("ghost", "exact"):
        model = MLP([3, 4, 2], [True, True], seed=8)
        engine = Engine(model, strategy=strategies.get(strategy), num_sources=3, mode=mode)
        alphas = []
        for _ in range(3):
            losses = model.losses(batch)
            if strategy == "auxilearn":
                alphas.append(engine.backward(losses[:8], batch[2][:8], validation=losses[8:]))
            else:
                alphas.append(engine.backward(losses, batch[2]))
        outcomes.append((alphas, [p.grad for p in model.parameters()]))
    for a, b in zip(outcomes[0][0], outcomes[1][0], strict=True):
        assert relative_error(a, b) <= TOL
    for a, b in zip(outcomes[0][1], outcomes[1][1], strict=True):
        assert relative_error(a, b) <= TOL  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["mlp", "cnn", "cnn-channels-last", "encoder"])
def test_bfloat16_autocast_on_cpu(which: str) -> None:
    ids = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0])
    spec = ConvSpec(2, 4, 8, 3, 1, 1, "zeros", 1, 2, True, "group", 6)
    wide = ConvSpec(2, 16, 8, 3, 2, 1, "zeros", 1, 2, True, "group", 6)
    makers = {
        "mlp": (lambda: MLP([5, 16, 16], [True, True], seed=0), mlp_batch(10, 5, ids.tolist(), 0)),
        "cnn": (lambda: CNN(spec, 0), cnn_batch(spec, ids.tolist(), 0)),
        "cnn-channels-last": (lambda: CNN(wide, 0), cnn_batch(wide, ids.tolist(), 0)),
        "encoder": (lambda: Encoder(11, 8, 2, True, 0), encoder_batch(11, 5, ids.tolist(), 0)),
    }
    make, batch64 = makers[which]
    batch = tuple(t.float() if t.is_floating_point() else t for t in batch64)

    def losses(model: nn.Module) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.losses(batch).float()  # type: ignore[operator]

    compare(lambda: make().float(), losses, ids, 3, tol=BF16_TOL)


def test_auto_prefers_ghost_with_a_module() -> None:
    needs = frozenset({Need.GRAM})
    assert resolve_mode("auto", "partitioned", needs, has_module=True).name == "ghost"
    # Given only parameters: the vectorised backward pass, not exact's K+1 passes.
    assert resolve_mode("auto", "partitioned", needs, has_module=False).name == "batched"
    engine = Engine(nn.Linear(2, 1), strategy=strategies.gcs(), num_sources=2)
    assert engine.mode.name == "ghost"
    engine.close()


# --------------------------------------------------------------------------- hooks


def test_hooks_removed_by_close_and_idle_under_no_grad() -> None:
    model = MLP([3, 4, 2], [True, True], seed=0)
    engine = Engine(model, strategy=strategies.gcs(), num_sources=3, mode="ghost")
    runner = engine.runner
    assert isinstance(runner, GhostRunner)
    assert all(len(layer._forward_hooks) == 1 for layer in model.layers)
    batch = mlp_batch(6, 3, [0, 1, 2, 0, 1, 2], 0)
    with torch.no_grad():
        model.losses(batch)
    with torch.inference_mode():
        model.losses(batch)
    assert runner.capture.pending == 0  # evaluation records nothing
    model.losses(batch)
    assert runner.capture.pending == 2
    engine.backward(model.losses(batch), batch[2])  # takes only the calls it uses
    assert runner.capture.pending == 0
    engine.close()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    model.losses(batch)
    assert runner.capture.pending == 0


# --------------------------------------------------------------------------- errors


def _engine(model: nn.Module, mode: str = "ghost", **kwargs: object) -> Engine:
    return Engine(model, strategy=strategies.gcs(), num_sources=3, mode=mode, **kwargs)  # type: ignore[arg-type]


def test_error_needs_the_module() -> None:
    with pytest.raises(EngineError, match=r"pass the nn\.Module itself"):
        Engine(nn.Linear(2, 1).parameters(), strategy=strategies.gcs(), num_sources=2, mode="ghost")


def test_error_batch_norm_in_training_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(F64)
    engine = _engine(model)
    x = torch.randn(6, 3, dtype=F64)
    with pytest.raises(EngineError, match=r"'1' \(BatchNorm1d\).*batch statistics"):
        engine.backward(model(x).squeeze(1) ** 2, IDS[:6])
    model.eval()  # running statistics: fine, and factored
    model[1].running_var.fill_(2.0)
    compare(lambda: model, lambda m: m(x).squeeze(1) ** 2, IDS[:6], 3)


def test_error_input_modified_in_place() -> None:
    class Clobber(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * 1.0
            out = self.lin(h)
            h.mul_(2.0)  # the linear layer's input, after the call
            return out.squeeze(1) + h.sum(1)

    model = Clobber().to(F64)
    engine = _engine(model)
    with pytest.raises(
        EngineError, match=r"input of module 'lin' \(Linear\) was modified in place"
    ):
        engine.backward(model(torch.randn(6, 3, dtype=F64)) ** 2, IDS[:6])


def test_error_parameter_used_outside_its_module() -> None:
    class Outside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.lin.weight).squeeze(1)  # lin itself is never called

    model = Outside().to(F64)
    engine = _engine(model)
    with pytest.raises(EngineError, match=r"'lin.weight' received a gradient"):
        engine.backward(model(torch.randn(6, 3, dtype=F64)) ** 2, IDS[:6])


def test_error_disagreement_caught_by_verification() -> None:
    """A tied weight read through F.linear while its module is also called: invisible to the
    hooks, caught by the first step's check against exact."""

    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.tanh(self.lin(x)), self.lin.weight).sum(1)

    model = Sneaky().to(F64)
    engine = _engine(model)
    with pytest.raises(EngineError, match="disagrees with 'exact'"):
        engine.backward(model(torch.randn(6, 3, dtype=F64)) ** 2, IDS[:6])


def test_error_fallback_module_with_dropout_in_training() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, dtype=F64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x * self.scale, 0.5, training=self.training)

    model = nn.Sequential(Noisy(), nn.Linear(3, 1)).to(F64)
    engine = _engine(model)
    with pytest.raises(EngineError, match=r"module '0' \(Noisy\) with torch.func.*deterministic"):
        engine.backward(model(torch.randn(6, 3, dtype=F64)).squeeze(1) ** 2, IDS[:6])
    model.eval()  # deterministic: the fallback works
    x = torch.randn(6, 3, dtype=F64)
    compare(lambda: model, lambda m: m(x).squeeze(1) ** 2, IDS[:6], 3)


class DroppingBlock(nn.Module):
    """A custom layer (own parameter, so replayed per sample with torch.func) that draws a
    dropout mask in its own forward, which the replay cannot redraw."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, 24, dtype=F64).view(3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.dropout(x @ self.weight, 0.3, training=self.training))


def _dropping_losses(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(3)  # the same masks in every run
    x = torch.linspace(-2.0, 2.0, 24, dtype=F64).view(8, 3)
    return model(x).squeeze(1) ** 2


def test_ghost_names_a_replayed_module_with_dropout_before_the_backward() -> None:
    """Forced ``ghost``: a module whose per-sample replay draws a dropout mask is found by the
    replay tried before the backward and refused, naming it; the graph is left for another
    backward."""
    from auxilia.errors import ModeUnavailableError

    model = nn.Sequential(DroppingBlock(), nn.Linear(8, 1)).to(F64).train()
    engine = _engine(model)
    losses = _dropping_losses(model)
    with pytest.raises(ModeUnavailableError, match=r"module '0' \(DroppingBlock\) with torch.func"):
        engine.backward(losses, IDS)
    losses.sum().backward()  # the graph was not consumed
    assert model[0].weight.grad is not None


def test_auto_mode_leaves_ghost_for_a_replayed_module_with_dropout() -> None:
    """``mode="auto"``: the step ghost cannot measure is measured by the next mode that serves
    the strategy (``batched`` for the norms, ``jvp`` for the target row alone), with one
    warning; statistics and .grad are exact's on the same masks."""

    def make() -> nn.Module:
        return nn.Sequential(DroppingBlock(), nn.Linear(8, 1)).to(F64).train()

    for extra, expected in (({Need.TARGET_ROW, Need.NORMS}, "batched"), ({Need.TARGET_ROW}, "jvp")):
        with pytest.warns(
            UserWarning,
            match=r"engine mode auto: ghost cannot measure this model \(torch.func cannot "
            r"replay module '0' \(DroppingBlock\) per sample\): " + expected,
        ):
            got = run(make(), _dropping_losses, IDS, 3, "auto", extra=extra, steps=2)
        want = run(make(), _dropping_losses, IDS, 3, "exact", extra=extra, steps=2)
        assert_matches(got, want, 1e-10)
    model = make()
    engine = Engine(model, strategy=strategies.gcs(), num_sources=3)
    assert engine.mode.name == "ghost"
    with pytest.warns(UserWarning, match="batched instead"):
        engine.backward(_dropping_losses(model), IDS)
    assert engine.mode.name == "batched"
    assert engine.fallback is not None
    assert "'0' (DroppingBlock)" in engine.fallback
    assert any(note.startswith("auto: ghost cannot measure") for note in engine.path()[1])


class Recurrent(nn.Module):
    """An ``nn.LSTM`` in float32 (whose CPU kernel torch.func cannot replay per sample; it
    can in float64) or a two-layer ``nn.GRU`` with dropout, under a linear read-out."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn: nn.RNNBase = (
            nn.LSTM(3, 4, batch_first=True)
            if kind == "lstm"
            else nn.GRU(3, 4, num_layers=2, dropout=0.25, batch_first=True)
        )
        self.out = nn.Linear(4, 1)
        self.to(torch.float32 if kind == "lstm" else F64)
        randomise(self, 5)

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(4)
        h, _ = self.rnn(x.to(self.out.weight.dtype))
        return self.out(h[:, -1]).squeeze(1) ** 2


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_module_torch_func_cannot_replay_is_found_before_the_backward(kind: str) -> None:
    """The replay is tried on the first step of a call pattern, while the graph is whole:
    forced ``ghost`` raises ``ModeUnavailableError`` naming the module (the graph is left for
    another backward); ``auto`` moves on to the next mode and agrees with exact."""
    from auxilia.errors import ModeUnavailableError

    x = torch.linspace(-1.0, 1.0, 8 * 5 * 3, dtype=F64).view(8, 5, 3)
    model = Recurrent(kind).train()
    engine = _engine(model)
    losses = model.losses(x)
    with pytest.raises(ModeUnavailableError, match=r"module 'rnn' \((LSTM|GRU)\)"):
        engine.backward(losses, IDS)
    losses.sum().backward()
    assert model.rnn.weight_hh_l0.grad is not None
    with pytest.warns(UserWarning, match=r"'rnn' \((LSTM|GRU)\b.*: batched"):
        got = run(Recurrent(kind).train(), lambda m: m.losses(x), IDS, 3, "auto", steps=2)  # type: ignore[operator]
    want = run(Recurrent(kind).train(), lambda m: m.losses(x), IDS, 3, "exact", steps=2)  # type: ignore[operator]
    assert_matches(got, want, 1e-5 if kind == "lstm" else 1e-10)


def test_auto_mode_leaves_ghost_for_batch_norm_in_training_mode() -> None:
    """Batch statistics couple the samples: ``auto`` measures such a model with the next mode
    (the gradients of the source means through the coupled batch, as exact measures them)."""

    def make() -> nn.Module:
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(F64)
        randomise(model, 8)
        return model.train()

    x = torch.linspace(-2.0, 2.0, 24, dtype=F64).view(8, 3)

    def losses(m: nn.Module) -> torch.Tensor:
        return m(x).squeeze(1) ** 2  # type: ignore[no-any-return]

    with pytest.warns(UserWarning, match=r"'1' \(BatchNorm1d\) normalises with batch statistics"):
        got = run(make(), losses, IDS, 3, "auto", steps=2)
    assert_matches(got, run(make(), losses, IDS, 3, "exact", steps=2), 1e-10)


class Checkpointed(nn.Module):
    """A linear layer inside ``torch.utils.checkpoint`` (recomputed in the backward)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.first, self.inner, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.reentrant = reentrant
        self.to(F64)
        randomise(self, 6)

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.first(x))
        h = checkpoint(lambda t: torch.tanh(self.inner(t)), h, use_reentrant=self.reentrant)
        return self.out(h).squeeze(1) ** 2


def test_checkpointed_layers_match_exact_and_leave_no_calls_behind() -> None:
    """The forward recomputed inside ghost's backward is not recorded as a call of the next
    step; three steps agree with exact."""
    x = torch.linspace(-1.0, 1.0, 24, dtype=F64).view(8, 3)
    compare(lambda: Checkpointed(False), lambda m: m.losses(x), IDS, 3, steps=3)  # type: ignore[operator]
    model = Checkpointed(False)
    engine = _engine(model)
    engine.backward(model.losses(x), IDS)
    assert isinstance(engine.runner, GhostRunner)
    assert engine.runner.capture.pending == 0


@pytest.mark.filterwarnings("ignore:engine mode 'batched'")  # its vmap fails first, then this
@pytest.mark.parametrize("mode", ["ghost", "exact", "batched"])
def test_error_reentrant_checkpoint(mode: str) -> None:
    model = Checkpointed(True)
    engine = _engine(model, mode=mode)
    x = torch.linspace(-1.0, 1.0, 24, dtype=F64).view(8, 3)
    with pytest.raises(EngineError, match="use_reentrant=False"):
        engine.backward(model.losses(x), IDS)


class Scaled(nn.Module):
    """A layer returning a tuple, called with one tensor twice and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(x)) * y * scale
        return h, h.sum(-1)


class OwnParameters(nn.Module):
    """A model that uses parameters of its own between its submodules, the pattern of a raw
    positional embedding or class token in a model's root and of a layer scale: an embedding,
    blocks in a ``ModuleList`` with residual connections and dropout, one block called twice,
    a tuple-returning layer called with a keyword, the raw parameters read in between."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.position = nn.Parameter(torch.linspace(-0.5, 0.5, 24).view(6, 4))
        self.gamma = nn.Parameter(torch.full((4,), 0.7))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Dropout(dropout)) for _ in range(2)
        )
        self.scaled = Scaled()
        self.out = nn.Linear(4, 2)
        self.to(F64)
        randomise(self, 12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = x + self.gamma * block(x)  # the residual reads x outside the block too
        x = x + self.blocks[0](x * self.gamma)  # a block called again
        h, total = self.scaled(x, x, scale=0.5)  # the same tensor twice
        return self.out(h.mean(1)) + total.mean(1, keepdim=True) * self.gamma[0]

    def losses(self, tokens: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(8)  # the same dropout masks in every run
        return (self(tokens) ** 2).sum(1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_own_parameters_between_submodules_match_exact(dropout: float) -> None:
    """The root's own parameters are replayed without its submodules (their recorded outputs,
    the gradients at their inputs): statistics and .grad are exact's, dropout at work below
    included, and the step stays on ghost."""
    tokens = torch.randint(0, 9, (8, 6), generator=torch.Generator().manual_seed(3))
    compare(lambda: OwnParameters(dropout).train(), lambda m: m.losses(tokens), IDS, 3, steps=2)  # type: ignore[operator]
    model = OwnParameters(dropout).train()
    engine = _engine(model)
    engine.backward(model.losses(tokens), IDS)
    assert engine.mode.name == "ghost"
    assert engine.fallback is None


class PositionsThroughALayer(nn.Module):
    """A raw table [8, d] passed through an activation module and averaged into every token:
    with 8 the batch's size, the activation's input looks per sample but is not."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.position = nn.Parameter(torch.linspace(-1.0, 1.0, 4 * length).view(length, 4))
        self.act = nn.Tanh()
        self.out = nn.Linear(4, 2)
        self.to(F64)
        randomise(self, 21)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(tokens) + self.act(self.position).mean(0))
        return self.out(h.mean(1))

    def losses(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self(tokens) ** 2).sum(1)


def test_a_submodule_given_a_table_is_replayed_whole() -> None:
    """The trial of the replay that takes recorded submodule calls fails (the table is not
    per sample); ghost replays the module whole instead, and agrees with exact."""
    from auxilia.engine.capture import FunctionalUnit

    tokens = torch.randint(0, 9, (8, 6), generator=torch.Generator().manual_seed(5))
    compare(lambda: PositionsThroughALayer(8), lambda m: m.losses(tokens), IDS, 3, steps=2)  # type: ignore[operator]
    model = PositionsThroughALayer(8)
    engine = _engine(model)
    engine.backward(model.losses(tokens), IDS)
    assert isinstance(engine.runner, GhostRunner)
    (unit,) = [u for u in engine.runner.capture.units if type(u) is FunctionalUnit]
    assert not unit.stubbing


def test_submodule_calls_that_are_not_per_sample_are_caught_by_the_sums(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sequence-first calls whose length equals the batch's size look per sample; with the
    shape rule that keeps them out turned off, the per-sample gradients no longer sum to the
    step's true gradient, and the module is replayed whole: still exact's numbers."""
    from auxilia.engine.capture import FunctionalUnit

    monkeypatch.setattr(
        FunctionalUnit, "children_ok", lambda self, call, n: self.stubbing and bool(call.children)
    )
    ids = torch.tensor([0, 1, 2, 1, 0])
    batch = encoder_batch(11, 5, ids.tolist(), 2)  # 5 samples of 5 tokens
    compare(lambda: Encoder(11, 4, 2, False, 2), lambda m: m.losses(batch), ids, 3)  # type: ignore[operator]
    model = Encoder(11, 4, 2, False, 2)
    engine = _engine(model)
    engine.backward(model.losses(batch), ids)
    assert isinstance(engine.runner, GhostRunner)
    (unit,) = [u for u in engine.runner.capture.units if type(u) is FunctionalUnit]
    assert not unit.stubbing


def test_own_parameter_replay_runs_no_submodule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay of a module's own parameters (and the trial of it) runs none of its
    submodules' forwards: they ran once, in the step's forward."""
    from auxilia.engine.capture import FunctionalUnit
    from auxilia.engine.ghost import ghost

    runs = {"n": 0}
    for kind in (nn.Linear, nn.Embedding, nn.Tanh, nn.Dropout, nn.Sequential, Scaled):

        def counted(self: nn.Module, *args: Any, _f: Any = kind.forward, **kwargs: Any) -> Any:
            runs["n"] += 1
            return _f(self, *args, **kwargs)

        monkeypatch.setattr(kind, "forward", counted)
    tokens = torch.randint(0, 9, (8, 6), generator=torch.Generator().manual_seed(3))
    model = OwnParameters(0.0).train()
    engine = _engine(model, mode=ghost(verify=False))  # type: ignore[arg-type]
    losses = model.losses(tokens)
    during_forward = runs["n"]
    engine.backward(losses, IDS)
    assert isinstance(engine.runner, GhostRunner)
    units = [u for u in engine.runner.capture.units if type(u) is FunctionalUnit]
    assert [u.name for u in units] == [""]
    assert runs["n"] == during_forward  # neither the trial nor the replay ran a submodule


def test_error_sparse_embedding() -> None:
    with pytest.raises(EngineError, match="sparse=True"):
        _engine(nn.Embedding(5, 2, sparse=True))


def test_error_shared_input_layout() -> None:
    with pytest.raises(EngineError, match="partitioned layout"):
        _engine(nn.Linear(2, 1), layout="shared-input")


def test_verification_can_be_turned_off() -> None:
    model = MLP([3, 2], [True], seed=0)
    runner = GhostRunner(ModeContext(model, list(model.parameters()), None, "partitioned"))
    assert runner.verifier.enabled
    quiet = GhostRunner(
        ModeContext(model, list(model.parameters()), None, "partitioned"), verify=False
    )
    assert not quiet.verifier.enabled
    runner.close()
    quiet.close()


def test_outcome_helper_sees_untouched_parameters() -> None:
    """A shared parameter that no present source reaches keeps ``.grad`` None, like exact."""
    model = MLP([3, 2], [True], heads=3, head_mode="subset", seed=2)
    batch = mlp_batch(4, 3, [0, 0, 1, 1], 2)
    out = run(model, lambda m: m.losses(batch), batch[2], 3, "ghost")  # type: ignore[operator]
    head_two = list(model.heads[2].parameters())
    index = [i for i, p in enumerate(model.parameters()) if any(p is q for q in head_two)]
    assert all(out.grads[i] is None for i in index)


class Mixed(nn.Module):
    """Every factored layer kind, run on two subsets of the rows: the per-source path."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 8, padding_idx=1)
        self.conv = nn.Conv1d(8, 4, 2, groups=1)  # 8 channels: channels-last patches
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 1)
        self.to(F64)
        randomise(self, 11)

    def part(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.gn(self.conv(self.embed(tokens).transpose(1, 2)))  # [n, 4, T-1]
        return self.lin(self.ln(h.transpose(1, 2))).sum((1, 2))

    def losses(self, tokens: torch.Tensor, split: bool) -> torch.Tensor:
        if not split:
            return self.part(tokens) ** 2
        return torch.cat([self.part(tokens[:3]), self.part(tokens[3:])]) ** 2


@pytest.mark.parametrize("route", ["kernel", "source", "cost"])
@pytest.mark.parametrize("split", [False, True])
def test_every_layer_kind_on_both_routes(
    route: str, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The N×N kernel and the per-source sums give the same Gram, per sample or per source."""
    from auxilia.engine import factors

    if route != "cost":
        cheap, dear = (
            ("kernel_cost", "source_cost") if route == "kernel" else ("source_cost", "kernel_cost")
        )
        for kind in (factors.Dense2D, factors.EmbeddingRows, factors.PerSample):
            monkeypatch.setattr(kind, cheap, lambda self, *a: 0.0)
            monkeypatch.setattr(kind, dear, lambda self, *a: 1.0)
    tokens = torch.randint(0, 6, (8, 4), generator=torch.Generator().manual_seed(3))
    compare(Mixed, lambda m: m.losses(tokens, split), IDS, 3)  # type: ignore[operator]
    for spec in (
        ConvSpec(2, 4, 4, 3, 2, 1, "reflect", 1, 2, True, "group", 6),
        ConvSpec(2, 16, 4, 3, 2, 1, "zeros", 1, 2, True, "group", 6),  # channels-last
    ):
        batch = cnn_batch(spec, IDS.tolist(), 4)
        compare(lambda s=spec: CNN(s, 4), lambda m, b=batch: m.losses(b), IDS, 3)  # type: ignore[misc,operator]
    enc = encoder_batch(11, 4, IDS.tolist(), 5)
    compare(lambda: Encoder(11, 4, 2, True, 5), lambda m: m.losses(enc), IDS, 3)  # type: ignore[operator]


def test_embedding_options_rms_norm_and_batch_norm_on_data() -> None:
    """scale_grad_by_freq with a padding index, RMSNorm, and BatchNorm in training mode on an
    input that needs no gradient (its batch statistics are then just data)."""

    class Options(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3, scale_grad_by_freq=True, padding_idx=2)
            self.rms = nn.RMSNorm(3)
            self.bn = nn.BatchNorm1d(3)
            self.lin = nn.Linear(3, 1)
            self.to(F64)
            randomise(self, 1)

        def losses(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return (self.lin(self.rms(self.embed(tokens))).sum((1, 2)) + self.bn(x).sum(1)) ** 2

    tokens = torch.randint(0, 5, (8, 4), generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    compare(Options, lambda m: m.losses(tokens, x), IDS, 3)  # type: ignore[operator]


@pytest.mark.parametrize("per_group", [2, 8])  # 8: channels-last patches
def test_dots_and_source_gradients_match_exact(per_group: int) -> None:
    """<g_k, v> and each g_k (what the target-gradient EMA reads) in the parameters' own order,
    whichever layout the convolution patches were copied in."""
    from auxilia.engine.exact import measure_exact
    from auxilia.engine.source_losses import split_by_source

    spec = ConvSpec(2, 2 * per_group, 4, 3, 2, 1, "zeros", 1, 2, True, "group", 6)
    batch = cnn_batch(spec, IDS.tolist(), 6)
    model = CNN(spec, 6)
    params = list(model.parameters())
    vectors = [torch.randn_like(p) for p in params]
    runner = GhostRunner(ModeContext(model, params, None, "partitioned"))
    got = runner.measure(split_by_source(model.losses(batch), IDS, 3), frozenset({Need.LOSSES}))
    runner.close()
    want = measure_exact(
        split_by_source(model.losses(batch), IDS, 3), params, None, frozenset({Need.LOSSES})
    )
    assert relative_error(got.dots(vectors), want.dots(vectors)) < 1e-10
    for k in range(3):
        for a, b in zip(got.source_gradient(k), want.source_gradient(k), strict=True):
            assert relative_error(a, b) < 1e-10


@pytest.mark.parametrize(
    ("model", "ids"),
    [
        ("branches", IDS),
        ("branches", torch.tensor([0, 0, 2, 2, 0, 0, 0, 0])),  # source 1 absent
        ("mixed", IDS),
        ("mixed-split", IDS),  # the per-source path: rows are sources
        ("mlp", torch.tensor([1, 1, 2, 2, 1, 2, 1, 1])),  # the target absent
    ],
)
def test_source_gradients_from_their_own_rows_match_exact(model: str, ids: torch.Tensor) -> None:
    """Each source's gradient (what the target-gradient EMA keeps), summed over that source's
    rows only, on every factor kind, with sources absent from the step."""
    from auxilia.engine.exact import measure_exact
    from auxilia.engine.source_losses import split_by_source

    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 6, (8, 4), generator=gen)
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    batch = mlp_batch(8, 3, ids.tolist(), 4)
    make: Callable[[], nn.Module]
    if model == "branches":
        make, losses = Branches, lambda m: m.losses(x, ids)
    elif model == "mlp":
        make, losses = (lambda: MLP([3, 4, 2], [True, True], seed=4)), lambda m: m.losses(batch)
    else:
        make, losses = Mixed, lambda m: m.losses(tokens, model == "mixed-split")
    net = make()
    params = list(net.parameters())
    runner = GhostRunner(ModeContext(net, params, None, "partitioned"))
    needs = frozenset({Need.LOSSES})
    got = runner.measure(split_by_source(losses(net), ids, 3), needs)
    runner.close()
    want = measure_exact(split_by_source(losses(net), ids, 3), params, None, needs)
    for k in range(3):
        for a, b in zip(got.source_gradient(k), want.source_gradient(k), strict=True):
            assert relative_error(a, b) < 1e-10


@pytest.mark.parametrize("route", ["source", "cost"])
@pytest.mark.parametrize("model", ["mixed-split", "mixed", "cnn-channels-last", "encoder"])
def test_target_row_and_norms_alone_match_exact(
    model: str, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Need.GRAM ghost forms only the Gram's first row and its diagonal (per-source
    sums: 2·K' instead of K'² products; embeddings: the touched (source, row) pairs)."""
    from auxilia.engine import factors

    if route == "source":
        for kind in (factors.Dense2D, factors.EmbeddingRows, factors.PerSample):
            monkeypatch.setattr(kind, "source_cost", lambda self, *a: 0.0)
            monkeypatch.setattr(kind, "kernel_cost", lambda self, *a: 1.0)
    tokens = torch.randint(0, 6, (8, 4), generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([0, 1, 2, 1, 0, 2, 2, 3])
    make: Any
    if model.startswith("mixed"):
        make, losses = Mixed, lambda m: m.losses(tokens, model == "mixed-split")
    elif model == "encoder":
        enc = encoder_batch(11, 4, ids.tolist(), 5)
        make, losses = (lambda: Encoder(11, 4, 2, True, 5)), (lambda m: m.losses(enc))
    else:
        spec = ConvSpec(2, 16, 4, 3, 2, 1, "zeros", 1, 2, True, "group", 6)
        batch = cnn_batch(spec, ids.tolist(), 4)
        make, losses = (lambda: CNN(spec, 4)), (lambda m: m.losses(batch))
    needs = {Need.LOSSES, Need.TARGET_ROW, Need.NORMS}
    # Two steps: the first is checked against exact (whole Gram); the second is the partial one.
    got = run(make(), losses, ids, 5, "ghost", extra=needs, steps=2)
    want = run(make(), losses, ids, 5, "exact", extra=needs, steps=2)
    assert got.statistics.gram is None
    for name in ("target_row", "norms"):
        a, b = getattr(got.statistics, name), getattr(want.statistics, name)
        assert relative_error(a, b) < 1e-10, (name, a, b)


class AttentionCalls(nn.Module):
    """``nn.MultiheadAttention`` called in the ways models call it, then a linear read-out."""

    def __init__(self, style: str, batch_first: bool) -> None:
        super().__init__()
        self.style = style
        self.batch_first = batch_first
        self.embed = nn.Embedding(9, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=0.3)
        self.out = nn.Linear(8, 2)
        self.to(F64)
        randomise(self, 13)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        x = h if self.batch_first else h.transpose(0, 1)
        length = tokens.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        weights = None
        if self.style == "default":  # need_weights=True, the weights unused
            a, _ = self.attention(x, x, x)
        elif self.style == "weights-used":  # their gradient reaches the loss: torch.func route
            a, weights = self.attention(x, x, x)
        elif self.style == "causal-bool":
            a, _ = self.attention(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        elif self.style == "float-masks":
            bias = torch.linspace(-1.0, 1.0, length * length, dtype=F64).view(length, length)
            padding = torch.zeros(tokens.shape, dtype=F64)
            padding[:, -1] = -2.0
            a, _ = self.attention(x, x, x, attn_mask=bias, key_padding_mask=padding)
        elif self.style == "per-head-mask":
            heads = causal.expand(tokens.shape[0] * 2, -1, -1)
            a, _ = self.attention(x, x, x, attn_mask=heads, need_weights=False)
        elif self.style == "cross":  # keys and values from another tensor: torch.func route
            a, _ = self.attention(x, x * 0.5, x * 0.5, need_weights=False)
        else:
            raise AssertionError(self.style)
        a = a if self.batch_first else a.transpose(0, 1)
        extra = 0.0 if weights is None else weights[:, :, 0].sum(1, keepdim=True)  # key 0
        return self.out(a.mean(1)) + extra

    def losses(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self(tokens) ** 2).sum(1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "style",
    ["default", "weights-used", "causal-bool", "float-masks", "per-head-mask", "cross"],
)
def test_attention_calls_match_exact(style: str, batch_first: bool) -> None:
    """Self-attention through its projections' factors (dropout off in eval mode), every other
    call through the exact torch.func route: statistics and .grad as exact's."""
    tokens = torch.randint(0, 9, (8, 4), generator=torch.Generator().manual_seed(2))

    def make() -> nn.Module:
        return AttentionCalls(style, batch_first).eval()

    compare(make, lambda m: m.losses(tokens), IDS, 3)  # type: ignore[operator]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("style", ["default", "causal-bool", "float-masks"])
def test_attention_with_dropout_at_work_matches_exact(style: str, batch_first: bool) -> None:
    """Self-attention in training mode (dropout 0.3 drawing masks) through the projections'
    factors: the replay draws the forward's own mask, so statistics and .grad are exact's.
    Both runs seed the generator before their forward, so they draw the same masks."""
    tokens = torch.randint(0, 9, (8, 4), generator=torch.Generator().manual_seed(2))

    def losses(m: nn.Module) -> torch.Tensor:
        torch.manual_seed(5)
        return m.losses(tokens)  # type: ignore[operator, no-any-return]

    compare(lambda: AttentionCalls(style, batch_first).train(), losses, IDS, 3, steps=2)


def test_attention_dropout_replay_leaves_the_random_stream_alone() -> None:
    """Replaying the dropout mask puts the generator back: the draws after a ghost step are
    those after an exact step on the same forward."""
    tokens = torch.randint(0, 9, (8, 4), generator=torch.Generator().manual_seed(2))
    after = {}
    for mode in ("ghost", "exact"):
        torch.manual_seed(11)
        model = AttentionCalls("default", True).train()
        run(model, lambda m: m.losses(tokens), IDS, 3, mode)  # type: ignore[operator]
        after[mode] = torch.rand(4)
    torch.testing.assert_close(after["ghost"], after["exact"], rtol=0, atol=0)


def test_transformer_encoder_layer_in_training_mode_matches_exact() -> None:
    """``nn.TransformerEncoderLayer`` with its default dropout (0.1, in the attention and
    after it), in training mode, the layout a user trains: ghost agrees with exact."""

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(9, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.out = nn.Linear(8, 2)
            self.to(F64)
            randomise(self, 3)

        def losses(self, tokens: torch.Tensor) -> torch.Tensor:
            torch.manual_seed(7)
            return (self.out(self.layer(self.embed(tokens)).mean(1)) ** 2).sum(1)

    tokens = torch.randint(0, 9, (8, 5), generator=torch.Generator().manual_seed(4))
    compare(lambda: Layer().train(), lambda m: m.losses(tokens), IDS, 3, steps=2)  # type: ignore[operator]


def test_attention_dropout_under_bfloat16_autocast_matches_exact() -> None:
    """The replayed mask under autocast is the forward's: the Gram within the bfloat16
    tolerance of exact's on the same masks."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True)
    model = nn.ModuleDict({"embed": nn.Embedding(9, 16), "layer": layer, "out": nn.Linear(16, 3)})
    tokens = torch.randint(0, 9, (8, 5), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 3
    grams = []
    for mode, m in (("ghost", model), ("exact", copy.deepcopy(model))):
        engine = Engine(m, strategy=strategies.gcs(), num_sources=3, mode=mode, extra_needs=ALL)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = m["layer"](m["embed"](tokens)).mean(1)
            losses = F.cross_entropy(m["out"](h).float(), labels, reduction="none")
        engine.backward(losses, IDS)
        assert engine.last_statistics is not None
        grams.append(engine.last_statistics.require(Need.GRAM))
    assert relative_error(grams[0], grams[1]) < BF16_TOL


def test_attention_unit_takes_the_projection_route() -> None:
    """A plain self-attention call gives linear factors (no per-sample replay under vmap)."""
    from auxilia.engine.capture import AttentionUnit
    from auxilia.engine.factors import Dense2D
    from auxilia.engine.source_losses import split_by_source

    model = AttentionCalls("default", True).eval()
    params = list(model.parameters())
    runner = GhostRunner(ModeContext(model, params, None, "partitioned"), verify=False)
    tokens = torch.randint(0, 9, (8, 4), generator=torch.Generator().manual_seed(2))
    (unit,) = [u for u in runner.capture.units if isinstance(u, AttentionUnit)]
    step = runner.capture.collect(split_by_source(model.losses(tokens), IDS, 3))
    runner.close()
    packed = unit.module.in_proj_weight
    kinds = [type(f) for ps, _, f in step.entries if any(p is packed for p in ps)]
    assert kinds == [Dense2D]


@pytest.mark.parametrize("table", ["dense", "pairs"])
@pytest.mark.parametrize("whole", [True, False])
def test_embedding_gram_on_both_tables(
    table: str, whole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedding Gram (whole, or row and norms) from the dense per-source table and from the
    sparse (source, row) pairs, per sample and per source, against exact."""
    from auxilia.engine import factors

    monkeypatch.setattr(factors.EmbeddingRows, "kernel_cost", lambda self: float("inf"))
    monkeypatch.setattr(factors.EmbeddingRows, "_dense_table", lambda self, w: table == "dense")
    tokens = torch.randint(0, 6, (8, 4), generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([0, 1, 2, 1, 0, 2, 2, 3])
    needs = {Need.LOSSES, Need.TARGET_ROW, Need.NORMS} | ({Need.GRAM} if whole else set())
    for split in (False, True):

        def losses(m: nn.Module, split: bool = split) -> torch.Tensor:
            return m.losses(tokens, split)  # type: ignore[operator, no-any-return]

        got = run(Mixed(), losses, ids, 5, "ghost", extra=needs, steps=2)
        want = run(Mixed(), losses, ids, 5, "exact", extra=needs, steps=2)
        names = ("gram", "target_row", "norms") if whole else ("target_row", "norms")
        for name in names:
            a, b = getattr(got.statistics, name), getattr(want.statistics, name)
            assert relative_error(a, b) < 1e-10, (split, name, a, b)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    din=st.integers(1, 5),
    dout=st.integers(1, 4),
    width=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_per_source_sums_match_per_row_gradients(
    rows: int, din: int, dout: int, width: int, bias: bool, seed: int
) -> None:
    """A once-called linear layer's per-source sums (one product per source over its rows,
    sorted or not, sources without rows included) equal the sums of per-row gradients, and
    so do the Grams formed from them, whole and as first row plus diagonal."""
    from auxilia.engine.factors import Dense2D

    g = torch.Generator().manual_seed(seed)
    a, b = (
        torch.randn(rows, din, generator=g, dtype=F64),
        torch.randn(rows, dout, generator=g, dtype=F64),
    )
    column = torch.randint(0, width, (rows,), generator=g)
    factor = Dense2D(a, b, torch.Size([dout, din]), torch.Size([dout]) if bias else None)
    assert factor.simple
    per_row = torch.einsum("ro,ri->roi", b, a).reshape(rows, -1)
    if bias:
        per_row = torch.cat([per_row, b], 1)
    want = torch.zeros(width, per_row.shape[1], dtype=F64).index_add_(0, column, per_row)
    torch.testing.assert_close(factor.per_source(column, width), want, rtol=1e-12, atol=1e-12)
    gram = want @ want.T
    torch.testing.assert_close(factor.source_gram(column, width), gram, rtol=1e-12, atol=1e-12)
    partial = factor.source_gram(column, width, full=False)
    torch.testing.assert_close(partial[0], gram[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(partial.diagonal(), gram.diagonal(), rtol=1e-12, atol=1e-12)
