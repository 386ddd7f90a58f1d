"""``auxilia demo``: few-shot MNIST with helpful and harmful auxiliaries, via the config path."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from auxilia.atomic import write_text
from auxilia.config import build_trainer, parse_config
from auxilia.data.bundled import few_shot_mnist
from auxilia.data.files import save_array_file

STRATEGIES: list[dict[str, Any]] = [
    {"name": "target-only"},
    {"name": "equal"},
    {"name": "gcs", "params": {"variant": "weighted"}},
    {"name": "olaux"},
    {"name": "auto"},
]


def write_demo_data(folder: Path, seed: int) -> dict[str, Any]:
    """Write the demo's arrays as ``.npz`` files and return the matching config mapping."""
    problem = few_shot_mnist(seed=seed)
    t = problem.target
    data = folder / "data"
    for split, pair in (("train", t.train), ("val", t.val), ("test", t.test)):
        assert pair is not None
        save_array_file(data / f"target_{split}.npz", pair[0].numpy(), pair[1].numpy())
    sources: list[dict[str, Any]] = []
    for s in problem.sources:
        entry: dict[str, Any] = {"name": s.name, "granularity": s.granularity, "head": s.head}
        if s.data is not None:
            save_array_file(data / f"{s.name}.npz", s.data[0].numpy(), s.data[1].numpy())
            entry["data"] = f"data/{s.name}.npz"
        else:
            save_array_file(data / f"{s.name}.npz", None, s.y.numpy())
            entry["labels"] = f"data/{s.name}.npz"
        if s.num_classes is not None:
            entry["num_classes"] = s.num_classes
        entry["role"] = problem.roles[s.name]
        sources.append(entry)
    return {
        "target": {
            "name": t.name,
            "train": "data/target_train.npz",
            "val": "data/target_val.npz",
            "test": "data/target_test.npz",
            "num_classes": t.num_classes,
        },
        "sources": sources,
        "model": {"trunk": "mlp", "params": {"hidden": [256, 256]}},
        "strategy": {"name": "auto"},
        "train": {
            "steps": 500,
            "lr": 0.001,
            "eval_every": 100,
            "checkpoint_every": 250,
            "seed": seed,
        },
    }


def run_demo(out: Path, *, steps: int, seed: int) -> list[dict[str, Any]]:
    """Run every demo strategy, print the comparison table, return the results."""
    console = Console(stderr=False)
    config = write_demo_data(out, seed)
    roles = {s["name"]: s.pop("role") for s in config["sources"]}
    config["train"]["steps"] = steps
    write_text(out / "demo.yaml", yaml.safe_dump(config, sort_keys=False))
    all_results = []
    for strategy in STRATEGIES:
        run_dir = out / strategy["name"]
        if (run_dir / "config.yaml").exists():  # a previous demo run: start afresh
            shutil.rmtree(run_dir)
        parsed = parse_config({**config, "strategy": strategy}, "demo")
        trainer = build_trainer(parsed, out, run_dir, quiet=False)
        all_results.append(trainer.fit())
    _print_table(console, all_results, roles, out)
    return all_results


def _print_table(
    console: Console, results: list[dict[str, Any]], roles: dict[str, str], out: Path
) -> None:
    baseline = results[0]["target"]["value"]
    summary = Table(title="Few-shot MNIST, 10 labels per class: target test accuracy")
    summary.add_column("strategy")
    summary.add_column("accuracy", justify="right")
    summary.add_column("vs target-only", justify="right")
    summary.add_column("seconds", justify="right")
    for r in results:
        value = r["target"]["value"]
        summary.add_row(
            r["strategy"]["name"],
            f"{value:.3f}",
            f"{100 * (value - baseline):+.1f} pt",
            f"{r['wall_seconds']:.1f}",
        )
    console.print(summary)
    sources = Table(title="Mean coefficient / first-order credit per auxiliary source")
    sources.add_column("source")
    sources.add_column("by construction")
    for r in results[1:]:
        sources.add_column(r["strategy"]["name"], justify="right")
    for k, name in enumerate(s["name"] for s in results[0]["sources"][1:]):
        cells = [name, roles[name]]
        for r in results[1:]:
            row = r["sources"][k + 1]
            coef, credit = row["mean_coefficient"], row["credit"]
            cells.append("-" if coef is None or credit is None else f"{coef:.2f} / {credit:+.3f}")
        sources.add_row(*cells)
    console.print(sources)
    console.print(
        f"Run directories (config, metrics, results, report.html) are in {out}/<strategy>/"
    )
