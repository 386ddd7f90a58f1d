"""Bloop (Hsieh et al., ICML 2024): the EMA the engine keeps, the exact update, purpose, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from auxilia.engine import Engine, Mode, resolve_mode
from auxilia.engine import modes as mode_registry
from auxilia.errors import EngineError, StrategyError
from auxilia.statistics import Need, Statistics
from auxilia.strategies.bloop import bloop

F64 = torch.float64


def _linear_problem() -> tuple[nn.Linear, Engine]:
    lin = nn.Linear(2, 1, bias=False).to(F64)
    engine = Engine(lin.parameters(), strategy=bloop(), num_sources=3)
    return lin, engine


def _step(lin: nn.Linear, engine: Engine, grads: dict[int, tuple[float, float]]) -> torch.Tensor:
    """One step whose loss for source k is <w, grads[k]>: its gradient is exactly grads[k]."""
    ids = torch.tensor(list(grads), dtype=torch.int64)
    x = torch.tensor([grads[k] for k in grads], dtype=F64)
    lin.zero_grad()
    engine.backward(lin(x).squeeze(1), ids)
    assert lin.weight.grad is not None
    return lin.weight.grad[0].clone()


def test_two_steps_by_hand() -> None:
    lin, engine = _linear_problem()
    # Step 1: ĝ starts at g_0 = (1, 0); r_1 = 1, r_2 = -2; projected g_1 = g_2 = (0, 1).
    grad = _step(lin, engine, {0: (1.0, 0.0), 1: (1.0, 1.0), 2: (-2.0, 1.0)})
    assert_close(grad, torch.tensor([1.0, 0.2], dtype=F64))
    # Step 2: ĝ = (1, 0) + 0.1 ((0, 1) - (1, 0)) = (0.9, 0.1), ‖ĝ‖² = 0.82; source 2 absent.
    grad = _step(lin, engine, {0: (0.0, 1.0), 1: (1.0, 0.0)})
    assert_close(grad, torch.tensor([0.1 * (1 - 0.81 / 0.82), 1 - 0.1 * 0.09 / 0.82], dtype=F64))
    assert engine.ema is not None
    assert_close(engine.ema[0][0], torch.tensor([0.9, 0.1], dtype=F64))


def test_update_from_statistics() -> None:
    strategy = bloop(weight=0.5, eps=0.0)
    stats = Statistics(
        present=torch.tensor([True, True, False, True]),
        target_row=torch.zeros(4, dtype=F64),
        ema_row=torch.tensor([2.0, 1.0, 7.0, -3.0], dtype=F64),
        ema_sqnorm=torch.tensor(4.0, dtype=F64),
    )
    alpha, _ = strategy.update(stats, strategy.init(4))
    # r = (1/4, -, -3/4): ĝ coefficient -0.5 (0.25 - 0.75) = 0.25; source 2 is absent.
    assert_close(alpha, torch.tensor([1.0, 0.5, 0.0, 0.5, 0.25], dtype=F64))


def test_purpose_projection_keeps_the_target_descent_rate() -> None:
    """An auxiliary opposed to the target changes nothing along ĝ: the target still descends."""
    lin, engine = _linear_problem()
    grad = _step(lin, engine, {0: (1.0, 0.0), 1: (0.0, 1.0), 2: (-5.0, 0.0)})
    assert float(grad[0]) == pytest.approx(1.0)  # along ĝ = g_0: exactly the target's own step
    assert float(grad[1]) == pytest.approx(0.1)  # the orthogonal helpful part is kept


def test_ema_is_checkpointed() -> None:
    lin, engine = _linear_problem()
    _step(lin, engine, {0: (1.0, 0.0), 1: (1.0, 1.0)})
    state = engine.state_dict()
    lin2, engine2 = _linear_problem()
    engine2.load_state_dict(state)
    a = _step(lin, engine, {0: (0.0, 1.0), 1: (1.0, 0.0)})
    b = _step(lin2, engine2, {0: (0.0, 1.0), 1: (1.0, 0.0)})
    assert_close(a, b, rtol=0, atol=0)


def test_mode_without_directions_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    limited = Mode(
        name="rows-only",
        summary="test",
        layouts=frozenset({"partitioned"}),
        provides=frozenset({Need.LOSSES, Need.TARGET_ROW, Need.NORMS, Need.GRAM}),
        start=lambda context: None,  # type: ignore[arg-type,return-value]
    )
    monkeypatch.setitem(mode_registry.MODES, "rows-only", limited)
    needs = Need.closure(bloop().needs)
    with pytest.raises(EngineError, match=r"'rows-only' cannot be used here: .*ema_row"):
        resolve_mode("rows-only", "partitioned", needs, has_module=False)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"weight": -1.0}, "weight"),
        ({"ema": 0.0}, "ema"),
        ({"ema": 1.5}, "ema"),
        ({"eps": -1.0}, "eps"),
        ({"weight": float("nan")}, "weight"),
    ],
)
def test_parameter_errors(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(StrategyError, match=key):
        bloop(**kwargs)
