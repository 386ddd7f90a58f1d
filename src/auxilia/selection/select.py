"""Rank every sample of the auxiliary pools for the target and keep a budget of the best.

:func:`select` warms a model up (target labels and a random subset of each pool), prepares the
scoring method on it, streams every pool through the method one batch at a time, ranks all
samples together and keeps the top ``budget`` (a count, or a fraction of all pool samples).
Under torchrun each process scores every W-th batch of each pool and rank 0 merges: the merged
ranking is the one-process ranking. :func:`write_selection` writes the ranked table (Parquet
and CSV), the selected samples as one ``.npz`` per pool, and a run config that trains on them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml

from auxilia.atomic import write_json, write_text, write_with
from auxilia.errors import ConfigError, DataError
from auxilia.selection.learner import Learner
from auxilia.selection.methods import Context, Method, get
from auxilia.selection.pools import Pool
from auxilia.selection.warmup import Group, warm_up
from auxilia.train.distributed import Place, join, local_device

F64 = torch.float64


class SelectTarget(Protocol):
    """What :func:`select` needs of the target: a :class:`~auxilia.data.sources.Target` or a
    :class:`~auxilia.selection.text.TextTarget`."""

    @property
    def name(self) -> str: ...

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def kind(self) -> str: ...

    @property
    def outputs(self) -> int: ...


@dataclass(frozen=True)
class SelectSettings:
    """How to select: the method, the budget, the warm-up and the scoring batch."""

    method: str = "gradient"
    params: Mapping[str, Any] = field(default_factory=dict)
    budget: int | float = 0.1  # a count (int >= 1) or a fraction of the pool (float in (0, 1])
    warmup_steps: int = 200
    checkpoints: int = 4
    warmup_samples: int = 2000  # per pool, drawn at random, for the warm-up
    batch_size: int = 256  # pool samples scored at a time
    warmup_batch: int = 32  # samples per group and warm-up step
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    timeout: float = 300.0  # seconds any collective may wait under torchrun

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float):
            raise ConfigError(f"select.budget: expected a count or a fraction, got {self.budget!r}")
        if isinstance(self.budget, int) and self.budget < 1:
            raise ConfigError(f"select.budget: a count must be >= 1, got {self.budget}")
        if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"select.budget: a fraction must be in (0, 1], got {self.budget}")
        for name in ("warmup_steps", "checkpoints", "warmup_samples", "batch_size", "warmup_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"select.{name}: expected an integer >= 1, got {getattr(self, name)}"
                )
        if not self.lr > 0:
            raise ConfigError(f"select.lr: expected a positive number, got {self.lr}")

    def count(self, total: int) -> int:
        """The number of samples the budget keeps out of ``total``."""
        if isinstance(self.budget, float):
            return max(1, min(total, round(self.budget * total)))
        return min(total, self.budget)


@dataclass
class Selection:
    """Every pool sample ranked (``table``: one row each, best first) and the budget kept."""

    table: Any  # pandas.DataFrame: rank, source, index, score, selected, parts...
    method: str
    params: dict[str, Any]
    budget: int
    timing: dict[str, float]

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per pool: how many samples it has, how many were selected and, where the method
        ranks pools first, the pool's ``source_score``."""
        out: dict[str, dict[str, Any]] = {}
        for name, group in self.table.groupby("source", sort=False):
            out[str(name)] = {"total": len(group), "selected": int(group["selected"].sum())}
            if "source_score" in group:
                out[str(name)]["source_score"] = float(group["source_score"].iloc[0])
        return out

    def selected_rows(self, pool: str) -> torch.Tensor:
        """The selected rows of ``pool``, sorted."""
        rows = self.table[(self.table["source"] == pool) & self.table["selected"]]["index"]
        return torch.as_tensor(sorted(rows.tolist()), dtype=torch.int64)


def _warm_groups(
    pools: Sequence[Pool], heads: Mapping[str, str], count: int, seed: int
) -> list[Group]:
    groups = []
    for k, pool in enumerate(pools):
        size = pool.size()
        generator = torch.Generator().manual_seed(seed + 7_001 * (k + 1))
        rows = torch.randperm(size, generator=generator)[: min(count, size)].sort().values
        x, y = pool.rows(rows)
        groups.append(Group(pool.name, heads[pool.name], x, y))
    return groups


def _broadcast(learner: Learner, context: Context, place: Place) -> None:
    """Every rank scores with rank 0's warm-up model and checkpoints, bit for bit."""
    if not place.distributed:
        return
    tensors = [t for t in learner.module.state_dict().values()]
    for checkpoint in context.checkpoints:
        tensors += list(checkpoint.state.values())
        for m, v in checkpoint.moments.values():
            tensors += [m, v]
    for tensor in tensors:
        buffer = tensor.detach().cpu()
        dist.broadcast(buffer, src=0)
        tensor.detach().copy_(buffer)


