"""The ``auxilia`` command line: run, demo, report."""

from __future__ import annotations

import os
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
    _leave_group()  # only after success: after a failure a peer may not answer
    target = results["target"]
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        typer.echo(f"{target['name']}: {target['split']} {target['metric']} {target['value']:.4f}")
        engine = results["engine"]
        path = f", {engine['path']}" if engine["path"] else ""
        typer.echo(f"engine: {engine['mode']} ({engine['layout']}{path}): {engine['why']}")
        typer.echo(f"run directory: {out_dir} (report: {out_dir / 'report.html'})")


@app.command()
def select(
    config: Annotated[
        Path, typer.Argument(help="YAML run config with a 'select' section (paths relative to it).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where the ranking goes (default: runs/<config name>-select)."),
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help="Override select.method.")] = None,
    budget: Annotated[
        float | None,
        typer.Option("--budget", help="Override select.budget: a count (>= 1) or a fraction."),
    ] = None,
) -> None:
    """Rank every sample of the config's dataset sources for the target; keep the budget's best.

    Writes ranking.parquet / ranking.csv (rank, source, index, score and its parts),
    selected/<source>.npz, selection.json and run.yaml (train on the selection with
    'auxilia run'). A language-model config (model.trunk: causal-lm) selects text:
    selected/<source>.jsonl, no run.yaml."""
    from dataclasses import replace

    from auxilia.config import load_selection
    from auxilia.selection import select as run_select
    from auxilia.selection import write_selection

    job = load_selection(config)
    settings = job.settings
    if method is not None:
        settings = replace(settings, method=method, params={})
    if budget is not None:
        settings = replace(settings, budget=int(budget) if budget >= 1 else budget)
    selection = run_select(job.target, job.pools, job.make_learner, settings)
    out_dir = out if out is not None else Path("runs") / f"{config.stem}-select"
    if os.environ.get("RANK", "0") != "0":
        _leave_group()
        return
    paths = write_selection(selection, job.pools, out_dir, job.config)
    counts = selection.counts()
    many = len(counts) > 1  # a pool's score orders the ranking only beside another pool
    shown = ", ".join(
        f"{name} {c['selected']}/{c['total']}"
        + (f" [source score {c['source_score']:+.3g}]" if "source_score" in c and many else "")
        for name, c in counts.items()
    )
    typer.echo(f"{selection.method}: selected {selection.budget} samples ({shown})")
    rate = selection.timing["scoring_samples_per_second"]
    plain = selection.timing["plain_samples_per_second"]
    passes = int(selection.timing["passes_per_sample"])
    each = f" ({passes} passes a sample)" if passes > 1 else ""
    typer.echo(
        f"scoring {rate:,.0f} samples/s{each}; plain forward+backward {plain:,.0f} samples/s"
    )
    if "config" in paths:
        typer.echo(
            f"ranking: {paths['parquet']}; train on the selection: auxilia run {paths['config']}"
        )
    else:
        typer.echo(f"ranking: {paths['parquet']}; selected text: {out_dir / 'selected'}")
    _leave_group()


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
    """Few-shot MNIST with helpful and harmful auxiliaries: target-only, equal, gcs, olaux, auto."""
    from auxilia.cli.demo import run_demo

    run_demo(out, steps=steps, seed=seed)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'auxilia run'.")],
) -> None:
    """Render RUN_DIR/report.html (plots of coefficients, target metric and credit) again."""
    from auxilia.report import render_report

    typer.echo(str(render_report(run_dir)))


def _where() -> str:
    """``rank R of W: `` under torchrun (so that an error names the process), else nothing."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"rank {rank} of {world}: " if world not in ("", "1") else ""


def main() -> None:
    """Entry point: run the app; turn auxilia errors into one line on stderr and an exit code.

    Under torchrun the line names the rank; a rank that loses contact with the others (one of
    them died or stopped answering within ``train.timeout``) says so and exits non-zero, so
    that torchrun stops the whole run.
    """
    try:
        app()
    except AuxiliaError as error:
        _record_for_torchrun(error)
        if _options["debug"]:
            raise
        print(f"error: {_where()}{error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print(f"{_where()}interrupted; resume with --resume", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        _record_for_torchrun(error)
        if not _where() or _options["debug"] or not _lost_contact(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"error: {_where()}lost contact with the other processes (one stopped or failed; "
            f"see its message): {first}",
            file=sys.stderr,
        )
        sys.exit(1)


def _lost_contact(error: BaseException) -> bool:
    """Whether ``error`` is torch.distributed's: a peer closed its connection or timed out."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or "gloo" in str(error).lower()


def _record_for_torchrun(error: BaseException) -> None:
    """Under torchrun, hand ``error`` to its error file, so that its failure summary shows the
    message of the rank that failed first (its "root cause") rather than only an exit code."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    get_error_handler().record_exception(error)


def _leave_group() -> None:
    """Destroy the process group torchrun's run joined, if any (a clean exit for gloo/NCCL)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
