"""The trainer on several processes: process group from ``torchrun``, shards of every batch.

``torchrun --nproc-per-node N -m auxilia run CONFIG.yaml`` starts N copies of the same run.
Every rank draws the same global batch (the same planner, seed and sampler state); each keeps
its contiguous share of every source's rows (:func:`shard`), so a source's batch is split over
the ranks and the engine's statistics are those of the global batch
(:mod:`auxilia.engine.distributed`). Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from auxilia.data.batching import Batch, Segment
from auxilia.errors import ConfigError


@dataclass(frozen=True)
class Place:
    """Which process this is: its rank among ``world`` processes (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_world() -> int:
    """The number of processes ``torchrun`` started (1 when it did not start this one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as error:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes"
        ) from error


def join(device: torch.device, timeout: float) -> Place:
    """Join the process group ``torchrun`` set up in the environment (gloo on CPU, NCCL on
    CUDA), unless one is initialised already; ``Place()`` for a single process.

    ``timeout`` bounds every collective: a rank that stops answering makes the others fail
    with an error after that many seconds rather than wait for ever.
    """
    if dist.is_available() and dist.is_initialized():
        return Place(int(dist.get_rank()), int(dist.get_world_size()))
    if launched_world() <= 1:
        return Place()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run on one process")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE is set but {key} is not: launch several processes with torchrun"
            )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
    return Place(int(dist.get_rank()), int(dist.get_world_size()))


def local_device(device: torch.device) -> torch.device:
    """On CUDA with several processes per machine each takes its own GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def share(length: int, place: Place) -> slice:
    """This rank's contiguous share of ``length`` rows (sizes differ by at most one)."""
    start = length * place.rank // place.world
    stop = length * (place.rank + 1) // place.world
    return slice(start, stop)


def shard(batch: Batch, place: Place) -> Batch:
    """This rank's rows of ``batch``: a share of each stretch of rows (the target's, which
    task sources label too, and each dataset's), with the segments renumbered to match."""
    if not place.distributed:
        return batch
    stretches: dict[tuple[int, int], slice] = {}  # (start, stop) of a stretch -> rows kept
    for segment in batch.segments:
        span = (segment.rows.start, segment.rows.stop)
        if span not in stretches:
            part = share(span[1] - span[0], place)
            stretches[span] = slice(span[0] + part.start, span[0] + part.stop)
    xs, position, moved = [], 0, {}
    for span, kept in sorted(stretches.items()):
        xs.append(batch.x[kept])
        moved[span] = (kept, slice(position, position + kept.stop - kept.start))
        position += kept.stop - kept.start
    segments = []
    for segment in batch.segments:
        kept, rows = moved[(segment.rows.start, segment.rows.stop)]
        first = kept.start - segment.rows.start
        labels = segment.labels[first : first + kept.stop - kept.start]
        segments.append(Segment(segment.source, segment.head, rows, labels))
    return Batch(torch.cat(xs), segments)


def check_world(place: Place, target_batch: int) -> None:
    """Every rank needs at least one target row of each step's batch."""
    if place.world > target_batch:
        raise ConfigError(
            f"{place.world} processes cannot share a global batch of {target_batch} target "
            f"rows (target.batch_size); use at most {target_batch} processes or a larger batch"
        )


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's parameters and buffers (a factory may not be seeded)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        buffer = tensor.detach()
        if dist.get_backend() != "nccl" and buffer.device.type != "cpu":
            cpu = buffer.cpu()
            dist.broadcast(cpu, src=0)
            buffer.copy_(cpu)
        else:
            dist.broadcast(buffer, src=0)


def reduce_sums(values: list[float], place: Place, device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (the evaluation's totals and counts)."""
    if not place.distributed:
        return values
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.cpu()]


def barrier(place: Place) -> None:
    """Wait for every rank (after rank 0 prepared the run directory)."""
    if place.distributed:
        dist.barrier()
