"""Bad input through the real command: one ``error:`` line naming the problem, non-zero exit,
no traceback (unless ``--debug``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from auxilia import samplers
from auxilia.data.files import save_array_file
from auxilia.errors import ConfigError
from auxilia.train.checkpoint import load_checkpoint
from tiny_problem import (
    REPO_ROOT,
    Outcome,
    assert_one_line_error,
    base_config,
    run_auxilia_process,
    write_tiny_problem,
)

Main = Callable[..., Outcome]


def _run(main: Main, config: Path, out: Path, *extra: str) -> Outcome:
    return main("run", config, "--out", out, "--quiet", *extra)


def _sources_with(**changed: dict[str, Any]) -> list[dict[str, Any]]:
    """The tiny problem's sources with some entries (by name) updated."""
    return [{**s, **changed.get(s["name"], {})} for s in base_config()["sources"]]


def _no_run_written(out: Path) -> None:
    assert not (out / "results.json").exists()
    assert not list((out / "checkpoints").glob("*.pt"))


# ---- the config file -----------------------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    outcome = run_auxilia_process("run", missing, "--out", tmp_path / "run")
    assert_one_line_error(outcome, "config file not found", str(missing))
    assert outcome.code == 2


def test_malformed_yaml_names_the_line(auxilia_main: Main, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("target:\n  name: tiny\n  train: [data/x.npz\nsteps: 3\n", encoding="utf-8")
    line = assert_one_line_error(
        _run(auxilia_main, config, tmp_path / "run"), str(config), "malformed YAML"
    )
    assert "at line 4" in line, line


def test_empty_config_file(auxilia_main: Main, tmp_path: Path) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("", encoding="utf-8")
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), str(config), "mapping")


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        pytest.param({"foo": 1}, ["foo", "unknown key"], id="unknown-top-level-key"),
        pytest.param(
            {"target": {"foo": 1}}, ["target.foo", "unknown key"], id="unknown-nested-key"
        ),
        pytest.param(
            {"train": {"stpes": 5}}, ["train.stpes", "unknown key"], id="misspelt-train-key"
        ),
        pytest.param(
            {"sources": [{"name": "x", "data": "data/other.npz", "colour": 1}]},
            ["sources.0.colour", "unknown key"],
            id="unknown-source-key",
        ),
        pytest.param({"train": {"steps": "many"}}, ["train.steps", "many"], id="wrong-type-steps"),
        pytest.param(
            {"target": {"num_classes": "three"}}, ["target.num_classes"], id="wrong-type-nested"
        ),
        pytest.param({"train": {"lr": -1}}, ["train.lr"], id="negative-lr"),
        pytest.param(
            {"train": {"optimizer": "rmsprop"}}, ["train.optimizer"], id="unknown-optimizer"
        ),
        pytest.param(
            {"sources": [{"name": "x", "granularity": "task", "data": "data/other.npz"}]},
            ["sources.0", "labels"],
            id="task-source-with-data",
        ),
        pytest.param(
            {"strategy": "nope"},
            ["unknown strategy 'nope'", "equal", "fixed", "gcs", "olaux", "target-only"],
            id="unknown-strategy",
        ),
        pytest.param(
            {"strategy": {"name": "gcs", "params": {"bogus": 1}}},
            ["strategy", "gcs", "bogus"],
            id="unknown-strategy-param",
        ),
        pytest.param(
            {"sampler": "roundrobin"},
            ["unknown sampler 'roundrobin'", "all", "uniform"],
            id="unknown-sampler",
        ),
        pytest.param(
            {"sampler": {"name": "uniform", "params": {"size": 2}}},
            ["sampler", "uniform", "size"],
            id="unknown-sampler-param",
        ),
        pytest.param(
            {"model": {"trunk": "transformer"}}, ["model.trunk", "transformer"], id="unknown-trunk"
        ),
        pytest.param(
            {"model": {"params": {"widths": [4]}}}, ["model", "widths"], id="unknown-trunk-param"
        ),
        pytest.param(
            {"strategy": {"name": "olaux", "params": {"horizon": "five"}}},
            ["olaux", "horizon"],
            id="wrong-type-strategy-param",
        ),
        pytest.param(
            {"train": {"device": "banana"}}, ["train.device", "banana"], id="unknown-device"
        ),
        pytest.param(
            {"train": {"device": "cuda"}},
            ["train.device", "cuda"],
            id="unavailable-device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_config_errors_name_the_key(
    auxilia_main: Main,
    make_config: Callable[..., Path],
    tmp_path: Path,
    changes: dict[str, Any],
    fragments: list[str],
) -> None:
    config = make_config(changes, name="bad.yaml")
    out = tmp_path / "run"
    outcome = _run(auxilia_main, config, out)
    assert_one_line_error(outcome, *fragments)
    assert outcome.code == 2
    _no_run_written(out)


