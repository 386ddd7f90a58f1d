"""``auxilia bench``: benchmarks of scaling promises."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from auxilia.errors import AuxiliaError, ConfigError

if TYPE_CHECKING:
    from auxilia.bench.workers import Progress

bench_app = typer.Typer(
    help="Benchmarks: how step cost scales (e.g. with the number of sources).",
    no_args_is_help=True,
)


@bench_app.command("sources")
def sources(
    sizes: Annotated[
        list[int] | None,
        typer.Option(
            "--sources",
            help="Numbers of auxiliary datasets to time, in order (repeat the option); "
            "ratios are to the first. Default: 10 and 1000.",
        ),
    ] = None,
    sampler: Annotated[str, typer.Option("--sampler", help="Sampler name.")] = "exp3",
    per_step: Annotated[
        int, typer.Option("--per-step", min=1, help="Auxiliary datasets drawn per step.")
    ] = 4,
    strategy: Annotated[str, typer.Option("--strategy", help="Strategy name.")] = "gcs",
    steps: Annotated[int, typer.Option("--steps", min=2, help="Training steps per run.")] = 150,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Steps left out of the timing.")
    ] = 30,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Samples per auxiliary dataset.")
    ] = 32,
    head: Annotated[
        str,
        typer.Option("--head", help="'target' (datasets share the target's head) or 'own'."),
    ] = "target",
    log_every: Annotated[
        int, typer.Option("--log-every", min=1, help="Steps per metrics line.")
    ] = 10,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Steps per checkpoint.")
    ] = 100,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="torch CPU threads (pinned for the runs).")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data and training.")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write one record per N to this file.")
    ] = None,
) -> None:
    """Median step time of the Trainer with N = 10 and N = 1000 auxiliary datasets (synthetic,
    in memory): with a sampler that draws a fixed number per step, it should not grow with N."""
    from rich.console import Console
    from rich.table import Table

    from auxilia.atomic import write_json
    from auxilia.bench.many_sources import ManySourcesSettings, records_json, run_many_sources

    if head not in ("target", "own"):
        raise ConfigError(f"--head: expected 'target' or 'own', got {head!r}")
    settings = ManySourcesSettings(
        sources=tuple(sizes) if sizes else (10, 1000),
        sampler=sampler,
        per_step=per_step,
        strategy=strategy,
        steps=steps,
        warmup=warmup,
        samples=samples,
        head="target" if head == "target" else "own",
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        threads=threads,
        seed=seed,
    )
    console = Console(stderr=False)
    console.print(
        f"threads: {threads} | sampler {sampler} (per_step {per_step}) | strategy {strategy} "
        f"| {steps} steps, first {warmup} not timed | {samples} samples per dataset"
    )
    records = run_many_sources(settings)
    table = Table(title="Step time against the number of auxiliary datasets")
    for column in ("sources", "median step ms", "ratio", "mean step ms", "mean ratio"):
        table.add_column(column, justify="right")
    table.add_column("setup s", justify="right")
    table.add_column("finish s", justify="right")
    for r in records:
        table.add_row(
            str(r.sources),
            f"{1e3 * r.median_step_seconds:.3f}",
            f"{r.ratio:.3f}",
            f"{1e3 * r.mean_step_seconds:.3f}",
            f"{r.mean_ratio:.3f}",
            f"{r.setup_seconds:.2f}",
            f"{r.finish_seconds:.2f}",
        )
    console.print(table)
    console.print(
        "median: the step itself; mean: with the metrics lines and checkpoints of the timed "
        "steps; setup: building the problem and trainer; finish: results and report."
    )
    if json_out is not None:
        write_json(json_out, records_json(records))
        console.print(f"wrote {json_out}")


def _split_values(values: list[str] | None) -> list[str]:
    """Values of a repeatable option, each of which may also be comma-separated."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


