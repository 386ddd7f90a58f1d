"""The selection benchmark's report as files: Markdown tables, a PNG figure and the JSON.

:func:`render_markdown` writes the goal and every method's standing at the goal's budget, then
per scenario its pool, the target metric against the budget and the harmful share against the
budget; :func:`plot_png` draws the metric against the budget, a panel per scenario, with
matplotlib's Agg backend (imported inside, so importing this module stays light);
:func:`write_report` writes ``select.json``, ``select.md`` and ``select.png`` atomically.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auxilia.atomic import write_bytes, write_json, write_text
from auxilia.bench.select import BASELINE, WHOLE

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _pts(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _pct(budget: float) -> str:
    return f"{budget:g} %"


def _check(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "**no**")


def _ratio(value: float | None) -> str:
    """A harmful ratio, and how many times fewer harmful samples than in the pool it means."""
    if value is None:
        return "n/a"
    under = "∞" if value == 0 else f"{1 / value:.1f}"
    return f"{value:.2f} (÷{under})"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the goal and every method's standing at the goal's budget, then
    per scenario its pool, the metric against budget and the harmful share against budget."""
    goal = report["goal"]
    budgets = [float(b) for b in report["budgets"]]
    ran = [sc for sc in report["scenarios"] if sc["status"] == "ran"]
    lines = [
        "# Selection benchmark: `auxilia bench select`",
        "",
        f"Command: `{report['command']}`  ",
        f"Suite: {report['suite']}; seeds: {', '.join(map(str, report['seeds']))}; "
        f"budgets: {', '.join(_pct(b) for b in budgets)} (and 100 %, the whole pool); "
        f"weighting: {report['weighting']}; jobs: {report['jobs']}; "
        f"wall time: {report['wall_seconds']:.0f} s  ",
        f"Machine: {report['machine']}  ",
        f"auxilia {report['auxilia_version']}, torch {report['torch_version']}",
        "",
        f"**The goal**: with {_pct(goal['budget'])} of the pool, `{goal['method']}` beats "
        "`random` at the same budget and the whole pool wherever the pool holds harmful "
        f"sources, and every seed's top-{_pct(goal['budget'])} selection holds at most "
        f"1/{goal['factor']:g} of the pool's share of harmful samples. "
        f"Met: {_check(goal['met'])}.",
        "",
        f"## Standing at {_pct(goal['budget'])} of the pool",
        "",
        "Per scenario: Δ vs `random` at the same budget (pt) / Δ vs the whole pool (pt) / "
        "harmful share over the pool's, worst seed (÷: how many times fewer) / the same for "
        "wrongly labelled samples, whatever their source.",
        "",
    ]
    head = "| method | " + " | ".join(sc["name"] for sc in ran) + " | goal |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    by = {(c["scenario"], c["method"]): c for c in goal["checks"]}
    for method in report["methods"]:
        cells = [f"`{method}`"]
        verdicts: list[bool] = []
        for sc in ran:
            c = by.get((sc["name"], method))
            if c is None:
                cells.append("failed")
                continue
            cells.append(
                f"{_pts(c['delta_random'])} / {_pts(c['delta_whole_pool'])} / "
                f"{_ratio(c['harmful_ratio_worst'])} / {_ratio(c.get('wrong_ratio_worst'))}"
            )
            if c["has_harmful"]:
                verdicts.append(
                    bool(c["beats_random"] and c["beats_whole_pool"] and c["under_represented"])
                )
        cells.append(_check(all(verdicts) if verdicts else None))
        lines.append("| " + " | ".join(cells) + " |")
    records = report["records"]
    for sc in report["scenarios"]:
        lines += ["", f"## Scenario `{sc['name']}`", ""]
        if sc["status"] != "ran":
            lines.append(f"Skipped: {sc['skip_reason']}")
            continue
        pool = sc["pool"]
        left_out = (
            f" Left out (no samples to select): {', '.join(pool['left_out'])}."
            if pool["left_out"]
            else ""
        )
        lines += [
            f"{sc['summary']}. {sc['steps']} training steps (and as many warm-up steps before "
            f"scoring), lr {sc['lr']:g}, trunk {sc['trunk']} {sc['trunk_params']}. Pool: "
            f"{pool['size']} samples, {_num(pool['harmful_share'], '{:.0%}')} from harmful "
            f"sources.{left_out}",
            "",
            f"target alone {_num(sc['target_only']['mean'])} ± "
            f"{_num(sc['target_only']['std'])}; whole pool {_num(sc['whole_pool']['mean'])} ± "
            f"{_num(sc['whole_pool']['std'])}.",
            "",
            "| source | what it is | head | samples | harmful |",
            "|---|---|---|---|---|",
        ]
        for src in pool["sources"]:
            lines.append(
                f"| {src['name']} | {src['role']} | {src['head']} | {src['size']} | "
                f"{'**yes**' if src['harmful'] else 'no'} |"
            )
        mine = [r for r in records if r["scenario"] == sc["name"]]
        cell = {(r["method"], float(r["budget"])): r for r in mine if r["status"] == "ok"}
        failed = {r["method"] for r in mine if r["status"] != "ok"}
        whole = cell.get(("whole-pool", WHOLE))
        methods = report["methods"]
        lines += _budget_table(
            f"target test {sc['metric']}, mean ± std",
            lambda r: f"{_num(r['mean'])} ± {_num(r['std'])}",
            methods,
            budgets,
            cell,
            failed,
            whole,
        )
        if pool["harmful_share"]:
            lines += _budget_table(
                "harmful share of the selection; its ratio to the pool's",
                lambda r: (
                    f"{_num(r['harmful_share'], '{:.1%}')} ({_num(r['harmful_ratio'], '{:.2f}')})"
                ),
                methods,
                budgets,
                cell,
                failed,
            )
        else:
            lines += ["", "No harmful source in this pool."]
        if any(r.get("wrong_share") is not None for r in mine):
            lines += _budget_table(
                "wrongly labelled share of the selection (rows whose label is not the target's "
                "rule for that input, whatever their source); its ratio to the pool's",
                lambda r: (
                    f"{_num(r.get('wrong_share'), '{:.1%}')} "
                    f"({_num(r.get('wrong_ratio'), '{:.2f}')})"
                ),
                methods,
                budgets,
                cell,
                failed,
            )
        lines += _budget_table(
            "largest class's share of the selected samples that share the target's head; "
            f"{_num(pool.get('largest_class_share'), '{:.0%}')} in the pool",
            lambda r: _num(r.get("largest_class_share"), "{:.0%}"),
            methods,
            budgets,
            cell,
            failed,
        )
    if report.get("skipped"):
        lines += ["", "## Skipped", ""]
        lines += [f"- {item}" for item in report["skipped"]]
    return "\n".join(lines) + "\n"


