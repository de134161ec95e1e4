"""Progress of a run's shards: a reporter the CLI sets around a run (a terminal
bar), which shards in this process advance; from a Dask worker, progress
travels as events instead (flows/dask_shards.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class ProgressReporter(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, n: int) -> None: ...


# Set by the CLI around a run; Prefect copies the context into its task threads,
# so shards report to the terminal's progress bar without a global.
_progress: ContextVar[ProgressReporter | None] = ContextVar("batchsight_progress", default=None)


def current_progress() -> ProgressReporter | None:
    return _progress.get()


@contextmanager
def reporting_progress(reporter: ProgressReporter | None) -> Iterator[None]:
    token = _progress.set(reporter)
    try:
        yield
    finally:
        _progress.reset(token)
