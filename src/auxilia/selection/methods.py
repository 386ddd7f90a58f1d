"""Scoring methods: how much each auxiliary sample is expected to help the target.

Each method is built by name with keyword parameters (:func:`get`), prepared once on the
:class:`Context` (the warm-up model, its checkpoints, the target's labels) and then scores the
pool one batch at a time, returning the score (higher = select first) and the parts of it. A
method never holds more than one batch of the pool.

| name | rule |
|---|---|
| ``gradient`` | LESS / TracIn: Σ_c lr_c · cos(Γ_c(x), ĝ_c), sketched per-sample gradients |
| ``color-filter`` | CoLoR-Filter: loss under a pool-trained prior − after tuning it on the target |
| ``tawt`` | TAWT at the sample level: log ω, mirror descent on encoder-gradient cosines |
| ``embedding`` | cosine of the sample's representation with the target's mean representation |
| ``loss`` | the warm-up model's loss (``order``: lowest or highest first) |
| ``random`` | uniform random scores (seeded) |
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from auxilia.engine.mode import ModeContext
from auxilia.engine.sketch import SketchRunner, allocate, projection_for
from auxilia.engine.source_losses import split_by_source
from auxilia.errors import ConfigError, StrategyError
from auxilia.registry import build
from auxilia.selection.learner import Learner
from auxilia.selection.pools import Pool, PoolBatch
from auxilia.selection.warmup import Checkpoint, Group, warm_up

F64 = torch.float64
Scores = dict[str, torch.Tensor]


@dataclass
class Context:
    """What a method is prepared on."""

    learner: Learner  # the model at the end of the warm-up
    checkpoints: list[Checkpoint]
    target: Group  # the target's training samples, through its head
    heads: dict[str, str]  # pool name -> the head its samples go through
    warm_groups: list[Group]  # the pools' warm-up subsets
    make_learner: Callable[[], Learner]  # a freshly initialised model (same seed every call)
    device: torch.device
    batch_size: int
    lr: float
    seed: int
    pool_index: dict[str, int] = field(default_factory=dict)
    target_kind: str = "classification"  # the target's kind: "classification", "regression", ...


class Method:
    """Base of the scoring methods: ``prepare`` once, ``score`` per batch, ``close`` at the end."""

    name = ""
    needs_warmup = True

    def __init__(self, **params: Any) -> None:
        self.params = params

    def check(self, checkpoints: int) -> None:
        """Raise a :class:`~auxilia.errors.ConfigError` if the parameters cannot work with
        ``checkpoints`` warm-up checkpoints: called before the warm-up, so a bad config fails
        at once. Default: nothing to check."""

    def prepare(self, context: Context) -> None:
        self.context = context

    def start_pool(self, pool: Pool) -> None:
        """Called before the first batch of ``pool``."""

    def rows_per_batch(self, batch_size: int) -> int:
        """How many pool rows each :meth:`score` call takes, for model passes of ``batch_size``
        rows (default: the same)."""
        return batch_size

    def passes(self) -> int:
        """Model passes scoring makes per sample (after :meth:`prepare`): one forward and one
        backward per checkpoint that measures it for the gradient methods; 1 otherwise."""
        return 1

    def score(self, pool: Pool, batch: PoolBatch) -> Scores:
        raise NotImplementedError

    def end_pool(self, pool: Pool) -> None:
        """Called after the last batch of ``pool``."""

    def tally(self) -> dict[str, torch.Tensor]:
        """Sums over this process's batches that ``finish`` needs; :func:`select` adds them up
        across ``torchrun`` processes and hands the total to :meth:`absorb`. Default: none."""
        return {}

    def absorb(self, total: Mapping[str, torch.Tensor]) -> None:
        """Take the tallies of every process, added up (called before :meth:`finish`)."""

    def finish(self, scores: Scores) -> Scores:
        """Adjust the whole pool's scores once all are known (e.g. normalise); default: none.

        A ``source_score`` column, where a method returns one, orders the ranking before
        ``score`` does (sources first, then the samples within each)."""
        return scores

    def close(self) -> None:
        """Release hooks and models."""


def _cosine_matrix(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, J]: cos(features_i, targets_j) in float64; 0 where either vector is exactly zero."""
    f, t = features.to(F64), targets.to(F64).to(features.device)
    denominator = torch.linalg.vector_norm(f, dim=1, keepdim=True) * torch.linalg.vector_norm(
        t, dim=1
    )
    dots = f @ t.T
    return torch.where(
        denominator > 0, dots / denominator.clamp_min(1e-300), torch.zeros_like(dots)
    )