def plain_throughput(
    learner: Learner,
    pool: Pool,
    head: str,
    batch_size: int,
    device: torch.device,
    batches: int = 20,
) -> float:
    """Samples per second of a plain forward + backward pass of ``learner`` on ``pool``."""
    model = learner.clone()
    model.module.to(device).train()
    seen, seconds = 0, 0.0
    for i, batch in enumerate(pool.batches(batch_size)):
        if i > batches:
            break
        x, y = batch.x.to(device), batch.y.to(device)
        began = time.perf_counter()
        torch.autograd.backward(model.losses(x, y, head).mean())
        if i > 0:  # the first batch is a warm-up
            seconds += time.perf_counter() - began
            seen += len(y)
        model.module.zero_grad(set_to_none=True)
    if seen == 0:  # a pool of one batch: time it once more
        batch = next(iter(pool.batches(batch_size)))
        began = time.perf_counter()
        torch.autograd.backward(model.losses(batch.x.to(device), batch.y.to(device), head).mean())
        seconds, seen = time.perf_counter() - began, len(batch.y)
    return seen / max(seconds, 1e-9)


def select(
    target: SelectTarget,
    pools: Sequence[Pool],
    make_learner: Callable[[], Learner],
    settings: SelectSettings | None = None,
) -> Selection:
    """Score every sample of ``pools`` for ``target`` and keep ``settings.budget`` of them."""
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

    settings = settings or SelectSettings()
    if not pools:
        raise DataError("select: no auxiliary pool to select from")
    names = [p.name for p in pools]
    if len(set(names)) != len(names) or target.name in names:
        raise DataError(f"select: pool names must be unique and differ from the target's: {names}")
    method: Method = get(settings.method, settings.params)
    if method.needs_warmup:
        method.check(settings.checkpoints)
    device = local_device(torch.device(settings.device))
    place = join(device, settings.timeout)
    heads = {p.name: target.name if p.head == "target" else p.name for p in pools}
    began = time.perf_counter()
    torch.manual_seed(settings.seed)
    learner = make_learner()
    target_group = Group(target.name, target.name, *target.train)
    warm_groups = _warm_groups(pools, heads, settings.warmup_samples, settings.seed)
    checkpoints = []
    if method.needs_warmup:
        checkpoints = warm_up(
            learner,
            [target_group, *warm_groups],
            steps=settings.warmup_steps,
            checkpoints=settings.checkpoints,
            lr=settings.lr,
            batch_size=settings.warmup_batch,
            seed=settings.seed,
            device=device,
        )
    learner.module.to(device).eval()

    def fresh() -> Learner:
        torch.manual_seed(settings.seed + 1)
        return make_learner()

    context = Context(
        learner=learner,
        checkpoints=checkpoints,
        target=target_group,
        heads=heads,
        warm_groups=warm_groups,
        make_learner=fresh,
        device=device,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        pool_index={p.name: k for k, p in enumerate(pools)},
        target_kind=target.kind,
    )
    _broadcast(learner, context, place)
    warm_seconds = time.perf_counter() - began
    method.prepare(context)
    prepared = time.perf_counter()
    scored: list[dict[str, torch.Tensor]] = []
    scoring_seconds, samples = 0.0, 0
    per_batch = method.rows_per_batch(settings.batch_size)
    try:
        for k, pool in enumerate(pools):
            method.start_pool(pool)
            for b, batch in enumerate(pool.batches(per_batch)):
                if b % place.world != place.rank:
                    continue
                if pool.head == "target" and target.kind == "classification":
                    _check_labels(pool, batch.y, target.outputs)
                start = time.perf_counter()
                scores = method.score(pool, batch)
                scoring_seconds += time.perf_counter() - start
                _check_finite(pool, batch.start, scores["score"], method.name)
                samples += len(batch.y)
                rows = torch.arange(batch.start, batch.start + len(batch.y))
                scored.append({"source": torch.full_like(rows, k), "index": rows, **scores})
            method.end_pool(pool)
    finally:
        method.close()
    gathered = _merge(scored, method.tally(), place)
    timing = {
        "warmup_seconds": warm_seconds,
        "prepare_seconds": prepared - began - warm_seconds,
        "scoring_seconds": scoring_seconds,
        "scored_samples": float(samples),
        "scoring_samples_per_second": samples / max(scoring_seconds, 1e-9),
        "passes_per_sample": float(method.passes()),
        "plain_samples_per_second": plain_throughput(
            learner, pools[0], heads[pools[0].name], settings.batch_size, device
        ),
        "world": float(place.world),
    }
    if gathered is None:  # not rank 0: rank 0 writes the result
        return Selection(pd.DataFrame(), method.name, dict(method.params), 0, timing)
    merged, tally = gathered
    method.absorb(tally)
    merged = method.finish(merged)
    frame = pd.DataFrame({key: value.numpy() for key, value in merged.items()})
    frame["source"] = [names[int(k)] for k in frame["source"]]
    frame["_order"] = range(len(frame))
    keys = [*(["source_score"] if "source_score" in frame else []), "score", "_order"]
    ascending = [key == "_order" for key in keys]
    frame = frame.sort_values(keys, ascending=ascending, kind="stable")
    frame = frame.drop(columns="_order").reset_index(drop=True)
    budget = settings.count(len(frame))
    frame.insert(0, "rank", range(1, len(frame) + 1))
    frame.insert(4, "selected", frame["rank"] <= budget)
    timing["total_seconds"] = time.perf_counter() - began
    return Selection(frame, method.name, dict(method.params), budget, timing)


