"""Read and write features/labels as .npz, .csv or .parquet files.

Every problem (missing file, unparsable bytes, missing column, NaN, length mismatch, no rows)
becomes a one-line :class:`~auxilia.errors.DataError` naming the file, never a library traceback.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from auxilia.atomic import write_with
from auxilia.errors import DataError

SUFFIXES = (".npz", ".csv", ".parquet", ".pq")
Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64] | npt.NDArray[np.float32]
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, TypeError, KeyError, EOFError, NotImplementedError,
    zipfile.BadZipFile, zlib.error,
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class ArrayFile:
    """Features and/or labels read from one file (``eq=False``: arrays have no truth value)."""

    path: Path
    x: Features | None  # float32, shape (N, ...); None if the file has no features
    y: Labels | None  # int64 if all values are integral, else float32; shape (N,) or (N, m)

    @property
    def num_samples(self) -> int:
        """Number of rows N (shared by ``x`` and ``y``)."""
        return len(self.x) if self.x is not None else len(self.y) if self.y is not None else 0


def load_array_file(
    path: str | Path,
    *,
    label_column: str | None = "y",
    feature_columns: Sequence[str] | None = None,
) -> ArrayFile:
    """Load and check ``x``/``y`` from ``path``; the format follows the suffix.

    Column options apply to tables: features default to every non-label column, and
    ``label_column=None`` reads an unlabelled table.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    if suffix == ".npz":
        x, y = _read_npz(path)
    else:
        x, y = _read_table(path, suffix, label_column, feature_columns)
    return ArrayFile(path, *_checked(path, x, y))


def save_array_file(path: str | Path, x: npt.ArrayLike | None, y: npt.ArrayLike | None) -> None:
    """Write ``x``/``y`` atomically; tables get columns ``x0..x{d-1}`` (x flattened) and ``y``."""
    path = Path(path)
    suffix = _suffix(path)
    xa, ya = (None if a is None else np.asarray(a) for a in (x, y))
    if xa is None and ya is None:
        raise DataError(f"{path}: nothing to save (x and y are both None)")
    for name, arr in (("x", xa), ("y", ya)):
        if arr is not None and (arr.ndim == 0 or arr.dtype.kind not in "biuf"):
            raise DataError(
                f"{path}: cannot save {name}: need a numeric array with a sample axis, "
                f"got {arr.dtype} of shape {arr.shape}"
            )
    if xa is not None and ya is not None and len(xa) != len(ya):
        raise DataError(f"{path}: x has {len(xa)} rows but y has {len(ya)}")
    if suffix == ".npz":
        arrays: dict[str, Any] = {k: v for k, v in (("x", xa), ("y", ya)) if v is not None}
        write_with(path, lambda handle: np.savez(handle, **arrays))
        return
    if ya is not None and ya.ndim != 1:
        raise DataError(f"{path}: {suffix} holds one label column but y has shape {ya.shape}")
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

    columns: dict[str, Any] = {}
    if xa is not None:
        flat = xa.reshape(xa.shape[0], int(np.prod(xa.shape[1:])))
        columns.update((f"x{i}", flat[:, i]) for i in range(flat.shape[1]))
    if ya is not None:  # float64 text keeps float32 labels exact through the integral check
        columns["y"] = ya.astype(np.float64) if ya.dtype.kind == "f" else ya
    frame = pd.DataFrame(columns)
    if suffix == ".csv":
        write_with(path, lambda handle: _write_bytes(handle, frame.to_csv(index=False).encode()))
    else:
        write_with(path, lambda handle: frame.to_parquet(handle, engine="pyarrow", index=False))


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use {', '.join(SUFFIXES)}")
    return suffix


