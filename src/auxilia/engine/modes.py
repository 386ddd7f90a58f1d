"""The registry of engine modes, and how ``mode="auto"`` chooses one."""

from __future__ import annotations

from auxilia.engine.batched import BATCHED
from auxilia.engine.exact import EXACT
from auxilia.engine.ghost import GHOST
from auxilia.engine.jvp import JVP
from auxilia.engine.mode import Layout, Mode
from auxilia.engine.sketch import SKETCH
from auxilia.errors import EngineError
from auxilia.statistics import Need

MODES: dict[str, Mode] = {mode.name: mode for mode in (EXACT, JVP, BATCHED, GHOST, SKETCH)}

# Fastest first; ``exact`` is last because it is always possible and always slowest. In the
# partitioned layout ``ghost`` needs the module; given only parameters (in the trainer: task
# sources beside datasets in a model whose rows interact, or a strategy that reads only the
# target row) ``jvp`` and ``batched`` still beat exact's K+1 passes, as in the shared-input
# layout.
PREFERENCE: dict[Layout, tuple[str, ...]] = {
    "partitioned": ("ghost", "jvp", "batched", "exact"),
    "shared-input": ("jvp", "batched", "exact"),
}
# With no gradient statistic to measure (``equal``, ``dwa``, ``uncertainty``), ``jvp`` does no
# more than the weighted backward pass itself, in either layout.
LOSSES_ONLY: tuple[str, ...] = ("jvp", "exact")


def mode_reason(mode: Mode, layout: Layout, needs: frozenset[Need], has_module: bool) -> str | None:
    """Why ``mode`` cannot serve ``needs`` in ``layout`` (None: it can)."""
    if layout not in mode.layouts:
        return f"it works on the {' and '.join(sorted(mode.layouts))} layout, not {layout}"
    missing = needs - mode.provides
    if missing:
        names = ", ".join(sorted(n.value for n in missing))
        return f"it cannot compute {names}"
    if mode.requires_module and not has_module:
        return "it hooks the model's layers: pass the nn.Module itself, not its parameters"
    return None


def unknown_mode(name: str) -> str | None:
    """The error message for a mode name that is neither ``auto`` nor registered, else None."""
    if name == "auto" or name in MODES:
        return None
    return f"unknown engine mode '{name}'; expected one of: {', '.join(['auto', *MODES])}"


def resolve_mode(
    name: str | Mode, layout: Layout, needs: frozenset[Need], has_module: bool
) -> Mode:
    """The mode called ``name`` (or given as a :class:`Mode`, e.g. ``sketch(dim=64)``), checked
    against the layout and needs; for ``auto`` the fastest that fits."""
    if isinstance(name, Mode):
        reason = mode_reason(name, layout, needs, has_module)
        if reason is not None:
            raise EngineError(f"engine mode '{name.name}' cannot be used here: {reason}")
        return name
    if name == "auto":
        order = LOSSES_ONLY if needs <= {Need.LOSSES} else PREFERENCE[layout]
        for candidate in order:
            mode = MODES.get(candidate)
            if mode is not None and mode_reason(mode, layout, needs, has_module) is None:
                return mode
        raise EngineError(f"no engine mode can compute {sorted(n.value for n in needs)}")
    unknown = unknown_mode(name)
    if unknown is not None:
        raise EngineError(unknown)
    mode = MODES[name]
    reason = mode_reason(mode, layout, needs, has_module)
    if reason is not None:
        raise EngineError(f"engine mode '{name}' cannot be used here: {reason}")
    return mode
