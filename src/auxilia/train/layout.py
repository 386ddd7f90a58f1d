"""How the trainer lays a step's losses out for the engine, so that ``auto`` finds a fast mode.

Per-sample modes (``ghost``, ``sketch``) need every row to carry one loss, but task sources
label the target's own rows. Three layouts follow:

- dataset sources alone: one loss per row; the engine gets the model (``ghost``);
- task sources alone, every step drawing them all: one [B, K+1] table of every task's loss on
  the target's rows, the engine's shared-input layout (``jvp``, ``batched``);
- otherwise the partitioned layout, either with the engine given parameters (``jvp`` for a
  strategy that needs at most the target row, ``batched`` for one that needs norms or the Gram
  matrix), or with the target's rows copied once per task in the batch (``one_row_per_loss``)
  and the engine given the model, so that ``ghost`` makes one pass over the copied rows: where
  that costs less than the mode on the shared rows (``copies_pay_off``) and rows do not
  interact in the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxilia.data.sources import Source, Target
from auxilia.engine import Layout, resolve_mode
from auxilia.errors import ConfigError
from auxilia.statistics import Need


@dataclass(frozen=True)
class StepLayout:
    """The engine layout of each step, and whether the target's rows are copied per task
    (the engine then gets the model rather than its parameters)."""

    layout: Layout
    copies_rows: bool
    gives_module: bool
    reason: str  # why, in one line: recorded in results.json and shown in the report


# Backward passes' worth of work per row, of the modes ``auto`` chooses between (measured, see
# BENCHMARKS.md "Copies of the target's rows"): ``ghost`` runs one backward to the layers'
# outputs, then its kernels and the combine from the stored factors (about two); ``jvp`` runs a
# first-order pass that keeps its graph, a second-order pass along g_0 (about 1.5) and the
# combine; ``batched`` one pass per source.
GHOST_PASSES = 2.0
JVP_PASSES = 3.5


def copies_pay_off(target: Target, sources: Sequence[Source], alternative: str) -> bool:
    """Whether ``ghost`` on the target's rows copied per task should beat ``alternative``, the
    mode that would run on the shared rows (``jvp`` or ``batched``; False for any other).

    Each copy adds a whole target batch of rows. With datasets beside a few tasks the copies
    add little and ghost wins; with tasks alone, or many tasks beside few datasets, the copies
    multiply the rows and the mode on the shared rows wins (measured).
    """
    passes = {"jvp": JVP_PASSES, "batched": float(len(sources) + 1)}.get(alternative)
    if passes is None:
        return False
    rows, copied = step_rows(target, sources)
    return GHOST_PASSES * copied <= passes * rows


def step_rows(target: Target, sources: Sequence[Source]) -> tuple[int, int]:
    """Rows of a step drawing every source: shared (the target's rows once) and with the
    target's rows copied once per task."""
    tasks = sum(1 for s in sources if s.granularity == "task")
    rows = target.batch_size + sum(s.batch_size for s in sources if s.granularity == "dataset")
    return rows, rows + tasks * target.batch_size


def rows_interact(model: torch.nn.Module) -> str | None:
    """Why two copies of one input row would not get the same output in training, or None.

    Dropout draws a mask per row; batch normalisation mixes rows through the batch statistics.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"'{name}' ({type(module).__name__}, p={module.p}) draws a mask per row"
        if isinstance(module, torch.nn.MultiheadAttention) and module.dropout > 0:
            return f"'{name}' (MultiheadAttention, dropout={module.dropout}) draws a mask per row"
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            return f"'{name}' ({type(module).__name__}) normalises with the batch's statistics"
    return None


def choose_layout(
    target: Target,
    sources: Sequence[Source],
    *,
    every_step_draws_all: bool,
    measured: frozenset[Need],
    mode: str,
    model: torch.nn.Module,
) -> StepLayout:
    """The layout for these sources, the statistics the mode must compute (``measured``) and
    the configured engine mode; a per-sample mode that copies cannot serve is a ConfigError."""
    if all(s.granularity == "dataset" for s in sources):
        return StepLayout("partitioned", False, True, "every source is a dataset: one loss per row")
    shared_input = (
        all(s.granularity == "task" for s in sources)
        and every_step_draws_all
        and Need.VALIDATION not in measured
    )
    rows, copied = step_rows(target, sources)
    counts = f"({rows} → {copied} rows with every source drawn)"
    copy = f"the target's rows copied once per task {counts}"
    if mode in ("ghost", "sketch"):
        interaction = rows_interact(model)
        if interaction is not None:
            raise ConfigError(
                f"train.engine_mode: '{mode}' needs one loss per row; task sources label "
                f"the target's own rows, and copies of them would differ: {interaction}; "
                "use 'auto', 'exact', 'batched' or 'jvp'"
            )
        return StepLayout("partitioned", True, True, f"engine_mode '{mode}': {copy}")
    if shared_input:
        return StepLayout(
            "shared-input",
            False,
            False,
            "every source is a task and each step draws them all: one table of every task's "
            "loss on the target's rows",
        )
    shared = "task sources label the target's own rows, shared by every task"
    if mode != "auto":
        return StepLayout("partitioned", False, False, f"{shared}; engine_mode '{mode}'")
    if measured <= {Need.LOSSES}:  # no mode needs more than the one plain backward
        return StepLayout("partitioned", False, False, f"{shared}; no gradient statistic")
    interaction = rows_interact(model)
    if interaction is not None:
        return StepLayout(
            "partitioned", False, False, f"{shared}; copies of a row would differ: {interaction}"
        )
    alternative = resolve_mode("auto", "partitioned", measured, has_module=False).name
    if copies_pay_off(target, sources, alternative):
        return StepLayout(
            "partitioned", True, True, f"{copy}: ghost over them costs less than {alternative}"
        )
    return StepLayout(
        "partitioned",
        False,
        False,
        f"{shared}: copying them per task {counts} would cost more than {alternative}",
    )
