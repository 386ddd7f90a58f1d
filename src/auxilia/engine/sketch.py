"""``sketch`` mode: per-sample gradients projected to ``dim`` coordinates, for sample-level use.

The same hooks and single backward as ``ghost`` (:mod:`auxilia.engine.capture`) give every
layer's inputs A and output gradients B. Each shared parameter, seen as a matrix
W ∈ R^{R×C} (``shape[0]`` × the rest), gets d_p of the ``dim`` coordinates and a
Kronecker-structured projection P_r ⊗ P_c with P_r ∈ R^{r×R}, P_c ∈ R^{c×C}, r·c ≥ d_p: the
projected per-sample gradient of a linear layer is Σ_t (P_r b_t) ⊗ (P_c a_t), so the full
per-sample gradient (N × P numbers) is never formed — only N×T×(r + c) and N×r×c. Embeddings
gather columns of P_r. 1-D parameters (biases, norm affines) use a plain projection of their
materialised per-sample gradients, as does the ``torch.func`` fallback (which does form its
module's per-sample gradients).

Budget. d_p ∝ √P (water-filled: a parameter with P ≤ its share is kept whole, by the
identity), at least one coordinate each, Σ d_p = min(dim, Σ P); ``dim`` must be at least the
number of shared parameter tensors. With ``dim ≥ Σ P`` every projection is the identity and the
statistics equal ``exact``'s.

Projections. The factors are random orthonormal rows scaled by √(R/r) (Haar: QR of a Gaussian
matrix with sign correction), so E[PᵀP] = I and, the coordinates being exchangeable, keeping
d_p of the r·c Kronecker coordinates scaled by √(r·c/d_p) stays unbiased: every statistic
(target row, Gram, norms²) is an unbiased estimate of the exact one; norms are the square root
of the estimated squared norms. They are drawn on the CPU in float64 from ``torch.Generator``
seeded by (seed, parameter index, side), so they depend only on the seed and the shapes of the
shared parameters: reproducible across runs and processes.

The measurement exposes ``features`` [N, dim]: the projected gradient of each sample's own
loss ℓ_i (not divided by its source's count), ``ids`` [N], and exact ``.grad``/``dots`` like
``ghost`` (only the statistics are estimated). Every shared layer must see the samples along
its batch dimension (no per-source path: a head applied to a subset of rows is refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.engine.capture import Capture, Step, Verifier, losses_statistic, statistics
from auxilia.engine.factors import F64, Projection
from auxilia.engine.ghost import GhostMeasurement
from auxilia.engine.mode import Mode, ModeContext, Runner
from auxilia.engine.source_losses import SourceLosses
from auxilia.errors import EngineError
from auxilia.statistics import Need

DEFAULT_DIM = 512
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def allocate(sizes: Sequence[int], dim: int) -> list[int]:
    """Coordinates per parameter: ∝ √size, capped at size, ≥ 1, summing to min(dim, Σ size)."""
    total = sum(sizes)
    if dim >= total:
        return list(sizes)
    if dim < len(sizes):
        raise EngineError(
            f"sketch dim {dim} is smaller than the number of shared parameter tensors "
            f"({len(sizes)}): every tensor needs at least one coordinate"
        )
    share = [0.0] * len(sizes)
    capped: set[int] = set()
    remaining = float(dim)
    while True:
        active = [i for i in range(len(sizes)) if i not in capped]
        lam = remaining / sum(math.sqrt(sizes[i]) for i in active)
        full = [i for i in active if lam * math.sqrt(sizes[i]) >= sizes[i]]
        if not full:
            break
        for i in full:
            share[i] = float(sizes[i])
            capped.add(i)
            remaining -= sizes[i]
    for i in active:
        share[i] = lam * math.sqrt(sizes[i])
    out = [min(sizes[i], max(1, math.floor(s))) for i, s in enumerate(share)]
    order = sorted(active, key=lambda i: share[i] - math.floor(share[i]), reverse=True)
    while sum(out) < dim:
        grew = False
        for i in order:
            if sum(out) < dim and out[i] < sizes[i]:
                out[i] += 1
                grew = True
        if not grew:
            break
    while sum(out) > dim:
        i = max(active, key=lambda j: out[j])
        out[i] -= 1
    return out


def _generator(seed: int, index: int, side: int) -> torch.Generator:
    value = (seed * _MIX[0] + (index + 1) * _MIX[1] + (side + 1) * _MIX[2]) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def orthonormal_rows(rows: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, size] Haar-random orthonormal rows scaled by √(size/rows): E[PᵀP] = I."""
    gaussian = torch.randn(size, rows, generator=generator, dtype=F64)
    q: torch.Tensor
    r: torch.Tensor
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)
    return q.T.contiguous() * math.sqrt(size / rows)


