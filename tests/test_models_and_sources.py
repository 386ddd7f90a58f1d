"""Trunks, heads, user factories, and the validation of targets and sources."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import auxilia as ax
from auxilia.data.sources import check_problem
from auxilia.errors import ConfigError, DataError
from auxilia.models import build_model, build_trunk


def _pair(n: int, dim: int = 4, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, dim), torch.arange(n) % classes


def test_mlp_trunk_widths() -> None:
    trunk = build_trunk("mlp", (4,), {"hidden": [7, 5]})
    model = build_model(trunk, torch.randn(4), {"t": 3, "aux": 2})
    features = model(torch.randn(6, 4))
    assert features.shape == (6, 5)
    assert model.heads["t"](features).shape == (6, 3)
    assert model.heads["aux"](features).shape == (6, 2)


def test_a_batch_norm_trunk_is_measured_in_eval_mode_and_left_as_it_was() -> None:
    """The width probe (one sample) runs in eval mode: batch norm of one sample would fail in
    training mode; its running statistics do not move and the trunk stays in training mode."""
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).train()
    norm = trunk[1]
    assert isinstance(norm, torch.nn.BatchNorm1d)
    before = (norm.running_mean.clone(), norm.num_batches_tracked.clone())
    model = build_model(trunk, torch.randn(4), {"t": 3})
    assert model.heads["t"].in_features == 6
    assert trunk.training
    assert torch.equal(norm.running_mean, before[0])
    assert torch.equal(norm.num_batches_tracked, before[1])


def test_a_trunk_that_refuses_the_example_is_a_config_error() -> None:
    class Picky(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("expected 3 channels")

    with pytest.raises(ConfigError, match=r"cannot process inputs of shape \(4,\): expected 3"):
        build_model(Picky(), torch.randn(4), {"t": 3})


def test_cnn_trunk_reshapes_flat_images() -> None:
    trunk = build_trunk(
        "cnn", (784,), {"channels": [4, 8], "image_shape": [1, 28, 28], "hidden": 10}
    )
    assert trunk(torch.randn(3, 784)).shape == (3, 10)
    convs = [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]


def test_cnn_rejects_shapes_it_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="image_shape"):
        build_trunk("cnn", (784,), {"image_shape": [1, 20, 20]})
    with pytest.raises(ConfigError, match="channels, height, width"):
        build_trunk("cnn", (784,), {})


def test_factory_by_import_path() -> None:
    trunk = build_trunk("trunk_factories:small", (2, 3), {"width": 7})
    assert trunk(torch.randn(5, 2, 3)).shape == (5, 7)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nosuchpackage.mod:fn", "cannot import module 'nosuchpackage.mod'"),
        ("trunk_factories:missing", "has no callable 'missing'"),
        ("trunk_factories:not_a_module", "not an nn.Module"),
        ("justaname", "expected 'mlp', 'cnn' or 'package.module:function'"),
        ("trunk_factories:small", "cannot build trunk"),
    ],
)
def test_factory_errors_name_the_problem(path: str, message: str) -> None:
    params = {"bogus": 1} if message == "cannot build trunk" else {}
    with pytest.raises(ConfigError, match=message):
        build_trunk(path, (4,), params)


def test_trainer_accepts_a_module_as_trunk() -> None:
    target = ax.Target("t", train=_pair(12), test=_pair(6))
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU())
    trainer = ax.Trainer(
        target,
        [],
        strategy=ax.strategies.equal(),
        trunk=trunk,
        settings=ax.TrainSettings(steps=2),
        quiet=True,
    )
    assert trainer.model.trunk is trunk
    assert trainer.fit()["target"]["split"] == "test"


def test_trainer_with_a_batch_norm_trunk_measures_without_ghost_and_says_why() -> None:
    """Datasets alone would run on ghost; a trunk normalising with batch statistics couples
    the samples, so the engine (mode auto) measures with the next mode and the run says why."""
    target = ax.Target("t", train=_pair(12), test=_pair(6))
    sources = [ax.Source("more", data=_pair(16), head="target")]
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
    trainer = ax.Trainer(
        target,
        sources,
        strategy=ax.strategies.gcs(),
        trunk=trunk,
        settings=ax.TrainSettings(steps=3),
        quiet=True,
    )
    with pytest.warns(UserWarning, match="normalises with batch statistics"):
        trainer.fit()
    summary = trainer.engine_summary()
    assert summary["mode"] == "batched"
    assert "ghost cannot measure this model ('trunk.1' (BatchNorm1d)" in summary["why"]


def test_dataset_inputs_are_read_into_tensors() -> None:
    x, y = _pair(10)
    target = ax.Target("t", train=TensorDataset(x, y))
    torch.testing.assert_close(target.train[0], x)
    assert target.train[1].dtype == torch.int64
    assert target.outputs == 3


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: ax.Target("t", train=(torch.randn(5, 2), torch.zeros(4, dtype=torch.long))),
            "x has 5 rows but y has 4",
        ),
        (
            lambda: ax.Target("t", train=(torch.randn(0, 2), torch.zeros(0, dtype=torch.long))),
            "has no samples",
        ),
        (
            lambda: ax.Target(
                "t", train=(torch.randn(3, 2), torch.tensor([0, 1, 5])), num_classes=3
            ),
            r"label 5 outside the head's range \[0, 3\)",
        ),
        (
            lambda: ax.Target("t", train=(torch.randn(3, 2), torch.tensor([0, -1, 1]))),
            "label -1 outside",
        ),
        (
            lambda: ax.Target("t", train=(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))),
            "non-finite",
        ),
        (lambda: ax.Source("s", granularity="task", data=_pair(3)), "takes labels"),
        (lambda: ax.Source("s", labels=torch.tensor([0, 1])), "takes data"),
        (lambda: ax.Source("s", data=_pair(3), granularity="other"), "granularity"),  # type: ignore[arg-type]
        (
            lambda: ax.Source("s", granularity="task", labels=torch.tensor([0]), head="target"),
            "its own head",
        ),
        (
            lambda: ax.Target("t", train=_pair(4), val=(torch.randn(2, 3), torch.tensor([0, 1]))),
            "inputs have shape",
        ),
    ],
)
def test_invalid_data_is_named(build: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        build()  # type: ignore[operator]


def test_problem_cross_checks() -> None:
    target = ax.Target("t", train=_pair(6), num_classes=3)
    with pytest.raises(DataError, match="used twice"):
        check_problem(target, [ax.Source("t", data=_pair(3))])
    with pytest.raises(DataError, match="has 4 labels but the target has 6"):
        check_problem(target, [ax.Source("task", granularity="task", labels=torch.zeros(4).long())])
    with pytest.raises(DataError, match="inputs have shape"):
        check_problem(target, [ax.Source("wide", data=_pair(3, dim=5))])
    bad = (torch.randn(3, 4), torch.tensor([0, 1, 4]))
    with pytest.raises(DataError, match=r"source 'big' \(head 't'\): label 4 outside"):
        check_problem(target, [ax.Source("big", data=bad, head="target")])
    check_problem(target, [ax.Source("big", data=bad, head="own")])  # its own head: 5 classes