def _write_bytes(handle: IO[bytes], data: bytes) -> None:
    handle.write(data)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit]) or "none"
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _read_npz(path: Path) -> tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None]:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: cannot be parsed as .npz (not a zip archive, or truncated)")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            x, y = (data[k] if k in names else None for k in ("x", "y"))
    except _PARSE_ERRORS as err:
        raise DataError(f"{path}: cannot be parsed as .npz ({_one_line(err)})") from err
    if x is None and y is None:
        raise DataError(f"{path}: .npz has neither 'x' nor 'y'; arrays present: {_names(names)}")
    return x, y


def _read_table(
    path: Path, suffix: str, label: str | None, features: Sequence[str] | None
) -> tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None]:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]
    import pyarrow as pa

    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path, engine="pyarrow")
    except (*_PARSE_ERRORS, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot be parsed as {suffix} ({_one_line(err)})") from err
    frame.columns = columns = [str(c) for c in frame.columns]
    if features is None:
        features = [c for c in columns if c != label]
    features = [features] if isinstance(features, str) else list(features)
    labels = [] if label is None else [label]
    for kind, name in [("label", c) for c in labels] + [("feature", c) for c in features]:
        if name not in columns:
            raise DataError(
                f"{path}: {kind} column '{name}' not found; available columns: {_names(columns)}"
            )
        if len(frame) and not pd.api.types.is_numeric_dtype(frame[name]):
            raise DataError(f"{path}: {kind} column '{name}' is not numeric ({frame[name].dtype})")
    if label in features:
        raise DataError(f"{path}: column '{label}' is both the label and a feature")
    x = frame[features].to_numpy(np.float64, na_value=np.nan) if features else None
    y = None
    if label is not None:  # keep exact integers; anything nullable/float goes through float64
        column = frame[label]
        exact = isinstance(column.dtype, np.dtype) and column.dtype.kind in "biu"
        y = column.to_numpy() if exact else column.to_numpy(np.float64, na_value=np.nan)
    if x is None and y is None:
        raise DataError(f"{path}: no feature or label columns selected")
    return x, y


def _checked(
    path: Path, x: npt.NDArray[Any] | None, y: npt.NDArray[Any] | None
) -> tuple[Features | None, Labels | None]:
    for name, arr in (("x", x), ("y", y)):
        if arr is not None and arr.dtype.kind not in "biuf":
            raise DataError(f"{path}: {name} has non-numeric dtype {arr.dtype}")
    if x is not None and x.ndim == 0:
        raise DataError(f"{path}: x is a 0-d scalar; expected shape (N, ...)")
    if y is not None and y.ndim not in (1, 2):
        raise DataError(f"{path}: y has shape {y.shape}; expected (N,) or (N, m)")
    if x is not None and y is not None and len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    if (len(x) if x is not None else len(y) if y is not None else 0) == 0:
        raise DataError(f"{path}: has no samples (0 rows)")
    xs = None if x is None else _float32(x)
    ys = None if y is None else _labels(y)
    for name, arr in (("x", xs), ("y", ys)):
        if arr is not None and arr.dtype.kind == "f":
            _check_finite(path, name, arr)
    return xs, ys


def _float32(arr: npt.NDArray[Any]) -> Features:
    with np.errstate(over="ignore"):  # overflow becomes inf, reported by _check_finite
        return arr.astype(np.float32)


def _labels(y: npt.NDArray[Any]) -> Labels:
    """int64 for integer/bool labels and for floats that are all integral (CSV gives 0.0, 1.0)."""
    if y.dtype.kind in "biu":
        return y.astype(np.int64)
    yf = y.astype(np.float64)
    if np.isfinite(yf).all() and (yf == np.trunc(yf)).all() and np.abs(yf).max() < 2.0**63:
        return yf.astype(np.int64)
    return _float32(yf)


def _check_finite(path: Path, name: str, arr: npt.NDArray[Any]) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        parts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
        first, plural = int(np.argwhere(bad)[0][0]), "s" if nan + inf > 1 else ""
        raise DataError(f"{path}: {name} contains {parts} value{plural} (first at sample {first})")
