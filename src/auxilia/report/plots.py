"""The report's three figures, rendered to PNG bytes with matplotlib's Agg backend.

matplotlib is imported inside the functions so that ``import auxilia.report`` stays light.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from auxilia.report.run_files import MetricRecord, SourceResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_POSITIVE = "#2e7d32"
_NEGATIVE = "#c62828"
_NEUTRAL = "#9e9e9e"


def _render(draw: Callable[[Axes], None], height: float = 4.0) -> bytes:
    """Draw onto a fresh Agg figure (no pyplot global state) and return it as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure.add_subplot())
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _placeholder(axes: Axes, title: str, message: str) -> None:
    axes.set_title(title)
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def _over_steps(axes: Axes, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def coefficients_png(records: Sequence[MetricRecord], names: Sequence[str]) -> bytes:
    """Coefficient of each source over steps; a gap where the source was not drawn."""
    title = "Coefficient per source"

    def draw(axes: Axes) -> None:
        if not records:
            _placeholder(axes, title, "no metrics recorded")
            return
        steps = [r.step for r in records]
        for name in names:
            values = [r.coefficient.get(name) for r in records]
            axes.plot(steps, [math.nan if v is None else v for v in values], ".-", label=name)
        _over_steps(axes, title, "coefficient")
        if names:
            axes.legend(loc="best", fontsize="small")

    return _render(draw)


def target_metric_png(records: Sequence[MetricRecord], metric: str) -> bytes:
    """Target validation metric over steps, or a note when the run has no validation points."""
    title = f"Target validation {metric}"
    points = [(r.step, r.val) for r in records if r.val is not None]

    def draw(axes: Axes) -> None:
        if not points:
            _placeholder(axes, title, "no validation points")
            return
        axes.plot([s for s, _ in points], [v for _, v in points], "o-", color=_POSITIVE)
        _over_steps(axes, title, metric)

    return _render(draw)


def credit_png(sources: Sequence[SourceResult]) -> bytes:
    """Two bars per source (order as given): credit (solid) and value at unit weight (hatched);
    positive green, negative red."""
    title = "Credit and value per source"

    def draw(axes: Axes) -> None:
        if not sources:
            _placeholder(axes, title, "no sources")
            return
        positions = list(range(len(sources)))
        for offset, label, hatch, numbers in (
            (-0.2, "credit (at the strategy's weights)", None, [s.credit for s in sources]),
            (0.2, "value (at weight 1)", "//", [s.value for s in sources]),
        ):
            bars = [0.0 if x is None else x for x in numbers]
            colors = [_POSITIVE if c > 0 else _NEGATIVE if c < 0 else _NEUTRAL for c in bars]
            axes.barh(
                [p + offset for p in positions],
                bars,
                height=0.4,
                color=colors,
                hatch=hatch,
                alpha=1.0 if hatch is None else 0.55,
                label=label,
            )
        axes.set_yticks(positions, [s.name for s in sources])
        axes.invert_yaxis()
        axes.axvline(0.0, color="black", linewidth=0.8)
        axes.set(title=title, xlabel="first-order decrease of the target loss")
        axes.legend(loc="best", fontsize="small")
        axes.grid(axis="x", alpha=0.3)

    return _render(draw, height=max(2.5, 1.0 + 0.4 * len(sources)))
