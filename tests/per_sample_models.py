"""Small random models and a comparison against ``exact``, shared by the ghost and sketch tests.

Every model has ``losses(batch) -> [N]`` (one loss per sample) and is float64 unless told.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from auxilia import strategies
from auxilia.engine import Engine
from auxilia.statistics import Need, Statistics

F64 = torch.float64
ALL = {Need.LOSSES, Need.TARGET_ROW, Need.GRAM, Need.NORMS}


def randomise(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


class MLP(nn.Module):
    """Linear layers (some without bias) and optional heads: ``gather`` applies every head to
    every row and picks each sample's own; ``subset`` applies each head to its rows only."""

    def __init__(
        self,
        sizes: Sequence[int],
        biases: Sequence[bool],
        heads: int = 0,
        head_mode: str = "gather",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b, bias in zip(sizes, sizes[1:], biases, strict=False)
        )
        self.heads = nn.ModuleList(nn.Linear(sizes[-1], 2) for _ in range(heads))
        self.head_mode = head_mode
        self.to(F64)
        randomise(self, seed)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x

    def losses(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, ids = batch
        h = self.features(x)
        if not len(self.heads):
            return ((h - y[:, : h.shape[1]]) ** 2).sum(1)
        if self.head_mode == "gather":
            outs = torch.stack([head(h) for head in self.heads])  # [H, N, 2]
            out = outs[ids % len(self.heads), torch.arange(len(ids), device=ids.device)]
            return ((out - y[:, :2]) ** 2).sum(1)
        losses = torch.zeros(x.shape[0], dtype=h.dtype, device=h.device)
        for k, head in enumerate(self.heads):
            rows = (ids % len(self.heads) == k).nonzero().squeeze(1)
            if len(rows):
                part = ((head(h[rows]) - y[rows, :2]) ** 2).sum(1)
                losses = losses.index_put((rows,), part)
        return losses


def mlp_batch(n: int, dim: int, ids: Sequence[int], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, dim, generator=gen, dtype=F64)
    y = torch.randn(n, 32, generator=gen, dtype=F64)
    return x, y, torch.tensor(list(ids), dtype=torch.int64)


@dataclass(frozen=True)
class ConvSpec:
    dims: int  # 1 or 2
    channels: int
    out: int
    kernel: int
    stride: int
    padding: int | str
    padding_mode: str
    dilation: int
    groups: int
    bias: bool
    norm: str  # "none", "group", "batch-eval", "layer"
    size: int  # spatial size of the input


class CNN(nn.Module):
    """A convolution, an optional normalisation, another 1×1 convolution, a linear read-out."""

    def __init__(self, spec: ConvSpec, seed: int = 0) -> None:
        super().__init__()
        conv = nn.Conv1d if spec.dims == 1 else nn.Conv2d
        self.spec = spec
        self.conv = conv(
            spec.channels,
            spec.out,
            spec.kernel,
            stride=spec.stride,
            padding=spec.padding,
            padding_mode=spec.padding_mode,
            dilation=spec.dilation,
            groups=spec.groups,
            bias=spec.bias,
        )
        self.norm: nn.Module
        if spec.norm == "group":
            self.norm = nn.GroupNorm(spec.groups, spec.out)
        elif spec.norm == "batch-eval":
            self.norm = (nn.BatchNorm1d if spec.dims == 1 else nn.BatchNorm2d)(spec.out).eval()
        else:
            self.norm = nn.Identity()
        self.mix = conv(spec.out, 3, 1)
        self.to(F64)
        randomise(self, seed)
        if spec.norm == "batch-eval":
            assert isinstance(self.norm, nn.modules.batchnorm._BatchNorm)
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            x = torch.zeros(1, spec.channels, *([spec.size] * spec.dims), dtype=F64)
            width = self.trunk(x).numel()
        self.out = nn.Linear(width, 2).to(F64)
        randomise(self.out, seed + 7)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(torch.tanh(self.norm(self.conv(x))))).flatten(1)

    def losses(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, _ = batch
        return ((self.out(self.trunk(x)) - y) ** 2).sum(1)


def cnn_batch(spec: ConvSpec, ids: Sequence[int], seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + 2)
    n = len(ids)
    x = torch.randn(n, spec.channels, *([spec.size] * spec.dims), generator=gen, dtype=F64)
    y = torch.randn(n, 2, generator=gen, dtype=F64)
    return x, y, torch.tensor(list(ids), dtype=torch.int64)


class Encoder(nn.Module):
    """Embeddings (with a raw positional parameter), self-attention, layer norms, a feed-forward
    layer on [N, T, d] and a read-out of the mean token."""

    def __init__(self, vocab: int, dim: int, heads: int, batch_first: bool, seed: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(16, dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 2)
        self.batch_first = batch_first
        self.to(F64)
        randomise(self, seed)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        q = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.attention(q, q, q, key_padding_mask=padding, need_weights=False)
        a = a if self.batch_first else a.transpose(0, 1)
        h = self.norm1(h + a)
        h = self.norm2(h + torch.relu(self.ff(h)))
        return self.out(h.mean(1))

    def losses(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens, padding, y, _ = batch
        return ((self(tokens, padding) - y) ** 2).sum(1)


def encoder_batch(
    vocab: int, length: int, ids: Sequence[int], seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + 3)
    n = len(ids)
    tokens = torch.randint(0, vocab, (n, length), generator=gen)
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[:, length - 1] = torch.rand(n, generator=gen) < 0.5  # some keys masked
    y = torch.randn(n, 2, generator=gen, dtype=F64)
    return tokens, padding, y, torch.tensor(list(ids), dtype=torch.int64)


# --------------------------------------------------------------------------- comparison


@dataclass
class Outcome:
    alpha: torch.Tensor
    statistics: Statistics
    grads: list[torch.Tensor | None]


def run(
    model: nn.Module,
    losses: Callable[[nn.Module], torch.Tensor],
    ids: torch.Tensor,
    num: int,
    mode: str,
    *,
    weights: Sequence[float] | None = None,
    shared: Callable[[nn.Module], Iterable[torch.Tensor]] | None = None,
    steps: int = 1,
    extra: Iterable[Need] = ALL,
) -> Outcome:
    """One Engine step (or several, accumulating) of ``mode`` on ``model``; ``extra``: the
    statistics measured."""
    weights = list(weights) if weights is not None else [1.0 + 0.5 * k for k in range(num)]
    engine = Engine(
        model,
        strategy=strategies.fixed(weights),
        num_sources=num,
        shared=None if shared is None else shared(model),
        mode=mode,
        extra_needs=extra,
    )
    alpha = torch.zeros(num, dtype=F64)
    for _ in range(steps):
        alpha = engine.backward(losses(model), ids)
    engine.close()
    assert engine.last_statistics is not None
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    return Outcome(alpha, engine.last_statistics, grads)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (absolute where b is all zeros)."""
    a, b = a.detach().to(F64), b.detach().to(F64)
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_matches(got: Outcome, want: Outcome, tol: float) -> None:
    """Statistics and every parameter's ``.grad`` within ``tol`` relative error."""
    assert torch.equal(got.alpha, want.alpha)
    for name in ("losses", "target_row", "gram", "norms"):
        a, b = getattr(got.statistics, name), getattr(want.statistics, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert relative_error(a, b) <= tol, (name, a, b)
    assert torch.equal(got.statistics.present, want.statistics.present)
    for i, (a, b) in enumerate(zip(got.grads, want.grads, strict=True)):
        if b is None or a is None:
            zero = a if b is None else b
            assert zero is None or bool((zero == 0).all()), i
            continue
        assert relative_error(a, b) <= tol, (i, a, b)


def compare(
    make: Callable[[], nn.Module],
    losses: Callable[[nn.Module], torch.Tensor],
    ids: torch.Tensor,
    num: int,
    mode: str = "ghost",
    tol: float = 1e-5,
    **kwargs: object,
) -> tuple[Outcome, Outcome]:
    """Run ``mode`` and ``exact`` on two copies of the same model; assert they agree."""
    model = make()
    reference = copy.deepcopy(model)
    got = run(model, losses, ids, num, mode, **kwargs)  # type: ignore[arg-type]
    want = run(reference, losses, ids, num, "exact", **kwargs)  # type: ignore[arg-type]
    assert_matches(got, want, tol)
    return got, want