def projection_for(shape: torch.Size, dim: int, seed: int, index: int) -> Projection:
    """The seeded projection of a parameter of ``shape`` to ``dim`` coordinates (float64, CPU)."""
    numel = math.prod(shape)
    if dim >= numel:
        return Projection(dim=numel, identity=True)
    if len(shape) < 2:
        dense = orthonormal_rows(dim, numel, _generator(seed, index, 0))
        return Projection(dim=dim, dense=dense)
    height, width = shape[0], numel // shape[0]
    r = min(height, max(1, math.ceil(math.sqrt(dim * height / width))))
    c = min(width, math.ceil(dim / r))
    if r * c < dim:
        r = min(height, math.ceil(dim / c))
    exact_fit = r * c == dim  # otherwise coordinates are subsampled: both sides must be random
    rows = (
        None
        if exact_fit and r == height
        else orthonormal_rows(r, height, _generator(seed, index, 1))
    )
    cols = (
        None if exact_fit and c == width else orthonormal_rows(c, width, _generator(seed, index, 2))
    )
    return Projection(dim=dim, rows=rows, cols=cols, scale=math.sqrt(r * c / dim))


@dataclass
class SketchMeasurement(GhostMeasurement):
    """Estimated statistics, projected per-sample gradients, exact ``.grad`` (as ``ghost``)."""

    features: torch.Tensor  # [N, dim]: projected gradient of each sample's own loss
    ids: torch.Tensor  # [N]: the source of each sample


class SketchRunner:
    """The ``sketch`` mode, started: hooks, and the per-parameter budget of coordinates."""

    def __init__(
        self, context: ModeContext, *, dim: int = DEFAULT_DIM, seed: int = 0, verify: bool = True
    ) -> None:
        if dim < 1:
            raise EngineError(f"sketch dim must be >= 1, got {dim}")
        self.capture = Capture(context, "sketch")
        self.verifier = Verifier(self.capture, context, verify)
        self.seed = seed
        shared = self.capture.shared
        self.dims = allocate([p.numel() for p in shared], dim)
        self.offsets = [sum(self.dims[:i]) for i in range(len(self.dims))]
        self.dim = sum(self.dims)
        self.index = {id(p): i for i, p in enumerate(shared)}
        self._cpu: dict[int, Projection] = {}
        self._placed: dict[tuple[int, torch.dtype, torch.device], Projection] = {}

    def projection(self, index: int, dtype: torch.dtype, device: torch.device) -> Projection:
        """Parameter ``index``'s projection in ``dtype`` on ``device`` (drawn once, cached)."""
        key = (index, dtype, device)
        if key not in self._placed:
            if index not in self._cpu:
                shape = self.capture.shared[index].shape
                self._cpu[index] = projection_for(shape, self.dims[index], self.seed, index)
            self._placed[key] = self._cpu[index].to(dtype, device)
        return self._placed[key]

    def features(self, step: Step) -> torch.Tensor:
        """[N, dim] projected per-sample gradients (each carrying 1/n_k, like the factors)."""
        if step.per_source_units:
            raise EngineError(
                f"engine mode 'sketch' needs per-sample gradients, but module "
                f"{step.per_source_units[0]} did not see the step's {step.n} samples along its "
                "batch dimension (e.g. a head applied to a subset of rows). Make it a "
                "non-shared parameter (shared=...) or use mode='ghost'"
            )
        dtypes = {p.dtype for p in self.capture.shared}
        dtype = F64 if dtypes == {F64} else torch.float32
        out = torch.zeros(step.n, self.dim, dtype=dtype, device=step.device)
        for params, _, factor in step.entries:
            indices = [self.index[id(p)] for p in params]
            projections = [self.projection(i, factor.dtype, step.device) for i in indices]
            for i, block in zip(indices, factor.project(projections), strict=True):
                out[:, self.offsets[i] : self.offsets[i] + self.dims[i]] += block.to(dtype)
        return out

    def measure(self, batch: SourceLosses, needs: frozenset[Need]) -> SketchMeasurement:
        self.capture.check(int(batch.losses.shape[0]), int(batch.present.sum()))
        reference = self.verifier.reference(batch)
        step = self.capture.collect(batch)
        if reference is not None:
            self.verifier.check(step.gram(), reference)
        features = self.features(step)
        sources = torch.zeros(step.width, self.dim, dtype=F64, device=step.device)
        sources.index_add_(0, step.column, features.to(F64))
        gram = (sources @ sources.T).cpu()
        losses = losses_statistic(batch) if Need.LOSSES in needs else None
        stats = statistics(batch.present, gram, losses, needs)
        own = features * step.counts.to(features.dtype).unsqueeze(1)
        return SketchMeasurement(stats, step, own, batch.ids)

    def close(self) -> None:
        """Remove the hooks and drop recorded calls."""
        self.capture.close()


def sketch(dim: int = DEFAULT_DIM, *, seed: int = 0, verify: bool = True) -> Mode:
    """The ``sketch`` mode projecting per-sample gradients to ``dim`` coordinates with ``seed``."""

    def start(context: ModeContext) -> Runner:
        return SketchRunner(context, dim=dim, seed=seed, verify=verify)

    return Mode(
        name="sketch",
        summary=f"per-sample gradients projected to {dim} coordinates (seed {seed}); "
        "unbiased estimates of the statistics, exact .grad",
        layouts=frozenset({"partitioned"}),
        provides=frozenset(Need),
        start=start,
        requires_module=True,
    )


SKETCH = sketch()
