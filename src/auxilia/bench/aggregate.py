"""From run results to the quality table: Spearman correlation, fraction of the oracle gain,
the bar and each strategy's standing, and the Markdown rendering.

Definitions (all on the target's test metric; accuracy differences are in points, ×100):

- ``delta``: mean over seeds of the strategy minus mean over seeds of ``target-only``.
- ``oracle_fraction``: ``(strategy − target-only) / (oracle − target-only)`` with means over
  seeds; ``None`` (n/a, left out of averages) when the oracle gain is under
  ``Bar.min_oracle_gain`` points, where the ratio would be noise.
- ``spearman_credit`` / ``spearman_coefficient``: Spearman rank correlation, over the
  scenario's auxiliary sources, between the strategy's per-source credit (its mean
  coefficient), averaged over seeds, and the leave-one-out ground truth; ties get average
  ranks; ``None`` when either side is constant (e.g. ``target-only``'s zero credit).
- ``spearman_value``: the same for the per-source value (summed ``lr·<g_k, g_0>``, the
  unit-weight first-order effect, see :mod:`auxilia.ledger`). Shown beside credit; the bar
  judges credit.
- The bar (:class:`Bar`): **do no harm**, the mean is never more than ``harm`` points below
  target-only on any scenario; **capture the gain**, the oracle fraction averages at least
  ``gain``; **know why**, the credit's Spearman correlation with leave-one-out ground truth
  averages at least ``spearman``. A strategy meets the bar when it ran on every scenario and
  passes all three.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Bar:
    """The thresholds every target-aware strategy is measured against."""

    harm: float = 1.0  # points below target-only allowed on any scenario
    gain: float = 0.8  # mean fraction of the oracle gain captured
    spearman: float = 0.8  # mean Spearman correlation of credit with leave-one-out truth
    min_oracle_gain: float = 1.0  # points; below it the oracle fraction is n/a

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def rankdata(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); ``None`` if undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = rankdata(x), rankdata(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def oracle_fraction(value: float, baseline: float, oracle: float, min_gain: float) -> float | None:
    """``(value − baseline) / (oracle − baseline)``, or ``None`` when the oracle gain is below
    ``min_gain`` (all in the same units, e.g. points)."""
    gain = oracle - baseline
    if not gain >= min_gain:
        return None
    return (value - baseline) / gain


def better_sign(metric: str) -> float:
    """+1 where larger is better (accuracy), -1 where smaller is (mse)."""
    return 1.0 if metric == "accuracy" else -1.0


def points_scale(metric: str) -> float:
    """Reporting units: accuracy in points (×100), other metrics as they are."""
    return 100.0 if metric == "accuracy" else 1.0


def mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


def std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def correlation_with(
    per_source: Mapping[str, float | None], truth: Mapping[str, float | None]
) -> float | None:
    """Spearman over the sources that have both a value and a ground truth."""
    names = [n for n in truth if truth[n] is not None and per_source.get(n) is not None]
    return spearman(
        [float(per_source[n]) for n in names],  # type: ignore[arg-type]
        [float(truth[n]) for n in names],  # type: ignore[arg-type]
    )


def standing(
    strategy: str, rows: Sequence[Mapping[str, Any] | None], scenarios: Sequence[str], bar: Bar
) -> dict[str, Any]:
    """A strategy's standing across scenarios from its per-scenario rows (``None`` or a row
    whose status is not "ok" where it did not run) against the bar."""
    ran = [r for r in rows if r is not None and r.get("status") == "ok"]
    missing = [
        s for s, r in zip(scenarios, rows, strict=True) if r is None or r.get("status") != "ok"
    ]
    deltas = [float(r["delta"]) for r in ran]
    worst = min(deltas) if deltas else None
    fraction = mean_or_none([r.get("oracle_fraction") for r in ran])
    credit = mean_or_none([r.get("spearman_credit") for r in ran])
    coefficient = mean_or_none([r.get("spearman_coefficient") for r in ran])
    value = mean_or_none([r.get("spearman_value") for r in ran])
    tol = 1e-9  # a mean of (0.6, 1.0) is 0.8 on the bar, whatever the rounding
    no_harm = None if worst is None else worst >= -bar.harm - tol
    gain = None if fraction is None else fraction >= bar.gain - tol
    why = None if credit is None else credit >= bar.spearman - tol
    return {
        "strategy": strategy,
        "scenarios": len(ran),
        "missing": missing,
        "worst_delta": worst,
        "mean_delta": mean_or_none(deltas),
        "mean_oracle_fraction": fraction,
        "oracle_scenarios": sum(1 for r in ran if r.get("oracle_fraction") is not None),
        "mean_spearman_credit": credit,
        "mean_spearman_coefficient": coefficient,
        "mean_spearman_value": value,
        "no_harm": no_harm,
        "captures_gain": gain,
        "knows_why": why,
        "meets_bar": bool(no_harm and gain and why and not missing),
    }


# ---- Markdown ------------------------------------------------------------------------------


def _ceiling(reliability: float) -> float:
    """About the highest Spearman a credit can reach against a truth of this reliability."""
    return math.sqrt(reliability) if reliability > 0 else 0.0


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _pts(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _check(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "**no**")


def _row_label(row: Mapping[str, Any], sampled: bool) -> str:
    return f"{row['strategy']} [{row['sampler']}]" if sampled else str(row["strategy"])


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the bar, the standing of every strategy, then per scenario its
    ground truth and its table of strategies."""
    bar = report["bar"]
    unit = "pt"
    lines = [
        "# Quality benchmark: `auxilia bench quality`",
        "",
        f"Command: `{report['command']}`  ",
        f"Suite: {report['suite']}; seeds: {', '.join(map(str, report['seeds']))}; "
        f"jobs: {report['jobs']}; wall time: {report['wall_seconds']:.0f} s  ",
        f"Machine: {report['machine']}  ",
        f"auxilia {report['auxilia_version']}, torch {report['torch_version']}",
        "",
        "**The bar** (target test metric, means over seeds): *do no harm*: never more than "
        f"{bar['harm']:g} {unit} below `target-only` on any scenario; *capture the gain*: on "
        f"average at least {100 * bar['gain']:.0f} % of the oracle gain (scenarios whose oracle "
        f"gains under {bar['min_oracle_gain']:g} {unit} are n/a); *know why*: Spearman "
        f"correlation of per-source credit with leave-one-out ground truth at least "
        f"{bar['spearman']:g} on average.",
        "",
        "## Standing against the bar",
        "",
        "| strategy | scenarios | worst Δ (pt) | mean Δ (pt) | oracle fraction | "
        "Spearman credit | Spearman coef | Spearman value | no harm | gain | know why | "
        "meets bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["standing"]:
        ran = f"{s['scenarios']}" + (
            f" (failed: {', '.join(s['missing'])})" if s["missing"] else ""
        )
        lines.append(
            f"| {s['strategy']} | {ran} | {_pts(s['worst_delta'])} | {_pts(s['mean_delta'])} | "
            f"{_num(s['mean_oracle_fraction'], '{:.2f}')} | "
            f"{_num(s['mean_spearman_credit'], '{:+.2f}')} | "
            f"{_num(s['mean_spearman_coefficient'], '{:+.2f}')} | "
            f"{_num(s.get('mean_spearman_value'), '{:+.2f}')} | {_check(s['no_harm'])} | "
            f"{_check(s['captures_gain'])} | {_check(s['knows_why'])} | "
            f"{'**yes**' if s['meets_bar'] else 'no'} |"
        )
    reliable = {
        sc["name"]: sc["truth_reliability"]
        for sc in report["scenarios"]
        if sc.get("truth_reliability") is not None
    }
    if reliable:
        ceilings = [_ceiling(r) for r in reliable.values()]
        lines += [
            "",
            "How far the ground truth itself reproduces (leave-one-out reliability per scenario, "
            "below): "
            + ", ".join(f"{name} {r:+.2f}" for name, r in reliable.items())
            + f". The mean of their square roots, {statistics.fmean(ceilings):.2f}, is about "
            "the highest mean Spearman a credit could reach against it.",
        ]
    for sc in report["scenarios"]:
        lines += ["", f"## Scenario `{sc['name']}`", ""]
        if sc["status"] != "ran":
            lines.append(f"Skipped: {sc['skip_reason']}")
            continue
        lines += [
            f"{sc['summary']}. {sc['steps']} steps, lr {sc['lr']:g}, trunk {sc['trunk']} "
            f"{sc['trunk_params']}; ground truth per {sc['ground_truth_level']}.",
            "",
        ]
        oracle = sc["oracle"]
        lines += [
            f"target-only {_num(sc['target_only']['mean'])} ± {_num(sc['target_only']['std'])}"
            f"; all sources, equal weights {_num(sc['all_equal']['mean'])}; oracle "
            f"({', '.join(oracle['sources']) or 'no source'}) {_num(oracle['mean'])}: gain "
            f"{_pts(oracle['gain'])} {unit}.",
            "",
        ]
        reliability = sc.get("truth_reliability")
        if reliability is not None:
            ceiling = _ceiling(reliability)
            lines += [
                f"Leave-one-out reliability {reliability:+.2f} (the Spearman correlation of its "
                "ranking with one from as many other seeds, split-half over seeds, "
                f"Spearman–Brown): a credit's Spearman with it can reach about {ceiling:.2f}.",
                "",
            ]
        has_relevance = any(src.get("relevance") is not None for src in sc["sources"])
        head = "| source | what it is | "
        head += "relevance | " if has_relevance else ""
        head += "leave-one-out Δ (pt) | add-one-in Δ (pt) | in oracle |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        shown = sc["sources"]
        if sc["ground_truth_level"] == "group":
            seen: dict[str, Mapping[str, Any]] = {}
            for src in shown:
                seen.setdefault(src["group"], src)
            shown = [dict(src, name=f"{g} (group)") for g, src in seen.items()]
        for src in shown:
            cells = [src["name"], src["role"]]
            if has_relevance:
                cells.append(_num(src.get("relevance"), "{:+.2f}"))
            cells += [
                f"{_pts(src['loo'])} ± {_num(src['loo_std'], '{:.1f}')}",
                f"{_pts(src['add_one_in'])} ± {_num(src['add_one_in_std'], '{:.1f}')}",
                "yes" if src["in_oracle"] else "no",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        sampled = len({r["sampler"] for r in sc["rows"]}) > 1 or any(
            r["sampler"] != "all" for r in sc["rows"]
        )
        rel = "Spearman credit vs relevance | " if has_relevance else ""
        head = (
            "| strategy | mean | std | Δ (pt) | oracle fraction | Spearman credit | "
            f"Spearman coef | Spearman value | {rel}s/run | bar |"
        )
        lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for r in sc["rows"]:
            label = _row_label(r, sampled)
            if r["status"] != "ok":
                lines.append(f"| {label} | failed: {r['reason']} |" + " |" * (head.count("|") - 3))
                continue
            cells = [
                label,
                _num(r["mean"]),
                _num(r["std"]),
                _pts(r["delta"]),
                _num(r["oracle_fraction"], "{:.2f}"),
                _num(r["spearman_credit"], "{:+.2f}"),
                _num(r["spearman_coefficient"], "{:+.2f}"),
                _num(r.get("spearman_value"), "{:+.2f}"),
            ]
            if has_relevance:
                cells.append(_num(r.get("spearman_credit_relevance"), "{:+.2f}"))
            cells += [f"{r['wall_seconds']:.2f}", "**harm**" if r["harm"] else "ok"]
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("skipped"):
        lines += ["", "## Skipped", ""]
        lines += [f"- {item}" for item in report["skipped"]]
    return "\n".join(lines) + "\n"
