"""Read and validate a finished run directory (``results.json`` + ``metrics.jsonl``).

Every problem becomes a one-line :class:`DataError` naming the file, key or line at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auxilia.errors import DataError


@dataclass(frozen=True)
class SourceResult:
    """Final summary of one source, as listed in ``results.json``."""

    name: str
    granularity: str
    head: str
    mean_coefficient: float | None  # None: never drawn
    final_coefficient: float | None
    credit: float | None  # None: not measured (no target row)
    value: float | None = None  # None: not measured, or a run from before value was recorded


@dataclass(frozen=True)
class EngineResult:
    """The engine mode and layout a run used, and why that layout (``results.json`` ``engine``)."""

    mode: str
    layout: str
    copies_target_rows: bool
    path: str | None
    why: str


@dataclass(frozen=True)
class Results:
    """The parts of ``results.json`` the report shows."""

    strategy_name: str
    strategy_params: dict[str, Any]
    target_name: str
    target_metric: str
    target_value: float
    sources: tuple[SourceResult, ...]
    steps: int
    seed: int
    wall_seconds: float
    engine: EngineResult | None = None  # None: a run from before the engine was recorded


@dataclass(frozen=True)
class MetricRecord:
    """One logged step: per-source coefficients (None = source not drawn) and the val value."""

    step: int
    coefficient: dict[str, float | None]
    val: float | None


@dataclass(frozen=True)
class Run:
    """A run directory read into memory."""

    path: Path
    results: Results
    metrics: tuple[MetricRecord, ...]


def _get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing key '{key}'")
    return obj[key]


def _str(obj: Any, key: str, where: str) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def _int(obj: Any, key: str, where: str) -> int:
    value = _get(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: '{key}' must be a number, got {value!r}")
    return float(value)


def _float(obj: Any, key: str, where: str) -> float:
    return _number(_get(obj, key, where), key, where)


def _optional_float(obj: Any, key: str, where: str) -> float | None:
    value = _get(obj, key, where)
    return None if value is None else _number(value, key, where)


def _dict(obj: Any, key: str, where: str) -> dict[str, Any]:
    value = _get(obj, key, where)
    if not isinstance(value, dict):
        raise DataError(f"{where}: '{key}' must be an object, got {value!r}")
    return value


def _source(obj: Any, where: str) -> SourceResult:
    return SourceResult(
        name=_str(obj, "name", where),
        granularity=_str(obj, "granularity", where),
        head=_str(obj, "head", where),
        mean_coefficient=_optional_float(obj, "mean_coefficient", where),
        final_coefficient=_optional_float(obj, "final_coefficient", where),
        credit=_optional_float(obj, "credit", where),
        value=_optional_float(obj, "value", where) if "value" in obj else None,
    )


def _engine(obj: Any, where: str) -> EngineResult:
    copies = _get(obj, "copies_target_rows", where)
    if not isinstance(copies, bool):
        raise DataError(f"{where}: 'copies_target_rows' must be true or false, got {copies!r}")
    path = _get(obj, "path", where)
    if path is not None and not isinstance(path, str):
        raise DataError(f"{where}: 'path' must be a string or null, got {path!r}")
    return EngineResult(
        mode=_str(obj, "mode", where),
        layout=_str(obj, "layout", where),
        copies_target_rows=copies,
        path=path,
        why=_str(obj, "why", where),
    )


def read_results(path: Path) -> Results:
    """Parse ``results.json``; unknown keys are ignored."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from error
    where = str(path)
    strategy = _dict(data, "strategy", where)
    target = _dict(data, "target", where)
    sources = _get(data, "sources", where)
    if not isinstance(sources, list):
        raise DataError(f"{where}: 'sources' must be a list, got {sources!r}")
    return Results(
        strategy_name=_str(strategy, "name", f"{where} strategy"),
        strategy_params=_dict(strategy, "params", f"{where} strategy"),
        target_name=_str(target, "name", f"{where} target"),
        target_metric=_str(target, "metric", f"{where} target"),
        target_value=_float(target, "value", f"{where} target"),
        sources=tuple(_source(s, f"{where} sources[{i}]") for i, s in enumerate(sources)),
        steps=_int(data, "steps", where),
        seed=_int(data, "seed", where),
        wall_seconds=_float(data, "wall_seconds", where),
        engine=_engine(_dict(data, "engine", where), f"{where} engine")
        if "engine" in data
        else None,
    )


def _record(line: str, where: str) -> MetricRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON: {error.msg}") from error
    coefficient = {
        str(name): None if value is None else _number(value, f"coefficient.{name}", where)
        for name, value in _dict(obj, "coefficient", where).items()
    }
    val = obj.get("val")
    return MetricRecord(
        step=_int(obj, "step", where),
        coefficient=coefficient,
        val=None if val is None else _float(val, "value", f"{where} val"),
    )


def read_metrics(path: Path) -> tuple[MetricRecord, ...]:
    """Parse ``metrics.jsonl`` (one JSON object per line; blank lines are skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    return tuple(
        _record(line, f"{path} line {number}")
        for number, line in enumerate(lines, start=1)
        if line.strip()
    )


def read_run(run_dir: Path) -> Run:
    """Read and validate a finished run directory."""
    if not run_dir.is_dir():
        raise DataError(f"not a run directory: {run_dir} does not exist or is not a folder")
    for name in ("results.json", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise DataError(f"not a run directory: {run_dir} has no {name}")
    return Run(
        path=run_dir,
        results=read_results(run_dir / "results.json"),
        metrics=read_metrics(run_dir / "metrics.jsonl"),
    )