@bench_app.command("speed")
def speed(
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--models",
            help="Models: mlp, cnn, transformer, transformer-math, transformer-dropout "
            "(comma-separated or repeated).",
        ),
    ] = None,
    layouts: Annotated[
        list[str] | None,
        typer.Option("--layouts", help="Layouts: shared-input, partitioned."),
    ] = None,
    ks: Annotated[
        list[str] | None,
        typer.Option("--ks", help="Numbers of auxiliary sources K (default 1,4,16,64)."),
    ] = None,
    strategy_specs: Annotated[
        list[str] | None,
        typer.Option(
            "--strategies",
            help="Strategies, NAME or NAME:VARIANT (default equal,gcs,gcs:unweighted,olaux,arml).",
        ),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option("--repeats", min=1, help="Timed steps per case (default 20).")
    ] = None,
    warmup: Annotated[
        int | None, typer.Option("--warmup", min=0, help="Untimed steps per case (default 6).")
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="torch CPU threads (pinned for the run).")
    ] = 1,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="Engine modes of the strategies, comma-separated: each strategy runs once per "
            "mode that can serve it (auto, exact, ghost, jvp, batched, sketch).",
        ),
    ] = "auto",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write one record per case to this file.")
    ] = None,
    no_baselines: Annotated[
        bool,
        typer.Option("--no-baselines", help="Skip the K-backward loop and the TorchJD rows."),
    ] = False,
    no_memory: Annotated[
        bool, typer.Option("--no-memory", help="Skip the peak-memory step of each case.")
    ] = False,
    breakdown: Annotated[
        bool,
        typer.Option(
            "--breakdown",
            help="Also time the phases of the jvp and batched modes (shared-input layout).",
        ),
    ] = False,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="A few-second preset (MLP, K 1 and 4, 3 strategies, 3 repeats)."
        ),
    ] = False,
) -> None:
    """Time one training step (forward, engine, strategy, optimizer.step) against a plain
    summed-loss step in the same process, per model, layout, K and strategy, beside a
    K-backward loop and TorchJD (UPGrad, Mean). Reports medians after warm-up, the ratio to
    the plain step and peak memory; options given with --quick override the preset."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from auxilia.atomic import write_json
    from auxilia.bench.speed import (
        QUICK,
        SpeedSettings,
        machine,
        records_json,
        run_speed,
        torchjd_available,
    )
    from auxilia.bench.speed import breakdown as phase_breakdown

    base = QUICK if quick else SpeedSettings()
    changes: dict[str, object] = {"threads": threads, "modes": tuple(_split_values([mode]))}
    if models:
        changes["models"] = tuple(_split_values(models))
    if layouts:
        changes["layouts"] = tuple(_split_values(layouts))
    if ks:
        try:
            changes["ks"] = tuple(int(k) for k in _split_values(ks))
        except ValueError as error:
            raise ConfigError(f"--ks: expected integers, got {ks}") from error
    if strategy_specs:
        changes["strategies"] = tuple(_split_values(strategy_specs))
    if repeats is not None:
        changes["repeats"] = repeats
    if warmup is not None:
        changes["warmup"] = warmup
    if no_baselines:
        changes["baselines"] = False
    if no_memory:
        changes["memory"] = False
    settings = dataclasses.replace(base, **changes)  # type: ignore[arg-type]

    console = Console(stderr=False, width=max(Console().width, 110))
    info = machine()
    console.print(
        f"machine: {info['cpu']}, {info['cores']} cores | torch {info['torch']} | "
        f"torch threads pinned to {settings.threads} | {settings.repeats} timed steps per case "
        f"after {settings.warmup} warm-up | engine mode {', '.join(settings.modes)}"
    )
    if settings.baselines and not torchjd_available():
        console.print(
            "torchjd is not installed (pip install 'auxilia[bench]'): the TorchJD rows are skipped"
        )

    def say(line: str) -> None:  # plain text: a "[jvp]" in a line is not a style tag
        console.print(line, markup=False, highlight=False)

    records = run_speed(settings, progress=say)
    table = Table(title="One training step against the plain summed-loss step")
    for column in ("model", "layout", "K", "method", "mode"):
        table.add_column(column)
    for column in ("median ms", "× plain", "× plain (min)", "peak MiB"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            r.model,
            r.layout,
            str(r.k),
            r.method,
            (r.mode or "") + (f" ({r.path})" if r.path else ""),
            f"{r.median_ms:.3f}",
            f"{r.ratio:.2f}",
            f"{r.ratio_of_min:.2f}",
            "" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.2f}",
        )
    console.print(table)
    for r in records:
        for note in r.notes:
            say(f"note: {r.model} {r.layout} K={r.k} {r.method}: {note}")
    document = records_json(records, settings, info)
    if breakdown:
        notes: list[str] = []
        for layout in settings.layouts:
            phases: dict[str, dict[str, float | None]] = {}
            for model in settings.models:
                for k in settings.ks:
                    found: list[str] = []
                    phases[f"{model} K={k}"] = phase_breakdown(
                        model,
                        k,
                        settings.repeats,
                        layout=layout,
                        threads=settings.threads,
                        notes=found,
                    )
                    notes += [f"{model} K={k}: {line}" for line in found]
            names = list(next(iter(phases.values())))
            detail = Table(title=f"Where the time goes ({layout}, median ms per phase)")
            detail.add_column("phase")
            for case in phases:
                detail.add_column(case, justify="right")
            for name in names:
                cells = [phases[case].get(name) for case in phases]
                detail.add_row(name, *("n/a" if c is None else f"{c:.3f}" for c in cells))
            console.print(detail)
            # "breakdown" keeps the shared-input phases (as before); partitioned ones beside it
            key = "breakdown" if layout == "shared-input" else f"breakdown_{layout}"
            document[key] = phases
        for line in notes:
            say(f"note: {line}")
        document["breakdown_notes"] = notes
    if json_out is not None:
        write_json(json_out, document)
        console.print(f"wrote {json_out}")


@bench_app.command("quality")
def quality(
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help="'quick' (digits, synthetic: CI-sized) or 'full' (adds mnist, fashion, "
            "reviews, many-sources). Ignored when --scenario is given.",
        ),
    ] = "quick",
    scenario_names: Annotated[
        list[str] | None,
        typer.Option("--scenario", help="Scenarios to run (repeat or comma-separate)."),
    ] = None,
    strategy_names: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy",
            help="Strategies to run (repeat or comma-separate; default: every registered one). "
            "target-only, the baseline, is always run.",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds 0..N-1 per cell.")] = 5,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="Training steps of every run (default: per scenario)."),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", min=1, help="Worker processes (default: the number of cores)."),
    ] = None,
    sampler_names: Annotated[
        list[str] | None,
        typer.Option(
            "--sampler",
            help="Samplers for scenarios that draw sources per step (default: the scenario's).",
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Cache of embeddings and ground truth (default $AUXILIA_CACHE or "
            "~/.cache/auxilia).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for quality.json and quality.md.")
    ] = Path("runs/bench-quality"),
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Scenarios × strategies × seeds with ground truth per source (leave-one-out, add-one-in)
    and an oracle; writes a Markdown and a JSON table: target metric, gain over target-only,
    fraction of the oracle gain, Spearman of credit with ground truth, and the bar."""
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    from auxilia import samplers, strategies
    from auxilia.bench.quality import QualitySettings, default_cache, run_quality, write_report

    chosen, suite_label = _scenarios(suite, scenario_names)
    picked = _split_values(strategy_names)
    for name in picked:
        try:
            strategies.from_spec(name)  # NAME or NAME:VARIANT
        except AuxiliaError as error:
            raise ConfigError(f"--strategy: {error}") from None
    picked_samplers = _split_values(sampler_names)
    for name in picked_samplers:
        if name not in samplers.names():
            raise ConfigError(
                f"--sampler: unknown sampler {name!r}; expected one of: "
                f"{', '.join(samplers.names())}"
            )
    settings = QualitySettings(
        scenarios=tuple(dict.fromkeys(chosen)),
        strategies=tuple(picked),
        seeds=tuple(range(seeds)),
        steps=steps,
        jobs=jobs if jobs is not None else (os.cpu_count() or 1),
        cache=cache if cache is not None else default_cache(),
        samplers=tuple(picked_samplers),
        suite=suite_label,
        command=" ".join(["auxilia bench quality", *_options_after("quality", sys.argv)]),
    )
    console = Console(stderr=False)
    console.print(
        f"scenarios: {', '.join(settings.scenarios)} | {len(settings.strategy_names())} "
        f"strategies | seeds {seeds} | jobs {settings.jobs} | cache {settings.cache}"
    )
    with _progress_bar("quality", quiet) as shown:
        report = run_quality(settings, shown)
    json_path, md_path = write_report(report, out)
    table = Table(title="Standing against the bar (means over scenarios)")
    for column in ("strategy", "worst Δ pt", "oracle fraction", "Spearman credit"):
        table.add_column(column, justify="right" if column != "strategy" else "left")
    table.add_column("meets bar")
    for s in report["standing"]:
        table.add_row(
            s["strategy"],
            "n/a" if s["worst_delta"] is None else f"{s['worst_delta']:+.1f}",
            "n/a" if s["mean_oracle_fraction"] is None else f"{s['mean_oracle_fraction']:.2f}",
            "n/a" if s["mean_spearman_credit"] is None else f"{s['mean_spearman_credit']:+.2f}",
            "yes" if s["meets_bar"] else "no",
        )
    console.print(table)
    for item in report["skipped"]:
        console.print(f"skipped: {item}", markup=False)
    console.print(f"wall time {report['wall_seconds']:.0f} s; wrote {md_path} and {json_path}")


