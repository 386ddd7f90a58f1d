"""Statistics over the global batch when the engine runs on several processes (``torchrun``).

Each process (rank) holds its share of every source's samples. The engine makes every
statistic a statistic of the *global* batch, so that all ranks get identical coefficients and
the run equals a one-process run on the same global batch:

1. **Losses** (every step): one all-reduce of 2·(K+1) float64 numbers, the per-source sample
   counts and loss sums. Every rank then knows each source's global count n_k and mean loss (a
   non-finite mean stops every rank at the same step, with the same message).
2. Each rank scales its samples' losses by 1/n_k (not 1/n_{k,r}), so its per-source gradients
   g'_{k,r} add up over ranks to the global g_k. This is what makes everything below a sum.
3. **Gradient statistics**, by what the strategy needs:
   - the target row only (``olaux``, unweighted ``gcs``, credit): an all-reduce of the target
     gradient (P numbers, P = shared parameters) and one of the K+1 products <g'_{k,r}, g_0>;
   - norms or the Gram matrix (``auto``, weighted ``gcs``, ``arml``, ...): an all-reduce of the
     m×P matrix of the present sources' gradients (m = sources in the step, the target and a
     held-out row included); every rank forms the same m×m Gram matrix from it.
   - nothing (``equal``, ``dwa``): no more than step 1.
4. **The gradient** (every step, the all-reduce DDP itself does): each rank writes Σ_k α_k g'_{k,r}
   (its heads their g'_{k,r}) and the step's gradients are summed over ranks: one all-reduce of
   the parameters that received a gradient on any rank (found by an all-reduce of one byte per
   parameter, so a model with a head per source sends only the heads in the step).

Only K-sized vectors cross ranks for the losses and the target row; the norms and the Gram
matrix need the per-source gradients themselves (cross-rank inner products cannot be formed
from K×K numbers per rank), at m·P numbers a step, m times DDP's all-reduce. :class:`Collectives`
counts the bytes and time of each kind, for the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from auxilia.engine.mode import Measurement
from auxilia.engine.source_losses import SourceLosses
from auxilia.errors import EngineError, NonFiniteSourceError
from auxilia.statistics import Need, Statistics

STATISTICS = "statistics"
GRADIENT = "gradient"


def distributed_world() -> int:
    """The number of processes of the default group (1 when torch.distributed is not set up)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


@dataclass
class Traffic:
    """What one kind of collective sent so far: calls, bytes (per rank) and seconds."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class Collectives:
    """The process group the engine reduces over, and a record of what it sent."""

    group: dist.ProcessGroup | None = None
    traffic: dict[str, Traffic] = field(
        default_factory=lambda: {STATISTICS: Traffic(), GRADIENT: Traffic()}
    )

    def __post_init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise EngineError(
                "distributed engine: torch.distributed is not initialised "
                "(call torch.distributed.init_process_group, or launch with torchrun)"
            )
        self.rank = int(dist.get_rank(self.group))
        self.world = int(dist.get_world_size(self.group))
        backend = str(dist.get_backend(self.group))
        self.on_cuda = backend == "nccl"

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return tensor if tensor.is_cuda else tensor.cuda()
        return tensor if tensor.device.type == "cpu" else tensor.cpu()

    def all_reduce(
        self, tensor: torch.Tensor, kind: str, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
    ) -> torch.Tensor:
        """Sum (or ``op``) ``tensor`` over the ranks; returns the result on ``tensor``'s device."""
        device = tensor.device
        buffer = self._place(tensor.contiguous())
        if buffer is tensor:
            buffer = buffer.clone()
        began = time.perf_counter()
        dist.all_reduce(buffer, op=op, group=self.group)
        record = self.traffic[kind]
        record.seconds += time.perf_counter() - began
        record.calls += 1
        record.bytes += buffer.numel() * buffer.element_size()
        return buffer.to(device)

    def report(self) -> dict[str, dict[str, float]]:
        """Traffic per kind: calls, bytes and seconds (per rank, since the engine started)."""
        return {
            kind: {"calls": t.calls, "bytes": t.bytes, "seconds": t.seconds}
            for kind, t in self.traffic.items()
        }


