"""Tests for auxilia.samplers, auxilia.ledger and auxilia.data.batching."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from auxilia import samplers
from auxilia.data.batching import BatchPlanner, IndexStream, one_row_per_loss
from auxilia.data.sources import Source, Target
from auxilia.errors import StrategyError
from auxilia.ledger import Ledger
from auxilia.statistics import Statistics

F64 = torch.float64
PROPERTY = settings(max_examples=30, deadline=None)


def _checkpoint(state: Any) -> Any:
    """Round trip through torch.save / torch.load(weights_only=True), as a checkpoint does."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("num", [1, 2, 7])
def test_all_draws_every_source(num: int) -> None:
    sampler = samplers.get("all")
    assert sampler.name == "all"
    state = sampler.init(num, 0)
    for _ in range(3):
        mask, state = sampler.draw(state, torch.ones(num, dtype=F64))
        assert mask.dtype == torch.bool
        assert mask.tolist() == [True] * num


def _draws(sampler: samplers.Sampler, state: dict[str, torch.Tensor], n: int) -> list[list[bool]]:
    """The next ``n`` masks, as lists of bools."""
    out = []
    coefficients = torch.ones(int(state["num_sources"]), dtype=F64)
    for _ in range(n):
        mask, state = sampler.draw(state, coefficients)
        out.append(mask.tolist())
    return out


