"""Every registered strategy, through every engine mode and layout it can use, and through
``auxilia run``; a mode it cannot use is a clear error, never a silent fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from auxilia import strategies
from auxilia.config import build_trainer, load_config
from auxilia.engine import MODES, Engine, Layout, resolve_mode
from auxilia.errors import EngineError
from auxilia.statistics import Need
from tiny_problem import write_tiny_problem

F64 = torch.float64
PARAMS: dict[str, dict[str, Any]] = {"fixed": {"weights": [1.0, 0.5, 2.0]}}
NUM = 3  # target + two auxiliaries


def _strategy(name: str) -> strategies.Strategy:
    return strategies.get(name, PARAMS.get(name))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)


def _steps(engine: Engine, model: nn.Module, layout: Layout) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    alpha = torch.empty(0)
    for _ in range(3):
        x = torch.randn(12, 4, generator=gen, dtype=F64)
        validation = None
        if Need.VALIDATION in engine.needs:  # held-out rows in the same forward pass
            held = model(torch.cat([x, torch.randn(4, 4, generator=gen, dtype=F64)]))
            out, validation = held[:12], held[12:, 0] ** 2
        else:
            out = model(x)
        model.zero_grad()
        if layout == "partitioned":
            losses = (out[:, 0] - x[:, 0]) ** 2
            ids = torch.arange(12) % NUM
            alpha = engine.backward(losses, ids, lr=0.1, validation=validation)
        else:
            losses = torch.stack([(out[:, 0] - x[:, k]) ** 2 for k in range(NUM)], dim=1)
            alpha = engine.backward(losses, lr=0.1)
    return alpha


CASES = [
    (name, mode, layout)
    for name in strategies.names()
    for mode in MODES
    for layout in ("partitioned", "shared-input")
]


@pytest.mark.parametrize(("name", "mode", "layout"), CASES)
def test_every_strategy_every_mode(name: str, mode: str, layout: Layout) -> None:
    strategy = _strategy(name)
    model = _model()
    needs = Need.closure(strategy.needs)
    mode_needs = needs | ({Need.GRAM} if Need.VALIDATION in needs else set())
    try:
        resolve_mode(mode, layout, mode_needs, has_module=True)
    except EngineError as error:  # a mode it cannot use: a clear error, from the Engine too
        message = str(error)
        assert f"'{mode}'" in message
        with pytest.raises(EngineError):
            Engine(model, strategy=strategy, num_sources=NUM, mode=mode, layout=layout)
        return
    if Need.VALIDATION in needs and layout == "shared-input":
        with pytest.raises(EngineError, match="partitioned layout"):
            Engine(model, strategy=strategy, num_sources=NUM, mode=mode, layout=layout)
        return
    engine = Engine(model, strategy=strategy, num_sources=NUM, mode=mode, layout=layout)
    alpha = _steps(engine, model, layout)
    engine.close()
    assert alpha.shape == (NUM,)
    assert bool(torch.isfinite(alpha).all())
    for p in model.parameters():
        assert p.grad is not None
        assert bool(torch.isfinite(p.grad).all())


def test_mode_refusals_name_what_is_missing() -> None:
    with pytest.raises(EngineError, match=r"'jvp' cannot be used here: it cannot compute gram"):
        Engine(_model(), strategy=strategies.get("arml"), num_sources=NUM, mode="jvp")
    with pytest.raises(EngineError, match=r"'ghost' cannot be used here: .*partitioned"):
        Engine(
            _model(),
            strategy=strategies.get("gcs"),
            num_sources=NUM,
            mode="ghost",
            layout="shared-input",
        )
    with pytest.raises(EngineError, match=r"pass the nn.Module itself"):
        Engine(_model().parameters(), strategy=strategies.get("gcs"), num_sources=NUM, mode="ghost")


@pytest.mark.parametrize("name", strategies.names())
def test_auxilia_run_accepts_every_name(name: str, tmp_path: Path) -> None:
    params = {"fixed": {"weights": [1.0, 0.5, 2.0, 1.0]}}.get(name, {})
    config = write_tiny_problem(
        tmp_path, {"strategy": {"name": name, "params": params}, "train": {"steps": 3}}
    )
    results = build_trainer(load_config(config), config.parent, tmp_path / "run", quiet=True).fit()
    assert results["strategy"]["name"] == name
    assert results["steps"] == 3