def _check_finite(pool: Pool, start: int, score: torch.Tensor, method: str) -> None:
    """A NaN or infinite score (a non-finite loss or gradient) names the pool row."""
    bad = (~torch.isfinite(score)).nonzero()
    if len(bad):
        row = start + int(bad[0])
        raise DataError(
            f"pool '{pool.name}': method '{method}' gave a non-finite score to row {row} "
            "(its loss or gradient is NaN or infinite); check that sample and the model"
        )


def _check_labels(pool: Pool, y: torch.Tensor, outputs: int) -> None:
    if y.dtype.is_floating_point:
        raise DataError(f"pool '{pool.name}': labels must be integers to share a classifier head")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= outputs):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"pool '{pool.name}': label {bad} outside the target head's [0, {outputs})")


Tensors = dict[str, torch.Tensor]


def _merge(scored: list[Tensors], tally: Tensors, place: Place) -> tuple[Tensors, Tensors] | None:
    """All batches' scores in pool order (rows sorted) and the method's tallies summed key by
    key, gathered on rank 0 across processes (None elsewhere)."""
    parts, total = scored, tally
    if place.distributed:
        gathered: list[Any] = [None] * place.world if place.writes else []
        dist.gather_object((scored, tally), gathered if place.writes else None, dst=0)
        if not place.writes:
            return None
        parts = [part for rank_parts, _ in gathered for part in rank_parts]
        total = {}
        for _, rank_tally in gathered:
            for key, value in rank_tally.items():
                total[key] = total[key] + value if key in total else value
    if not parts:
        raise DataError("select: the pools have no samples")
    keys = list(parts[0])
    joined = {key: torch.cat([p[key] for p in parts]) for key in keys}
    order = torch.argsort(joined["source"] * (1 << 40) + joined["index"], stable=True)
    return {key: value[order] for key, value in joined.items()}, total


def write_selection(
    selection: Selection,
    pools: Sequence[Pool],
    out: Path,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``ranking.parquet``, ``ranking.csv``, ``selected/<pool>.npz`` (text pools:
    ``.jsonl``), ``selection.json`` and, given the run config the pools came from, ``run.yaml``
    training on the selection."""
    out.mkdir(parents=True, exist_ok=True)
    table = selection.table
    paths = {"parquet": out / "ranking.parquet", "csv": out / "ranking.csv"}
    write_with(paths["parquet"], lambda handle: table.to_parquet(handle, index=False))
    write_text(paths["csv"], table.to_csv(index=False))
    files: dict[str, str] = {}
    for pool in pools:
        rows = selection.selected_rows(pool.name)
        if len(rows) == 0:
            continue
        path = pool.save(rows, out / "selected")
        files[pool.name] = str(path.relative_to(out))
    if config is not None:
        paths["config"] = out / "run.yaml"
        write_text(paths["config"], yaml.safe_dump(_run_config(config, files), sort_keys=False))
    paths["summary"] = out / "selection.json"
    write_json(
        paths["summary"],
        {
            "method": selection.method,
            "params": selection.params,
            "budget": selection.budget,
            "sources": selection.counts(),
            "files": files,
            "timing": selection.timing,
        },
    )
    return paths


def _run_config(config: Mapping[str, Any], files: Mapping[str, str]) -> dict[str, Any]:
    """The run config with each pool's data replaced by its selected samples (pools with none
    selected are left out); other keys as given (paths already absolute)."""
    resolved = copy.deepcopy(dict(config))
    resolved.pop("select", None)
    sources = []
    for source in resolved.get("sources", []):
        if source.get("granularity", "dataset") != "dataset":
            sources.append(source)
        elif source["name"] in files:
            sources.append(
                {
                    **source,
                    "data": files[source["name"]],
                    "label_column": "y",
                    "feature_columns": None,
                }
            )
    resolved["sources"] = sources
    return resolved
