"""The same run on several processes (torchrun, gloo on CPU) as on one.

Equivalence: with the same global batch and seed, two processes give the same coefficients at
every step and the same final parameters as one, for the engine alone (every mode, both
layouts) and for whole Trainer and ``auxilia run`` runs. Checkpoints: written once, resumable
on another number of processes. Failures: a rank that dies, raises, hangs or meets a NaN stops
the whole run in bounded time with a message naming it, and the last checkpoint survives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from auxilia.data.batching import Batch, Segment
from auxilia.errors import ConfigError, EngineError
from auxilia.train.checkpoint import list_checkpoints, load_checkpoint
from auxilia.train.distributed import Place, check_world, shard, share
from distributed_worker import ENGINE_CASES, engine_case, trainer_case
from tiny_problem import REPO_ROOT, run_auxilia_process, torchrun, write_tiny_problem

TESTS = Path(__file__).resolve().parent
if not torch.distributed.is_available():  # pragma: no cover - every CPU wheel has it
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def assert_close(one: dict[str, Any], many: dict[str, Any], rtol: float, where: str) -> None:
    torch.testing.assert_close(many["alphas"], one["alphas"], rtol=rtol, atol=rtol, msg=where)
    torch.testing.assert_close(many["params"], one["params"], rtol=rtol, atol=rtol, msg=where)


# ---- sharding -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    target=st.integers(1, 9),
    datasets=st.lists(st.integers(0, 7), max_size=3),
    tasks=st.integers(0, 2),
    world=st.integers(1, 4),
)
def test_shards_partition_every_source(
    target: int, datasets: list[int], tasks: int, world: int
) -> None:
    """The ranks' shards hold every row of every source once, in order, sizes within one."""
    segments = [Segment(0, "t", slice(0, target), torch.arange(target))]
    segments += [
        Segment(1 + i, f"task{i}", slice(0, target), torch.arange(target) + 100 * (i + 1))
        for i in range(tasks)
    ]
    start = target
    for j, n in enumerate(datasets):
        k = 1 + tasks + j
        segments.append(Segment(k, f"d{j}", slice(start, start + n), torch.arange(n) + 1000 * k))
        start += n
    batch = Batch(torch.arange(start, dtype=torch.float64).unsqueeze(1), segments)
    shards = [shard(batch, Place(rank, world)) for rank in range(world)]
    for i, segment in enumerate(segments):
        parts = [s.segments[i] for s in shards]
        assert all(p.source == segment.source and p.head == segment.head for p in parts)
        assert torch.equal(torch.cat([p.labels for p in parts]), segment.labels)
        rows = torch.cat([s.x[p.rows, 0] for s, p in zip(shards, parts, strict=True)])
        assert torch.equal(rows, batch.x[segment.rows, 0])
        sizes = [p.rows.stop - p.rows.start for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert sum(len(s.x) for s in shards) == len(batch.x)


def test_share_and_world_checks() -> None:
    assert [share(5, Place(r, 2)) for r in range(2)] == [slice(0, 2), slice(2, 5)]
    assert shard(Batch(torch.zeros(3, 1), []), Place()).x.shape == (3, 1)
    check_world(Place(0, 4), 4)
    with pytest.raises(ConfigError, match="5 processes cannot share a global batch of 4 target"):
        check_world(Place(0, 5), 4)


def test_engine_refuses_distributed_without_a_process_group() -> None:
    from auxilia import strategies
    from auxilia.engine import Engine

    model = torch.nn.Linear(3, 1)
    with pytest.raises(EngineError, match=r"torch\.distributed is not initialised"):
        Engine(model, strategy=strategies.get("gcs"), num_sources=2, distributed=True)


# ---- equivalence ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("engine")
    done = torchrun(TESTS / "distributed_worker.py", "engine", out)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks[0], ranks[1]


@pytest.mark.parametrize(("layout", "mode", "name"), ENGINE_CASES)
def test_engine_on_two_processes_equals_one(
    engine_runs: tuple[dict[str, Any], dict[str, Any]], layout: str, mode: str, name: str
) -> None:
    """float64: coefficients and parameters to 1e-10, identical bit for bit on both ranks;
    uneven shares, a source with one sample (absent on a rank), one absent from a step, a
    held-out row (auxinash), the EMA (bloop), a gradient already in ``.grad``."""
    key = f"{layout}/{mode}/{name}"
    single = engine_case(layout, mode, name, Place())
    first, second = engine_runs[0][key], engine_runs[1][key]
    if single is None:  # the mode cannot serve the strategy: refused alike on every rank
        assert first is None
        assert second is None
        return
    assert torch.equal(first["alphas"], second["alphas"]), key
    assert torch.equal(first["params"], second["params"]), key
    assert_close(single, first, 1e-10, key)


TRAINER_CASES = [
    ("equal", "ghost", "all"),
    ("gcs", "ghost", "all"),
    ("olaux", "ghost", "all"),
    ("arml", "ghost", "all"),
    ("auto", "ghost", "exp3"),
    ("gcs", "exact", "exp3"),
    ("olaux", "jvp", "all"),
    ("arml", "batched", "all"),
    ("auxinash", "exact", "all"),
    ("auto", "tasks", "all"),  # the task source alone: the shared-input layout
]


def case_config(folder: Path, strategy: str, mode: str, sampler: str, **train: Any) -> Path:
    """The tiny problem (without its task source for ``ghost``; with it alone for ``tasks``,
    under ``engine_mode: auto``) under ``strategy``."""
    changes: dict[str, Any] = {
        "strategy": {"name": strategy},
        "train": {
            "engine_mode": "auto" if mode == "tasks" else mode,
            "steps": 10, "log_every": 1, "checkpoint_every": 5, **train,
        },
    }  # fmt: skip
    if sampler != "all":
        changes["sampler"] = {"name": sampler, "params": {"per_step": 1}}
    path = write_tiny_problem(folder, changes, name=f"{strategy}-{mode}-{sampler}.yaml")
    if mode in ("ghost", "tasks"):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        kept = "dataset" if mode == "ghost" else "task"
        config["sources"] = [s for s in config["sources"] if s["granularity"] == kept]
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("trainer")
    paths = [case_config(folder / "problem", *case) for case in TRAINER_CASES]
    done = torchrun(TESTS / "distributed_worker.py", "trainer", folder / "out", *paths)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(folder / "out" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for path in map(str, paths):
        assert torch.equal(ranks[0][path]["alphas"], ranks[1][path]["alphas"]), path
    return {"paths": paths, "runs": ranks[0]}


@pytest.mark.parametrize("case", TRAINER_CASES, ids=["-".join(c) for c in TRAINER_CASES])
def test_trainer_on_two_processes_equals_one(
    trainer_runs: dict[str, Any], case: tuple[str, str, str]
) -> None:
    """float32 Trainer runs (Adam, per-source heads, a task source, exp3 drawing sources)."""
    path = trainer_runs["paths"][TRAINER_CASES.index(case)]
    single = trainer_case(path)
    many = trainer_runs["runs"][str(path)]
    assert_close(single, many, 1e-4, str(case))
    assert many["val"] == pytest.approx(single["val"])


def metric_lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_parameters(run: Path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(list_checkpoints(run / "checkpoints")[-1][1])["model"])


def test_auxilia_run_under_torchrun(tmp_path: Path) -> None:
    """``torchrun -m auxilia run``: the same metrics, checkpoint and result as ``auxilia run``;
    rank 0 alone writes (one metrics line per step) and prints."""
    config = case_config(tmp_path / "problem", "gcs", "auto", "all")
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_auxilia_process("run", config, "--out", one, "--quiet")
    assert single.code == 0, single.stderr
    done = torchrun("-m", "auxilia", "run", config, "--out", two, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1
    lines_one, lines_two = metric_lines(one), metric_lines(two)
    assert [r["step"] for r in lines_two] == list(range(1, 11))
    for a, b in zip(lines_one, lines_two, strict=True):
        assert b["coefficient"] == pytest.approx(a["coefficient"], rel=1e-4, abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for name, value in final_parameters(one).items():
        torch.testing.assert_close(final_parameters(two)[name], value, rtol=1e-4, atol=1e-5)
    result_one = json.loads((one / "results.json").read_text())["target"]
    result_two = json.loads((two / "results.json").read_text())["target"]
    assert result_two["value"] == pytest.approx(result_one["value"])
    assert (two / "report.html").exists()


def test_resume_on_another_number_of_processes(tmp_path: Path) -> None:
    """A 2-process run stopped at step 5 continues on one process to the same end as an
    uninterrupted one-process run."""
    half = case_config(tmp_path / "problem", "auto", "auto", "all", steps=5)
    half = half.rename(half.with_name("half.yaml"))
    full = case_config(tmp_path / "problem", "auto", "auto", "all")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_auxilia_process("run", full, "--out", straight, "--quiet").code == 0
    done = torchrun("-m", "auxilia", "run", half, "--out", resumed, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(resumed / "checkpoints")] == [5]
    again = run_auxilia_process("run", full, "--out", resumed, "--resume", "--quiet")
    assert again.code == 0, again.stderr
    for name, value in final_parameters(straight).items():
        torch.testing.assert_close(final_parameters(resumed)[name], value, rtol=1e-4, atol=1e-5)
    assert [r["step"] for r in metric_lines(resumed)] == list(range(1, 11))


def test_the_documented_loop_runs_on_two_processes(tmp_path: Path) -> None:
    """docs/distributed.md's own-loop example (which checks itself against one process)."""
    text = (REPO_ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    script = tmp_path / "example.py"
    script.write_text(block, encoding="utf-8")
    done = torchrun(script)
    assert done.returncode == 0, done.stderr[-3000:]


# ---- failures -------------------------------------------------------------------------------


def failing_config(folder: Path, how: str, **model: Any) -> Path:
    return write_tiny_problem(
        folder,
        {
            "model": {
                "trunk": "distributed_trunks:failing_trunk",
                "params": {"hidden": [16], "how": how, "rank": 1, "after": 6, **model},
            },
            "train": {"steps": 12, "checkpoint_every": 5, "timeout": 10},
        },
        name=f"{how}.yaml",
    )


def assert_last_checkpoint_intact(run: Path) -> None:
    checkpoints = list_checkpoints(run / "checkpoints")
    assert [step for step, _ in checkpoints] == [5]
    assert int(load_checkpoint(checkpoints[-1][1])["step"]) == 5
    assert not (run / "results.json").exists()


@pytest.mark.parametrize("how", ["exit", "raise", "hang"])
def test_a_failing_rank_stops_the_whole_run(tmp_path: Path, how: str) -> None:
    """Rank 1 dies (exit 3), raises, or stops answering at step 7: torchrun ends every rank
    within the collective timeout (10 s here), names rank 1's failure (as the root cause, or
    beside rank 0's lost contact with it), and the checkpoint of step 5 is intact."""
    config = failing_config(tmp_path / "problem", how)
    run = tmp_path / "run"
    done = torchrun("-m", "auxilia", "run", config, "--out", run, "--quiet", timeout=180)
    assert done.returncode != 0
    assert "Root Cause" in done.stderr
    cause = done.stderr.split("Root Cause", 1)[1]
    if how == "hang":  # rank 0 gives up waiting for rank 1 and says so
        assert "rank      : 0" in cause
        assert "error: rank 0 of 2: lost contact with the other processes" in done.stderr
    else:  # rank 1's failure is in torchrun's summary: the root cause, or listed beside
        # rank 0's when rank 0 was seen to fail first (a loaded machine) for losing rank 1
        assert "rank      : 1" in done.stderr
        failure = "exitcode  : 3" if how == "exit" else "injected failure"
        assert failure in done.stderr
        if "rank      : 1" not in cause:
            assert "error: rank 0 of 2: lost contact with the other processes" in done.stderr
    assert_last_checkpoint_intact(run)


def test_a_nan_on_one_rank_stops_every_rank_alike(tmp_path: Path) -> None:
    """Rank 1's features turn NaN at step 7, rank 0's stay finite: the global loss check makes
    both ranks stop at that step with the same one-line message; the checkpoint survives."""
    config = failing_config(tmp_path / "problem", "nan")
    run = tmp_path / "run"
    done = torchrun("-m", "auxilia", "run", config, "--out", run, "--quiet", timeout=180)
    assert done.returncode != 0
    # The two ranks write to one stderr, so their lines may interleave: find each message.
    errors = sorted(re.findall(r"error: rank \d of 2: [^\n]*?kept", done.stderr))
    assert len(errors) == 2, done.stderr[-3000:]
    for rank, line in enumerate(errors):
        assert line.startswith(f"error: rank {rank} of 2: non-finite loss nan for source 'tiny'")
        assert "at step 7" in line
    assert_last_checkpoint_intact(run)