@PROPERTY
@given(num=st.integers(1, 9), per_step=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_uniform_draws_target_plus_min_m_k(num: int, per_step: int, seed: int) -> None:
    sampler = samplers.uniform(per_step=per_step)
    state = sampler.init(num, seed)
    for mask in _draws(sampler, state, 8):
        assert len(mask) == num
        assert mask[0] is True
        assert sum(mask[1:]) == min(per_step, num - 1)


@PROPERTY
@given(num=st.integers(2, 9), per_step=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_uniform_reproducible_and_state_round_trip(num: int, per_step: int, seed: int) -> None:
    sampler = samplers.get("uniform", {"per_step": per_step})
    first = _draws(sampler, sampler.init(num, seed), 6)
    assert _draws(sampler, sampler.init(num, seed), 6) == first
    # Restore after 3 draws: the next draws are the same.
    state = sampler.init(num, seed)
    for _ in range(3):
        _, state = sampler.draw(state, torch.ones(num, dtype=F64))
    restored = _checkpoint(state)
    assert _draws(sampler, restored, 3) == first[3:]


def test_uniform_draw_does_not_mutate_state() -> None:
    sampler = samplers.uniform(per_step=2)
    state = sampler.init(6, 3)
    before = {k: v.clone() for k, v in state.items()}
    first, _ = sampler.draw(state, torch.ones(6, dtype=F64))
    again, _ = sampler.draw(state, torch.ones(6, dtype=F64))
    assert torch.equal(first, again)
    for key, value in before.items():
        assert torch.equal(state[key], value)


def test_uniform_is_uniform_and_seed_dependent() -> None:
    sampler = samplers.uniform(per_step=2)
    draws = torch.tensor(_draws(sampler, sampler.init(6, 0), 2000), dtype=F64)
    frequency = draws[:, 1:].mean(dim=0)  # each auxiliary drawn with probability 2/5
    assert bool(((frequency - 0.4).abs() < 0.05).all()), frequency
    assert float(draws[:, 0].mean()) == 1.0
    other = _draws(sampler, sampler.init(6, 1), 20)
    assert other != draws[:20].bool().tolist()


def test_sampler_registry_errors() -> None:
    assert samplers.names() == ["all", "exp3", "proportional", "ucb1", "uniform"]
    with pytest.raises(StrategyError, match="unknown sampler 'thompson'") as info:
        samplers.get("thompson")
    assert "all" in str(info.value)
    assert "uniform" in str(info.value)
    with pytest.raises(StrategyError, match="'k'") as info:
        samplers.get("uniform", {"k": 2})
    assert "per_step" in str(info.value)
    with pytest.raises(StrategyError, match="'per_step'"):
        samplers.get("all", {"per_step": 2})
    with pytest.raises(StrategyError, match="per_step must be >= 1"):
        samplers.get("uniform", {"per_step": 0})


# --------------------------------------------------------------------------- ledger


def _stats(
    present: list[bool],
    row: list[float] | None,
    losses: list[float],
    lr: float,
) -> Statistics:
    return Statistics(
        present=torch.tensor(present),
        losses=torch.tensor(losses, dtype=F64),
        target_row=None if row is None else torch.tensor(row, dtype=F64),
        lr=lr,
    )


STEP1 = (_stats([True, True, False], [4.0, 2.0, 0.0], [1.0, 3.0, 0.0], 0.1), [1.0, 0.5, 0.0])
STEP2 = (_stats([True, False, True], [2.0, 0.0, -8.0], [2.0, 0.0, 5.0], 0.2), [1.0, 0.0, 0.25])


def _approx(record: dict[str, float | None]) -> dict[str, Any]:
    return {k: None if v is None else pytest.approx(v, abs=1e-12) for k, v in record.items()}


def test_ledger_credit_is_lr_alpha_target_row() -> None:
    ledger = Ledger(["t", "a", "b"])
    credit = ledger.record(STEP1[0], torch.tensor(STEP1[1], dtype=F64))
    assert credit.tolist() == pytest.approx([0.1 * 1 * 4, 0.1 * 0.5 * 2, 0.0])
    # Absent sources get no credit even if the strategy gave them a coefficient.
    stats = _stats([True, False, True], [2.0, 3.0, -8.0], [2.0, 0.0, 5.0], 0.2)
    credit = ledger.record(stats, torch.tensor([1.0, 0.7, 0.25], dtype=F64))
    assert credit.tolist() == pytest.approx([0.4, 0.0, 0.2 * 0.25 * -8])


def test_ledger_interval_flush_and_summary() -> None:
    ledger = Ledger(["t", "a", "b"])
    for stats, alpha in (STEP1, STEP2):
        ledger.record(stats, torch.tensor(alpha, dtype=F64))
    record = ledger.flush_interval()
    assert _approx(record["coefficient"]) == {"t": 1.0, "a": 0.5, "b": 0.25}
    assert _approx(record["loss"]) == {"t": 1.5, "a": 3.0, "b": 5.0}
    assert _approx(record["credit"]) == {"t": 0.8, "a": 0.1, "b": -0.4}
    # Reset: an empty interval has nothing for anyone.
    empty = ledger.flush_interval()
    for key in ("coefficient", "loss", "credit"):
        assert empty[key] == {"t": None, "a": None, "b": None}
    # The next interval only sees its own steps.
    ledger.record(
        _stats([True, True, True], [1.0, -1.0, 2.0], [4.0, 6.0, 8.0], 1.0),
        torch.tensor([1.0, 0.0, 1.0], dtype=F64),
    )
    record = ledger.flush_interval()
    assert _approx(record["coefficient"]) == {"t": 1.0, "a": 0.0, "b": 1.0}
    assert _approx(record["loss"]) == {"t": 4.0, "a": 6.0, "b": 8.0}
    assert _approx(record["credit"]) == {"t": 1.0, "a": 0.0, "b": 2.0}
    # The run summary covers all three steps; means skip the steps a source was absent.
    summary = {row["name"]: row for row in ledger.summary()}
    assert [row["name"] for row in ledger.summary()] == ["t", "a", "b"]
    assert summary["t"]["drawn_steps"] == 3
    assert summary["a"]["drawn_steps"] == 2
    assert summary["b"]["drawn_steps"] == 2
    assert summary["t"]["mean_coefficient"] == pytest.approx(1.0)
    assert summary["a"]["mean_coefficient"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert summary["b"]["mean_coefficient"] == pytest.approx(0.625)  # (0.25 + 1) / 2
    assert summary["a"]["final_coefficient"] == 0.0
    assert summary["b"]["final_coefficient"] == 1.0
    assert summary["t"]["credit"] == pytest.approx(1.8)
    assert summary["a"]["credit"] == pytest.approx(0.1)
    assert summary["b"]["credit"] == pytest.approx(1.6)
    assert ledger.steps == 3


def test_ledger_value_is_lr_target_row_whatever_the_coefficient() -> None:
    """Value is credit at unit weight: a source the strategy shuts out (α = 0) gets no credit
    but still shows that it would have hurt (negative value); an absent one gets neither."""
    ledger = Ledger(["t", "a", "b"])
    for stats, alpha in (STEP1, STEP2):
        ledger.record(stats, torch.tensor(alpha, dtype=F64))
    ledger.record(
        _stats([True, True, True], [1.0, -1.0, 2.0], [4.0, 6.0, 8.0], 1.0),
        torch.tensor([1.0, 0.0, 1.0], dtype=F64),
    )
    summary = {row["name"]: row for row in ledger.summary()}
    # t: 0.1·4 + 0.2·2 + 1·1; a: 0.1·2 + (absent) + 1·(−1); b: (absent) + 0.2·(−8) + 1·2
    assert summary["t"]["value"] == pytest.approx(1.8)
    assert summary["a"]["value"] == pytest.approx(-0.8)
    assert summary["b"]["value"] == pytest.approx(0.4)
    assert summary["a"]["credit"] == pytest.approx(0.1)  # 0.1·0.5·2, then α = 0
    record = ledger.flush_interval()
    assert _approx(record["value"]) == {"t": 1.8, "a": -0.8, "b": 0.4}


def test_ledger_resumes_a_checkpoint_without_value_as_unknown() -> None:
    """A checkpoint written before the ledger kept value resumes; value is then unknown
    (None), never a silent 0, while the other totals continue exactly."""
    ledger = Ledger(["t", "a", "b"])
    ledger.record(STEP1[0], torch.tensor(STEP1[1], dtype=F64))
    old = ledger.state_dict()
    for part in ("run", "interval"):
        del old[part]["value_sum"]
    restored = Ledger(["t", "a", "b"])
    restored.load_state_dict(old)
    restored.record(STEP2[0], torch.tensor(STEP2[1], dtype=F64))
    summary = {row["name"]: row for row in restored.summary()}
    assert summary["t"]["value"] is None
    assert summary["b"]["credit"] == pytest.approx(-0.4)


def test_ledger_final_coefficient_is_last_step_where_drawn() -> None:
    ledger = Ledger(["t", "a", "b"])
    ledger.record(STEP1[0], torch.tensor(STEP1[1], dtype=F64))
    ledger.record(STEP2[0], torch.tensor(STEP2[1], dtype=F64))
    summary = {row["name"]: row for row in ledger.summary()}
    assert summary["a"]["final_coefficient"] == 0.5  # a was absent at step 2, keeps 0.5
    assert summary["b"]["final_coefficient"] == 0.25
    never = Ledger(["t", "never"])
    never.record(
        _stats([True, False], [1.0, 0.0], [1.0, 0.0], 1.0), torch.tensor([1.0, 0.0], dtype=F64)
    )
    row = never.summary()[1]
    assert row["drawn_steps"] == 0
    assert row["mean_coefficient"] is None
    assert row["final_coefficient"] is None
    assert row["credit"] == 0.0


def test_ledger_without_target_row_reports_none_credit() -> None:
    ledger = Ledger(["t", "a"])
    credit = ledger.record(
        _stats([True, True], None, [1.0, 2.0], 0.1), torch.tensor([1.0, 0.5], dtype=F64)
    )
    assert all(math.isnan(c) for c in credit.tolist())
    record = ledger.flush_interval()
    assert record["credit"] == {"t": None, "a": None}
    assert _approx(record["coefficient"]) == {"t": 1.0, "a": 0.5}
    assert _approx(record["loss"]) == {"t": 1.0, "a": 2.0}
    assert [row["credit"] for row in ledger.summary()] == [None, None]


def test_ledger_state_round_trip() -> None:
    names = ["t", "a", "b"]
    ledger = Ledger(names)
    ledger.record(STEP1[0], torch.tensor(STEP1[1], dtype=F64))
    restored = Ledger(names)
    restored.load_state_dict(_checkpoint(ledger.state_dict()))
    # The saved state is a copy: later records of the original do not leak into it.
    snapshot = ledger.state_dict()
    for target in (ledger, restored):
        target.record(STEP2[0], torch.tensor(STEP2[1], dtype=F64))
    assert restored.steps == ledger.steps == 2
    assert restored.summary() == ledger.summary()
    assert restored.flush_interval() == ledger.flush_interval()
    assert snapshot["steps"] == 1
    assert float(snapshot["run"]["drawn"][2]) == 0.0


# --------------------------------------------------------------------------- IndexStream


@PROPERTY
@given(size=st.integers(1, 12), epochs=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_index_stream_epochs_are_permutations(size: int, epochs: int, seed: int) -> None:
    stream = IndexStream(size, seed)
    for _ in range(epochs):
        epoch = stream.take(size)
        assert sorted(epoch.tolist()) == list(range(size))


@PROPERTY
@given(
    size=st.integers(1, 10),
    chunks=st.lists(st.integers(1, 25), min_size=1, max_size=6),
    seed=st.integers(0, 2**31),
)
def test_index_stream_take_across_epoch_boundaries(size: int, chunks: list[int], seed: int) -> None:
    stream = IndexStream(size, seed)
    pieces = [stream.take(n) for n in chunks]
    for piece, n in zip(pieces, chunks, strict=True):
        assert len(piece) == n
    total = torch.cat(pieces)
    # Chunking does not matter: the same stream as one big take.
    assert torch.equal(total, IndexStream(size, seed).take(len(total)))
    # Every full epoch of the concatenated stream is a permutation.
    for start in range(0, len(total) - size + 1, size):
        assert sorted(total[start : start + size].tolist()) == list(range(size))
    # Reshuffled between epochs (with 8 items, 3 identical epochs in a row are implausible).
    if size == 8 and len(total) >= 24:
        epochs = [total[i : i + 8].tolist() for i in (0, 8, 16)]
        assert not epochs[0] == epochs[1] == epochs[2]


@PROPERTY
@given(size=st.integers(1, 10), before=st.integers(0, 25), seed=st.integers(0, 2**31))
def test_index_stream_state_round_trip(size: int, before: int, seed: int) -> None:
    stream = IndexStream(size, seed)
    if before:
        stream.take(before)
    state = _checkpoint(stream.state_dict())
    expected = [stream.take(n).tolist() for n in (3, size, 7)]
    restored = IndexStream(size, seed + 1)  # a different seed: the state must override it
    restored.load_state_dict(state)
    assert [restored.take(n).tolist() for n in (3, size, 7)] == expected


# --------------------------------------------------------------------------- BatchPlanner


def _problem() -> tuple[Target, list[Source]]:
    # Column 0 of every input encodes its row: 0..19 for the target, 100+j / 200+j for datasets.
    n = 20
    x = torch.stack([torch.arange(n, dtype=torch.float32), torch.ones(n)], dim=1)
    target = Target("digits", train=(x, torch.arange(n) % 3), batch_size=5)
    task = Source("parity", granularity="task", labels=torch.arange(n) % 2)
    m = 7
    xd = torch.stack([100 + torch.arange(m, dtype=F64), torch.zeros(m, dtype=F64)], dim=1)
    own = Source("extra", data=(xd, (torch.arange(m) * 5) % 4), batch_size=3)
    xs = torch.stack([200 + torch.arange(9, dtype=torch.float32), torch.zeros(9)], dim=1)
    shared = Source("more", data=(xs, torch.arange(9) % 3), head="target", batch_size=4)
    return target, [task, own, shared]


def _check_batch(batch: Any, target: Target, sources: list[Source], drawn: list[bool]) -> None:
    segments = batch.segments
    assert [s.source for s in segments] == [k for k, d in enumerate(drawn) if d]
    heads = {0: "digits", 1: "parity", 2: "extra", 3: "digits"}
    for seg in segments:
        assert seg.head == heads[seg.source]
    # The target's rows come first; task sources reuse them with their own labels.
    rows = batch.x[segments[0].rows, 0].long()
    assert segments[0].rows == slice(0, target.batch_size)
    assert torch.equal(segments[0].labels, target.train[1][rows])
    assert torch.equal(batch.x[: target.batch_size], target.train[0][rows])
    start = target.batch_size
    for seg in segments[1:]:
        source = sources[seg.source - 1]
        if source.granularity == "task":
            assert seg.rows == slice(0, target.batch_size)
            assert torch.equal(seg.labels, source.y[rows])
            continue
        # Dataset segments are contiguous, in source order, and labelled from their own data.
        assert seg.rows == slice(start, start + source.batch_size)
        offset = 100 if source.name == "extra" else 200
        picked = batch.x[seg.rows, 0].long() - offset
        assert bool(((picked >= 0) & (picked < len(source.y))).all())
        assert torch.equal(seg.labels, source.y[picked])
        start += source.batch_size
    assert batch.x.shape == (start, 2)
    assert batch.x.dtype == torch.float32


def test_batch_planner_segments_and_labels() -> None:
    target, sources = _problem()
    planner = BatchPlanner(target, sources, seed=0)
    for drawn in ([True] * 4, [True, True, False, True], [True, False, True, False]):
        batch = planner.next(torch.tensor(drawn))
        _check_batch(batch, target, sources, drawn)


def test_batch_planner_target_rows_cover_an_epoch() -> None:
    target, sources = _problem()
    planner = BatchPlanner(target, sources, seed=1)
    rows = [planner.next(torch.tensor([True] * 4)).x[:5, 0].long() for _ in range(4)]
    assert sorted(torch.cat(rows).tolist()) == list(range(20))


def test_batch_planner_undrawn_source_is_skipped_and_its_stream_waits() -> None:
    target, sources = _problem()
    planner = BatchPlanner(target, sources, seed=2)
    reference = BatchPlanner(target, sources, seed=2)
    skipped = planner.next(torch.tensor([True, True, False, True]))
    assert 2 not in [s.source for s in skipped.segments]
    assert skipped.x.shape[0] == 5 + 4
    # Source 2 was not drawn: its next batch is the one it would have had first.
    first_ref = reference.next(torch.tensor([True] * 4))
    now = planner.next(torch.tensor([True] * 4))
    seg_now = next(s for s in now.segments if s.source == 2)
    seg_ref = next(s for s in first_ref.segments if s.source == 2)
    assert torch.equal(now.x[seg_now.rows], first_ref.x[seg_ref.rows])


def test_batch_planner_state_round_trip() -> None:
    target, sources = _problem()
    planner = BatchPlanner(target, sources, seed=3)
    for _ in range(3):
        planner.next(torch.tensor([True] * 4))
    state = _checkpoint(planner.state_dict())
    masks = [[True] * 4, [True, False, True, False], [True] * 4, [True, True, False, True]]
    expected = [planner.next(torch.tensor(m)) for m in masks]
    restored = BatchPlanner(target, sources, seed=99)
    restored.load_state_dict(state)
    for mask, batch in zip(masks, expected, strict=True):
        got = restored.next(torch.tensor(mask))
        assert torch.equal(got.x, batch.x)
        assert [(s.source, s.rows) for s in got.segments] == [
            (s.source, s.rows) for s in batch.segments
        ]
        for a, b in zip(got.segments, batch.segments, strict=True):
            assert torch.equal(a.labels, b.labels)


def test_one_row_per_loss_copies_the_target_rows_for_each_task() -> None:
    target, sources = _problem()
    second_task = Source("odd3", granularity="task", labels=torch.arange(20) % 3)
    planner = BatchPlanner(target, [*sources, second_task], seed=4)
    batch = planner.next(torch.tensor([True] * 5))
    laid_out = one_row_per_loss(batch)
    # Row i carries loss i: segments tile the rows in their order, each with its own inputs.
    assert [s.source for s in laid_out.segments] == [s.source for s in batch.segments]
    start = 0
    for old, new in zip(batch.segments, laid_out.segments, strict=True):
        size = old.rows.stop - old.rows.start
        assert new.rows == slice(start, start + size)
        assert torch.equal(laid_out.x[new.rows], batch.x[old.rows])
        assert torch.equal(new.labels, old.labels)
        assert new.head == old.head
        start += size
    assert laid_out.x.shape[0] == start == 5 * 3 + 3 + 4
    # Without a task the batch is one row per loss already and comes back as it is.
    no_task = planner.next(torch.tensor([True, False, True, True, False]))
    assert one_row_per_loss(no_task) is no_task
