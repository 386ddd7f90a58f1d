"""Resume exactness: a run stopped at N/2 and resumed to N equals the uninterrupted run, bitwise."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from auxilia.cli import app
from auxilia.config import build_trainer, load_config
from auxilia.data.sources import Source, Target
from auxilia.errors import ConfigError
from auxilia.train.layout import copies_pay_off
from tiny_problem import (
    Outcome,
    assert_one_line_error,
    assert_same,
    base_config,
    write_tiny_problem,
)

STEPS = 20
HALF = 10  # a multiple of log_every (5) and checkpoint_every (10): the logs line up exactly

DATASETS = [s for s in base_config()["sources"] if s["granularity"] == "dataset"]
TASKS = [s for s in base_config()["sources"] if s["granularity"] == "task"]

CASES = {
    "gcs-all": {"strategy": {"name": "gcs"}, "sampler": {"name": "all"}},
    # horizon 3: the resume point (10) falls inside an olaux accumulation window
    "olaux-all": {
        "strategy": {"name": "olaux", "params": {"horizon": 3}},
        "sampler": {"name": "all"},
    },
    "gcs-uniform": {
        "strategy": {"name": "gcs"},
        "sampler": {"name": "uniform", "params": {"per_step": 1}},
    },
    "olaux-uniform": {
        "strategy": {"name": "olaux", "params": {"horizon": 3}},
        "sampler": {"name": "uniform", "params": {"per_step": 1}},
    },
    # held-out target batches (their own index stream) and a meta step inside the window
    "auxinash-holdout": {
        "strategy": {"name": "auxinash", "params": {"update_every": 3}},
        "sampler": {"name": "all"},
    },
    # the engine's EMA of the target gradient is part of the checkpoint
    "bloop-ema": {"strategy": {"name": "bloop"}, "sampler": {"name": "all"}},
    # dataset sources only: ``auto`` runs the per-sample ghost mode
    "auto-ghost": {"sources": DATASETS, "strategy": {"name": "auto"}},
    "bloop-ghost": {"sources": DATASETS, "strategy": {"name": "bloop"}},
    "auxinash-ghost": {
        "sources": DATASETS,
        "strategy": {"name": "auxinash", "params": {"update_every": 3}},
    },
    # tasks beside datasets, copies made for ghost; ghost cannot replay the LSTM trunk, so the
    # engine moves on to batched and the copies are dropped: both kept across the resume
    "auto-fallback": {
        "model": {"trunk": "tests.tiny_problem:recurrent_trunk"},
        "strategy": {"name": "auto"},
    },
    # task sources only, every one drawn: the shared-input layout (batched, jvp)
    "auto-tasks": {"sources": TASKS, "strategy": {"name": "auto"}},
    "projection-tasks": {
        "sources": TASKS,
        "strategy": {"name": "auto", "params": {"variant": "projection"}},
    },
}


def _fit(config: Path, out: Path, *, resume: bool = False) -> dict[str, Any]:
    return build_trainer(load_config(config), config.parent, out, quiet=True).fit(resume=resume)


def _last_checkpoint(out: Path) -> dict[str, Any]:
    path = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def _results(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results.pop("wall_seconds")
    return results


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def _assert_runs_equal(resumed: Path, full: Path) -> None:
    a, b = _last_checkpoint(resumed), _last_checkpoint(full)
    assert a["step"] == b["step"] == STEPS
    assert set(a["model"]) == set(b["model"])
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), f"model parameter {name} differs after resume"
    a.pop("wall_seconds")
    b.pop("wall_seconds")
    # Which of vmap or a loop `batched` kept is timed in each run (same numbers either way): two
    # runs may keep different ones; a resumed run keeps its own (test below).
    a["engine"].pop("batched_path", None)
    b["engine"].pop("batched_path", None)
    assert_same(a, b)  # optimizer, engine/strategy, sampler, planner, ledger, RNG
    ra, rb = _results(resumed), _results(full)
    ra["engine"].pop("path")
    rb["engine"].pop("path")
    assert ra == rb
    metrics, expected = _metrics(resumed), _metrics(full)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert [m for m in metrics if m["step"] > HALF] == [m for m in expected if m["step"] > HALF]
    assert metrics == expected


@pytest.mark.filterwarnings("ignore:engine mode auto:UserWarning")  # the auto-fallback case
@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_more_steps_is_exact(case: str, tmp_path: Path) -> None:
    problem = tmp_path / "problem"
    full_config = write_tiny_problem(problem, CASES[case], name="full.yaml")
    half_config = write_tiny_problem(
        problem, {**CASES[case], "train": {"steps": HALF}}, name="half.yaml"
    )

    full = _fit(full_config, tmp_path / "full")
    split_dir = tmp_path / "split"
    half = _fit(half_config, split_dir)
    assert half["steps"] == HALF
    assert _last_checkpoint(split_dir)["step"] == HALF

    kept = _last_checkpoint(split_dir)["engine"].get("batched_path")
    resumed = _fit(full_config, split_dir, resume=True)  # train.steps raised from HALF to STEPS
    assert _last_checkpoint(split_dir)["engine"].get("batched_path") == kept
    assert kept is None or kept in resumed["engine"]["path"]  # "vmap", or "via batched, vmap"
    assert resumed["steps"] == STEPS
    assert resumed["target"] == full["target"]
    assert resumed["sources"] == full["sources"]
    _assert_runs_equal(split_dir, tmp_path / "full")
    # config.yaml describes the resumed run (train.steps raised to STEPS), as in the full run
    resolved = yaml.safe_load((split_dir / "config.yaml").read_text(encoding="utf-8"))
    assert resolved["train"]["steps"] == STEPS
    assert resolved == yaml.safe_load(
        (tmp_path / "full" / "config.yaml").read_text(encoding="utf-8")
    )


def test_leaving_ghost_drops_the_copies_made_for_it(tmp_path: Path) -> None:
    """Tasks beside datasets: the target's rows are copied for ghost, which cannot replay an
    LSTM trunk; the engine moves on (mode auto), the copies are dropped, and the run says so."""
    config = write_tiny_problem(tmp_path / "problem", CASES["auto-fallback"])
    with pytest.warns(UserWarning, match=r"cannot replay module 'trunk.rnn' \(LSTM\)"):
        results = _fit(config, tmp_path / "out")
    engine = results["engine"]
    assert engine["mode"] == "batched"
    assert engine["copies_target_rows"] is False
    assert "the target's rows copied once per task" in engine["why"]
    assert "ghost cannot measure this model" in engine["why"]
    assert engine["why"].index("copies dropped") < engine["why"].index("ghost cannot")
    assert _last_checkpoint(tmp_path / "out")["engine"]["fallback"]["mode"] == "batched"


def test_cli_resume_with_more_steps_is_exact(tmp_path: Path) -> None:
    problem = tmp_path / "problem"
    full_config = write_tiny_problem(problem, CASES["olaux-uniform"], name="full.yaml")
    half_config = write_tiny_problem(
        problem, {**CASES["olaux-uniform"], "train": {"steps": HALF}}, name="half.yaml"
    )
    runner = CliRunner()
    for args in (
        ["run", str(full_config), "--out", str(tmp_path / "full"), "--quiet"],
        ["run", str(half_config), "--out", str(tmp_path / "split"), "--quiet"],
        ["run", str(full_config), "--out", str(tmp_path / "split"), "--resume", "--quiet"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
    _assert_runs_equal(tmp_path / "split", tmp_path / "full")


def test_half_written_metrics_line_is_dropped_on_resume(tmp_path: Path) -> None:
    config = write_tiny_problem(tmp_path / "problem", CASES["gcs-uniform"])
    full = tmp_path / "full"
    _fit(config, full)

    # A crash after step 15's line and in the middle of step 20's, with the checkpoint of step 10.
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    (crashed / "checkpoints" / "step_00000020.pt").unlink()
    (crashed / "results.json").unlink()
    lines = (full / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    (crashed / "metrics.jsonl").write_text(
        "\n".join(lines[:3]) + "\n" + lines[3][:30], encoding="utf-8"
    )

    _fit(config, crashed, resume=True)
    text = (crashed / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    for line in text.splitlines():
        json.loads(line)  # every line is whole
    _assert_runs_equal(crashed, full)


def test_resume_with_other_sources_fails(
    auxilia_main: Callable[..., Outcome], tmp_path: Path
) -> None:
    problem = tmp_path / "problem"
    config = write_tiny_problem(problem, {"train": {"steps": HALF}})
    out = tmp_path / "run"
    _fit(config, out)
    fewer = write_tiny_problem(
        problem, {"sources": base_config()["sources"][:2]}, name="fewer.yaml"
    )
    outcome = auxilia_main("run", fewer, "--out", out, "--resume", "--quiet")
    assert_one_line_error(outcome, "checkpoint", "parity")
    assert (out / "checkpoints" / f"step_{HALF:08d}.pt").is_file()


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("-ghost")])
def test_ghost_cases_run_the_ghost_mode(case: str, tmp_path: Path) -> None:
    config = write_tiny_problem(tmp_path, CASES[case])
    trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
    assert trainer.engine.mode.name == "ghost"


@pytest.mark.parametrize(("case", "mode"), [("auto-tasks", "batched"), ("projection-tasks", "jvp")])
def test_task_sources_alone_run_the_shared_input_layout(
    case: str, mode: str, tmp_path: Path
) -> None:
    config = write_tiny_problem(tmp_path, CASES[case])
    trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
    assert trainer.engine.layout == "shared-input"
    assert trainer.engine.mode.name == mode


def fit_variants(tmp_path: Path, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Train the tiny problem once per variant (config changes): each trainer with its fit."""
    runs = {}
    for label, changes in variants.items():
        config = write_tiny_problem(tmp_path / label, changes)
        trainer = build_trainer(
            load_config(config), config.parent, tmp_path / f"out-{label}", quiet=True
        )
        runs[label] = (trainer, trainer.fit())
    return runs


