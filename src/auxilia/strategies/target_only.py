"""``target-only``: train on the target alone; auxiliary heads learn, the trunk ignores them."""

from __future__ import annotations

from auxilia.strategies.base import Strategy, stateless, target_one_hot


def target_only() -> Strategy:
    """α = (1, 0, ..., 0): the baseline every other strategy must not fall much below."""
    return stateless("target-only", frozenset(), target_one_hot)
