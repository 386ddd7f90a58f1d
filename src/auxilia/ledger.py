"""The ledger: coefficients, losses, first-order credit and value per source over a run.

Credit (DESIGN.md, principle 5): the decrease of the target loss attributed to source k at a
step is ``lr * α_k * <g_k, g_0>``; summed over steps it is the source's contribution. For
optimizers other than plain SGD it is a first-order proxy (the preconditioner is ignored).

Value: the same at unit weight, ``lr * <g_k, g_0>``: the first-order decrease of the target
loss the source's gradient would have brought with weight 1 at each step of the run. Credit
says what a source did under the strategy's weights; value says what it would have done, so a
source that a gate shuts out (α_k ≈ 0, credit ≈ 0) still shows whether it would have helped or
hurt. Leave-one-out ground truth is defined at unit weight too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from auxilia.statistics import Statistics

_FIELDS = ("coefficient_sum", "loss_sum", "credit_sum", "value_sum", "drawn")


class Ledger:
    """Running per-source totals, for the whole run and for the current logging interval."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        k = len(self.names)
        self.run = {f: torch.zeros(k, dtype=torch.float64) for f in _FIELDS}
        self.interval = {f: torch.zeros(k, dtype=torch.float64) for f in _FIELDS}
        self.final = torch.full((k,), math.nan, dtype=torch.float64)
        self.steps = 0

    def record(self, stats: Statistics, coefficients: torch.Tensor) -> torch.Tensor:
        """Add one step; returns its credit per source (NaN where no target row was measured)."""
        present = stats.present.to(torch.float64)
        alpha = coefficients.to(torch.float64)
        if stats.target_row is None:
            value = torch.full_like(alpha, math.nan)
        else:
            value = stats.lr * stats.target_row.to(torch.float64) * present
        credit = alpha * value
        losses = (
            stats.losses.to(torch.float64) if stats.losses is not None else torch.zeros_like(alpha)
        )
        step = {
            "coefficient_sum": alpha * present,
            "loss_sum": losses * present,
            "credit_sum": credit,
            "value_sum": value,
            "drawn": present,
        }
        for totals in (self.run, self.interval):
            for name, value in step.items():
                totals[name] += value
        self.final = torch.where(stats.present, alpha, self.final)
        self.steps += 1
        return credit

    def flush_interval(self) -> dict[str, dict[str, float | None]]:
        """Means (coefficient, loss) and sums (credit, value) since the last flush; then reset."""
        drawn = self.interval["drawn"]
        index = drawn.nonzero().squeeze(1)
        names = [self.names[k] for k in index.tolist()]
        counts = drawn[index]

        def per_source(values: torch.Tensor, mean: bool) -> dict[str, float | None]:
            # None for every source, then the drawn ones: Python work grows with the sources
            # drawn in the interval, not with all of them.
            numbers = (values[index] / counts if mean else values[index]).tolist()
            out: dict[str, float | None] = dict.fromkeys(self.names)
            out.update(
                (n, None if math.isnan(x) else x) for n, x in zip(names, numbers, strict=True)
            )
            return out

        record = {
            "loss": per_source(self.interval["loss_sum"], mean=True),
            "coefficient": per_source(self.interval["coefficient_sum"], mean=True),
            "credit": per_source(self.interval["credit_sum"], mean=False),
            "value": per_source(self.interval["value_sum"], mean=False),
        }
        for value in self.interval.values():
            value.zero_()
        return record

    def summary(self) -> list[dict[str, Any]]:
        """Per source: mean coefficient over the steps it was drawn, final coefficient, credit
        and value."""
        rows = []
        for k, name in enumerate(self.names):
            drawn = float(self.run["drawn"][k])
            credit = float(self.run["credit_sum"][k])
            value = float(self.run["value_sum"][k])
            rows.append(
                {
                    "name": name,
                    "drawn_steps": int(drawn),
                    "mean_coefficient": float(self.run["coefficient_sum"][k]) / drawn
                    if drawn
                    else None,
                    "final_coefficient": None
                    if math.isnan(float(self.final[k]))
                    else float(self.final[k]),
                    "credit": None if math.isnan(credit) else credit,
                    "value": None if math.isnan(value) else value,
                }
            )
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {
            "run": {k: v.clone() for k, v in self.run.items()},
            "interval": {k: v.clone() for k, v in self.interval.items()},
            "final": self.final.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint from before a field existed (value) resumes
        with that field's totals at NaN (unknown), never silently at 0."""
        unknown = torch.full((len(self.names),), math.nan, dtype=torch.float64)
        self.run = {k: state["run"].get(k, unknown).clone() for k in _FIELDS}
        self.interval = {k: state["interval"].get(k, unknown).clone() for k in _FIELDS}
        self.final = state["final"].clone()
        self.steps = int(state["steps"])
