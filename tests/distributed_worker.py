"""Cases run on one process and, under torchrun, on several; the tests compare the two.

``torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py engine OUT`` runs every
engine case on its share of each global batch and saves, per rank, the coefficients of every
step and the final parameters to ``OUT/rank<R>.pt``; ``... trainer OUT CONFIG...`` does the same
for whole Trainer runs built from config files. The tests run the same functions on one
process (``engine_case``, ``trainer_case``) and compare.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auxilia import strategies
from auxilia.engine import Engine
from auxilia.errors import EngineError
from auxilia.train.distributed import Place, share

NUM_SOURCES = 5  # the target and four auxiliary sources
ROWS = 13  # global batch: odd, so the two ranks' shares differ in size
HELD_OUT = 5
STEPS = 3
INPUTS, HIDDEN = 5, 7

ENGINE_STRATEGIES = ("equal", "gcs", "olaux", "arml", "auto", "auxinash", "bloop")
ENGINE_CASES = [
    *[
        ("partitioned", mode, s)
        for mode in ("exact", "ghost", "jvp", "batched")
        for s in ENGINE_STRATEGIES
    ],
    *[("shared-input", mode, s) for mode in ("exact", "jvp", "batched") for s in ENGINE_STRATEGIES],
]


def _model() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(INPUTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh()
    )
    heads = nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(NUM_SOURCES))
    return trunk.double(), heads.double()


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    """The step's global batch: inputs, targets, source ids (source 3 has one sample, so one
    rank has none; source 4 none at step 0), and held-out target rows."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 3, (ROWS,), generator=g)
    ids[[0, ROWS - 1]] = 0  # a target sample on each rank (jvp needs one)
    ids[5] = 3
    if step > 0:
        ids[[2, 9]] = 4
    return {
        "x": torch.randn(ROWS, INPUTS, generator=g, dtype=torch.float64),
        "y": torch.randn(ROWS, NUM_SOURCES, generator=g, dtype=torch.float64),
        "ids": ids,
        "held_x": torch.randn(HELD_OUT, INPUTS, generator=g, dtype=torch.float64),
        "held_y": torch.randn(HELD_OUT, generator=g, dtype=torch.float64),
        "prefill": torch.randn(HIDDEN, generator=g, dtype=torch.float64),
    }


class _Partitioned(nn.Module):
    """Trunk plus the target head, which every source shares (ghost hooks this module)."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.trunk(x)).squeeze(1)
        return out


def engine_case(layout: str, mode: str, name: str, place: Place) -> dict[str, Any] | None:
    """Three SGD steps of the engine on this rank's share; None where the mode cannot serve."""
    trunk, heads = _model()
    strategy = strategies.get(name)
    model = _Partitioned(trunk, heads[0])
    try:
        if layout == "partitioned":
            engine = Engine(
                model,
                strategy=strategy,
                num_sources=NUM_SOURCES,
                mode=mode,
                distributed=place.distributed,
            )
            params = list(model.parameters())
        else:
            params = [*trunk.parameters(), *heads.parameters()]
            engine = Engine(
                params,
                strategy=strategy,
                num_sources=NUM_SOURCES,
                shared=list(trunk.parameters()),
                mode=mode,
                layout="shared-input",
                distributed=place.distributed,
            )
    except EngineError:
        return None
    alphas = []
    for step in range(STEPS):
        batch = _global_batch(step)
        rows = share(ROWS, place)
        held = share(HELD_OUT, place)
        if step == 1:  # gradient accumulation: .grad holds an earlier micro-batch's gradient
            trunk[2].bias.grad = batch["prefill"].clone()
        validation = None
        if layout == "partitioned":
            x = torch.cat([batch["x"][rows], batch["held_x"][held]])
            out = model(x)
            n = rows.stop - rows.start
            losses = (out[:n] - batch["y"][rows, 0]) ** 2
            if name == "auxinash":
                validation = (out[n:] - batch["held_y"][held]) ** 2
            alpha = engine.backward(losses, batch["ids"][rows], lr=0.1, validation=validation)
        else:
            features = trunk(batch["x"][rows])
            outs = torch.cat([h(features) for h in heads], dim=1)
            losses = (outs - batch["y"][rows]) ** 2
            alpha = engine.backward(losses, lr=0.1)
        alphas.append(alpha.clone())
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.1 * p.grad
                p.grad = None
    engine.close()
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return {"alphas": torch.stack(alphas), "params": flat}


def trainer_case(config_path: Path, steps: int | None = None) -> dict[str, Any]:
    """A Trainer built from ``config_path``, stepped in memory: α per step, final parameters."""
    from auxilia.config import build_trainer, load_config

    config = load_config(config_path)
    trainer = build_trainer(config, config_path.parent, None, quiet=True)
    alphas = [
        trainer.train_step(step).clone() for step in range(1, (steps or trainer.settings.steps) + 1)
    ]
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    assert trainer.target.val is not None
    return {
        "alphas": torch.stack(alphas),
        "params": flat,
        "val": trainer.evaluate(trainer.target.val),
    }


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    kind, out = argv[0], Path(argv[1])
    dist.init_process_group("gloo")
    place = Place(dist.get_rank(), dist.get_world_size())
    results: dict[str, Any] = {}
    if kind == "engine":
        for layout, mode, name in ENGINE_CASES:
            results[f"{layout}/{mode}/{name}"] = engine_case(layout, mode, name, place)
    else:
        for path in argv[2:]:
            results[path] = trainer_case(Path(path))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{place.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
