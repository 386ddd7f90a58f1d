"""Render a finished run directory into plots and a self-contained ``report.html``."""

from __future__ import annotations

from auxilia.report.page import render_report

__all__ = ["render_report"]
