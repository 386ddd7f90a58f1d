"""User-facing errors: each carries a one-line message that names the problem."""

from __future__ import annotations


class AuxiliaError(Exception):
    """Base class for errors caused by input, configuration or a failed run (not by a bug).

    The CLI prints ``str(error)`` on one line and exits non-zero; the traceback is shown only
    with ``--debug``.
    """

    exit_code: int = 2


class ConfigError(AuxiliaError):
    """A configuration key is missing, unknown, or has a value of the wrong kind."""


class DataError(AuxiliaError):
    """Input data is missing, malformed, empty or inconsistent (lengths, label ranges)."""


class StrategyError(AuxiliaError):
    """A strategy or sampler name is unknown, or its parameters are invalid."""


class EngineError(AuxiliaError):
    """The gradient engine was given inconsistent inputs (shapes, source ids, modes)."""


class ModeUnavailableError(EngineError):
    """An engine mode cannot measure this model; raised before anything was computed, so that
    ``mode="auto"`` can measure the step with another mode. ``reason``: why, in a phrase."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NonFiniteSourceError(EngineError):
    """The engine found a source's mean loss NaN or infinite."""

    def __init__(self, source: str, value: float) -> None:
        super().__init__(f"non-finite loss {value} for source '{source}'")
        self.source = source
        self.value = value


class NonFiniteLossError(AuxiliaError):
    """A loss became NaN or infinite during training; the run stops at that step."""

    exit_code = 1

    def __init__(self, step: int, source: str, value: float) -> None:
        super().__init__(
            f"non-finite loss {value} for source '{source}' at step {step}; "
            "training stopped, the last good checkpoint is kept"
        )
        self.step = step
        self.source = source
        self.value = value
