"""Build ``report.html``: summary and per-source tables plus the plots, as one self-contained page.

The PNGs are also written to ``run_dir/plots/`` so they can be used on their own.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from auxilia.atomic import write_bytes
from auxilia.report import plots
from auxilia.report.run_files import Results, read_run

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { display: block; max-width: 100%; margin-bottom: 1.5em; }
"""


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _row(*cells: str) -> str:
    return "<tr>" + "".join(cells) + "</tr>"


def _summary(results: Results) -> str:
    params = ", ".join(f"{key}={value}" for key, value in results.strategy_params.items())
    rows = [
        (f"target {results.target_metric}", _num(results.target_value, ".4f")),
        ("strategy", f"{results.strategy_name} ({params})" if params else results.strategy_name),
        ("steps", str(results.steps)),
        ("seed", str(results.seed)),
        ("wall seconds", _num(results.wall_seconds, ".1f")),
    ]
    engine = results.engine
    if engine is not None:
        how = [engine.layout, *([engine.path] if engine.path else [])]
        rows += [
            ("engine mode", f"{engine.mode} ({', '.join(how)})"),
            ("engine layout", engine.why),
        ]
    body = "".join(_row(f"<th>{escape(k)}</th>", f"<td>{escape(v)}</td>") for k, v in rows)
    return f"<table>{body}</table>"


def _sources(results: Results) -> str:
    header = _row(
        *(
            f"<th>{h}</th>"
            for h in (
                "source",
                "granularity",
                "head",
                "mean coef.",
                "final coef.",
                "credit",
                "value",
            )
        )
    )
    body = "".join(
        _row(
            f"<td>{escape(s.name)}</td>",
            f"<td>{escape(s.granularity)}</td>",
            f"<td>{escape(s.head)}</td>",
            f'<td class="num">{_num(s.mean_coefficient)}</td>',
            f'<td class="num">{_num(s.final_coefficient)}</td>',
            f'<td class="num">{_num(s.credit, "+.4g")}</td>',
            f'<td class="num">{_num(s.value, "+.4g")}</td>',
        )
        for s in results.sources
    )
    return f"<table>{header}{body}</table>"


def render_report(run_dir: str | Path) -> Path:
    """Render ``run_dir/report.html`` (and ``run_dir/plots/*.png``); return the page's path."""
    run = read_run(Path(run_dir))
    results = run.results
    images = {
        "coefficients": plots.coefficients_png(run.metrics, [s.name for s in results.sources]),
        "target_metric": plots.target_metric_png(run.metrics, results.target_metric),
        "credit": plots.credit_png(results.sources),
    }
    figures = []
    for name, png in images.items():
        write_bytes(run.path / "plots" / f"{name}.png", png)
        data = base64.b64encode(png).decode("ascii")
        figures.append(f'<img alt="{name}" src="data:image/png;base64,{data}">')
    title = escape(f"auxilia report: {results.target_name} ({results.strategy_name})")
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            "<h2>Summary</h2>",
            _summary(results),
            "<h2>Sources</h2>",
            _sources(results),
            "<h2>Plots</h2>",
            *figures,
            "</body></html>",
            "",
        ]
    )
    out = run.path / "report.html"
    write_bytes(out, page.encode("utf-8"))  # explicit UTF-8, whatever the locale
    return out