def test_config_file_not_utf8(auxilia_main: Main, tmp_path: Path) -> None:
    config = tmp_path / "binary.yaml"
    config.write_bytes(bytes(range(256)))
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), str(config))


def test_out_is_an_existing_file(auxilia_main: Main, tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.write_text("not a folder", encoding="utf-8")
    assert_one_line_error(_run(auxilia_main, tiny_config, out), str(out))


def test_debug_shows_the_exception(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config({"target": {"foo": 1}}, name="bad.yaml")
    with pytest.raises(ConfigError, match=r"target\.foo"):
        auxilia_main("--debug", "run", config, "--out", tmp_path / "run", "--quiet")


# ---- data files ----------------------------------------------------------------------------------


def test_missing_data_file(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config({"sources": _sources_with(helper={"data": "data/nothere.npz"})})
    missing = config.parent / "data" / "nothere.npz"
    assert_one_line_error(
        _run(auxilia_main, config, tmp_path / "run"), str(missing), "does not exist"
    )


def test_malformed_data_file(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    broken = config.parent / "data" / "broken.npz"
    broken.write_bytes(np.random.default_rng(0).bytes(256))
    config = make_config({"sources": _sources_with(helper={"data": "data/broken.npz"})})
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), str(broken), ".npz")


def test_x_and_y_of_different_lengths(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    bad = config.parent / "data" / "uneven.npz"
    np.savez(bad, x=np.zeros((10, 8), np.float32), y=np.zeros(9, np.int64))
    config = make_config({"sources": _sources_with(other={"data": "data/uneven.npz"})})
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), str(bad), "10", "9")


def test_target_label_outside_num_classes(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    train = config.parent / "data" / "target_train.npz"
    with np.load(train) as data:
        x, y = data["x"], data["y"].copy()
    y[4] = 7
    save_array_file(config.parent / "data" / "target_train_bad.npz", x, y)
    config = make_config({"target": {"train": "data/target_train_bad.npz"}})
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), "tiny", "label 7", "[0, 3)")


def test_shared_head_source_label_outside_target_classes(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 20)
    labels[3] = 5
    save_array_file(
        config.parent / "data" / "helper_bad.npz",
        rng.standard_normal((20, 8)).astype(np.float32),
        labels,
    )
    config = make_config({"sources": _sources_with(helper={"data": "data/helper_bad.npz"})})
    assert_one_line_error(
        _run(auxilia_main, config, tmp_path / "run"), "helper", "label 5", "[0, 3)"
    )


def test_source_without_samples(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    empty = config.parent / "data" / "empty.npz"
    np.savez(empty, x=np.zeros((0, 8), np.float32), y=np.zeros(0, np.int64))
    config = make_config({"sources": _sources_with(other={"data": "data/empty.npz"})})
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), str(empty), "no samples")


def test_task_labels_not_aligned_with_target(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    save_array_file(config.parent / "data" / "parity_short.npz", None, np.zeros(29, np.int64))
    config = make_config({"sources": _sources_with(parity={"labels": "data/parity_short.npz"})})
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), "parity", "29", "30")


def test_source_inputs_of_another_shape(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    save_array_file(
        config.parent / "data" / "wide.npz", np.zeros((12, 9), np.float32), np.zeros(12, np.int64)
    )
    config = make_config({"sources": _sources_with(other={"data": "data/wide.npz"})})
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), "other", "(9,)", "(8,)")


