"""Run records (``<out>/runs/<id>.json``): what a run is doing, kept true while it lives and after it dies.

A record says ``running`` only while its process is alive: a heartbeat thread rewrites ``heartbeat_at`` every
``heartbeat_seconds``, and a reader that finds a ``running`` record whose heartbeat is older than
``STALE_HEARTBEATS`` beats reports it as ``interrupted`` (the process was killed and could not say so). A run
that ends with an error records ``failed`` and the error; one stopped by a signal records ``interrupted``.
Rerunning the same run id resumes it either way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
from collections.abc import Callable

from fkd_core.errors import OutputNotWritable, RunConflict, SourceNotFound
from fkd_core.layout import AnnotateOutput
from fkd_core.parquet_io import dataset
from fkd_core.storage import (
    check_bucket,
    exists,
    is_local,
    json_bytes,
    overwrite_in_place,
    read_json,
    url_to_fs,
    write_json,
)

HEARTBEAT_SECONDS = 30.0
STALE_HEARTBEATS = 4  # a record silent for this many beats belongs to a dead process

STATUSES = ("running", "completed", "failed", "interrupted")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RunRecord:
    """The live record of one run: ``start`` it, ``finish`` it; a thread keeps its heartbeat in between."""

    def __init__(
        self,
        uri: str,
        doc: dict,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        on_error: Callable[[Exception], None] | None = None,
    ):
        self.uri = uri
        self.doc = dict(doc)
        self.heartbeat_seconds = heartbeat_seconds
        self._on_error = on_error
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Mark the run ``running`` (a resumed run counts another attempt) and start the heartbeat."""
        now = utcnow().isoformat()
        with self._lock:
            self.doc.update(
                status="running",
                attempts=int(self.doc.get("attempts", 0)) + 1,
                attempt_started_at=now,
                heartbeat_at=now,
                heartbeat_seconds=self.heartbeat_seconds,
                host=socket.gethostname(),
                pid=os.getpid(),
            )
            self.doc.setdefault("started_at", now)
            self.doc.pop("error", None)
            write_json(self.doc, self.uri)
        self._thread = threading.Thread(target=self._beat, name="fkd-run-heartbeat", daemon=True)
        self._thread.start()

    def finish(self, status: str, **fields) -> None:
        """Stop the heartbeat and write the final status (``completed``, ``failed`` or ``interrupted``)."""
        if status not in STATUSES or status == "running":
            raise ValueError(f"not a final run status: {status!r}")
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_seconds + 5)
        with self._lock:
            self.doc.update(fields, status=status, finished_at=utcnow().isoformat())
            try:
                write_json(self.doc, self.uri)
            except OutputNotWritable:
                # a full disk has no room for a second copy: say how the run ended in the record's own blocks
                if not is_local(url_to_fs(self.uri)[0]):
                    raise
                overwrite_in_place(self.uri, json_bytes(self.doc))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.doc["heartbeat_at"] = utcnow().isoformat()
                    write_json(self.doc, self.uri)
            except Exception as e:  # a missed beat is not worth stopping the run for
                if self._on_error is not None:
                    self._on_error(e)


def effective_status(doc: dict, now: dt.datetime | None = None) -> str:
    """The status a reader should believe: a ``running`` record with a stale heartbeat is ``interrupted``."""
    status = doc.get("status", "unknown")
    if status != "running":
        return status
    beat = doc.get("heartbeat_at") or doc.get("started_at")
    every = float(doc.get("heartbeat_seconds") or HEARTBEAT_SECONDS)
    if not beat:
        return "interrupted"  # written before heartbeats existed, and never finished
    age = ((now or utcnow()) - dt.datetime.fromisoformat(beat)).total_seconds()
    return "interrupted" if age > STALE_HEARTBEATS * every else "running"


def finished_counts(out: str, run_id: str) -> dict:
    """Images per status and faces of a run's finished shards (its ``images`` parts), over every attempt."""
    import pyarrow.compute as pc

    counts = {"images": 0, "ok": 0, "no_face": 0, "error": 0, "faces": 0}
    uri = AnnotateOutput(out).run_dir("images", run_id)
    if not exists(uri):  # nothing finished yet, or a run with nothing to do
        return counts
    tbl = dataset(uri).to_table(columns=["status", "n_faces"])
    for row in pc.value_counts(tbl.column("status")).to_pylist():
        counts[row["values"]] = row["counts"]
    return counts | {"images": tbl.num_rows, "faces": int(pc.sum(tbl.column("n_faces")).as_py() or 0)}


def list_runs(out: str, now: dt.datetime | None = None) -> list[dict]:
    """Every run record under ``<out>/runs``, oldest first, each with its ``effective_status`` at ``now``.

    A run that has not completed gets the counts of its finished shards so far.
    """
    check_bucket(out, "output bucket")
    fs, path = url_to_fs(AnnotateOutput(out).runs)
    if not fs.isdir(path):
        if is_local(fs) and not fs.exists(path.rsplit("/runs", 1)[0]):
            raise SourceNotFound(f"{out} does not exist")
        return []
    rows = []
    now = now or utcnow()
    for p in sorted(fs.glob(f"{path}/*.json")):
        name = p.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        try:
            doc = json.loads(fs.cat_file(p))
        except (ValueError, OSError) as e:
            rows.append({"run_id": name.removesuffix(".json"), "status": "unreadable", "error": str(e)})
            continue
        doc["status"] = effective_status(doc, now)
        if doc["status"] != "completed" and doc.get("run_id"):
            doc["counts"] = finished_counts(out, doc["run_id"])
        rows.append(doc)
    return sorted(rows, key=lambda d: (d.get("started_at") or "", d.get("run_id") or ""))


def read_run(out: str, run_id: str) -> dict | None:
    return read_json(AnnotateOutput(out).record(run_id))


def same_spelling(recorded: str | None, given: str) -> str:
    """``given`` as the run record spells it if both name the same place (``./in`` and ``in``, a trailing ``/``),
    so only a different source counts as one."""
    import os

    def norm(u: str) -> str:
        u = u.rstrip("/") or u
        return u if "://" in u else os.path.abspath(u)

    return recorded if recorded is not None and norm(recorded) == norm(given) else given


def check_identity(previous: dict, run_id: str, *, source: str, model_id: str, detector: dict) -> None:
    """Refuse (:class:`RunConflict`) to resume run ``run_id`` with another source, model or detector settings
    than its record ``previous`` says it started with: its rows would mix two pipelines."""
    for key, what, now in (
        ("source", "source", same_spelling(previous.get("source"), source)),
        ("model_id", "model", model_id),
        ("detector", "detector settings", detector),
    ):
        if previous.get(key, now) != now:
            raise RunConflict(
                f"run {run_id} was started with {what} {previous[key]}; resume it with the same {what} "
                f"or start a new run id (this one is {now})"
            )
