"""Which failures are retried, and run records that stay true while a run lives and after it dies."""

import datetime as dt
import errno
import json
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from fkd_core.errors import BucketNotFound, CheckpointError, SourceNotFound, is_transient
from fkd_core.runs import RunRecord, effective_status, list_runs


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def _as_s3fs_raises(cause: BaseException) -> OSError:
    """s3fs turns a botocore error it has no mapping for into an OSError raised from it."""
    try:
        try:
            raise cause
        except BaseException as e:
            raise OSError(errno.EIO, str(e)) from e
    except OSError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        TimeoutError("timed out"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        _client_error("SlowDown", 503),
        _client_error("InternalError", 500),
        _client_error("Throttling", 400),
        _client_error("TooManyRequests", 429),
        _as_s3fs_raises(_client_error("ServiceUnavailable", 503)),
        _as_s3fs_raises(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_what_can_heal_is_transient(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(errno.ENOENT, "no such file"),
        PermissionError(errno.EACCES, "denied"),
        NotADirectoryError(errno.ENOTDIR, "not a directory"),
        SourceNotFound("source /x does not exist"),
        BucketNotFound("output bucket s3://nobucket does not exist"),
        CheckpointError("model m.safetensors does not exist"),
        ValueError("bad value"),
        KeyError("bug"),
        _client_error("NoSuchBucket", 404),
        _client_error("AccessDenied", 403),
        _as_s3fs_raises(_client_error("InvalidArgument", 400)),
        # a missing file stays a missing file even when it surfaced while a connection was being retried
        _as_s3fs_raises(FileNotFoundError("gone")),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_what_cannot_heal_is_not_transient(exc):
    assert not is_transient(exc)


def test_a_live_run_record_beats_and_ends_with_its_status(tmp_path):
    uri = str(tmp_path / "runs" / "r.json")
    rec = RunRecord(uri, {"run_id": "r"}, heartbeat_seconds=0.1)
    rec.start()
    first = json.loads((tmp_path / "runs" / "r.json").read_text())
    assert first["status"] == "running" and first["attempts"] == 1 and first["pid"] > 0
    time.sleep(0.5)
    beat = json.loads((tmp_path / "runs" / "r.json").read_text())
    assert beat["heartbeat_at"] > first["heartbeat_at"]  # the thread rewrites the heartbeat while the run lives
    rec.finish("failed", error="OSError: disk full")
    done = json.loads((tmp_path / "runs" / "r.json").read_text())
    assert done["status"] == "failed" and done["error"] == "OSError: disk full" and done["finished_at"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "runs" / "r.json").read_text()) == done  # no beat after the end
    # resuming counts another attempt and clears the old error
    again = RunRecord(uri, done, heartbeat_seconds=0.1)
    again.start()
    again.finish("completed")
    final = json.loads((tmp_path / "runs" / "r.json").read_text())
    assert (final["status"], final["attempts"], "error" in final) == ("completed", 2, False)
    with pytest.raises(ValueError):
        again.finish("running")


def test_a_running_record_whose_heartbeat_stopped_reads_as_interrupted(tmp_path):
    beat = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    doc = {"run_id": "k", "status": "running", "heartbeat_at": beat.isoformat(), "heartbeat_seconds": 30}
    assert effective_status(doc, beat + dt.timedelta(seconds=100)) == "running"
    assert effective_status(doc, beat + dt.timedelta(seconds=121)) == "interrupted"
    assert effective_status({**doc, "status": "completed"}, beat + dt.timedelta(days=9)) == "completed"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "k.json").write_text(json.dumps({**doc, "started_at": beat.isoformat()}))
    (tmp_path / "runs" / "k.plan.parquet").write_bytes(b"")
    rows = list_runs(str(tmp_path), now=beat + dt.timedelta(hours=1))
    assert [(r["run_id"], r["status"]) for r in rows] == [("k", "interrupted")]
    assert rows[0]["counts"]["images"] == 0  # no shard finished
    (tmp_path / "no-runs-yet").mkdir()
    assert list_runs(str(tmp_path / "no-runs-yet")) == []
    with pytest.raises(SourceNotFound, match="does not exist"):
        list_runs(str(tmp_path / "missing"))