def assert_same_training(first: Any, second: Any) -> None:
    """Two (trainer, results) pairs trained the same: parameters, target metric, credit."""
    (trainer_a, results_a), (trainer_b, results_b) = first, second
    model_a = trainer_a.model.state_dict()
    for name, tensor in trainer_b.model.state_dict().items():
        torch.testing.assert_close(model_a[name], tensor, rtol=1e-4, atol=1e-6)
    assert results_a["target"]["value"] == pytest.approx(results_b["target"]["value"])
    for a, b in zip(results_a["sources"], results_b["sources"], strict=True):
        assert a["name"] == b["name"]
        assert a["credit"] == pytest.approx(b["credit"], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("strategy", ["auto", "olaux"])
def test_task_sources_train_the_same_in_either_layout(strategy: str, tmp_path: Path) -> None:
    """The shared-input table of task losses and the per-row partitioned split (a sampler that
    draws the one task every step, but is not ``all``) measure and train the same."""
    runs = fit_variants(
        tmp_path,
        {
            sampler: {
                "sources": TASKS,
                "strategy": {"name": strategy},
                "sampler": {"name": sampler, "params": {"per_step": 1} if sampler != "all" else {}},
            }
            for sampler in ("all", "uniform")
        },
    )
    assert runs["all"][0].engine.layout == "shared-input"
    assert runs["uniform"][0].engine.layout == "partitioned"
    assert_same_training(runs["all"], runs["uniform"])


def test_task_sources_beside_datasets_copy_the_target_rows(tmp_path: Path) -> None:
    """With a task beside datasets, a per-sample mode gets one row per loss (the target's rows
    copied for the task), unless rows interact in the model: then the error names why."""
    for strategy, mode in (("gcs", "auto"), ("olaux", "ghost")):
        config = write_tiny_problem(
            tmp_path,
            {"strategy": {"name": strategy}, "train": {"engine_mode": mode}},
            name=f"{strategy}-{mode}.yaml",
        )
        trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
        assert trainer.copies_rows
        assert (trainer.engine.layout, trainer.engine.mode.name) == ("partitioned", "ghost")
        trainer.train_step(0)
        summary = trainer.engine_summary()
        assert summary["copies_target_rows"]
        assert summary["mode"] == "ghost"
        assert (
            "the target's rows copied once per task (24 → 32 rows with every source drawn)"
            in summary["why"]
        )
    dropout = {"model": {"params": {"hidden": [16], "dropout": 0.1}}}
    config = write_tiny_problem(tmp_path, {**dropout, "train": {"engine_mode": "ghost"}})
    with pytest.raises(ConfigError, match=r"'ghost' needs one loss per row.*Dropout, p=0.1"):
        build_trainer(load_config(config), config.parent, None, quiet=True)
    config = write_tiny_problem(tmp_path, dropout, name="dropout.yaml")
    trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
    assert not trainer.copies_rows
    assert trainer.engine.mode.name == "batched"  # shared features: no per-sample mode
    assert trainer.engine_summary()["why"].endswith(
        "copies of a row would differ: 'trunk.3' (Dropout, p=0.1) draws a mask per row"
    )
    # Tasks alone under a sampler other than `all`: each copy is a whole target batch, the
    # FLOPs of `batched`'s passes, so `auto` keeps `batched`; asked for, `ghost` still runs.
    alone = {"sources": TASKS, "sampler": {"name": "uniform", "params": {"per_step": 1}}}
    for mode, copies, name in (("auto", False, "batched"), ("ghost", True, "ghost")):
        config = write_tiny_problem(
            tmp_path, {**alone, "train": {"engine_mode": mode}}, name=f"alone-{mode}.yaml"
        )
        trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
        assert (trainer.copies_rows, trainer.engine.mode.name) == (copies, name)
        if mode == "auto":
            assert trainer.engine_summary()["why"].endswith(
                "copying them per task (8 → 16 rows with every source drawn) "
                "would cost more than batched"
            )


def test_copies_pay_off_where_ghost_over_the_copies_costs_less() -> None:
    """About 2 backward passes a row for ``ghost`` over the copied rows, against 3.5 for ``jvp``
    and K + 1 for ``batched`` over the shared rows (hand-counted rows below)."""
    x = torch.zeros(64, 4)
    labels = torch.zeros(64, dtype=torch.long)

    def sources(datasets: int, tasks: int) -> list[Source]:
        return [
            Source(f"d{i}", data=(x, labels), head="target", batch_size=32) for i in range(datasets)
        ] + [Source(f"t{i}", granularity="task", labels=labels) for i in range(tasks)]

    target = Target("t", train=(x, labels), batch_size=32)
    # The demo's shape, 4 datasets and a task: 160 rows, 192 with the copy (2·192 ≤ 3.5·160).
    assert copies_pay_off(target, sources(4, 1), "jvp")
    assert copies_pay_off(target, sources(4, 1), "batched")
    # 8 + 8: 288 rows, 544 copied: 1088 > 3.5·288 = 1008, but ≤ 17·288.
    assert not copies_pay_off(target, sources(8, 8), "jvp")
    assert copies_pay_off(target, sources(8, 8), "batched")
    # Tasks alone: 32 rows, 160 copied; 320 > 5·32.
    assert not copies_pay_off(target, sources(0, 4), "batched")
    assert not copies_pay_off(target, sources(0, 4), "jvp")
    # Copies are a choice between ghost and these two; any other mode on the shared rows stays.
    assert not copies_pay_off(target, sources(4, 1), "exact")


# One dataset beside three tasks: copying the target's rows for each task multiplies the
# step's rows by 2.5 (16 → 40), more than ``jvp``'s passes over the shared rows cost.
MANY_TASKS = {
    "sources": [
        base_config()["sources"][0],
        *({**TASKS[0], "name": f"parity{i}"} for i in range(3)),
    ]
}


@pytest.mark.parametrize(
    ("strategy", "changes", "mode"),
    [
        ("auto", {}, "ghost"),
        ("arml", {}, "ghost"),
        ("olaux", {}, "ghost"),
        ("olaux", MANY_TASKS, "jvp"),
        ("arml", MANY_TASKS, "ghost"),
    ],
)
def test_task_and_dataset_sources_train_as_exact_does(
    strategy: str, changes: dict[str, Any], mode: str, tmp_path: Path
) -> None:
    """A task source beside dataset sources puts several losses on the target's rows; ``auto``
    runs ``ghost`` on copies of the target's rows where they cost less than the mode on the
    shared rows (``jvp`` for a strategy that reads only the target row, ``batched``'s K + 1
    passes for one that reads more), that mode otherwise, and trains as ``exact`` does."""
    runs = fit_variants(
        tmp_path,
        {
            engine_mode: {
                **changes,
                "strategy": {"name": strategy},
                "train": {"engine_mode": engine_mode},
            }
            for engine_mode in ("auto", "exact")
        },
    )
    assert runs["auto"][0].copies_rows == (mode == "ghost")
    assert runs["auto"][1]["engine"]["mode"] == mode  # results.json records what ran
    assert runs["exact"][1]["engine"]["mode"] == "exact"
    assert runs["auto"][0].engine.mode.name == mode
    assert runs["exact"][0].engine.mode.name == "exact"
    assert_same_training(runs["auto"], runs["exact"])