@dataclass(frozen=True)
class GlobalLosses:
    """The global counts and mean losses of a step, and the local batch rescaled to them."""

    batch: SourceLosses  # local samples, each loss scaled by n_{k,r} / n_k
    counts: torch.Tensor  # float64 [K'] global sample counts
    means: torch.Tensor  # float64 [K'] global mean losses (0 where absent)

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0


def _local_sums(batch: SourceLosses, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-source sample counts and loss sums of this rank, float64 on the CPU."""
    losses = batch.losses.detach()
    num = batch.num_sources
    if layout == "shared-input":
        if losses.dim() == 2:
            count = float(losses.shape[0])
            return torch.full((num,), count, dtype=torch.float64), losses.to(torch.float64).sum(
                dim=0
            ).cpu()
        return torch.ones(num, dtype=torch.float64), losses.to(torch.float64).cpu()
    sums = torch.zeros(num, dtype=torch.float64, device=losses.device).index_add(
        0, batch.ids, losses.to(torch.float64)
    )
    return batch.counts.to(torch.float64), sums.cpu()


def globalise_losses(
    collectives: Collectives,
    batch: SourceLosses,
    layout: str,
    names: Sequence[str] | None,
) -> GlobalLosses:
    """One all-reduce of counts and loss sums; the local batch rescaled to the global counts."""
    counts, sums = _local_sums(batch, layout)
    num = counts.shape[0]
    reduced = collectives.all_reduce(torch.cat([counts, sums]), STATISTICS)
    total, total_sums = reduced[:num], reduced[num:]
    means = torch.where(total > 0, total_sums / total.clamp_min(1.0), torch.zeros_like(total))
    if not bool(torch.isfinite(means).all()):
        k = int((~torch.isfinite(means)).nonzero()[0, 0])
        label = names[k] if names is not None and k < len(names) else str(k)
        raise NonFiniteSourceError(label, float(means[k]))
    scale = torch.where(total > 0, counts / total.clamp_min(1.0), torch.zeros_like(total))
    losses = batch.losses
    factor = scale.to(device=losses.device, dtype=losses.dtype)
    scaled = losses * (factor if layout == "shared-input" else factor[batch.ids])
    local = SourceLosses(
        counts=batch.counts,
        losses=scaled,
        ids=batch.ids,
        given_means=batch.mean_vector * factor,
        given_values=batch.mean_values * scale,
    )
    return GlobalLosses(local, total, means)


def _flat(
    values: Sequence[torch.Tensor], order: Sequence[torch.Tensor], like: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``values`` (one per parameter of ``order``) laid out over the parameters ``like``, flat;
    zeros for parameters of ``like`` that ``order`` does not list."""
    by_id = {id(p): v for p, v in zip(order, values, strict=True)}
    dtype = _buffer_dtype(like)
    parts = [
        by_id[id(p)].reshape(-1).to(dtype)
        if id(p) in by_id
        else torch.zeros(p.numel(), dtype=dtype, device=p.device)
        for p in like
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def _buffer_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in like:
        out.append(flat[start : start + p.numel()].reshape(p.shape).to(p.dtype))
        start += p.numel()
    return out


def _source_gradient(
    local: Measurement, k: int, locally_present: bool, shared: Sequence[torch.Tensor]
) -> torch.Tensor:
    """This rank's g'_{k,r} over ``shared``, flat (zeros where source k has no sample here)."""
    if not locally_present:
        return _flat([], [], shared)
    measured = getattr(local, "source_gradient", None)
    if measured is None:
        raise EngineError("this engine mode cannot give per-source gradients across processes")
    return _flat(measured(k), local.shared, shared)  # type: ignore[attr-defined]


@dataclass
class GlobalMeasurement:
    """Statistics of the global batch; writes the globally summed combined gradient."""

    statistics: Statistics
    local: Measurement
    collectives: Collectives
    shared: list[torch.Tensor]  # every shared parameter of the engine, in its order
    params: list[torch.Tensor]  # every parameter of the engine
    rows: dict[int, torch.Tensor]  # source -> its global gradient over ``shared``, flat

    def combine(self, coefficients: torch.Tensor) -> None:
        """Σ_k α_k g_k of the global batch into ``.grad``: local combine, then one all-reduce."""
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.local.combine(coefficients)
        written = torch.tensor([p.grad is not None for p in self.params], dtype=torch.uint8)
        anywhere = self.collectives.all_reduce(written, GRADIENT, dist.ReduceOp.MAX).bool()
        chosen = [p for p, w in zip(self.params, anywhere.tolist(), strict=True) if w]
        if chosen:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in chosen]
            flat = self.collectives.all_reduce(_flat(grads, chosen, chosen), GRADIENT)
            for p, g in zip(chosen, _unflat(flat, chosen), strict=True):
                p.grad = g
        for p, before in zip(self.params, saved, strict=True):
            if before is not None:  # accumulate, as backward does
                if p.grad is not None:
                    before.add_(p.grad)
                p.grad = before

    def source_gradient(self, k: int) -> list[torch.Tensor]:
        """Source k's global gradient on each shared parameter."""
        if k not in self.rows:
            raise EngineError(
                f"across processes this step measured the global gradient of sources "
                f"{sorted(self.rows)}, not of source {k}"
            )
        return _unflat(self.rows[k], self.shared)

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """<g_k, v> for every source k of the global batch; float64 [K'] on CPU."""
        flat = _flat(vectors, self.shared, self.shared).to(torch.float64)
        num = self.statistics.num_sources
        if self.rows and len(self.rows) == int(self.statistics.present.sum()):
            out = torch.zeros(num, dtype=torch.float64)
            for k, row in self.rows.items():
                out[k] = float(row.to(torch.float64) @ flat.to(row.device))
            return out
        local_vectors = _unflat(flat, self.shared)
        by_id = {id(p): v for p, v in zip(self.shared, local_vectors, strict=True)}
        ordered = [
            by_id.get(id(p), torch.zeros_like(p)).to(p.device)
            for p in self.local.shared  # type: ignore[attr-defined]
        ]
        values = self.local.dots(ordered)  # type: ignore[attr-defined]
        return self.collectives.all_reduce(values.to(torch.float64), STATISTICS)


GRAM_NEEDS = frozenset({Need.GRAM, Need.NORMS})


def globalise(
    collectives: Collectives,
    local: Measurement,
    batch: GlobalLosses,
    needs: frozenset[Need],
    shared: list[torch.Tensor],
    params: list[torch.Tensor],
    mode_name: str,
) -> GlobalMeasurement:
    """The global statistics ``needs`` asks for, from this rank's measurement of its samples."""
    present = batch.present
    local_present = batch.batch.present
    losses = batch.means.clone() if Need.LOSSES in needs else None
    rows: dict[int, torch.Tensor] = {}
    if needs & GRAM_NEEDS:
        from auxilia.engine.exact import gradient_statistics

        index = present.nonzero().squeeze(1).tolist()
        stacked = (
            torch.stack([_source_gradient(local, k, bool(local_present[k]), shared) for k in index])
            if index
            else torch.zeros(0, 0)
        )
        reduced = collectives.all_reduce(stacked, STATISTICS) if index else stacked
        wide = reduced.to(torch.float64)
        gram = (wide @ wide.T).cpu()
        rows = {k: reduced[i] for i, k in enumerate(index)}
        stats = gradient_statistics(present, gram, losses, needs)
    elif Need.TARGET_ROW in needs:
        if bool(local_present.any()) and not bool(local_present[0]) and mode_name == "jvp":
            raise EngineError(
                "engine mode 'jvp' across processes needs at least one target sample on every "
                "process; use 'exact' or 'batched', or give every rank target samples"
            )
        target = _source_gradient(local, 0, bool(local_present[0]), shared)
        target = collectives.all_reduce(target, STATISTICS)
        rows = {0: target}
        row = torch.zeros(batch.counts.shape[0], dtype=torch.float64)
        if bool(present[0]):
            vectors = _unflat(target, shared)
            by_id = {id(p): v for p, v in zip(shared, vectors, strict=True)}
            local_shared = local.shared  # type: ignore[attr-defined]
            ordered = [by_id.get(id(p), torch.zeros_like(p)).to(p.device) for p in local_shared]
            products = local.dots(ordered)  # type: ignore[attr-defined]
            row = collectives.all_reduce(products.to(torch.float64), STATISTICS) * present
        stats = Statistics(present=present, losses=losses, target_row=row)
    else:
        stats = Statistics(present=present, losses=losses)
    return GlobalMeasurement(stats, local, collectives, shared, params, rows)
