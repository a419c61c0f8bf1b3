"""Progress of a running annotate flow, where operators look: a Prefect progress artifact and a terminal bar.

Shard tasks report images as they are done (every 32, when the model has run on them) through a sink: a counter
in this process for the local task runner, Dask worker events (``log_event`` / ``subscribe_topic``) for shards
on a Dask cluster. The flow's main thread ticks the board about once a second, so both the artifact and the bar
move every second or so, not once per shard.
"""

from __future__ import annotations

import logging
import secrets
import sys
import threading
from collections.abc import Callable

_COUNTERS: dict[str, _Counter] = {}
_TOPIC = "fkd-progress-"


class ShardCancelled(Exception):
    """The flow is stopping (interrupted, or another shard failed): a shard still running gives up."""


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self.cancelled = False
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.cancelled:
            raise ShardCancelled("the run is stopping")
        with self._lock:
            self.value += n


def progress_sink(key: str | None) -> Callable[[int], None] | None:
    """Where a shard task reports images done: the flow's counter if it runs in the flow's process, else Dask."""
    if not key:
        return None
    counter = _COUNTERS.get(key)
    if counter is not None:
        return counter.add
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    # shards report every 32 images (the model's batch), so one event per report is cheap
    return lambda n: worker.log_event(_TOPIC + key, n)


class ProgressBoard:
    """Images done out of planned, published to a Prefect progress artifact and (on a terminal) a rich bar."""

    def __init__(self, total: int, title: str, bar: bool, artifact_key: str = "annotate-progress") -> None:
        from prefect.artifacts import create_progress_artifact

        self.total = total
        self.key = secrets.token_hex(8)
        self.counter = _Counter()
        _COUNTERS[self.key] = self.counter
        self.finished = 0  # images of shards whose task has returned
        self.shown = -1
        self.title = title
        self.artifact = create_progress_artifact(
            progress=0.0 if total else 100.0, key=artifact_key, description=f"{title}: images done of {total}"
        )
        self._bar = None
        self._handlers: list[tuple[logging.Handler, object]] = []
        if bar and total:
            self._start_bar()

    def listen_to(self, task_runner) -> None:
        """Also count the images that Dask workers report (shards on a cluster run in other processes)."""
        client = getattr(task_runner, "client", None)  # prefect-dask's DaskTaskRunner.client (made on first use)
        if client is not None:
            client.subscribe_topic(_TOPIC + self.key, lambda event: self.counter.add(int(event[1])))

    def cancel(self) -> None:
        """Make shards still running in this process stop at their next image (their parts are not written)."""
        self.counter.cancelled = True

    def shard_done(self, images: int) -> None:
        self.finished += images

    @property
    def done(self) -> int:
        return min(self.total, max(self.counter.value, self.finished))

    def tick(self) -> None:
        from prefect.artifacts import update_progress_artifact

        done = self.done
        if done == self.shown:
            return
        self.shown = done
        update_progress_artifact(self.artifact, progress=100.0 * done / self.total if self.total else 100.0)
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=done)

    def close(self) -> None:
        try:
            self.tick()
        finally:
            _COUNTERS.pop(self.key, None)
            if self._bar is not None:
                self._bar.stop()
                for handler, console in self._handlers:
                    handler.console = console
                self._bar = None

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn(self.title),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            refresh_per_second=4,
        )
        self._bar_task = self._bar.add_task("images", total=self.total)
        # Prefect's console log handlers print through rich consoles of their own; while the bar is live they
        # print through the bar's, which draws each log line above the bar instead of through it.
        for handler in console_handlers():
            self._handlers.append((handler, handler.console))
            handler.console = self._bar.console
        self._bar.start()


def console_handlers() -> list[logging.Handler]:
    """Prefect's console log handlers (each prints through a rich console of its own)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    from flows._common import logging_handlers

    return logging_handlers(PrefectConsoleHandler)
