"""Step time of the per-sample engine modes against a plain summed-loss step.

    .venv/bin/python scripts/bench_ghost.py [--threads 1] [--steps 200] [--modes ghost,sketch]
        [--device cpu]

Plain step: forward, ``losses.mean().backward()``, ``optimizer.step()``. Engine step: forward,
``engine.backward(losses, ids)`` with the full Gram matrix requested (``extra_needs``), the
strategy ``equal`` (so the strategy costs nothing), ``optimizer.step()``. Models: the MLP
64-256-256 (+ a 10-way head) on batch 64 and the built-in small CNN (16 and 32 channels,
128 hidden) on 28×28, batch 64; K auxiliary sources plus the target, samples assigned at random.
Prints the median step time of each and the ratio engine / plain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from auxilia import strategies
from auxilia.engine import Engine
from auxilia.models.trunks import cnn
from auxilia.statistics import Need


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(cnn((1, 28, 28)), nn.Linear(128, 10))


def median_time(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(
    name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], args: argparse.Namespace
) -> None:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    torch.manual_seed(0)
    model = make().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        optimizer.step()

    base = median_time(plain, args.steps, args.warmup, device)
    print(f"{name}: plain step {base * 1e3:.3f} ms")
    for k in args.sources:
        ids = torch.randint(0, k + 1, (args.batch,), generator=gen).to(device)
        for mode in args.modes:
            engine = Engine(
                model,
                strategy=strategies.equal(),
                num_sources=k + 1,
                mode=mode,
                extra_needs={Need.GRAM, Need.LOSSES},
            )

            def step(engine: Engine = engine, ids: torch.Tensor = ids) -> None:
                optimizer.zero_grad(set_to_none=True)
                losses = nn.functional.cross_entropy(model(x), y, reduction="none")
                engine.backward(losses, ids)
                optimizer.step()

            took = median_time(step, args.steps, args.warmup, device)
            engine.close()
            print(f"  K={k:3d} {mode:7s} {took * 1e3:8.3f} ms  ratio {took / base:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--sources", type=lambda s: [int(v) for v in s.split(",")], default=[4, 16, 64]
    )
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["ghost"])
    parser.add_argument("--models", type=lambda s: s.split(","), default=["mlp", "cnn"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "mlp" in args.models:
        bench("MLP 64-256-256, batch 64", mlp, (64,), args)
    if "cnn" in args.models:
        bench("CNN 28x28, batch 64", small_cnn, (1, 28, 28), args)


if __name__ == "__main__":
    main()
