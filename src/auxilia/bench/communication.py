"""What auxilia adds to a distributed step: bytes and time of its collectives, beside DDP's.

Run under torchrun (gloo on CPU)::

    torchrun --standalone --nproc-per-node 2 -m auxilia.bench.communication [--ks 4,16] [--json F]

The model is the speed benchmark's ``mlp`` case in the partitioned layout (trunk 64-256-256,
a 10-class head every source shares, global batch 64: a quarter from the target, the rest
spread over K sources); each rank takes its contiguous share of the batch. For each strategy
and K the engine runs ``--repeats`` steps after ``--warmup``; its :class:`Collectives` record,
per step and rank, the bytes and seconds of the *statistics* collectives (what auxilia adds:
counts and losses, the target gradient and row, or the sources' gradients) and of the
*gradient* all-reduce (what DDP itself does for any model: one sum of the step's gradient).
Beside them, a plain step of the same model under ``DistributedDataParallel`` (mean loss,
``backward``) is timed: DDP's own step, its all-reduce included.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from auxilia import strategies
from auxilia.bench.speed import BATCH, LR, make_problem
from auxilia.engine import Engine
from auxilia.engine.distributed import GRADIENT, STATISTICS
from auxilia.train.distributed import Place, share

STRATEGIES = ("equal", "gcs:unweighted", "olaux", "gcs", "auto", "arml")


def _rows(place: Place) -> slice:
    return share(BATCH, place)


def engine_steps(
    k: int, spec: str, place: Place, warmup: int, repeats: int, seed: int
) -> dict[str, Any]:
    """Median step time and per-step traffic of the engine with ``spec`` on K sources."""
    problem = make_problem("mlp", "partitioned", k, seed)
    model = copy.deepcopy(problem.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine = Engine(model, strategy=strategies.from_spec(spec), num_sources=k + 1, distributed=True)
    rows = _rows(place)
    x, y, ids = problem.inputs[rows], problem.targets[rows], problem.ids[rows]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        engine.backward(losses, ids, lr=LR)
        optimizer.step()

    for _ in range(warmup):
        step()
    before = engine.communication()
    times = []
    for _ in range(repeats):
        dist.barrier()
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    after = engine.communication()
    engine.close()

    def per_step(kind: str, field: str) -> float:
        return (after[kind][field] - before[kind][field]) / repeats

    return {
        "K": k,
        "strategy": spec,
        "mode": engine.mode.name,
        "step_ms": 1e3 * statistics.median(times),
        "statistics_bytes": per_step(STATISTICS, "bytes"),
        "statistics_calls": per_step(STATISTICS, "calls"),
        "statistics_ms": 1e3 * per_step(STATISTICS, "seconds"),
        "gradient_bytes": per_step(GRADIENT, "bytes"),
        "gradient_ms": 1e3 * per_step(GRADIENT, "seconds"),
    }


def ddp_steps(k: int, place: Place, warmup: int, repeats: int, seed: int) -> dict[str, Any]:
    """Median time of a plain DDP step (mean loss, backward, SGD) on the same model and rows."""
    problem = make_problem("mlp", "partitioned", k, seed)
    model = nn.parallel.DistributedDataParallel(copy.deepcopy(problem.model))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rows = _rows(place)
    x, y = problem.inputs[rows], problem.targets[rows]
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - began)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"K": k, "step_ms": 1e3 * statistics.median(times), "gradient_bytes": size}


def table(records: list[dict[str, Any]], ddp: list[dict[str, Any]], world: int) -> str:
    by_k = {r["K"]: r for r in ddp}
    lines = [
        f"{world} processes, gloo, 1 thread each; per step and rank; DDP = plain step under "
        "DistributedDataParallel",
        "",
        "| K | strategy | mode | added by auxilia: bytes | calls | ms | gradient all-reduce: "
        "bytes | ms | step ms | DDP step ms | DDP all-reduce bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        d = by_k[r["K"]]
        lines.append(
            f"| {r['K']} | {r['strategy']} | {r['mode']} | {r['statistics_bytes']:,.0f} | "
            f"{r['statistics_calls']:.0f} | {r['statistics_ms']:.2f} | "
            f"{r['gradient_bytes']:,.0f} | {r['gradient_ms']:.2f} | {r['step_ms']:.2f} | "
            f"{d['step_ms']:.2f} | {d['gradient_bytes']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="4,16", help="numbers of auxiliary sources")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", default=None, help="write the records here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    place = Place(dist.get_rank(), dist.get_world_size())
    ks = [int(v) for v in args.ks.split(",")]
    records, ddp = [], []
    for k in ks:
        ddp.append(ddp_steps(k, place, args.warmup, args.repeats, args.seed))
        for spec in args.strategies.split(","):
            records.append(engine_steps(k, spec, place, args.warmup, args.repeats, args.seed))
    if place.writes:
        print(table(records, ddp, place.world))
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as handle:
                json.dump({"world": place.world, "engine": records, "ddp": ddp}, handle, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
