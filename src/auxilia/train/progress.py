"""Progress: a live bar on a terminal, plain log lines elsewhere (CI, files, pipes)."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    """Reports step counts and the latest target validation metric."""

    def __init__(
        self, total: int, label: str, *, live: bool | None = None, quiet: bool = False
    ) -> None:
        self.total = total
        self.label = label
        self.quiet = quiet
        self.live = sys.stderr.isatty() if live is None else live
        self._bar: Progress | None = None
        self._task = TaskID(0)

    def __enter__(self) -> TrainingProgress:
        if self.live and not self.quiet:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, info="")
        return self

    def advance(self, step: int, info: str = "") -> None:
        """Move to ``step`` (completed steps); ``info`` is shown beside the bar."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def log(self, step: int, message: str) -> None:
        """A plain line (only when no live bar is shown)."""
        if self._bar is None and not self.quiet:
            print(f"[{self.label}] step {step}/{self.total} {message}", file=sys.stderr, flush=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, traceback)
