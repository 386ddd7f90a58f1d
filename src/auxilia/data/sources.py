"""The target and the auxiliary sources of a run, as validated in-memory tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from auxilia.errors import DataError

Kind = Literal["classification", "regression"]
Granularity = Literal["task", "dataset"]
ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]
Pair = tuple[torch.Tensor, torch.Tensor]
PairLike = tuple[ArrayLike, ArrayLike] | Dataset[Any]


def _tensor(value: ArrayLike, what: str, *, labels: bool) -> torch.Tensor:
    """Integer labels become int64; other values float (float64 stays float64, else float32)."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.dim() == 0:
        raise DataError(f"{what}: expected an array with one row per sample, got a scalar")
    if labels and not tensor.dtype.is_floating_point and tensor.dtype != torch.bool:
        return tensor.to(torch.int64)
    if tensor.dtype != torch.float64:
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise DataError(f"{what}: {bad} non-finite values (NaN or inf)")
    return tensor


def to_pair(data: PairLike, what: str) -> Pair:
    """Turn ``(x, y)`` arrays or a map-style ``Dataset`` of ``(x, y)`` items into two tensors.

    Datasets are read once into memory: auxilia's sources are small enough for that, and it
    makes sampling, resume and distributed sharding exact.
    """
    if isinstance(data, Dataset):
        try:
            items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        except TypeError as error:
            raise DataError(f"{what}: the Dataset must define __len__ and __getitem__") from error
        if not items:
            raise DataError(f"{what}: has no samples")
        try:
            xs = torch.stack([torch.as_tensor(item[0]) for item in items])
            ys = torch.stack([torch.as_tensor(item[1]) for item in items])
        except (TypeError, IndexError, RuntimeError) as error:
            raise DataError(
                f"{what}: Dataset items must be (x, y) pairs of equal shapes"
            ) from error
        data = (xs, ys)
    if not isinstance(data, tuple) or len(data) != 2:
        raise DataError(f"{what}: expected an (x, y) pair or a torch Dataset")
    x = _tensor(data[0], f"{what} x", labels=False)
    y = _tensor(data[1], f"{what} y", labels=True)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{what}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise DataError(f"{what}: has no samples")
    return x, y


def _labels(value: ArrayLike, what: str) -> torch.Tensor:
    y = _tensor(value, f"{what} labels", labels=True)
    if y.shape[0] == 0:
        raise DataError(f"{what}: has no samples")
    return y


def output_size(
    kind: Kind, labels: Sequence[torch.Tensor], num_classes: int | None, what: str
) -> int:
    """Width of a head: the number of classes (checked against labels) or regression targets."""
    if kind == "regression":
        widths = {1 if y.dim() == 1 else int(y[0].numel()) for y in labels}
        if len(widths) != 1:
            raise DataError(f"{what}: regression targets have different widths {sorted(widths)}")
        return widths.pop()
    for y in labels:
        if y.dtype.is_floating_point:
            raise DataError(f"{what}: classification labels must be integers, got floats")
        if y.dim() != 1:
            raise DataError(
                f"{what}: classification labels must be 1-D, got shape {tuple(y.shape)}"
            )
    low = min(int(y.min()) for y in labels)
    high = max(int(y.max()) for y in labels)
    classes = num_classes if num_classes is not None else high + 1
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise DataError(f"{what}: label {bad} outside the head's range [0, {classes})")
    return classes


@dataclass(frozen=True)
class Target:
    """The task auxilia optimises for: training, validation and test splits of (x, y).

    ``num_classes`` is inferred from the labels of all splits when not given.
    """

    name: str
    train: Pair
    val: Pair | None = None
    test: Pair | None = None
    kind: Kind = "classification"
    num_classes: int | None = None
    batch_size: int = 32
    outputs: int = field(init=False)

    def __post_init__(self) -> None:
        what = f"target '{self.name}'"
        object.__setattr__(self, "train", to_pair(self.train, f"{what} train"))
        for split in ("val", "test"):
            value = getattr(self, split)
            if value is not None:
                pair = to_pair(value, f"{what} {split}")
                object.__setattr__(self, split, pair)
                if pair[0].shape[1:] != self.train[0].shape[1:]:
                    raise DataError(
                        f"{what} {split}: inputs have shape {tuple(pair[0].shape[1:])}"
                        f", train inputs {tuple(self.train[0].shape[1:])}"
                    )
        if self.batch_size < 1:
            raise DataError(f"{what}: batch_size must be >= 1, got {self.batch_size}")
        splits = [p[1] for p in (self.train, self.val, self.test) if p is not None]
        object.__setattr__(self, "outputs", output_size(self.kind, splits, self.num_classes, what))


