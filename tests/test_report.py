"""Tests for the report layer, on synthetic run directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from auxilia.errors import DataError
from auxilia.report import render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _results(sources: list[str]) -> dict[str, Any]:
    return {
        "auxilia_version": "0.1.0",
        "strategy": {"name": "gcs", "params": {"variant": "weighted"}},
        "target": {"name": "digits", "metric": "accuracy", "split": "test", "value": 0.83},
        "sources": [
            {
                "name": name,
                "granularity": "dataset",
                "head": "digits",
                "mean_coefficient": 0.5,
                "final_coefficient": 0.25 * i,
                "credit": 0.01 * (1 - i),
                "value": -0.02 * i if i != 2 else 0.0,
            }
            for i, name in enumerate(sources)
        ],
        "engine": {
            "mode": "batched",
            "layout": "partitioned",
            "copies_target_rows": False,
            "path": "vmap",
            "why": "copies of a row would differ: 'trunk.2' (Dropout, p=0.1) draws a mask per row",
        },
        "steps": 30,
        "seed": 0,
        "wall_seconds": 1.5,
        "unknown_key": True,
    }


def _metrics(sources: list[str], with_val: bool) -> list[dict[str, Any]]:
    lines = []
    for step in (10, 20, 30):
        coefficient = {
            name: (None if step == 20 and i else step / (30 * (i + 1)))
            for i, name in enumerate(sources)
        }
        line: dict[str, Any] = {
            "step": step,
            "lr": 0.001,
            "loss": {name: 1.0 for name in sources},
            "coefficient": coefficient,
            "credit": coefficient,
        }
        if with_val and step != 20:
            line["val"] = {"metric": "accuracy", "value": step / 40}
        lines.append(line)
    return lines


def make_run(
    root: Path, sources: list[str] | None = None, with_val: bool = True, n_metrics: int = 3
) -> Path:
    names = sources if sources is not None else ["digits", "clean", "parity"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(_results(names)), encoding="utf-8")
    lines = _metrics(names, with_val)[:n_metrics]
    (root / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8"
    )
    return root


def test_report_contains_sources_and_images(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    out = render_report(str(run))
    assert out == run / "report.html"
    html = out.read_text(encoding="utf-8")
    for name in ("digits", "clean", "parity", "gcs", "accuracy"):
        assert name in html
    assert html.count('src="data:image/png;base64,') == 3
    assert "<th>value</th>" in html
    assert "-0.02" in html  # clean's value
    for name in ("coefficients", "target_metric", "credit"):
        assert (run / "plots" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_results_without_value_still_render(tmp_path: Path) -> None:
    """results.json from before value was recorded: its column shows "-"."""
    run = make_run(tmp_path / "run")
    data = json.loads((run / "results.json").read_text(encoding="utf-8"))
    for source in data["sources"]:
        del source["value"]
    (run / "results.json").write_text(json.dumps(data), encoding="utf-8")
    html = render_report(run).read_text(encoding="utf-8")
    assert "<th>value</th>" in html


def test_the_engine_that_ran_is_shown_and_older_runs_render_without_it(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    html = render_report(run).read_text(encoding="utf-8")
    assert "batched (partitioned, vmap)" in html
    assert "&#x27;trunk.2&#x27; (Dropout, p=0.1) draws a mask per row" in html
    data = json.loads((run / "results.json").read_text(encoding="utf-8"))
    data["engine"]["copies_target_rows"] = "no"
    (run / "results.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match="'copies_target_rows' must be true or false"):
        render_report(run)
    del data["engine"]
    (run / "results.json").write_text(json.dumps(data), encoding="utf-8")
    assert "engine mode" not in render_report(run).read_text(encoding="utf-8")


def test_missing_results_names_file(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "results.json").unlink()
    with pytest.raises(DataError, match=r"results\.json"):
        render_report(run)


def test_missing_key_is_named(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    data = json.loads((run / "results.json").read_text(encoding="utf-8"))
    del data["target"]["value"]
    (run / "results.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match="'value'"):
        render_report(run)


def test_malformed_metrics_line_names_line(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl line 4"):
        render_report(run)


def test_no_validation_points_and_empty_metrics(tmp_path: Path) -> None:
    for run in (
        make_run(tmp_path / "noval", with_val=False),
        make_run(tmp_path / "empty", n_metrics=0),
    ):
        html = render_report(run).read_text(encoding="utf-8")
        assert html.count("data:image/png;base64,") == 3
        assert (run / "plots" / "target_metric.png").read_bytes().startswith(PNG_SIGNATURE)


def test_source_names_are_escaped(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", sources=["<b>bold</b>", "a&b"])
    html = render_report(run).read_text(encoding="utf-8")
    assert "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "a&amp;b" in html
    assert "<b>" not in html


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, auxilia.report; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
