"""Batch plans: which rows of which source enter a step, reproducibly and resumably."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.data.sources import Source, Target

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
        for k, source in enumerate(self.sources, start=1):
            if not bool(drawn[k]):
                continue
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

    def state_dict(self) -> dict[str, StreamState]:
        return {str(k): stream.state_dict() for k, stream in self.streams.items()}

    def load_state_dict(self, state: dict[str, StreamState]) -> None:
        for k, stream in self.streams.items():
            stream.load_state_dict(state[str(k)])
