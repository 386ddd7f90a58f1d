"""Benchmarks that guard scaling promises (``auxilia bench ...``)."""

from __future__ import annotations

from auxilia.bench.many_sources import (
    BenchRecord,
    ManySourcesSettings,
    run_many_sources,
    synthetic_problem,
)

__all__ = ["BenchRecord", "ManySourcesSettings", "run_many_sources", "synthetic_problem"]
