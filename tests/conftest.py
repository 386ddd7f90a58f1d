"""Shared fixtures: the tiny problem on disk and an in-process call of the ``auxilia`` command."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tiny_problem import Outcome, write_tiny_problem


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """Config path of the tiny problem (20 steps, gcs, all sources) under ``tmp_path/problem``."""
    return write_tiny_problem(tmp_path / "problem")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """``make_config(changes, name=...)``: the tiny problem's config with ``changes`` merged in."""

    def make(changes: Mapping[str, Any] | None = None, *, name: str = "config.yaml") -> Path:
        return write_tiny_problem(tmp_path / "problem", changes, name=name)

    return make


@pytest.fixture
def auxilia_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Outcome]:
    """Call ``auxilia.cli.main()`` in-process (it formats errors); capture exit code and streams."""
    from auxilia.cli import main

    def call(*args: str | Path) -> Outcome:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["auxilia", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return call
