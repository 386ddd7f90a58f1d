"""Step cost against the number of auxiliary datasets: N = 10 versus N = 1000, same process.

With a sampler that draws a fixed number of datasets per step (``exp3``, ``per_step = 4``),
a step touches the target and four datasets whatever N is, so its wall time should not grow
with N. This builds a synthetic problem in memory (a small MLP; a target and N auxiliary
datasets of a few dozen samples each), runs the real :class:`~auxilia.train.Trainer` (run
directory, metrics lines and checkpoints included) for each N, and reports the median and the
mean time between the starts of consecutive steps after a warm-up. The median is the step
itself; the mean also carries what happens every few steps (metrics lines, checkpoints).
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from auxilia import samplers, strategies
from auxilia.data.sources import Source, Target
from auxilia.errors import ConfigError
from auxilia.train import Trainer, TrainSettings


@dataclass(frozen=True)
class ManySourcesSettings:
    """What ``auxilia bench sources`` runs."""

    sources: tuple[int, ...] = (10, 1000)
    sampler: str = "exp3"
    per_step: int = 4
    strategy: str = "gcs"
    steps: int = 150
    warmup: int = 30
    samples: int = 32  # per auxiliary dataset
    features: int = 32
    hidden: int = 64
    classes: int = 4
    batch_size: int = 16
    head: Literal["target", "own"] = "target"
    log_every: int = 10
    checkpoint_every: int = 100
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources or any(n < 1 for n in self.sources):
            raise ConfigError(f"--sources: expected counts >= 1, got {list(self.sources)}")
        for name in ("per_step", "steps", "samples", "features", "hidden", "classes", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}"
                )
        if self.batch_size < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("--batch-size, --log-every, --checkpoint-every: expected >= 1")
        if not 0 <= self.warmup < self.steps - 1:
            raise ConfigError(
                f"--warmup: expected 0 <= warmup < steps - 1 ({self.steps - 1}), got {self.warmup}"
            )
        if self.head not in ("target", "own"):
            raise ConfigError(f"--head: expected 'target' or 'own', got {self.head!r}")


@dataclass(frozen=True)
class BenchRecord:
    """The timing of one N."""

    sources: int
    sampler: str
    per_step: int
    strategy: str
    threads: int
    steps_timed: int
    median_step_seconds: float
    mean_step_seconds: float
    ratio: float  # median over the median of the first N
    mean_ratio: float  # mean over the mean of the first N
    setup_seconds: float  # building the problem and the trainer
    finish_seconds: float  # from the start of the last step: it, results.json, the report
    sources_per_step: float  # auxiliary datasets drawn per step, on average


def synthetic_problem(
    num_sources: int,
    *,
    samples: int = 32,
    features: int = 32,
    classes: int = 4,
    batch_size: int = 16,
    head: Literal["target", "own"] = "target",
    seed: int = 0,
) -> tuple[Target, list[Source]]:
    """A target and ``num_sources`` auxiliary datasets, generated in memory.

    Labels come from linear rules: the target's, and for each dataset a mix of the target's
    rule and its own random one (from fully aligned to unrelated), so gradient alignments vary.
    """
    generator = torch.Generator().manual_seed(seed)
    rule = torch.randn(features, classes, generator=generator)
    x_target = torch.randn(4 * samples, features, generator=generator)
    target = Target(
        "target",
        train=(x_target, (x_target @ rule).argmax(dim=1)),
        num_classes=classes,
        batch_size=batch_size,
    )
    xs = torch.randn(num_sources, samples, features, generator=generator)
    own = torch.randn(num_sources, features, classes, generator=generator)
    mix = torch.linspace(0.0, 1.0, num_sources).reshape(-1, 1, 1)
    rules = (1.0 - mix) * rule + mix * own
    labels = torch.bmm(xs, rules).argmax(dim=2)
    sources = [
        Source(
            f"aux{k:04d}",
            data=(xs[k], labels[k]),
            head=head,
            num_classes=classes,
            batch_size=batch_size,
        )
        for k in range(num_sources)
    ]
    return target, sources


class _TimedTrainer(Trainer):
    """A trainer that notes when each step starts (nothing else differs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marks: list[float] = []

    def train_step(self, step: int) -> torch.Tensor:
        self.marks.append(time.perf_counter())
        return super().train_step(step)


def _time_one(num_sources: int, settings: ManySourcesSettings, folder: Path) -> dict[str, Any]:
    began = time.perf_counter()
    target, sources = synthetic_problem(
        num_sources,
        samples=settings.samples,
        features=settings.features,
        classes=settings.classes,
        batch_size=settings.batch_size,
        head=settings.head,
        seed=settings.seed,
    )
    trainer = _TimedTrainer(
        target,
        sources,
        strategy=strategies.get(settings.strategy),
        sampler=samplers.get(settings.sampler, {"per_step": settings.per_step}),
        trunk="mlp",
        trunk_params={"hidden": [settings.hidden]},
        settings=TrainSettings(
            steps=settings.steps,
            optimizer="adam",
            lr=1e-3,
            log_every=settings.log_every,
            eval_every=settings.steps,
            checkpoint_every=settings.checkpoint_every,
            seed=settings.seed,
        ),
        out_dir=folder / f"sources_{num_sources}",
        quiet=True,
    )
    setup = time.perf_counter() - began
    trainer.fit()
    finish = time.perf_counter() - trainer.marks[-1]
    marks = trainer.marks
    intervals = [b - a for a, b in itertools.pairwise(marks)][settings.warmup :]
    return {
        "median": statistics.median(intervals),
        "mean": statistics.fmean(intervals),
        "timed": len(intervals),
        "setup": setup,
        "finish": finish,
        "drawn": float(trainer.ledger.run["drawn"][1:].sum()) / max(len(marks), 1),
    }


def run_many_sources(settings: ManySourcesSettings) -> list[BenchRecord]:
    """Time the trainer for each N in ``settings.sources`` (in that order, one process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="auxilia-bench-") as tmp:
            timings = [(n, _time_one(n, settings, Path(tmp))) for n in settings.sources]
    finally:
        torch.set_num_threads(previous)
    base = timings[0][1]
    return [
        BenchRecord(
            sources=n,
            sampler=settings.sampler,
            per_step=settings.per_step,
            strategy=settings.strategy,
            threads=settings.threads,
            steps_timed=t["timed"],
            median_step_seconds=t["median"],
            mean_step_seconds=t["mean"],
            ratio=t["median"] / base["median"],
            mean_ratio=t["mean"] / base["mean"],
            setup_seconds=t["setup"],
            finish_seconds=t["finish"],
            sources_per_step=t["drawn"],
        )
        for n, t in timings
    ]


def records_json(records: Sequence[BenchRecord]) -> list[dict[str, Any]]:
    """Plain dicts for ``--json``."""
    return [asdict(record) for record in records]
