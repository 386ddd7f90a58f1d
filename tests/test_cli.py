"""End-to-end tests of the ``auxilia`` command: run, report, demo, help and run-directory errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from auxilia.cli import app
from tiny_problem import REPO_ROOT, Outcome, assert_one_line_error

NAMES = ["tiny", "helper", "other", "parity"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUXILIA = Path(sys.executable).parent / "auxilia"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


def _invoke(runner: CliRunner, *args: str | Path) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _run(runner: CliRunner, config: Path, out: Path, *extra: str) -> Any:
    return _invoke(runner, "run", config, "--out", out, "--quiet", *extra)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_per_source(record: dict[str, Any], key: str) -> None:
    values = record[key]
    assert isinstance(values, dict), (key, values)
    assert list(values) == NAMES, (key, values)
    for value in values.values():
        assert value is None or _is_number(value), (key, values)


# ---- auxilia run ---------------------------------------------------------------------------------


def test_run_writes_every_file(runner: CliRunner, tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run(runner, tiny_config, out)
    assert "tiny: test accuracy" in result.stdout
    assert "engine: ghost (partitioned): the target's rows copied once per task" in result.stdout
    assert str(out) in result.stdout

    # config.yaml: the resolved config, loadable, data paths absolute and existing
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert config["target"]["name"] == "tiny"
    for split in ("train", "val", "test"):
        path = Path(config["target"][split])
        assert path.is_absolute(), path
        assert path.is_file(), path
    assert [s["name"] for s in config["sources"]] == NAMES[1:]
    for source in config["sources"]:
        path = Path(source["data"] or source["labels"])
        assert path.is_absolute(), path
        assert path.is_file(), path
    assert config["strategy"]["name"] == "gcs"
    assert config["sampler"]["name"] == "all"
    assert config["model"] == {"trunk": "mlp", "params": {"hidden": [16]}}
    assert config["train"]["steps"] == 20
    assert config["train"]["log_every"] == 5

    # metrics.jsonl: one object per logged step; val on evaluated steps
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for record in records:
        assert isinstance(record["step"], int)
        assert _is_number(record["lr"])
        assert record["lr"] == pytest.approx(0.01)
        for key in ("loss", "coefficient", "credit", "value"):
            _check_per_source(record, key)
        assert record["coefficient"]["tiny"] == pytest.approx(1.0)
        assert all(v is not None for v in record["loss"].values())  # every source drawn ("all")
        if record["step"] % 10 == 0:
            assert record["val"]["metric"] == "accuracy"
            assert _is_number(record["val"]["value"])
            assert 0 <= record["val"]["value"] <= 1
        else:
            assert "val" not in record

    # results.json
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    target = results["target"]
    assert target["name"] == "tiny"
    assert target["metric"] == "accuracy"
    assert target["split"] == "test"
    assert _is_number(target["value"])
    assert 0 <= target["value"] <= 1
    assert results["strategy"]["name"] == "gcs"
    assert isinstance(results["strategy"]["params"], dict)
    assert results["steps"] == 20
    assert results["seed"] == 0
    assert _is_number(results["wall_seconds"])
    assert results["wall_seconds"] >= 0
    sources = {s["name"]: s for s in results["sources"]}
    assert set(NAMES[1:]) <= set(sources)
    expected = {
        "helper": ("dataset", "tiny"),
        "other": ("dataset", "other"),
        "parity": ("task", "parity"),
    }
    for name, (granularity, head) in expected.items():
        source = sources[name]
        assert source["granularity"] == granularity
        assert source["head"] == head
        for key in ("mean_coefficient", "final_coefficient", "credit", "value"):
            assert _is_number(source[key]), (name, key, source[key])
        assert source["mean_coefficient"] >= 0

    # checkpoints: the cadence (10) and the last step, loadable without executing code
    checkpoints = sorted((out / "checkpoints").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["step_00000010.pt", "step_00000020.pt"]
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    assert state["step"] == 20
    assert list(state["names"]) == NAMES
    assert all(isinstance(t, torch.Tensor) for t in state["model"].values())

    # report.html and its plots
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower()
    assert "data:image/png;base64," in html
    plots = sorted((out / "plots").glob("*.png"))
    assert plots, "no plots written"
    for plot in plots:
        assert plot.read_bytes().startswith(PNG_SIGNATURE), plot


def test_run_defaults_to_runs_config_name(
    runner: CliRunner, tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _invoke(runner, "run", tiny_config, "--quiet")
    assert (work / "runs" / tiny_config.stem / "results.json").is_file()


def test_run_prints_progress_unless_quiet(
    auxilia_main: Callable[..., Outcome], tiny_config: Path, tmp_path: Path
) -> None:
    loud = auxilia_main("run", tiny_config, "--out", tmp_path / "loud")
    assert loud.code == 0, loud
    assert "step 10/20" in loud.stderr
    assert "step 20/20" in loud.stderr
    quiet = auxilia_main("run", tiny_config, "--out", tmp_path / "quiet", "--quiet")
    assert quiet.code == 0, quiet
    assert quiet.stderr == ""


# ---- help ----------------------------------------------------------------------------------------


def test_help_lists_commands(runner: CliRunner) -> None:
    result = _invoke(runner, "--help")
    for command in ("run", "demo", "report"):
        assert command in result.stdout
    assert "--debug" in result.stdout
    assert "--version" in result.stdout


@pytest.mark.parametrize(
    ("command", "documented"),
    [
        ("run", ["CONFIG", "--out", "--resume", "--quiet", "YAML run config"]),
        ("demo", ["--out", "--steps", "--seed", "runs/demo", "500"]),
        ("report", ["RUN_DIR", "report.html"]),
    ],
)
def test_command_help_documents_options(
    runner: CliRunner, command: str, documented: list[str]
) -> None:
    text = _invoke(runner, command, "--help").stdout
    assert "Usage:" in text
    for fragment in documented:
        assert fragment.lower() in text.lower(), (
            f"{fragment!r} missing from 'auxilia {command} --help'"
        )


def test_run_help_documents_default_out(runner: CliRunner) -> None:
    # The help text of --out says "[default: runs/<config name>]"; it must survive rich markup.
    text = _invoke(runner, "run", "--help").stdout
    assert "runs/<config name>" in text, text


def test_version(runner: CliRunner) -> None:
    from auxilia import __version__

    assert __version__ in _invoke(runner, "--version").stdout


# ---- run directory errors ------------------------------------------------------------------------


def test_existing_run_without_resume_fails(
    runner: CliRunner, tiny_config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _run(runner, tiny_config, out)
    before = (out / "results.json").read_bytes()
    done = subprocess.run(
        [str(AUXILIA), "run", str(tiny_config), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    line = assert_one_line_error(
        Outcome(done.returncode, done.stdout, done.stderr),
        str(out),
        "already holds a run",
        "--resume",
    )
    assert done.returncode == 2, line
    assert (out / "results.json").read_bytes() == before  # the old run is untouched


def test_resume_without_checkpoints_fails(
    auxilia_main: Callable[..., Outcome], tiny_config: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        auxilia_main("run", tiny_config, "--out", empty, "--resume", "--quiet"),
        "--resume",
        "no checkpoint",
    )
    missing = tmp_path / "missing"
    assert_one_line_error(
        auxilia_main("run", tiny_config, "--out", missing, "--resume", "--quiet"), "no checkpoint"
    )


def test_resume_of_finished_run_is_a_no_op(
    runner: CliRunner, tiny_config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _run(runner, tiny_config, out)
    metrics = (out / "metrics.jsonl").read_text(encoding="utf-8")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    _run(runner, tiny_config, out, "--resume")
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == metrics
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results.pop("wall_seconds")
    again.pop("wall_seconds")
    assert again == results


# ---- auxilia report ------------------------------------------------------------------------------


def test_report_rerenders(runner: CliRunner, tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(runner, tiny_config, out)
    (out / "report.html").unlink()
    for plot in (out / "plots").glob("*.png"):
        plot.unlink()
    result = _invoke(runner, "report", out)
    assert result.stdout.strip() == str(out / "report.html")
    assert "data:image/png;base64," in (out / "report.html").read_text(encoding="utf-8")
    assert list((out / "plots").glob("*.png"))


def test_report_of_a_non_run_fails(auxilia_main: Callable[..., Outcome], tmp_path: Path) -> None:
    assert_one_line_error(auxilia_main("report", tmp_path), "results.json")


# ---- auxilia demo --------------------------------------------------------------------------------


def test_demo_smoke(runner: CliRunner, tmp_path: Path) -> None:
    # Smoke test of the demo: 5 steps per strategy (the full demo takes ~30 s and is not run here).
    out = tmp_path / "demo"
    _invoke(runner, "demo", "--steps", "5", "--out", out)
    for strategy in ("target-only", "equal", "gcs", "olaux", "auto"):
        results = json.loads((out / strategy / "results.json").read_text(encoding="utf-8"))
        assert results["strategy"]["name"] == strategy
        assert results["steps"] == 5
        assert 0 <= results["target"]["value"] <= 1
        assert (out / strategy / "report.html").is_file()
