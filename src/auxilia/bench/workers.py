"""Where the benchmark grids run their jobs: a process pool, and a count of jobs for a bar.

:class:`Workers` runs picklable jobs (a top-level function and its arguments) in a ``spawn``
process pool of ``jobs`` workers with one torch thread each, or, with ``jobs = 1``, in this
process as already completed futures (under :func:`pinned_threads`, so both give the same
numbers). :class:`Progress` counts finished jobs; the CLI subclasses it to draw a bar.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

Job = Callable[..., dict[str, Any]]


def init_worker() -> None:
    """Process-pool initializer: one torch thread per worker (the pool is the parallelism)."""
    torch.set_num_threads(1)


class Workers:
    """Runs jobs in a spawn process pool, or inline (``jobs = 1``) as completed futures."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.capacity = 2 * jobs if jobs > 1 else 1  # jobs in flight: keep every worker busy
        self.pool = (
            ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker
            )
            if jobs > 1
            else None
        )

    def start(self, job: Job, *args: Any) -> Future[dict[str, Any]]:
        """``job(*args)`` in a worker; inline, it has already run when this returns."""
        if self.pool is not None:
            return self.pool.submit(job, *args)
        future: Future[dict[str, Any]] = Future()
        future.set_result(job(*args))
        return future

    @contextmanager
    def running(self) -> Iterator[Workers]:
        """The pool, with this process pinned to one torch thread when jobs run inline; shut
        down (pending jobs cancelled) on the way out."""
        try:
            if self.pool is None:
                with pinned_threads(1):
                    yield self
            else:
                yield self
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def pinned_threads(count: int) -> Iterator[None]:
    """torch uses ``count`` threads inside the block, and what it used before afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Progress:
    """Counts jobs; the CLI shows them as a bar. ``total`` may grow (jobs scheduled later)."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def add(self, count: int) -> None:
        self.total += count
        self.changed("")

    def advance(self, label: str) -> None:
        self.done += 1
        self.changed(label)

    def changed(self, label: str) -> None:
        """Override to display; ``label`` describes the job that just finished."""
