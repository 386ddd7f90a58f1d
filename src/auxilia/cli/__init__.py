"""The ``auxilia`` command line: run, demo, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from auxilia import __version__
from auxilia.cli.bench import bench_app
from auxilia.errors import AuxiliaError

app = typer.Typer(
    help="auxilia: train a target task with auxiliary data, weighted by what it does for it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_options = {"debug": False}
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"auxilia {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback on errors.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Target-aware auxiliary learning. Errors are one line on stderr; --debug shows tracebacks."""
    _options["debug"] = debug


@app.command()
def run(
    config: Annotated[
        Path, typer.Argument(help="YAML run config (paths inside are relative to it).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default: runs/<config name>).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the last checkpoint in the run directory."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
) -> None:
    """Train the target with its auxiliary sources as CONFIG says; write a run directory."""
    from auxilia.config import build_trainer, load_config

    parsed = load_config(config)
    out_dir = out if out is not None else Path("runs") / config.stem
    trainer = build_trainer(parsed, config.parent, out_dir, quiet=quiet)
    results = trainer.fit(resume=resume)
    target = results["target"]
    typer.echo(f"{target['name']}: {target['split']} {target['metric']} {target['value']:.4f}")
    typer.echo(f"run directory: {out_dir} (report: {out_dir / 'report.html'})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes its runs.")] = Path(
        "runs/demo"
    ),
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Training steps per strategy.")
    ] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data split and training.")] = 0,
) -> None:
    """Few-shot MNIST with helpful and harmful auxiliaries: target-only, equal, gcs, olaux."""
    from auxilia.cli.demo import run_demo

    run_demo(out, steps=steps, seed=seed)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'auxilia run'.")],
) -> None:
    """Render RUN_DIR/report.html (plots of coefficients, target metric and credit) again."""
    from auxilia.report import render_report

    typer.echo(str(render_report(run_dir)))


def main() -> None:
    """Entry point: run the app; turn auxilia errors into one line on stderr and an exit code."""
    try:
        app()
    except AuxiliaError as error:
        if _options["debug"]:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        sys.exit(130)
