"""Build a strategy or sampler from its name and keyword parameters, with errors naming the key."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from auxilia.errors import StrategyError

T = TypeVar("T")


def _check_type(kind: str, name: str, key: str, value: Any, default: Any) -> None:
    """Compare a parameter with the type of its default (bool, int, float, str)."""
    if default is inspect.Parameter.empty or default is None:
        return
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise StrategyError(f"{kind} '{name}' parameter '{key}' expects {expected}, got {value!r}")


def build(
    kind: str, name: str, registry: Mapping[str, Callable[..., T]], params: Mapping[str, Any] | None
) -> T:
    """Call ``registry[name](**params)``; unknown names and keys raise :class:`StrategyError`."""
    if name not in registry:
        raise StrategyError(
            f"unknown {kind} '{name}'; expected one of: {', '.join(sorted(registry))}"
        )
    constructor = registry[name]
    accepted = inspect.signature(constructor).parameters
    given = dict(params or {})
    for key in given:
        if key not in accepted:
            expected = ", ".join(accepted) or "no parameters"
            raise StrategyError(f"{kind} '{name}' has no parameter '{key}'; expected: {expected}")
    missing = [
        k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in given
    ]
    if missing:
        raise StrategyError(f"{kind} '{name}' needs parameter '{missing[0]}'")
    for key, value in given.items():
        _check_type(kind, name, key, value, accepted[key].default)
    try:
        return constructor(**given)
    except (TypeError, ValueError) as error:
        raise StrategyError(f"{kind} '{name}': {error}") from error