@dataclass(frozen=True)
class Source:
    """An auxiliary source: another ``task`` on the target's inputs, or a labelled ``dataset``.

    A ``task`` gives ``labels`` aligned with the target's training inputs and always has its own
    head. A ``dataset`` gives ``data`` (x, y) and either shares the target's head
    (``head="target"``, same label space) or gets its own (``head="own"``).
    """

    name: str
    granularity: Granularity = "dataset"
    data: Pair | None = None
    labels: torch.Tensor | None = None
    head: Literal["target", "own"] = "own"
    kind: Kind = "classification"
    num_classes: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        what = f"source '{self.name}'"
        if self.granularity == "dataset":
            if self.data is None or self.labels is not None:
                raise DataError(f"{what}: a dataset source takes data=(x, y), not labels")
            object.__setattr__(self, "data", to_pair(self.data, what))
        elif self.granularity == "task":
            if self.labels is None or self.data is not None:
                raise DataError(
                    f"{what}: a task source takes labels (aligned with the target), not data"
                )
            if self.head != "own":
                raise DataError(f"{what}: a task source has its own head (head='own')")
            object.__setattr__(self, "labels", _labels(self.labels, what))
        else:
            raise DataError(
                f"{what}: granularity must be 'task' or 'dataset', got {self.granularity!r}"
            )
        if self.batch_size < 1:
            raise DataError(f"{what}: batch_size must be >= 1, got {self.batch_size}")

    @property
    def y(self) -> torch.Tensor:
        """The labels of this source's samples."""
        if self.data is not None:
            return self.data[1]
        assert self.labels is not None
        return self.labels


def check_problem(target: Target, sources: Sequence[Source]) -> None:
    """Cross-checks between target and sources: unique names, shapes, label ranges, alignment."""
    seen = {target.name}
    for source in sources:
        what = f"source '{source.name}'"
        if source.name in seen:
            raise DataError(f"{what}: the name is used twice (names must be unique)")
        seen.add(source.name)
        if source.granularity == "task":
            if source.y.shape[0] != target.train[0].shape[0]:
                raise DataError(
                    f"{what}: has {source.y.shape[0]} labels but the target has "
                    f"{target.train[0].shape[0]} training samples (a task labels the target inputs)"
                )
        else:
            assert source.data is not None
            if source.data[0].shape[1:] != target.train[0].shape[1:]:
                raise DataError(
                    f"{what}: inputs have shape {tuple(source.data[0].shape[1:])}, "
                    f"the target's {tuple(target.train[0].shape[1:])}"
                )
        if source.head == "target":
            if source.kind != target.kind:
                raise DataError(
                    f"{what}: shares the target's head but is {source.kind}, not {target.kind}"
                )
            output_size(
                target.kind,
                [source.y],
                target.outputs if target.kind == "classification" else None,
                f"{what} (head '{target.name}')",
            )
            if (
                target.kind == "regression"
                and output_size("regression", [source.y], None, what) != target.outputs
            ):
                raise DataError(
                    f"{what}: regression width differs from the target's ({target.outputs})"
                )


def head_outputs(source: Source) -> int:
    """Width of the own head of ``source``."""
    return output_size(source.kind, [source.y], source.num_classes, f"source '{source.name}'")


def split_pair(pair: Pair, fraction: float, seed: int, key: str) -> tuple[Pair, Pair]:
    """(kept, held): a seeded share ``fraction`` of the samples held out, at least one each side.

    ``key`` names the setting in the error raised when that is impossible.
    """
    x, y = pair
    n = len(y)
    count = max(1, round(fraction * n))
    if not 0.0 < fraction < 1.0 or count >= n:
        raise DataError(
            f"{key}: cannot hold out {fraction:g} of {n} training samples and keep at least one "
            "to train on"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:count], order[count:]
    return (x[kept], y[kept]), (x[held], y[held])


def hold_out(target: Target, fraction: float, seed: int) -> tuple[Target, Pair]:
    """Split ``fraction`` of the target's training samples off as a held-out set.

    For strategies that learn from held-out target losses (AuxiLearn, AuxiNash): the returned
    target trains on the rest, and its number of outputs is unchanged even if a class ends up
    only in the held-out part. The split is seeded, so a resumed run holds out the same samples.
    """
    kept, held = split_pair(target.train, fraction, seed, f"target '{target.name}' train.holdout")
    num_classes = target.outputs if target.kind == "classification" else target.num_classes
    trained = Target(
        target.name,
        train=kept,
        val=target.val,
        test=target.test,
        kind=target.kind,
        num_classes=num_classes,
        batch_size=target.batch_size,
    )
    return trained, held