def _budget_table(
    title: str,
    show: Callable[[Mapping[str, Any]], str],
    methods: Sequence[str],
    budgets: Sequence[float],
    cell: Mapping[tuple[str, float], Mapping[str, Any]],
    failed: set[str],
    whole: Mapping[str, Any] | None = None,
) -> list[str]:
    """A method × budget table of ``show(record)``; given ``whole``, with a whole-pool column
    and the seconds per ranking."""
    head = f"| method ({title}) | " + " | ".join(_pct(b) for b in budgets) + " |"
    head += " 100 % (whole pool) | s/ranking |" if whole is not None else ""
    lines = ["", head, "|" + "---|" * (head.count("|") - 1)]
    for method in methods:
        cells = [f"`{method}`"]
        for b in budgets:
            r = cell.get((method, b))
            cells.append(show(r) if r else "failed" if method in failed else "n/a")
        if whole is not None:
            seconds = next(
                (
                    cell[(method, b)].get("selection_seconds")
                    for b in budgets
                    if (method, b) in cell
                ),
                None,
            )
            cells += [show(whole), _num(seconds, "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_png(report: Mapping[str, Any]) -> bytes:
    """Target metric against budget, one panel per scenario that ran: a line per method
    (mean ± std over seeds) ending at the whole pool (100 %), the target alone dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ran = [sc for sc in report["scenarios"] if sc["status"] == "ran"]
    panels = max(1, len(ran))
    figure = Figure(figsize=(5.0 * panels, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, panels, squeeze=False)[0]
    budgets = [float(b) for b in report["budgets"]]
    for axes, sc in zip(axes_list, ran, strict=False):
        _panel(
            axes,
            sc,
            [r for r in report["records"] if r["scenario"] == sc["name"]],
            budgets,
            report["methods"],
        )
    if not ran:
        axes_list[0].text(0.5, 0.5, "no scenario ran", ha="center", va="center")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _panel(
    axes: Axes,
    scenario: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    budgets: Sequence[float],
    methods: Sequence[str],
) -> None:
    cell = {(r["method"], float(r["budget"])): r for r in records if r["status"] == "ok"}
    whole = cell.get(("whole-pool", WHOLE))
    for method in methods:
        xs, ys, errs = [], [], []
        for b in [*budgets, WHOLE]:
            r = cell.get((method, b)) if b < WHOLE else whole
            if r is None or r["mean"] is None:
                continue
            xs.append(b)
            ys.append(r["mean"])
            errs.append(r["std"])
        if xs:
            random_ = method == BASELINE
            axes.errorbar(
                xs,
                ys,
                yerr=errs,
                marker="o",
                capsize=3,
                label=method,
                linestyle=":" if random_ else "-",
                color="#616161" if random_ else None,
            )
    alone = scenario["target_only"]["mean"]
    if alone is not None:
        axes.axhline(alone, linestyle="--", color="#9e9e9e", label="target alone")
    axes.set_xscale("log")
    ticks = [*budgets, WHOLE]
    axes.set_xticks(ticks, [f"{b:g}" for b in ticks])
    axes.minorticks_off()
    axes.set(
        title=f"{scenario['name']} (pool {scenario['pool']['size']})",
        xlabel="budget (% of the pool; 100 = whole pool)",
        ylabel=f"target test {scenario['metric']}",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def write_report(report: Mapping[str, Any], out: Path) -> tuple[Path, Path, Path]:
    """Write ``select.json``, ``select.md`` and ``select.png`` into ``out`` atomically."""
    json_path, md_path, png_path = out / "select.json", out / "select.md", out / "select.png"
    write_json(json_path, dict(report))
    write_text(md_path, render_markdown(report))
    write_bytes(png_path, plot_png(report))
    return json_path, md_path, png_path
