"""Held-out target data for strategies that learn from it (AuxiLearn, AuxiNash)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auxilia.config import build_trainer, load_config
from auxilia.data.sources import Target, hold_out
from auxilia.errors import DataError
from tiny_problem import base_config, write_tiny_problem


def _target(n: int = 20) -> Target:
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.arange(n) % 4
    return Target("t", train=(x, y), batch_size=4)


def test_hold_out_splits_disjointly_and_reproducibly() -> None:
    target = _target()
    trained, (hx, hy) = hold_out(target, 0.25, seed=3)
    assert len(hy) == 5
    assert len(trained.train[1]) == 15
    rows = {tuple(r.tolist()) for r in trained.train[0]} | {tuple(r.tolist()) for r in hx}
    assert len(rows) == 20  # every sample is in exactly one part
    again, (hx2, _) = hold_out(target, 0.25, seed=3)
    assert torch.equal(hx, hx2)
    assert torch.equal(again.train[0], trained.train[0])
    assert not torch.equal(hold_out(target, 0.25, seed=4)[1][0], hx)


def test_hold_out_keeps_the_number_of_classes() -> None:
    x = torch.zeros(5, 2)
    y = torch.tensor([0, 0, 0, 0, 3])  # class 3 may end up only in the held-out part
    target = Target("t", train=(x, y))
    for seed in range(5):
        trained, _ = hold_out(target, 0.2, seed=seed)
        assert trained.outputs == target.outputs == 4


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.5), (3, 0.9), (10, 0.0)])
def test_hold_out_refuses_to_leave_nothing(n: int, fraction: float) -> None:
    with pytest.raises(DataError, match=r"train\.holdout"):
        hold_out(_target(n), fraction, seed=0)


def test_trainer_holds_out_only_for_strategies_that_need_it(tmp_path: Path) -> None:
    config = write_tiny_problem(tmp_path, {"train": {"steps": 2, "holdout": 0.25}})
    trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
    assert trainer.holdout is None  # gcs trains on every target sample
    n = len(trainer.target.train[1])
    config = write_tiny_problem(
        tmp_path,
        {"strategy": {"name": "auxilearn"}, "train": {"steps": 2, "holdout": 0.25}},
        name="aux.yaml",
    )
    trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
    assert trainer.holdout is not None
    assert len(trainer.holdout[1]) == round(0.25 * n)
    assert len(trainer.planner.target.train[1]) == n - round(0.25 * n)
    trainer.fit()
    stats = trainer.engine.last_statistics
    assert stats is not None
    assert stats.validation_row is not None
    assert stats.validation_row.shape == (len(trainer.names),)
    assert float(stats.validation_row.abs().sum()) > 0


def test_val_fraction_splits_the_train_file_and_names_the_key(tmp_path: Path) -> None:
    datasets = [s for s in base_config()["sources"] if s["granularity"] == "dataset"]
    config = write_tiny_problem(
        tmp_path,
        {"target": {"val": None, "val_fraction": 0.25}, "sources": datasets, "train": {"steps": 2}},
    )
    trainer = build_trainer(load_config(config), config.parent, None, quiet=True)
    assert trainer.target.val is not None
    n = len(trainer.target.train[1]) + len(trainer.target.val[1])
    assert len(trainer.target.val[1]) == round(0.25 * n)
    config = write_tiny_problem(
        tmp_path,
        {"target": {"val": None, "val_fraction": 0.999}, "sources": datasets},
        name="bad.yaml",
    )
    with pytest.raises(DataError, match=r"target\.val_fraction: cannot hold out"):
        build_trainer(load_config(config), config.parent, None, quiet=True)