def test_non_finite_features_in_a_file(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_config()
    x = np.zeros((12, 8), np.float32)
    x[5, 2] = np.nan
    bad = config.parent / "data" / "nan.npz"
    save_array_file(bad, x, np.zeros(12, np.int64))
    config = make_config({"sources": _sources_with(other={"data": "data/nan.npz"})})
    assert_one_line_error(_run(auxilia_main, config, tmp_path / "run"), str(bad), "NaN")


# ---- non-finite loss during training -------------------------------------------------------------


def _first_draw(seed: int, num_sources: int, source: int) -> int:
    """The step at which the ``uniform`` sampler (per_step 1) first draws ``source``."""
    sampler = samplers.get("uniform", {"per_step": 1})
    state = sampler.init(num_sources, seed + 7)  # the trainer seeds its sampler with seed + 7
    for step in range(1, 1000):
        drawn, state = sampler.draw(state, torch.ones(num_sources))
        if bool(drawn[source]):
            return step
    raise AssertionError("never drawn")


def test_huge_features_overflow_the_loss(
    auxilia_main: Main, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    # 1e38 is finite in float32, so the file loads; the squared error of a regression head on
    # such inputs overflows to inf the first time the source is drawn (drawn first at a step
    # after a checkpoint, through the uniform sampler's seed).
    config = make_config()
    x = np.full((20, 8), 1e38, np.float32)
    x[::2] *= -1
    save_array_file(config.parent / "data" / "huge.npz", x, np.full(20, 0.5, np.float32))
    sources = [
        *base_config()["sources"],
        {"name": "huge", "data": "data/huge.npz", "head": "own", "kind": "regression"},
    ]
    seed = next(s for s in range(100) if 6 <= _first_draw(s, len(sources) + 1, len(sources)) <= 20)
    step = _first_draw(seed, len(sources) + 1, len(sources))
    config = make_config(
        {
            "sources": sources,
            "sampler": {"name": "uniform", "params": {"per_step": 1}},
            "train": {"seed": seed, "checkpoint_every": 5},
        }
    )
    out = tmp_path / "run"
    outcome = _run(auxilia_main, config, out)
    line = assert_one_line_error(outcome, "non-finite loss", "'huge'", f"at step {step}")
    assert outcome.code == 1, line
    assert not (out / "results.json").exists()
    last_good = (step - 1) // 5 * 5
    state = load_checkpoint(out / "checkpoints" / f"step_{last_good:08d}.pt")
    assert state["step"] == last_good
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())


def test_nan_loss_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trunk factory from this test package turns the 'other' source's features NaN from
    # training step 13 on; checkpoints are written every 5 steps.
    config = write_tiny_problem(
        tmp_path / "problem",
        {
            "model": {
                "trunk": "tests.tiny_problem:poisoned_trunk",
                "params": {"hidden": [16], "after": 12},
            },
            "train": {"checkpoint_every": 5},
        },
    )
    out = tmp_path / "run"
    outcome = run_auxilia_process("run", config, "--out", out, "--quiet")
    line = assert_one_line_error(outcome, "non-finite loss", "'other'", "at step 13")
    assert outcome.code == 1, line
    assert not (out / "results.json").exists()
    assert not (out / "report.html").exists()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert checkpoints == ["step_00000005.pt", "step_00000010.pt"]
    state = torch.load(out / "checkpoints" / checkpoints[-1], map_location="cpu", weights_only=True)
    assert state["step"] == 10
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]

    # --debug shows the traceback of the same failure
    debug = run_auxilia_process("--debug", "run", config, "--out", tmp_path / "debug", "--quiet")
    assert debug.code != 0
    assert "Traceback" in debug.stderr
    assert "NonFiniteLossError" in debug.stderr

    # The run resumes from the last good checkpoint (a fresh trunk counts its calls from 0 again).
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from auxilia.config import build_trainer, load_config

    results = build_trainer(load_config(config), config.parent, out, quiet=True).fit(resume=True)
    assert results["steps"] == 20
    assert (out / "results.json").is_file()