@bench_app.command("select")
def select(
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help="'quick' (digits, synthetic) or 'full' (the quality benchmark's six "
            "scenarios). Ignored when --scenario is given.",
        ),
    ] = "quick",
    scenario_names: Annotated[
        list[str] | None,
        typer.Option(
            "--scenario", "--scenarios", help="Scenarios to run (repeat or comma-separate)."
        ),
    ] = None,
    method_names: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "--methods",
            help="Selection methods (repeat or comma-separate; default: all six), each NAME or "
            "NAME:KEY=VALUE[:KEY=VALUE] (e.g. gradient:contrast=true). random, the baseline, is "
            "always run.",
        ),
    ] = None,
    budget_values: Annotated[
        list[str] | None,
        typer.Option(
            "--budgets",
            "--budget",
            help="Budgets in percent of the pool, in (0, 100] (default 1,5,10,25,50); "
            "100 %, the whole pool, is always run.",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds 0..N-1 per cell.")] = 3,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Training steps of every run, and warm-up steps of every ranking "
            "(default: per scenario).",
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "--workers", min=1, help="Worker processes (default: the number of cores)."
        ),
    ] = None,
    weighting: Annotated[
        str,
        typer.Option(
            "--weighting",
            help="'count' (each source weighted by its share of the selection: every selected "
            "sample counts the same) or 'source' (equal weights per source, as auxilia run).",
        ),
    ] = "count",
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Cache of rankings, embeddings and ground truth (default $AUXILIA_CACHE or "
            "~/.cache/auxilia).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for select.json, select.md and select.png.")
    ] = Path("runs/bench-select"),
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Scenarios × selection methods × budgets × seeds: the target's test metric after training
    on the target plus the top k % of the pool, against k % at random, the whole pool and the
    target alone, and the share of selected samples from harmful sources; writes a Markdown
    table, a JSON file and a plot of the metric against the budget."""
    import os
    import sys

    from rich.console import Console
    from rich.table import Table

    from auxilia.bench.quality import default_cache
    from auxilia.bench.select import BUDGETS, SelectBenchSettings, method_spec, run_select
    from auxilia.bench.select_report import write_report

    chosen, suite_label = _scenarios(suite, scenario_names)
    picked = _split_values(method_names)
    for name in picked:
        try:
            method_spec(name)
        except ConfigError as error:
            raise ConfigError(f"--method: {error}") from error
    budgets: list[float] = []
    for value in _split_values(budget_values):
        try:
            budget = float(value.rstrip("%"))
        except ValueError as error:
            raise ConfigError(f"--budgets: expected percentages, got {value!r}") from error
        if not 0.0 < budget <= 100.0:
            raise ConfigError(f"--budgets: {value} is out of range; budgets are in (0, 100]")
        budgets.append(budget)
    if weighting not in ("count", "source"):
        raise ConfigError(f"--weighting: expected 'count' or 'source', got {weighting!r}")
    settings = SelectBenchSettings(
        scenarios=tuple(chosen),
        methods=tuple(picked),
        budgets=tuple(budgets) if budgets else BUDGETS,
        seeds=tuple(range(seeds)),
        steps=steps,
        jobs=jobs if jobs is not None else (os.cpu_count() or 1),
        cache=cache if cache is not None else default_cache(),
        weighting="count" if weighting == "count" else "source",
        suite=suite_label,
        command=" ".join(["auxilia bench select", *_options_after("select", sys.argv)]),
    )
    console = Console(stderr=False)
    console.print(
        f"scenarios: {', '.join(settings.scenarios)} | methods: "
        f"{', '.join(settings.method_names())} | budgets "
        f"{', '.join(f'{b:g}' for b in settings.budget_list())} % | seeds {seeds} | jobs "
        f"{settings.jobs} | cache {settings.cache}"
    )
    with _progress_bar("select", quiet) as shown:
        report = run_select(settings, shown)
    json_path, md_path, png_path = write_report(report, out)
    goal = report["goal"]
    table = Table(title=f"At {goal['budget']:g} % of the pool (means over seeds)")
    for column in ("scenario", "method", "Δ vs random pt", "Δ vs whole pool pt", "harmful ratio"):
        table.add_column(column, justify="left" if column in ("scenario", "method") else "right")
    for c in goal["checks"]:
        table.add_row(
            c["scenario"],
            c["method"],
            "n/a" if c["delta_random"] is None else f"{c['delta_random']:+.1f}",
            "n/a" if c["delta_whole_pool"] is None else f"{c['delta_whole_pool']:+.1f}",
            "n/a" if c["harmful_ratio_worst"] is None else f"{c['harmful_ratio_worst']:.2f}",
        )
    console.print(table)
    met = goal["met"]
    console.print(
        f"goal ({goal['method']}): {'n/a' if met is None else 'met' if met else 'not met'}"
    )
    for item in report["skipped"]:
        console.print(f"skipped: {item}", markup=False)
    console.print(
        f"wall time {report['wall_seconds']:.0f} s; wrote {md_path}, {json_path} and {png_path}"
    )


def _scenarios(suite: str, names: list[str] | None) -> tuple[list[str], str]:
    """The scenarios named (suite "custom"), else those of ``suite``; unknown names are errors."""
    from auxilia.bench.scenarios import SCENARIOS, SUITES

    if names:
        chosen, label = _split_values(names), "custom"
    else:
        if suite not in SUITES:
            raise ConfigError(f"--suite: expected one of {', '.join(SUITES)}, got {suite!r}")
        chosen, label = list(SUITES[suite]), suite
    for name in chosen:
        if name not in SCENARIOS:
            raise ConfigError(
                f"--scenario: unknown scenario {name!r}; expected one of: {', '.join(SCENARIOS)}"
            )
    return list(dict.fromkeys(chosen)), label


@contextmanager
def _progress_bar(title: str, quiet: bool) -> Iterator[Progress]:
    """A :class:`~auxilia.bench.workers.Progress` drawn as a rich bar on stderr (none when
    ``quiet``), open for the duration of the block."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    from auxilia.bench.workers import Progress

    bar = RichProgress(
        TextColumn(f"[bold]{title}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        disable=quiet,
    )

    class _Shown(Progress):
        def __init__(self) -> None:
            super().__init__()
            self.task = bar.add_task("jobs", total=0, info="")

        def changed(self, label: str) -> None:
            bar.update(self.task, total=self.total, completed=self.done, info=label)

    with bar:
        yield _Shown()


def _options_after(command: str, argv: list[str]) -> list[str]:
    """The command line's words after ``command`` (to record how a result was produced)."""
    return argv[argv.index(command) + 1 :] if command in argv else argv[1:]
