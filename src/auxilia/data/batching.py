"""Batch plans: which rows of which source enter a step, reproducibly and resumably."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from auxilia.data.sources import Source, Target
from auxilia.errors import DataError

StreamState = dict[str, torch.Tensor]


class IndexStream:
    """Indices 0..n-1 in a fresh random order each epoch, drawn ``n`` at a time across epochs."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.position = 0

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` indices (reshuffling whenever an epoch ends)."""
        parts = []
        while count > 0:
            if self.position == self.size:
                self.order = torch.randperm(self.size, generator=self.generator)
                self.position = 0
            chunk = self.order[self.position : self.position + count]
            self.position += len(chunk)
            count -= len(chunk)
            parts.append(chunk)
        return torch.cat(parts)

    def state_dict(self) -> StreamState:
        return {
            "rng": self.generator.get_state(),
            "order": self.order.clone(),
            "position": torch.tensor(self.position),
        }

    def load_state_dict(self, state: StreamState) -> None:
        self.generator.set_state(state["rng"])
        self.order = state["order"].clone()
        self.position = int(state["position"])


@dataclass(frozen=True)
class Segment:
    """The rows of a batch that belong to one source, the head they go through, their labels."""

    source: int
    head: str
    rows: slice
    labels: torch.Tensor


@dataclass(frozen=True)
class Batch:
    """Inputs of one step (target rows first, then each drawn dataset) and their segments."""

    x: torch.Tensor
    segments: list[Segment]


def one_row_per_loss(batch: Batch) -> Batch:
    """``batch`` laid out one row per loss, in the order of its segments: the target's rows
    are copied for each task segment that labels them, so that row i carries loss i, what the
    per-sample modes (``ghost``, ``sketch``) need. Where rows do not interact inside the model,
    each copy's loss is the loss it replaces, and so is the gradient of their sum."""
    spans = [(segment.rows.start, segment.rows.stop) for segment in batch.segments]
    if len(set(spans)) == len(spans):
        return batch
    xs, segments, start = [], [], 0
    for segment in batch.segments:
        xs.append(batch.x[segment.rows])
        stop = start + segment.rows.stop - segment.rows.start
        segments.append(Segment(segment.source, segment.head, slice(start, stop), segment.labels))
        start = stop
    return Batch(torch.cat(xs), segments)


class BatchPlanner:
    """Draws the rows of every step: the target's batch, task labels on the same rows, and a
    batch from each drawn dataset source."""

    def __init__(self, target: Target, sources: Sequence[Source], seed: int) -> None:
        self.target = target
        self.sources = list(sources)
        self.head_names = [target.name] + [
            target.name if s.head == "target" else s.name for s in self.sources
        ]
        self.streams = {0: IndexStream(len(target.train[0]), seed)}
        for k, source in enumerate(self.sources, start=1):
            if source.granularity == "dataset":
                self.streams[k] = IndexStream(len(source.y), seed + 1000 * k)

    def next(self, drawn: torch.Tensor) -> Batch:
        """The batch of one step for the sources where ``drawn`` is True (the target always)."""
        rows = self.streams[0].take(self.target.batch_size)
        xs = [self.target.train[0][rows]]
        segments = [Segment(0, self.head_names[0], slice(0, len(rows)), self.target.train[1][rows])]
        start = len(rows)
        # Only the drawn sources, in source order: the cost grows with the draw, not with K.
        for k in drawn[1:].nonzero().squeeze(1).add(1).tolist():
            source = self.sources[k - 1]
            if source.granularity == "task":
                segments.append(Segment(k, self.head_names[k], slice(0, len(rows)), source.y[rows]))
                continue
            assert source.data is not None
            picked = self.streams[k].take(source.batch_size)
            xs.append(source.data[0][picked].to(xs[0].dtype))
            segments.append(
                Segment(k, self.head_names[k], slice(start, start + len(picked)), source.y[picked])
            )
            start += len(picked)
        return Batch(torch.cat(xs), segments)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stream's state packed into four tensors (not four per source), so that a
        checkpoint of a run with thousands of sources stays quick to write."""
        streams = list(self.streams.values())
        return {
            "streams": torch.tensor(list(self.streams), dtype=torch.int64),
            "rng": torch.stack([s.generator.get_state() for s in streams]),
            "order": torch.cat([s.order for s in streams]),
            "position": torch.tensor([s.position for s in streams], dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (or the older one dict per stream, keyed "k")."""
        if "streams" not in state:
            for k, stream in self.streams.items():
                stream.load_state_dict(state[str(k)])
            return
        keys = [int(k) for k in state["streams"].tolist()]
        if keys != list(self.streams):
            raise DataError(
                f"batch planner state has {len(keys)} streams that differ from this run's "
                f"{len(self.streams)}"
            )
        sizes = [self.streams[k].size for k in keys]
        orders = torch.split(state["order"], sizes)
        for i, k in enumerate(keys):
            self.streams[k].load_state_dict(
                {
                    "rng": state["rng"][i].clone(),  # a view would crash set_state
                    "order": orders[i],
                    "position": state["position"][i],
                }
            )
