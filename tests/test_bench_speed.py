"""``auxilia bench speed``: a smoke run of the quick preset and the JSON records it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from auxilia.bench import speed
from auxilia.cli import app
from auxilia.errors import ConfigError

RECORD_KEYS = {
    "model": str,
    "layout": str,
    "k": int,
    "method": str,
    "kind": str,
    "median_ms": float,
    "ratio": float,
    "min_ms": float,
    "ratio_of_min": float,
    "steps": int,
    "notes": list,
}


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, ["bench", "speed", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _check_record(record: dict[str, Any]) -> None:
    for key, kind in RECORD_KEYS.items():
        assert isinstance(record[key], kind), (key, record)
    assert record["mode"] is None or isinstance(record["mode"], str)
    assert record["path"] is None or isinstance(record["path"], str)
    memory = record["peak_memory_mb"]
    assert memory is None or (isinstance(memory, float) and memory >= 0)
    assert math.isfinite(record["median_ms"])
    assert record["median_ms"] > 0
    assert math.isfinite(record["ratio"])
    assert record["ratio"] > 0


def test_quick_run_writes_table_and_records(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    result = _invoke("--quick", "--ks", "3", "--repeats", "2", "--json", str(out))
    assert torch.get_num_threads() == threads  # pinned for the run only
    assert "torch threads pinned to 1" in result.output
    assert "× plain" in result.output

    document = json.loads(out.read_text())
    assert document["benchmark"] == "speed"
    assert {"cpu", "cores", "torch"} <= set(document["machine"])
    assert document["settings"]["threads"] == 1
    records = document["records"]
    for record in records:
        _check_record(record)
    groups = {(r["model"], r["layout"], r["k"]) for r in records}
    assert groups == {("mlp", "shared-input", 3), ("mlp", "partitioned", 3)}
    for group in groups:
        rows = [r for r in records if (r["model"], r["layout"], r["k"]) == group]
        plain = [r for r in rows if r["kind"] == "plain"]
        assert len(plain) == 1
        assert plain[0]["ratio"] == 1.0
        methods = {r["method"] for r in rows}
        assert {"plain", "equal", "olaux", "arml", "loop"} <= methods
        if speed.torchjd_available():
            assert {"torchjd-upgrad", "torchjd-mean"} <= methods
        for r in rows:
            if r["kind"] == "strategy":
                assert r["mode"]  # the engine mode that ran
            assert r["steps"] == 2
    shared = {r["method"]: r["mode"] for r in records if r["layout"] == "shared-input"}
    assert shared["olaux"] == "jvp"
    assert shared["arml"] == "batched"


def test_modes_side_by_side(tmp_path: Path) -> None:
    """``--mode`` takes several modes: each strategy runs once per mode that can serve it; a
    mode that cannot (jvp for the norms ``gcs`` reads) is left out with a line that says why."""
    out = tmp_path / "speed.json"
    result = _invoke(
        "--models", "mlp", "--layouts", "partitioned", "--ks", "2", "--strategies", "olaux,gcs",
        "--mode", "exact,jvp", "--repeats", "1", "--warmup", "0", "--no-baselines",
        "--no-memory", "--json", str(out),
    )  # fmt: skip
    document = json.loads(out.read_text())
    assert document["settings"]["modes"] == ["exact", "jvp"]
    ran = {(r["method"], r["mode"]) for r in document["records"] if r["kind"] == "strategy"}
    assert ran == {("olaux", "exact"), ("olaux", "jvp"), ("gcs", "exact")}
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "mlp partitioned K=2: gcs [jvp] skipped: engine mode 'jvp' cannot be used" in output
    assert "cannot compute norms" in output
    # One mode that cannot serve a strategy is an error, as in the engine.
    with pytest.raises(Exception, match="cannot compute norms"):
        _invoke("--quick", "--strategies", "gcs", "--mode", "jvp", "--no-baselines")


def test_transformer_with_dropout_runs_on_ghost(tmp_path: Path) -> None:
    """The training transformer (dropout at work) is timed in both layouts; partitioned runs
    on ghost, whose attention replay draws the forward's own mask."""
    out = tmp_path / "speed.json"
    _invoke(
        "--models", "transformer-dropout", "--ks", "2", "--strategies", "gcs", "--repeats",
        "1", "--warmup", "0", "--no-baselines", "--no-memory", "--json", str(out),
    )  # fmt: skip
    records = json.loads(out.read_text())["records"]
    for record in records:
        _check_record(record)
    modes = {(r["layout"], r["mode"]) for r in records if r["kind"] == "strategy"}
    assert modes == {("partitioned", "ghost"), ("shared-input", "batched")}
    encoder = speed.make_trunk("transformer-dropout")[0]
    assert isinstance(encoder, speed.TokenEncoder)
    assert encoder.training
    assert encoder.layer.self_attn.dropout == 0.1


def test_without_torchjd_the_rows_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(speed, "torchjd_available", lambda: False)
    out = tmp_path / "speed.json"
    result = _invoke(
        "--quick",
        "--layouts",
        "shared-input",
        "--ks",
        "2",
        "--strategies",
        "gcs:unweighted",
        "--repeats",
        "1",
        "--no-memory",
        "--json",
        str(out),
    )
    assert "torchjd is not installed" in result.output
    records = json.loads(out.read_text())["records"]
    assert [r["method"] for r in records] == ["plain", "gcs:unweighted", "loop"]
    assert all(r["peak_memory_mb"] is None for r in records)


def test_breakdown_phases() -> None:
    phases = speed.breakdown("mlp", 2, repeats=1)
    assert {"forward", "jvp: second-order pass", "batched: gram", "optimizer step"} <= set(phases)
    assert all(value is not None and value >= 0 for value in phases.values())


def test_breakdown_phases_partitioned() -> None:
    """ghost's phases, the whole Gram matrix and its row and norms from alternate steps."""
    phases = speed.breakdown("cnn", 3, repeats=2, layout="partitioned")
    assert set(phases) == {
        "forward (layer hooks on)",
        "engine input checks (split)",
        "plain backward",
        "ghost: backward to layer outputs, factors",
        "ghost: Gram matrix",
        "ghost: target row and norms",
        "ghost: combine (.grad)",
        "optimizer step",
    }
    assert all(value is not None and value > 0 for value in phases.values())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"models": ("resnet",)}, "unknown model 'resnet'"),
        ({"layouts": ("mixed",)}, "unknown layout 'mixed'"),
        ({"ks": (0,)}, "every K must be >= 1"),
        ({"strategies": ("nope",)}, "unknown strategy 'nope'"),
        ({"modes": ("fast",)}, "unknown engine mode 'fast'"),
        ({"modes": ()}, "at least one engine mode"),
    ],
)
def test_settings_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        speed.SpeedSettings(**changes)


def test_cli_rejects_bad_ks() -> None:
    result = CliRunner().invoke(app, ["bench", "speed", "--quick", "--ks", "two"])
    assert isinstance(result.exception, ConfigError)
