"""Progress of a running annotate flow, where operators look: a Prefect progress artifact and a terminal bar.

Shard tasks report images (and their faces) as they are done (every 32, when the model has run on them) through a
sink: a counter in this process for the local task runner, Dask worker events (``log_event`` /
``subscribe_topic``) for shards on a Dask cluster. The flow's main thread ticks the board about once a second, so
both the artifact and the bar move every second or so, not once per shard; each shows images done of planned,
images per second, faces so far and the time left.
"""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from collections.abc import Callable

_COUNTERS: dict[str, _Counter] = {}
_TOPIC = "fkd-progress-"


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self.faces = 0
        self.stopping = threading.Event()  # set when the run stops: shards in this process give up
        self._lock = threading.Lock()

    def add(self, n: int, faces: int = 0) -> None:
        with self._lock:
            self.value += n
            self.faces += faces


def stop_event(key: str | None) -> threading.Event | None:
    """What tells a shard task running in the flow's process that the run is stopping (None elsewhere: on Dask, the
    flow cancels the shards' futures). Found by the board's key: task parameters are plain values."""
    counter = _COUNTERS.get(key) if key else None
    return counter.stopping if counter is not None else None


def progress_sink(key: str | None) -> Callable[[int, int], None] | None:
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
    return lambda n, faces=0: worker.log_event(_TOPIC + key, (n, faces))


class ProgressBoard:
    """Images done out of planned, published to a Prefect progress artifact and (on a terminal) a rich bar."""

    def __init__(self, total: int, title: str, bar: bool, artifact_key: str = "annotate-progress") -> None:
        from prefect.artifacts import create_progress_artifact

        self.total = total
        self.key = secrets.token_hex(8)
        self.counter = _Counter()
        _COUNTERS[self.key] = self.counter
        self.finished = 0  # images of shards whose task has returned
        self.finished_faces = 0
        self.shown = -1
        self.title = title
        self.started = time.monotonic()
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
            client.subscribe_topic(_TOPIC + self.key, lambda event: self.counter.add(*map(int, event[1])))

    def cancel(self) -> None:
        """Make shards still running in this process stop at their next image (their parts are not written)."""
        self.counter.stopping.set()

    def shard_done(self, images: int, faces: int = 0) -> None:
        self.finished += images
        self.finished_faces += faces

    @property
    def done(self) -> int:
        return min(self.total, max(self.counter.value, self.finished))

    @property
    def faces(self) -> int:
        return max(self.counter.faces, self.finished_faces)

    def status(self) -> tuple[float, str]:
        """Images per second so far, and a line saying where the run is: done of planned, rate, faces, time left."""
        done = self.done
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = done / seconds
        left = (self.total - done) / rate if rate > 0 else None
        eta = f"{_duration(left)} left" if left is not None else "time left unknown"
        return rate, f"{done} of {self.total} images, {rate:.1f} images/s, {self.faces} faces, {eta}"

    def tick(self) -> None:
        from prefect.artifacts import update_progress_artifact

        done = self.done
        if done == self.shown:
            return
        self.shown = done
        rate, line = self.status()
        progress = 100.0 * done / self.total if self.total else 100.0
        update_progress_artifact(self.artifact, progress=progress, description=f"{self.title}: {line}")
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=done, rate=f"{rate:.1f}", faces=self.faces)

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
            TextColumn("images, {task.fields[rate]} images/s, {task.fields[faces]} faces, ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            refresh_per_second=4,
        )
        self._bar_task = self._bar.add_task("images", total=self.total, rate="0.0", faces=0)
        # Prefect's console log handlers print through rich consoles of their own; while the bar is live they
        # print through the bar's, which draws each log line above the bar instead of through it.
        from ._common import console_handlers

        for handler in console_handlers():
            self._handlers.append((handler, handler.console))
            handler.console = self._bar.console
        self._bar.start()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
