"""Gradient engine: per-source statistics of a step and the target-aware combined gradient."""

from auxilia.engine.engine import MODES, Engine, Measurement
from auxilia.engine.source_losses import SourceLosses, split_by_source

__all__ = ["MODES", "Engine", "Measurement", "SourceLosses", "split_by_source"]
