"""Auxiliary pools read in batches, so that scoring a pool never holds all of it in memory.

A :class:`Pool` is a named sequence of labelled samples that goes through one head (the
target's, or its own). Parquet files are read one row group at a time, CSV files in chunks;
``.npz`` archives (which cannot be read in part) and in-memory tensors are sliced. Every batch
carries the global row index of its first sample, so scores map back to rows of the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from auxilia.data.files import (
    _PARSE_ERRORS,
    _one_line,
    _suffix,
    load_array_file,
    save_array_file,
)
from auxilia.errors import DataError

Head = Literal["target", "own"]


@dataclass(frozen=True)
class PoolBatch:
    """``start``: the pool row of the first sample; ``x`` and ``y`` as the trainer uses them."""

    start: int
    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class Pool:
    """A pool of auxiliary samples: from tensors (``data``) or a file (``path``), streamed."""

    name: str
    head: Head = "target"
    data: tuple[torch.Tensor, torch.Tensor] | None = None
    path: Path | None = None
    label_column: str = "y"
    feature_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.path is None):
            raise DataError(f"pool '{self.name}': give either data=(x, y) or a file path")
        if self.data is not None:
            x, y = self.data
            if len(x) != len(y):
                raise DataError(f"pool '{self.name}': x has {len(x)} rows but y has {len(y)}")
            if len(x) == 0:
                raise DataError(f"pool '{self.name}': has no samples")
        if self.path is not None:
            _suffix(self.path)  # an unsupported suffix is an error now, not mid-scoring
            if not self.path.is_file():
                raise DataError(f"{self.path}: file does not exist")

    def batches(self, size: int) -> Iterator[PoolBatch]:
        """The pool in order, ``size`` samples at a time (the last batch may be smaller)."""
        if self.data is not None:
            x, y = self.data
            for start in range(0, len(x), size):
                yield PoolBatch(start, x[start : start + size], y[start : start + size])
            return
        assert self.path is not None
        suffix = _suffix(self.path)
        if suffix == ".npz":
            loaded = load_array_file(self.path, label_column=self.label_column)
            if loaded.x is None or loaded.y is None:
                raise DataError(f"{self.path}: needs both x and y")
            x, y = torch.from_numpy(loaded.x), torch.from_numpy(loaded.y)
            for start in range(0, len(x), size):
                yield PoolBatch(start, x[start : start + size], y[start : start + size])
            return
        yield from self._table_batches(size, suffix)

    def _table_batches(self, size: int, suffix: str) -> Iterator[PoolBatch]:
        import pandas as pd  # type: ignore[import-untyped,unused-ignore]

        assert self.path is not None
        start, columns = 0, None
        for frame in self._frames(size, suffix):
            frame.columns = [str(c) for c in frame.columns]
            if columns is None:
                columns = self._columns(list(frame.columns))
            features, label = columns
            for offset in range(0, len(frame), size):
                part = frame.iloc[offset : offset + size]
                for name in (*features, label):
                    if not pd.api.types.is_numeric_dtype(part[name]):
                        raise DataError(f"{self.path}: column '{name}' is not numeric")
                x = part[features].to_numpy(np.float32, copy=True)  # Arrow's may be read-only
                y = part[label].to_numpy()
                if not np.isfinite(x).all():
                    raise DataError(f"{self.path}: non-finite feature values near row {start}")
                labels = torch.from_numpy(
                    y.astype(np.int64) if y.dtype.kind in "biu" else _integral(y)
                )
                yield PoolBatch(start, torch.from_numpy(x), labels)
                start += len(part)

    def _frames(self, size: int, suffix: str) -> Iterator[Any]:
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert self.path is not None
        try:
            if suffix == ".csv":
                yield from pd.read_csv(self.path, chunksize=max(size, 1024))
            else:
                handle = pq.ParquetFile(self.path)
                for batch in handle.iter_batches(batch_size=max(size, 1024)):
                    yield batch.to_pandas()
        except (*_PARSE_ERRORS, pa.ArrowException) as err:
            raise DataError(f"{self.path}: cannot be read ({_one_line(err)})") from err

    def _columns(self, columns: list[str]) -> tuple[list[str], str]:
        label = self.label_column
        if label not in columns:
            raise DataError(f"{self.path}: label column '{label}' not found")
        features = (
            list(self.feature_columns)
            if self.feature_columns is not None
            else [c for c in columns if c != label]
        )
        missing = [c for c in features if c not in columns]
        if missing:
            raise DataError(f"{self.path}: feature column '{missing[0]}' not found")
        return features, label

    def size(self) -> int:
        """The number of samples (reads only the metadata of Parquet files)."""
        if self.data is not None:
            return len(self.data[0])
        assert self.path is not None
        if _suffix(self.path) == ".parquet" or _suffix(self.path) == ".pq":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(self.path).metadata.num_rows)
        return sum(len(b.y) for b in self.batches(4096))

    def rows(self, index: torch.Tensor, size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at the sorted pool rows ``index``, gathered in one pass over the pool."""
        wanted = torch.as_tensor(index, dtype=torch.int64)
        xs, ys = [], []
        for batch in self.batches(size):
            stop = batch.start + len(batch.y)
            inside = wanted[(wanted >= batch.start) & (wanted < stop)] - batch.start
            if len(inside):
                xs.append(batch.x[inside])
                ys.append(batch.y[inside])
        if not xs:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
        return torch.cat(xs), torch.cat(ys)

    def save(self, rows: torch.Tensor, directory: Path) -> Path:
        """Write the samples at the sorted pool ``rows`` to ``directory/<name>.npz``."""
        x, y = self.rows(rows)
        path = directory / f"{self.name}.npz"
        save_array_file(path, x.numpy(), y.numpy())
        return path


def _integral(y: np.ndarray) -> np.ndarray:
    values = y.astype(np.float64)
    if np.isfinite(values).all() and (values == np.trunc(values)).all():
        return values.astype(np.int64)
    return values.astype(np.float32)
