"""Trunk factories named by import path in tests (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def small(input_shape: Sequence[int], width: int = 5) -> nn.Module:
    """A flatten + linear trunk of ``width`` features."""
    size = 1
    for dim in input_shape:
        size *= dim
    return nn.Sequential(nn.Flatten(), nn.Linear(size, width), nn.Tanh())


def not_a_module(input_shape: Sequence[int]) -> int:
    """A broken factory: returns an int."""
    return len(input_shape)
