"""Speed of one training step with the engine against a plain summed-loss step, same process.

``auxilia bench speed`` times one full training step (zero_grad, forward, engine with its
strategy, ``optimizer.step``) for every case — model × layout × K × strategy — and the plain
step that sums the losses and calls ``backward`` once, on the same model, batch and optimizer.
Baselines run side by side: a plain loop of K+1 backward passes (what LibMTL does), and
TorchJD's ``mtl_backward`` + ``jac_to_grad`` with UPGrad and with Mean, when ``torchjd`` is
installed (``pip install auxilia[bench]``).

Models (batch 64 everywhere, SGD):

- ``mlp``: trunk Linear(64, 256)-ReLU-Linear(256, 256)-ReLU, the anchors' setup;
- ``cnn``: Conv(1→16, 3×3, stride 2)-ReLU-Conv(16→32, 3×3, stride 2)-ReLU-Linear(1568,
  128)-ReLU on 28×28 inputs (strided convolutions: CPU max-pooling would dominate the step
  and flatter every ratio);
- ``transformer``: token embedding (vocabulary 1000, width 64) and one
  ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 128, no dropout) on sequences of 16
  tokens, mean-pooled; ``transformer-math`` (not in the default set) is the same with the
  math attention kernel, which, unlike CPU flash attention, can be differentiated twice;
  ``transformer-dropout`` (not in the default set) has the layer's default dropout, 0.1, in
  and after its attention, as it trains (``ghost`` replays the attention core with the
  forward's own mask).

``shared-input`` layout: one linear head with K+1 outputs, squared error per task, losses
[64, K+1], the trunk shared (the head is not). ``partitioned`` layout: one 10-class linear
head for every source, cross-entropy per sample, a quarter of the batch from the target and
the rest spread over the K auxiliary sources in turn (sources with no sample at K = 64),
every parameter shared. The engine runs in mode ``auto`` unless told otherwise, so a case
measures whichever modes are registered when it runs.

Timing: every case is warmed up, then the cases of one (model, layout, K) group take turns
in three rounds, each case running one untimed step and then a third of its ``repeats``
timed steps, so that drift of the machine spreads evenly and no case pays for the memory
another left behind; the median of each case is reported and divided by the plain step's.
Peak memory is measured on one more step under ``torch.profiler`` (CPU memory events): the
most bytes the step's tensors held above what was allocated when the step began.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from auxilia import strategies
from auxilia.engine import Engine
from auxilia.engine.batched import (
    JacobianMeasurement,
    batched_jacobian,
    jacobian_statistics,
    sequential_jacobian,
    split_shared,
    write_gradient,
)
from auxilia.engine.exact import accumulate
from auxilia.engine.ghost import GhostRunner
from auxilia.engine.jvp import FALLBACK_ERRORS, checked_row, first_order
from auxilia.engine.mode import Layout, ModeContext
from auxilia.engine.modes import unknown_mode
from auxilia.engine.source_losses import split_by_source, split_by_task
from auxilia.errors import AuxiliaError, ConfigError, EngineError
from auxilia.statistics import Need

MODELS = ("mlp", "cnn", "transformer", "transformer-math", "transformer-dropout")
DEFAULT_MODELS = ("mlp", "cnn", "transformer")
LAYOUTS: tuple[Layout, ...] = ("shared-input", "partitioned")
BASELINES = ("loop", "torchjd-upgrad", "torchjd-mean")
BATCH = 64
CLASSES = 10
SEQUENCE = 16
ROUNDS = 3  # timed steps are taken in this many rounds over the cases of a group
LR = 1e-3  # SGD; small, so that hundreds of steps on one batch stay finite for every strategy
VOCABULARY = 1000

Kind = Literal["plain", "strategy", "baseline"]


@dataclass(frozen=True)
class SpeedSettings:
    """What ``auxilia bench speed`` runs."""

    models: tuple[str, ...] = DEFAULT_MODELS
    layouts: tuple[Layout, ...] = LAYOUTS
    ks: tuple[int, ...] = (1, 4, 16, 64)
    strategies: tuple[str, ...] = ("equal", "gcs", "gcs:unweighted", "olaux", "arml", "auto")
    repeats: int = 20
    warmup: int = 6
    threads: int = 1
    baselines: bool = True
    modes: tuple[str, ...] = ("auto",)  # every strategy runs once per mode that can serve it
    memory: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.models:
            if name not in MODELS:
                raise ConfigError(f"unknown model '{name}'; expected one of: {', '.join(MODELS)}")
        for layout in self.layouts:
            if layout not in LAYOUTS:
                raise ConfigError(
                    f"unknown layout '{layout}'; expected one of: {', '.join(LAYOUTS)}"
                )
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"every K must be >= 1, got {list(self.ks)}")
        if self.repeats < 1 or self.warmup < 0 or self.threads < 1:
            raise ConfigError("repeats and threads must be >= 1 and warmup >= 0")
        for spec in self.strategies:
            strategies.from_spec(spec)  # fails early on an unknown name or variant
        if not self.modes:
            raise ConfigError("give at least one engine mode")
        for mode in self.modes:
            unknown = unknown_mode(mode)
            if unknown is not None:
                raise ConfigError(unknown)


@dataclass
class SpeedRecord:
    """One case: its median step time, its ratio to the plain step and its peak memory."""

    model: str
    layout: str
    k: int
    method: str  # "plain", a strategy spec, or a baseline name
    kind: Kind
    mode: str | None  # the engine mode that ran (strategies only)
    path: str | None  # how it ran: "vmap" or "loop" (batched), "via batched, loop" (jvp)
    median_ms: float
    ratio: float  # median over the plain step's median
    min_ms: float  # the fastest timed step: on a busy machine, the least disturbed
    ratio_of_min: float  # min over the plain step's min
    peak_memory_mb: float | None
    steps: int
    notes: list[str] = field(default_factory=list)


# A preset small enough for a smoke test: a few seconds.
QUICK = SpeedSettings(
    models=("mlp",),
    ks=(1, 4),
    strategies=("equal", "olaux", "arml"),
    repeats=3,
    warmup=1,
)


# --------------------------------------------------------------------------- problems


def make_trunk(model: str) -> tuple[nn.Module, int]:
    """The shared trunk of ``model`` and the width of its features."""
    if model == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()), 256
    if model == "cnn":
        trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
        )
        return trunk, 128
    dropout = 0.1 if model == "transformer-dropout" else 0.0
    return TokenEncoder(math_attention=model == "transformer-math", dropout=dropout), 64


class TokenEncoder(nn.Module):
    """Token embedding, one transformer encoder layer, mean over the sequence.

    ``math_attention`` runs attention with PyTorch's math kernel instead of the default
    (flash attention on CPU), whose backward can be differentiated again and batched by vmap.
    """

    def __init__(self, width: int = 64, math_attention: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, width)
        self.layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=4, dim_feedforward=2 * width, dropout=dropout, batch_first=True
        )
        self.math_attention = math_attention

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        context = sdpa_kernel(SDPBackend.MATH) if self.math_attention else contextlib.nullcontext()
        with context:
            hidden: torch.Tensor = self.layer(self.embed(tokens))
        return hidden.mean(dim=1)


@dataclass
class Problem:
    """A model (trunk + head) with one fixed batch for a layout and K."""

    model: nn.Sequential  # [trunk, head]
    layout: Layout
    num_sources: int
    inputs: torch.Tensor
    targets: torch.Tensor  # [B, K+1] regression targets, or [B] class labels
    ids: torch.Tensor  # source of each sample (partitioned)

    @property
    def trunk(self) -> nn.Module:
        return self.model[0]

    def losses(self, model: nn.Sequential) -> torch.Tensor:
        """Per-sample losses: [B, K+1] (shared-input) or [B] (partitioned)."""
        return self.losses_from(model[1](model[0](self.inputs)))

    def losses_from(self, out: torch.Tensor) -> torch.Tensor:
        if self.layout == "shared-input":
            return (out - self.targets) ** 2
        return F.cross_entropy(out, self.targets, reduction="none")

    def shared(self, model: nn.Sequential) -> list[torch.Tensor] | None:
        """The trunk in the shared-input layout; everything (None) in the partitioned one."""
        return list(model[0].parameters()) if self.layout == "shared-input" else None

    def source_means(self, losses: torch.Tensor) -> list[torch.Tensor]:
        """Graph-connected mean loss of every present source, the target first."""
        if self.layout == "shared-input":
            return list(losses.mean(dim=0).unbind())
        batch = split_by_source(losses, self.ids, self.num_sources)
        return [m for m in batch.means if m is not None]


def make_problem(model: str, layout: Layout, k: int, seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trunk, width = make_trunk(model)
    outputs = k + 1 if layout == "shared-input" else CLASSES
    net = nn.Sequential(trunk, nn.Linear(width, outputs))
    if model == "mlp":
        inputs = torch.randn(BATCH, 64, generator=gen)
    elif model == "cnn":
        inputs = torch.randn(BATCH, 1, 28, 28, generator=gen)
    else:
        inputs = torch.randint(0, VOCABULARY, (BATCH, SEQUENCE), generator=gen)
    if layout == "shared-input":
        targets = torch.randn(BATCH, k + 1, generator=gen)
    else:
        targets = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    quarter = BATCH // 4
    ids = torch.cat([torch.zeros(quarter), 1 + torch.arange(BATCH - quarter) % k]).long()
    return Problem(net, layout, k + 1, inputs, targets, ids)


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One timed method on its own copy of the problem's model and optimizer."""

    method: str
    kind: Kind
    step: Callable[[], None]
    mode: str | None = None
    path: str | None = None
    engine: Engine | None = None
    times: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def run(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start


def _copy(problem: Problem) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    model = copy.deepcopy(problem.model)
    return model, torch.optim.SGD(model.parameters(), lr=LR)


def plain_case(problem: Problem) -> Case:
    model, optimizer = _copy(problem)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = problem.losses(model)
        loss = losses.mean(dim=0).sum() if problem.layout == "shared-input" else losses.mean()
        torch.autograd.backward(loss)
        optimizer.step()

    return Case("plain", "plain", step)


def strategy_case(problem: Problem, spec: str, mode: str) -> Case:
    model, optimizer = _copy(problem)
    engine = Engine(
        model,
        strategy=strategies.from_spec(spec),
        num_sources=problem.num_sources,
        shared=problem.shared(model),
        mode=mode,
        layout=problem.layout,
    )
    ids = problem.ids if problem.layout == "partitioned" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        engine.backward(problem.losses(model), ids, lr=LR)
        optimizer.step()

    return Case(spec, "strategy", step, mode=engine.mode.name, engine=engine)


def strategy_cases(
    problem: Problem, specs: Sequence[str], modes: Sequence[str]
) -> tuple[list[Case], list[str]]:
    """One case per strategy and mode, and why any was left out: with several modes, one that
    cannot serve a strategy (``jvp`` for a strategy that reads the norms) is skipped."""
    cases, skipped = [], []
    for spec in specs:
        for mode in modes:
            try:
                cases.append(strategy_case(problem, spec, mode))
            except EngineError as error:
                if len(modes) == 1:
                    raise
                skipped.append(f"{spec} [{mode}] skipped: {error}")
    return cases, skipped


def loop_case(problem: Problem) -> Case:
    """K+1 backward passes, one per present source, gradients summed: no statistics."""
    model, optimizer = _copy(problem)
    params = list(model.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for mean in problem.source_means(problem.losses(model)):
            grads = torch.autograd.grad(mean, params, retain_graph=True, allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                if grad is not None:
                    accumulate(param, grad)
        optimizer.step()

    return Case("loop", "baseline", step)


def torchjd_case(problem: Problem, which: str) -> Case:
    """TorchJD 0.18: ``mtl_backward`` on the features, then ``jac_to_grad`` with UPGrad/Mean."""
    from torchjd.aggregation import Mean, UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    model, optimizer = _copy(problem)
    aggregator = UPGrad() if which == "torchjd-upgrad" else Mean()
    shared_input = problem.layout == "shared-input"
    shared = list(model[0].parameters()) if shared_input else list(model.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        features = model[0](problem.inputs)
        out = model[1](features)
        means = problem.source_means(problem.losses_from(out))
        # Shared-input: the trunk's Jacobian, the head gets its per-task gradients summed.
        # Partitioned: every parameter is shared, so the "features" are the outputs.
        mtl_backward(means, features=features if shared_input else out, retain_graph=True)
        jac_to_grad(shared, aggregator)
        optimizer.step()

    return Case(which, "baseline", step)


def torchjd_available() -> bool:
    try:
        import torchjd.aggregation
        import torchjd.autojac  # noqa: F401
    except ImportError:
        return False
    try:
        from torchjd.aggregation import UPGrad

        UPGrad()  # needs the quadprog projector extra
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop lines on file descriptor 2."""
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters)
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def peak_memory_mb(step: Callable[[], None]) -> float | None:
    """The most memory the step's tensors held above the start of the step, in MiB."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    try:
        with (
            warnings.catch_warnings(),  # what the step warns was noted during its warm-up
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p,
        ):
            warnings.simplefilter("ignore")
            step()
        results: Any = getattr(p.profiler, "kineto_results", None)
        if results is None:
            return None
        events = [e for e in results.events() if e.name() == "[memory]"]
    except (RuntimeError, AttributeError):
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += int(event.nbytes())
        peak = max(peak, current)
    return peak / 2**20


def _run_group(cases: list[Case], settings: SpeedSettings) -> None:
    for case in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(max(settings.warmup, 1 if settings.memory else 0)):
                case.step()
        messages = {str(w.message).splitlines()[0] for w in caught}
        # The engine's own fallbacks are reported by Engine.path() instead.
        case.notes += sorted(m for m in messages if not m.startswith("engine mode "))
    # The timed steps come in ROUNDS rounds; in each, every case takes its turn: one untimed
    # step (it pays for what the previous case left in the allocator and caches), then its
    # share of the timed steps. Drift of a busy machine spreads over every case.
    rounds = min(ROUNDS, settings.repeats)
    for r in range(rounds):
        share = settings.repeats // rounds + (1 if r < settings.repeats % rounds else 0)
        for case in cases:
            case.step()
            case.times += [case.run() for _ in range(share)]
    for case in cases:
        if case.engine is not None:
            case.path, notes = case.engine.path()
            case.notes += notes


def run_speed(
    settings: SpeedSettings, progress: Callable[[str], None] | None = None
) -> list[SpeedRecord]:
    """Time every case of ``settings``; one record per case, the plain step included."""
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    with_torchjd = settings.baselines and torchjd_available()
    records: list[SpeedRecord] = []
    try:
        for model_name in settings.models:
            for layout in settings.layouts:
                for k in settings.ks:
                    started = time.perf_counter()
                    problem = make_problem(model_name, layout, k, settings.seed)
                    where = f"{model_name} {layout} K={k}"
                    engine_cases, skipped = strategy_cases(
                        problem, settings.strategies, settings.modes
                    )
                    cases = [plain_case(problem), *engine_cases]
                    if settings.baselines:
                        cases.append(loop_case(problem))
                        if with_torchjd:
                            cases += [torchjd_case(problem, b) for b in BASELINES[1:]]
                    try:
                        _run_group(cases, settings)
                    except AuxiliaError as error:
                        raise EngineError(f"bench speed, {where}: {error}") from error
                    records += _records(model_name, layout, k, cases, settings)
                    if progress is not None:
                        for line in skipped:
                            progress(f"{where}: {line}")
                        progress(
                            f"{where}: {len(cases)} cases in {time.perf_counter() - started:.1f} s"
                        )
    finally:
        torch.set_num_threads(previous)
    return records


def _records(
    model: str, layout: str, k: int, cases: list[Case], settings: SpeedSettings
) -> list[SpeedRecord]:
    plain = statistics.median(cases[0].times)
    plain_min = min(cases[0].times)
    out = []
    for case in cases:
        median = statistics.median(case.times)
        memory = peak_memory_mb(case.step) if settings.memory else None
        out.append(
            SpeedRecord(
                model=model,
                layout=layout,
                k=k,
                method=case.method,
                kind=case.kind,
                mode=case.mode,
                path=case.path,
                median_ms=1e3 * median,
                ratio=median / plain,
                min_ms=1e3 * min(case.times),
                ratio_of_min=min(case.times) / plain_min,
                peak_memory_mb=memory,
                steps=len(case.times),
                notes=case.notes,
            )
        )
    return out


def machine() -> dict[str, Any]:
    """CPU model, core count, torch version: what a timing needs to be read."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torchjd": _torchjd_version(),
    }


def _torchjd_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchjd")
    except PackageNotFoundError:
        return None


def records_json(
    records: Sequence[SpeedRecord], settings: SpeedSettings, info: dict[str, Any]
) -> dict[str, Any]:
    """The JSON document: machine, settings, and one record per case."""
    return {
        "benchmark": "speed",
        "machine": info,
        "settings": asdict(settings),
        "records": [asdict(r) for r in records],
    }


# --------------------------------------------------------------------------- breakdown


def breakdown(
    model_name: str,
    k: int,
    repeats: int = 20,
    layout: Layout = "shared-input",
    seed: int = 0,
    threads: int = 1,
    notes: list[str] | None = None,
) -> dict[str, float | None]:
    """Median milliseconds of each phase of a step: the ``jvp`` and ``batched`` modes
    (shared-input layout) or the ``ghost`` mode (partitioned).

    Runs the modes' own building blocks one at a time on a fresh graph each repetition:
    forward (to the per-sample losses), the engine's input checks (split), the first- and
    second-order passes of ``jvp``, its combine, the Jacobian of ``batched`` (vmapped, and as
    a loop of backward passes), its Gram matrix and its combine, and the plain backward and
    optimizer step for scale. Where the second-order pass fails (flash attention), its phases
    are None and a line is added to ``notes``. Partitioned: ``ghost``'s one backward pass to
    the layers' outputs with its factors, the whole Gram matrix or only its target row and
    norms (alternate repetitions), and the combine that writes ``.grad``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        problem = make_problem(model_name, layout, k, seed)
        with warnings.catch_warnings():  # vmap's fallback warnings: the table shows the cost
            warnings.simplefilter("ignore")
            if layout == "partitioned":
                return _ghost_breakdown(problem, repeats)
            return _breakdown(problem, repeats, [] if notes is None else notes)
    finally:
        torch.set_num_threads(previous)


class Phases:
    """Wall times of named phases over repetitions (``clear`` drops the warm-up's)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times.setdefault(name, []).append(time.perf_counter() - start)

    def clear(self) -> None:
        self.times.clear()

    def medians(self) -> dict[str, float]:
        """Median milliseconds of each phase, in the order first timed."""
        return {name: 1e3 * statistics.median(values) for name, values in self.times.items()}


def _breakdown(problem: Problem, repeats: int, notes: list[str]) -> dict[str, float | None]:
    layout = problem.layout
    model, optimizer = _copy(problem)
    params = list(model.parameters())
    shared, others = split_shared(params, problem.shared(model))
    present = torch.ones(problem.num_sources, dtype=torch.bool)
    alpha = torch.rand(problem.num_sources, dtype=torch.float64) + 0.5
    phases = Phases()
    timed = phases.timed
    rows = list(range(problem.num_sources))
    gram = frozenset({Need.GRAM})
    failure: str | None = None
    for repeat in range(repeats + 2):
        optimizer.zero_grad(set_to_none=True)
        with timed("forward"):
            losses = problem.losses(model)
        with timed("engine input checks (split)"):
            if layout == "shared-input":
                batch = split_by_task(losses, problem.num_sources)
            else:
                batch = split_by_source(losses, problem.ids, problem.num_sources)
            means = batch.mean_vector  # formed on first use: by these modes, in the split
        with timed("plain backward"):
            torch.autograd.grad(means.sum(), params, retain_graph=True)
        if failure is None:
            try:
                with timed("jvp: first-order pass"):
                    target, probe = first_order(means, shared)
                with timed("jvp: second-order pass"):
                    checked_row(target, probe)
                del probe
            except FALLBACK_ERRORS as error:  # the mode would measure through batched
                failure = f"{type(error).__name__}: {error}".splitlines()[0]
        with timed("jvp: combine"):
            write_gradient(batch.weighted(), shared, others, alpha, present)
        with timed("batched: jacobian, vmap"):
            blocks = batched_jacobian(means, rows, shared)
        with timed("batched: jacobian, loop"):
            sequential_jacobian(means, rows, shared)
        with timed("batched: gram"):
            stats = jacobian_statistics(batch, rows, blocks, gram)
        with timed("batched: combine"):
            measured = JacobianMeasurement(stats, batch.weighted(), rows, shared, others, blocks)
            measured.combine(alpha)
        with timed("optimizer step"):
            optimizer.step()
        if repeat < 2:  # warm-up
            phases.clear()
    out: dict[str, float | None] = dict(phases.medians())
    if failure is not None:
        out["jvp: first-order pass"] = out["jvp: second-order pass"] = None
        notes.append(f"jvp has no second-order pass here and measures through batched: {failure}")
    return out


def _ghost_breakdown(problem: Problem, repeats: int) -> dict[str, float | None]:
    model, optimizer = _copy(problem)
    params: list[torch.Tensor] = list(model.parameters())
    runner = GhostRunner(ModeContext(model, params, None, "partitioned"), verify=False)
    alpha = torch.rand(problem.num_sources, dtype=torch.float64) + 0.5
    phases = Phases()
    timed = phases.timed
    try:
        for repeat in range(2 * repeats + 2):
            optimizer.zero_grad(set_to_none=True)
            with timed("forward (layer hooks on)"):
                losses = problem.losses(model)
            with timed("engine input checks (split)"):
                batch = split_by_source(losses, problem.ids, problem.num_sources)
            with timed("plain backward"):
                torch.autograd.grad(losses.mean(), params, retain_graph=True)
            with timed("ghost: backward to layer outputs, factors"):
                runner.capture.check(int(losses.shape[0]), int(batch.present.sum()))
                step = runner.capture.collect(batch)
            full = repeat % 2 == 0
            with timed("ghost: Gram matrix" if full else "ghost: target row and norms"):
                step.gram(full=full)
            with timed("ghost: combine (.grad)"):
                step.combine(alpha)
            with timed("optimizer step"):
                optimizer.step()
            if repeat < 2:  # warm-up
                phases.clear()
    finally:
        runner.close()
    return dict(phases.medians())