class _Features:
    """Projected per-sample gradients of one model on a set of parameters.

    Plain gradients come from the engine's ``sketch`` mode (hooks, one backward, Kronecker
    projections: the per-sample gradient is never formed). With ``moments`` (LESS's Adam
    preconditioning) the per-sample gradients are materialised by ``torch.func``, turned into
    Adam's update direction and projected with the same kind of seeded projections.
    ``verify``: before the first batch through each head, check the sketch's hooks against
    ``exact`` on the first ``CHECKED`` samples (a mismatch is an error naming the module); the
    scoring runner itself does not check, since its checks cost an N×N kernel per batch shape.
    """

    CHECKED = 32

    def __init__(
        self,
        learner: Learner,
        params: list[nn.Parameter],
        dim: int,
        seed: int,
        moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
        verify: bool = True,
    ) -> None:
        self.learner = learner
        self.params = params
        self.moments = moments
        module = learner.module
        self.verify, self.checked = verify, set[str]()
        if moments is None:
            every = [p for p in module.parameters() if p.requires_grad]
            self.mode_context = ModeContext(
                module, list(every), list[torch.Tensor](params), "partitioned"
            )
            self.dim, self.seed = dim, seed
            self.runner: SketchRunner | None = SketchRunner(
                self.mode_context, dim=dim, seed=seed, verify=False
            )
        else:
            self.runner = None
            names = {id(p): n for n, p in module.named_parameters()}
            self.names = [names[id(p)] for p in params]
            dims = allocate([p.numel() for p in params], dim)
            self.projections = [
                projection_for(p.shape, d, seed, i)
                for i, (p, d) in enumerate(zip(params, dims, strict=True))
            ]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, head: str, adam: bool) -> torch.Tensor:
        """[N, d] projected gradients of each sample's own loss (Adam-transformed if ``adam``)."""
        if self.runner is not None:
            if self.verify and head not in self.checked:
                self._check(x[: self.CHECKED], y[: self.CHECKED], head)
            losses = self.learner.losses(x, y, head)
            ids = torch.zeros(len(losses), dtype=torch.int64, device=losses.device)
            measurement = self.runner.measure(split_by_source(losses, ids, 1), frozenset())
            return measurement.features.detach()
        return self._materialised(x, y, head, adam)

    def _check(self, x: torch.Tensor, y: torch.Tensor, head: str) -> None:
        """Measure a few samples with a checking runner (its hooks replace the scoring one's)."""
        assert self.runner is not None
        self.runner.close()
        checking = SketchRunner(self.mode_context, dim=self.dim, seed=self.seed, verify=True)
        try:
            losses = self.learner.losses(x, y, head)
            ids = torch.zeros(len(losses), dtype=torch.int64, device=losses.device)
            checking.measure(split_by_source(losses, ids, 1), frozenset())
        finally:
            checking.close()
        self.checked.add(head)
        self.runner = SketchRunner(self.mode_context, dim=self.dim, seed=self.seed, verify=False)

    def _materialised(
        self, x: torch.Tensor, y: torch.Tensor, head: str, adam: bool
    ) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        wrapper = _LossOf(self.learner, head)
        fixed = {f"inner.{n}": p.detach() for n, p in self.learner.module.named_parameters()}
        fixed.update({f"inner.{n}": b for n, b in self.learner.module.named_buffers()})
        chosen = {f"inner.{n}": fixed[f"inner.{n}"] for n in self.names}

        def one(
            values: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
        ) -> torch.Tensor:
            out: torch.Tensor = functional_call(
                wrapper, {**fixed, **values}, (xi.unsqueeze(0), yi.unsqueeze(0))
            )
            return out.sum()

        with warnings.catch_warnings():  # vmap over CPU attention kernels says it falls back
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = vmap(grad(one), in_dims=(None, 0, 0))(chosen, x, y)
        parts = []
        for name, projection in zip(self.names, self.projections, strict=True):
            g = grads[f"inner.{name}"].detach()
            if adam and self.moments is not None and name in self.moments:
                m, v = (t.to(g.device, g.dtype) for t in self.moments[name])
                beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as in LESS
                g = (beta1 * m + (1 - beta1) * g) / torch.sqrt(beta2 * v + (1 - beta2) * g**2 + eps)
            parts.append(projection.to(g.dtype, g.device).vector(g))
        return torch.cat(parts, dim=1)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


class _LossOf(nn.Module):
    """The learner's per-sample losses through ``head`` as one module (for ``torch.func``)."""

    def __init__(self, learner: Learner, head: str) -> None:
        super().__init__()
        self.inner = learner.module
        self.learner = [learner]  # a list: not registered as a submodule a second time
        self.head = head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.learner[0].losses(x, y, self.head)


