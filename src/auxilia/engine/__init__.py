"""Gradient engine: per-source statistics of a step and the target-aware combined gradient."""

from auxilia.engine.engine import Engine, statistics_to_measure
from auxilia.engine.mode import Layout, Measurement, Mode, ModeContext, Runner
from auxilia.engine.modes import MODES, resolve_mode
from auxilia.engine.source_losses import SourceLosses, split_by_source, split_by_task

__all__ = [
    "MODES",
    "Engine",
    "Layout",
    "Measurement",
    "Mode",
    "ModeContext",
    "Runner",
    "SourceLosses",
    "resolve_mode",
    "split_by_source",
    "split_by_task",
    "statistics_to_measure",
]