class _CheckpointCosines(Method):
    """cos(per-sample gradient, target gradient) at every warm-up checkpoint."""

    encoder_only = False
    contrast = False  # compare with the target's gradient minus the pool's (gradient only)

    def __init__(
        self, dim: int = 512, adam: bool = False, subtasks: str = "none", **params: Any
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if subtasks not in ("auto", "classes", "none"):
            raise ValueError(f"subtasks must be 'auto', 'classes' or 'none', got {subtasks!r}")
        super().__init__(dim=dim, adam=adam, **params)
        self.dim, self.adam, self.subtasks = dim, adam, subtasks
        self.models: list[Learner] = []
        self.open: list[_Features] = []
        self.targets: list[torch.Tensor] = []  # per checkpoint: [J, d], one row per subtask
        self.labels: list[int] = []  # the target class of each subtask (J = 1: none)
        self.verified: set[str] = set()  # heads whose hooks were checked against exact
        self.target_means: dict[str, list[torch.Tensor]] = {}  # per head, per checkpoint
        self.target_overall: dict[str, list[torch.Tensor]] = {}  # [1, d]: over every class

    def prepare(self, context: Context) -> None:
        super().prepare(context)
        if not context.checkpoints:
            raise ConfigError(f"selection method '{self.name}' needs warm-up checkpoints")
        self.models = [context.learner.clone(c.state) for c in context.checkpoints]
        for model in self.models:
            model.module.to(context.device).eval()
        classification = context.target_kind == "classification"
        if self.subtasks == "classes" and not classification:
            raise ConfigError(
                f"selection method '{self.name}': subtasks 'classes' needs a classification "
                f"target, not {context.target_kind}"
            )
        by_class = self.subtasks == "classes" or (self.subtasks == "auto" and classification)
        self.labels = sorted({int(v) for v in context.target.y.tolist()}) if by_class else []

    def start_pool(self, pool: Pool) -> None:
        ctx = self.context
        head = ctx.heads[pool.name]
        self.open = []
        for model, checkpoint in zip(self.models, ctx.checkpoints, strict=True):
            params = model.compared(head, encoder_only=self.encoder_only)
            moments = checkpoint.moments if self.adam else None
            verify = head not in self.verified  # the first checkpoint's runner checks
            self.verified.add(head)
            self.open.append(_Features(model, params, self.dim, ctx.seed, moments, verify))
        if head not in self.target_means:  # pools through the same head share them
            pairs = [self._target_means(f) for f in self.open]
            means = [m for m, _ in pairs]
            overall = [(m * n.unsqueeze(1)).sum(0, keepdim=True) / n.sum() for m, n in pairs]
            if self.contrast:
                pool_means = [self._pool_mean(f, head) for f in self.open]
                means = [m - p for m, p in zip(means, pool_means, strict=True)]
                overall = [o - p for o, p in zip(overall, pool_means, strict=True)]
            self.target_means[head] = means
            self.target_overall[head] = overall
        self.targets = self.target_means[head]

    def _target_means(self, features: _Features) -> tuple[torch.Tensor, torch.Tensor]:
        """[J, d]: the target's mean projected gradient, per class (J classes) or over all;
        and [J]: how many target samples each row averages."""
        ctx, t = self.context, self.context.target
        rows = max(1, len(self.labels))
        index = {label: j for j, label in enumerate(self.labels)}
        total = torch.zeros(rows, 0, dtype=F64)
        count = torch.zeros(rows, dtype=F64)
        for start in range(0, len(t.y), ctx.batch_size):
            x = t.x[start : start + ctx.batch_size].to(ctx.device)
            y = t.y[start : start + ctx.batch_size].to(ctx.device)
            f = features(x, y, t.head, adam=False).to(F64).cpu()  # LESS: a plain target side
            j = (
                torch.tensor([index[int(v)] for v in y.tolist()])
                if self.labels
                else torch.zeros(len(y), dtype=torch.int64)
            )
            if total.shape[1] == 0:
                total = torch.zeros(rows, f.shape[1], dtype=F64)
            total.index_add_(0, j, f)
            count.index_add_(0, j, torch.ones(len(y), dtype=F64))
        return total / count.clamp_min(1.0).unsqueeze(1), count

    def _pool_mean(self, features: _Features, head: str) -> torch.Tensor:
        """[1, d]: the mean projected gradient of the pools' warm-up samples through ``head``."""
        ctx = self.context
        groups = [g for g in ctx.warm_groups if g.head == head and len(g.y)]
        if not groups:
            raise ConfigError(
                f"selection method '{self.name}' with contrast needs warm-up samples of the "
                f"pools through head '{head}' (select.warmup_samples > 0)"
            )
        total: torch.Tensor | None = None
        count = 0
        for group in groups:
            for start in range(0, len(group.y), ctx.batch_size):
                x = group.x[start : start + ctx.batch_size].to(ctx.device)
                y = group.y[start : start + ctx.batch_size].to(ctx.device)
                f = features(x, y, head, adam=False).to(F64).cpu().sum(0)
                total = f if total is None else total + f
                count += len(y)
        assert total is not None
        return (total / count).unsqueeze(0)

    def cosines(self, pool: Pool, batch: PoolBatch, at: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, J]: the cosine at each checkpoint with each subtask's target gradient; with
        ``at`` ([N, m] checkpoint indices) only where a row's ``at`` names the checkpoint, NaN
        elsewhere (a checkpoint's model sees only its rows)."""
        ctx = self.context
        head = ctx.heads[pool.name]
        x, y = batch.x.to(ctx.device), batch.y.to(ctx.device)
        out = torch.full((len(y), len(self.open), self.targets[0].shape[0]), math.nan, dtype=F64)
        seen: dict[int, torch.Tensor] = {}
        for c, (features, target) in enumerate(zip(self.open, self.targets, strict=True)):
            rows = torch.arange(len(y)) if at is None else (at == c).any(dim=1).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            on_device = rows.to(x.device)
            f = features(x[on_device], y[on_device], head, adam=self.adam)
            seen[c] = f
            out[rows, c] = _cosine_matrix(f, target).cpu()
        self.observe(pool, seen)
        return out

    def observe(self, pool: Pool, features: Mapping[int, torch.Tensor]) -> None:
        """Sees each checkpoint's [n, d] projected gradients of the batch rows it measured,
        by checkpoint index (a checkpoint that measured no row is left out); default: nothing."""

    def passes(self) -> int:
        return len(self.context.checkpoints)

    def end_pool(self, pool: Pool) -> None:
        self._close_features()

    def close(self) -> None:
        self._close_features()
        self.models = []

    def _close_features(self) -> None:
        for features in self.open:
            features.close()
        self.open = []

    def parts(self, cosines: torch.Tensor) -> Scores:
        return {f"cos_step{c.step}": cosines[:, i] for i, c in enumerate(self.context.checkpoints)}


class GradientMethod(_CheckpointCosines):
    """``gradient``: LESS (Xia et al., 2024, "LESS: Selecting Influential Data for Targeted
    Instruction Tuning") with TracIn's checkpoint sum (Pruthi et al., 2020).

    score(x) = Σ_c lr_c · cos(Γ_c(x), ĝ_c), over the warm-up checkpoints c, where ĝ_c is the
    target's mean gradient and Γ_c(x) the sample's gradient, both projected to ``dim``
    coordinates by seeded random projections (the engine's ``sketch`` mode: Kronecker-structured,
    so per-sample gradients are never formed), on the parameters the sample and the target share
    (the trunk, and the target's head for pools that use it). ``adam=True`` uses LESS's Adam
    preconditioning: Γ = m'/√(v' + ε) with m' = β₁m + (1−β₁)g, v' = β₂v + (1−β₂)g² from the
    checkpoint's Adam moments (the per-sample gradients are then materialised, which costs
    memory and time; the target side stays a plain gradient, as in LESS). Cosines, not inner
    products: LESS found that inner products prefer short sequences (small-norm gradients).

    Subtasks, as in LESS (which scores against each validation subtask and keeps the maximum):
    score(x) = max_j Σ_c lr_c · cos(Γ_c(x), ĝ_c^j). ``subtasks: auto`` (the default) takes the
    target's classes as subtasks for a classification target (ĝ^j: the mean gradient of the
    target's samples of class j; the column ``subtask`` names the class chosen) and the whole
    target otherwise; ``none`` compares with the mean over all target samples. Against that one
    mean, the samples that align best are those of the class the model fits worst (its
    gradient dominates the mean), so a top-k collapses onto one class.

    Sources first (``by_source=True``, the default): the pools are ranked by their
    ``source_score`` Σ_c lr_c · cos(Γ̄_c, ĝ_c), the cosine of the pool's mean projected
    gradient Γ̄_c with the target's mean gradient over all its samples (the dataset-level
    gradient similarity auxilia's training strategies gate on), and the samples within each
    pool by their own score. A pool's mean gradient says how a random draw from it moves the
    target, and its noise averages out over the pool; a sample's own score, read alone, is
    noisier and biased: the correctly labelled rows of a mostly mislabelled, or merely
    related, source align with the target as well as any row, but a selection of them is not
    a sample of the target's distribution (it keeps the inputs where the source's rule agrees
    with the target's, and drops those near the target's decision boundary, where the rules
    differ), and against the best of the target's classes its mislabelled rows look aligned
    too. auxilia's training strategies weigh whole sources for the same reason. The price: a
    better pool's worst samples come before a worse pool's best. With a single pool the order
    is LESS's; ``by_source=False`` ranks the samples alone across pools, as LESS does.

    ``contrast=True`` compares with ĝ_c^j − ḡ_c instead, ḡ_c the mean gradient of the pools'
    warm-up samples through the same head: what the target asks beyond what the pool as a
    whole already teaches. It is the first-order form of CoLoR-Filter's conditional loss
    reduction (fine-tuning on the target moves the parameters along −ĝ relative to a model of
    the pool), and it removes the direction every sample shares, e.g. spelling for a
    language model trained from scratch. Not LESS's rule, so off by default.

    One checkpoint per sample (``checkpoints_per_sample: 1``, the default): each checkpoint
    costs a forward and a backward pass per sample, so the full sum over C checkpoints scores
    at most 1.5/C of a plain training pass's throughput. Instead every sample is measured at m
    of the C checkpoints (:func:`spread`: seeded, every checkpoint gets m/C of each pool, in
    every block of C consecutive rows), and its sum is estimated as (C/m) Σ_{c ∈ at(x)} lr_c
    (cos_c(x) − μ_c) + Σ_c lr_c μ_c, μ_c the mean cosine of its pool's rows at c: unbiased
    over the draw, and the pool's mean cosines and mean gradients (``source_score``) still
    average all C checkpoints, each over m/C of the pool. The cost is noise in the samples'
    own scores, which decide the ranking most where one pool mixes what helps with what does
    not (docs/select.md). ``0`` (or C) measures every sample at every checkpoint: the sum
    itself, as LESS and TracIn compute it, at C times the cost. The ``cos_step`` columns are
    NaN where a sample was not measured.
    """

    name = "gradient"

    def __init__(
        self,
        dim: int = 512,
        adam: bool = False,
        subtasks: str = "auto",
        contrast: bool = False,
        by_source: bool = True,
        checkpoints_per_sample: int = 1,
    ) -> None:
        if checkpoints_per_sample < 0:
            raise ValueError(
                f"checkpoints_per_sample must be >= 0 (0: every checkpoint), "
                f"got {checkpoints_per_sample}"
            )
        super().__init__(
            dim=dim,
            adam=adam,
            subtasks=subtasks,
            contrast=contrast,
            by_source=by_source,
            checkpoints_per_sample=checkpoints_per_sample,
        )
        self.contrast, self.by_source = contrast, by_source
        self.requested = checkpoints_per_sample
        self.each = checkpoints_per_sample  # as used: 0 where it asks for every checkpoint
        self.sums: dict[int, torch.Tensor] = {}  # pool -> [C, d]: Σ of its projected gradients
        self.counts: dict[int, torch.Tensor] = {}  # pool -> [C]: rows measured at each
        self.cosine_sums: dict[int, torch.Tensor] = {}  # pool -> [C, J]: Σ of its rows' cosines
        self.source_scores: dict[int, float] = {}
        self.cosine_means: dict[int, torch.Tensor] = {}  # pool -> [C, J]

    def check(self, checkpoints: int) -> None:
        if self.requested > checkpoints:
            raise ConfigError(
                f"selection method 'gradient': checkpoints_per_sample {self.requested} exceeds the "
                f"{checkpoints} warm-up checkpoints (select.checkpoints); "
                "0 scores every sample at every checkpoint"
            )

    def prepare(self, context: Context) -> None:
        super().prepare(context)
        self.check(len(context.checkpoints))
        every = self.requested == len(context.checkpoints)
        self.each = 0 if every else self.requested  # every checkpoint: the sum, no estimate
        self.sums, self.counts, self.cosine_sums = {}, {}, {}
        self.source_scores, self.cosine_means = {}, {}

    def rows_per_batch(self, batch_size: int) -> int:
        """With one checkpoint per sample, each checkpoint's model sees m/C of a batch's rows:
        C/m times ``batch_size`` rows keep its passes at ``batch_size`` rows."""
        if not self.each:
            return batch_size
        return max(1, batch_size * len(self.context.checkpoints) // self.each)

    def passes(self) -> int:
        return self.each or len(self.context.checkpoints)

    def observe(self, pool: Pool, features: Mapping[int, torch.Tensor]) -> None:
        k = self.context.pool_index[pool.name]
        if k not in self.counts:
            self.counts[k] = torch.zeros(len(self.open), dtype=F64)
            if self.by_source:
                d = self.targets[0].shape[1]
                self.sums[k] = torch.zeros(len(self.open), d, dtype=F64)
        for c, f in features.items():
            self.counts[k][c] += len(f)
            if self.by_source:
                self.sums[k][c] += f.to(F64).sum(dim=0).cpu()

    def tally(self) -> dict[str, torch.Tensor]:
        out = {f"sum{k}": v for k, v in self.sums.items()}
        out.update({f"count{k}": v for k, v in self.counts.items()})
        out.update({f"cosines{k}": v for k, v in self.cosine_sums.items()})
        return out

    def absorb(self, total: Mapping[str, torch.Tensor]) -> None:
        """Each pool's ``source_score`` from its mean projected gradient over every process and,
        with one checkpoint per sample, its mean cosine at each checkpoint."""
        ctx = self.context
        lrs = torch.tensor([c.lr for c in ctx.checkpoints], dtype=F64)
        self.source_scores, self.cosine_means = {}, {}
        for name, k in ctx.pool_index.items():
            if f"sum{k}" in total:  # else no process scored a batch of this pool
                target = torch.cat(self.target_overall[ctx.heads[name]])  # [C, d]
                mean = total[f"sum{k}"] / total[f"count{k}"].clamp_min(1.0).unsqueeze(1)
                pairs = zip(mean, target, strict=True)
                cosines = torch.stack([_cosine_matrix(m[None], t[None])[0, 0] for m, t in pairs])
                self.source_scores[k] = float((lrs * cosines).sum())
            if f"cosines{k}" in total:
                rows = total[f"count{k}"].clamp_min(1.0).unsqueeze(1)
                self.cosine_means[k] = total[f"cosines{k}"] / rows

    def score(self, pool: Pool, batch: PoolBatch) -> Scores:
        ctx = self.context
        lrs = torch.tensor([c.lr for c in ctx.checkpoints], dtype=F64)
        if self.each:
            k = ctx.pool_index[pool.name]
            rows = torch.arange(batch.start, batch.start + len(batch.y))
            at = spread(rows, len(ctx.checkpoints), self.each, ctx.seed, k)  # [N, m]
            cosines = self.cosines(pool, batch, at)  # [N, C, J], NaN where not measured
            summed = cosines.nan_to_num().sum(0)  # [C, J]: over the rows measured at each
            self.cosine_sums[k] = self.cosine_sums[k] + summed if k in self.cosine_sums else summed
            own = cosines.gather(1, at[:, :, None].expand(-1, -1, cosines.shape[2]))  # [N, m, J]
            scale = len(ctx.checkpoints) / self.each
            per_subtask = scale * (own * lrs[at][:, :, None]).sum(dim=1)  # refined by finish
            best, _ = per_subtask.max(dim=1)
            return {"score": best, "_at": at, "_cosines": own}
        cosines = self.cosines(pool, batch)  # [N, C, J]
        per_subtask = torch.einsum("ncj,c->nj", cosines, lrs)
        best, chosen = per_subtask.max(dim=1)
        at_best = cosines.gather(2, chosen.view(-1, 1, 1).expand(-1, cosines.shape[1], 1))
        out = {"score": best, **self.parts(at_best[:, :, 0])}
        if self.labels:
            out["subtask"] = torch.tensor(self.labels, dtype=torch.int64)[chosen]
        return out

    def finish(self, scores: Scores) -> Scores:
        """With one checkpoint per sample: each sample's estimate of the checkpoint sum, with its
        pool's mean cosines (from :meth:`absorb`) as the control variate; with ``by_source``:
        each sample's ``source_score``, its pool's."""
        scores = dict(scores)
        if self.each and "_at" in scores:
            scores = self._estimate(scores)
        if not self.by_source or len(scores["score"]) == 0:
            return scores
        pools = int(scores["source"].max()) + 1
        table = torch.tensor([self.source_scores.get(k, 0.0) for k in range(pools)], dtype=F64)
        return {**scores, "source_score": table[scores["source"]]}

    def _estimate(self, scores: Scores) -> Scores:
        """Σ_c lr_c cos_c(x) estimated from the m checkpoints a sample was measured at:
        (C/m) Σ_{c ∈ at(x)} lr_c (cos_c(x) − μ_c) + Σ_c lr_c μ_c, μ_c the mean cosine of the
        sample's pool at checkpoint c. Unbiased over the random choice of checkpoints (each is
        drawn with probability m/C), and exact where the learning rate is constant (as in the
        warm-up) and a sample differs from its pool's mean by the same at every checkpoint:
        what is left to chance is how a sample's standing in its pool changes along the
        warm-up."""
        ctx = self.context
        checkpoints = len(ctx.checkpoints)
        lrs = torch.tensor([c.lr for c in ctx.checkpoints], dtype=F64)
        at, own = scores.pop("_at"), scores.pop("_cosines")  # [N, m], [N, m, J]
        source = scores["source"]
        pools = int(source.max()) + 1 if len(source) else 0
        unseen = torch.zeros(checkpoints, own.shape[2], dtype=F64)
        means = torch.stack(
            [self.cosine_means.get(k, unseen) for k in range(pools)] or [unseen]
        )  # [P, C, J]
        mu = means[source[:, None], at]  # [N, m, J]
        base = (means * lrs[None, :, None]).sum(dim=1)[source]  # [N, J]
        per_subtask = (checkpoints / self.each) * ((own - mu) * lrs[at][:, :, None]).sum(1) + base
        best, chosen = per_subtask.max(dim=1)
        scores["score"] = best
        at_best = own.gather(2, chosen.view(-1, 1, 1).expand(-1, own.shape[1], 1))[:, :, 0]
        for c, checkpoint in enumerate(ctx.checkpoints):
            column = torch.full((len(best),), math.nan, dtype=F64)
            hit = at == c  # [N, m]
            rows, slot = hit.nonzero(as_tuple=True)
            column[rows] = at_best[rows, slot]
            scores[f"cos_step{checkpoint.step}"] = column
        if self.labels:
            scores["subtask"] = torch.tensor(self.labels, dtype=torch.int64)[chosen]
        return scores


def spread(rows: torch.Tensor, checkpoints: int, each: int, seed: int, pool: int) -> torch.Tensor:
    """[N, each]: the checkpoints (indices) at which the pool ``rows`` are scored.

    Rows go in blocks of ``checkpoints`` consecutive rows; each block gets its own seeded random
    permutation π of the checkpoints, and the block's row p the checkpoints π[p], π[p+1], …,
    π[p+each−1] (mod C). So every checkpoint scores ``each`` rows of each full block: a pool is
    spread evenly over the checkpoints whatever the order of its rows, and the choice depends
    only on (seed, pool, row), not on the batches or the process that scores them.
    """
    if len(rows) == 0:
        return torch.zeros(0, each, dtype=torch.int64)
    r = rows.numpy().astype(np.uint64)
    size = np.uint64(checkpoints)
    blocks, which = np.unique(r // size, return_inverse=True)
    keys = _mix(
        np.uint64(seed % 2**64),
        np.uint64(pool),
        blocks[:, None],
        np.arange(checkpoints, dtype=np.uint64)[None, :],
    )
    permutations = np.argsort(keys, axis=1, kind="stable")  # [B, C]
    slots = ((r % size).astype(np.int64)[:, None] + np.arange(each)[None, :]) % checkpoints
    return torch.from_numpy(permutations[which.reshape(-1)[:, None], slots].astype(np.int64))


def _mix(*parts: Any) -> Any:
    """A 64-bit hash of broadcast unsigned integer arrays (splitmix64's finaliser per part)."""
    out = np.zeros((), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            x = (np.asarray(part, dtype=np.uint64) ^ out) + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            out = x ^ (x >> np.uint64(31))
    return out


class TawtMethod(_CheckpointCosines):
    """``tawt``: TAWT's weights (Chen et al., ICLR 2022, "Weighted Training for Cross-Task
    Learning") at the level of samples.

    ω over the pool starts uniform and takes one mirror-descent step per warm-up checkpoint
    with TAWT's gradient −cos(∇_φ L_target, ∇_φ ℓ_x), on the *encoder* (trunk) parameters φ
    only, as in the TAWT code: log ω(x) = η Σ_c cos_c + const, η = ``lr`` (1.0, the code's
    ``weight_lr``). The score is η Σ_c cos_c; ``weight`` is ω, normalised over the whole pool
    (all sources) once every sample is scored. Unlike ``gradient`` it ignores the heads and the
    learning rates, so it ranks by how a sample shapes the representation.
    """

    name = "tawt"
    encoder_only = True

    def __init__(self, lr: float = 1.0, dim: int = 512) -> None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr}")
        super().__init__(dim=dim, adam=False, lr=lr)
        self.eta = lr

    def score(self, pool: Pool, batch: PoolBatch) -> Scores:
        cosines = self.cosines(pool, batch)[:, :, 0]  # one subtask: the whole target
        return {"score": self.eta * cosines.sum(dim=1), **self.parts(cosines)}

    def finish(self, scores: Scores) -> Scores:
        scores = dict(scores)
        scores["weight"] = torch.softmax(scores["score"].to(F64), dim=0)
        return scores


class ColorFilterMethod(Method):
    """``color-filter``: CoLoR-Filter (Brandfonbrener et al., 2024, "CoLoR-Filter: Conditional
    Loss Reduction Filtering for Targeted Language Model Pre-training").

    score(x) = ℓ(x; θ_prior) − ℓ(x; θ_conditional): θ_prior is a model trained on the pool (the
    pools' warm-up subsets, equal weights, ``prior_steps`` Adam steps from a fresh
    initialisation), θ_conditional the same model fine-tuned on the target's labels for
    ``finetune_steps``. A sample whose loss drops most when the model learns the target is most
    target-like (the paper's −log-likelihood ratio). Needs only forward passes over the pool.
    Samples of pools with their own head are compared through that head, which the target never
    trains: their score reflects the change of the shared trunk only.
    """

    name = "color-filter"

    def __init__(self, prior_steps: int = 0, finetune_steps: int = 0) -> None:
        if prior_steps < 0 or finetune_steps < 0:
            raise ValueError("prior_steps and finetune_steps must be >= 0 (0: the warm-up's)")
        super().__init__(prior_steps=prior_steps, finetune_steps=finetune_steps)

    def prepare(self, context: Context) -> None:
        super().prepare(context)
        warm = context.checkpoints[-1].step if context.checkpoints else 100
        prior_steps = int(self.params["prior_steps"]) or warm
        finetune = int(self.params["finetune_steps"]) or max(1, warm // 2)

        def train(learner: Learner, groups: list[Group], steps: int) -> None:
            warm_up(
                learner,
                groups,
                steps=steps,
                checkpoints=1,
                lr=context.lr,
                batch_size=32,
                seed=context.seed,
                device=context.device,
            )

        self.prior = context.make_learner()
        train(self.prior, context.warm_groups, prior_steps)
        self.conditional = self.prior.clone()
        train(self.conditional, [context.target], finetune)
        self.prior.module.eval()
        self.conditional.module.eval()

    @torch.no_grad()
    def score(self, pool: Pool, batch: PoolBatch) -> Scores:
        ctx = self.context
        head = ctx.heads[pool.name]
        x, y = batch.x.to(ctx.device), batch.y.to(ctx.device)
        prior = self.prior.losses(x, y, head).to(F64).cpu()
        conditional = self.conditional.losses(x, y, head).to(F64).cpu()
        return {"score": prior - conditional, "loss_prior": prior, "loss_conditional": conditional}


class EmbeddingMethod(Method):
    """``embedding`` (baseline): cos(h(x), mean of h over the target's samples), h the
    warm-up model's representation (the trunk's output)."""

    name = "embedding"

    def __init__(self) -> None:
        super().__init__()

    def prepare(self, context: Context) -> None:
        super().prepare(context)
        t = context.target
        with torch.no_grad():
            total = None
            for start in range(0, len(t.y), context.batch_size):
                rep = (
                    context.learner.representation(
                        t.x[start : start + context.batch_size].to(context.device)
                    )
                    .to(F64)
                    .sum(dim=0)
                )
                total = rep if total is None else total + rep
        assert total is not None
        self.mean = total / len(t.y)

    @torch.no_grad()
    def score(self, pool: Pool, batch: PoolBatch) -> Scores:
        rep = self.context.learner.representation(batch.x.to(self.context.device))
        cosine = _cosine_matrix(rep, self.mean.unsqueeze(0))[:, 0].cpu()
        return {"score": cosine, "cosine": cosine}


class LossMethod(Method):
    """``loss`` (baseline): the warm-up model's loss of the sample, ``order: lowest`` (default:
    easy, likely clean samples first) or ``highest`` (hard samples first)."""

    name = "loss"

    def __init__(self, order: str = "lowest") -> None:
        if order not in ("lowest", "highest"):
            raise ValueError(f"order must be 'lowest' or 'highest', got {order!r}")
        super().__init__(order=order)
        self.sign = -1.0 if order == "lowest" else 1.0

    @torch.no_grad()
    def score(self, pool: Pool, batch: PoolBatch) -> Scores:
        ctx = self.context
        loss = (
            ctx.learner.losses(batch.x.to(ctx.device), batch.y.to(ctx.device), ctx.heads[pool.name])
            .to(F64)
            .cpu()
        )
        return {"score": self.sign * loss, "loss": loss}


class RandomMethod(Method):
    """``random`` (baseline): uniform scores in [0, 1), seeded by the seed, the pool and the
    batch's first row (so any process scoring the same batch draws the same numbers)."""

    name = "random"
    needs_warmup = False

    def __init__(self) -> None:
        super().__init__()

    def score(self, pool: Pool, batch: PoolBatch) -> Scores:
        k = self.context.pool_index[pool.name]
        generator = torch.Generator().manual_seed(
            (self.context.seed * 1_000_003 + k * 7_919 + batch.start) % (2**63)
        )
        return {"score": torch.rand(len(batch.y), generator=generator, dtype=F64)}


Kind = Literal["gradient", "color-filter", "tawt", "embedding", "loss", "random"]
METHODS: dict[str, Callable[..., Method]] = {
    "gradient": GradientMethod,
    "color-filter": ColorFilterMethod,
    "tawt": TawtMethod,
    "embedding": EmbeddingMethod,
    "loss": LossMethod,
    "random": RandomMethod,
}


def get(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """The scoring method ``name`` with ``params``; unknown names or keys raise a
    :class:`~auxilia.errors.ConfigError` naming the problem."""
    try:
        return build("selection method", name, METHODS, params)
    except StrategyError as error:
        raise ConfigError(str(error)) from error


def names() -> Sequence[str]:
    return list(METHODS)
