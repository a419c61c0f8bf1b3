"""The lease on a real S3 API (a moto server on 127.0.0.1): conditional PUT races, expiry, missing buckets."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
import uuid

import pytest

from fkd_core.errors import BucketNotFound
from fkd_core.lease import Lease, LeaseHeld, LeaseLost, LeaseUnsupported

pytestmark = [pytest.mark.flows, pytest.mark.s3]


@pytest.fixture(scope="module")
def prefect_harness():
    """Overrides the flows' autouse Prefect harness: the lease is Prefect-free, so no Prefect server is needed."""
    yield


@pytest.fixture
def bucket(s3fs_clean) -> str:
    name = f"lease-{uuid.uuid4().hex[:12]}"
    s3fs_clean.mkdir(name)
    return name


def _records(fs, prefix: str, name: str = "job") -> dict[int, dict | bytes]:
    """generation -> record (raw bytes if unparsable) of every lease object under ``prefix``, read afresh."""
    fs.invalidate_cache()
    out = {}
    for key in fs.find(prefix):
        m = re.fullmatch(rf"{re.escape(name)}\.(\d+)\.json", key.rsplit("/", 1)[-1])
        if m:
            raw = fs.cat_file(key)
            try:
                out[int(m.group(1))] = json.loads(raw)
            except ValueError:
                out[int(m.group(1))] = raw
    return out


def _stale(fs, prefix: str, generation: int) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).isoformat()
    rec = {"holder": {"run_id": "dead"}, "generation": generation, "token": "dead", "expires_at": past}
    fs.pipe_file(f"{prefix}/job.{generation:010d}.json", json.dumps(rec).encode())


def _race(uri: str, n: int) -> tuple[list[Lease], list[bool]]:
    leases = [Lease(uri, "job", {"thread": i}, ttl=30) for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[bool] = [False] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=20)
            results[i] = leases[i].try_acquire()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return leases, results


def test_racing_leases_on_s3_exactly_one_wins(bucket, s3fs_clean):
    prefix = f"{bucket}/out/_leases"
    uri = f"s3://{prefix}"
    expected = []
    for rnd, start in enumerate(["empty", "released", "released", "expired", "expired", "released"]):
        if start == "expired":
            _stale(s3fs_clean, prefix, 10 * rnd)
            want = 10 * rnd + 1
        else:
            want = rnd + 1 if start == "empty" else expected[-1] + 1
        leases, results = _race(uri, 6)
        assert sum(results) == 1, f"round {rnd} ({start}): {results}"
        winner = results.index(True)
        assert leases[winner].generation == want
        records = _records(s3fs_clean, prefix)
        assert max(records) == want and records[want]["holder"] == {"thread": winner}
        assert set(records) <= {want - 1, want}, records  # older generations cleaned up
        for i, lease in enumerate(leases):
            if i != winner:
                assert lease.last_holder["holder"] == {"thread": winner}
        assert leases[winner].release()
        assert _records(s3fs_clean, prefix)[want]["released"] is True
        expected.append(want)
    s3fs_clean.invalidate_cache()
    assert not [k for k in s3fs_clean.find(bucket) if ".probe-" in k]  # the conditional-write probe cleaned up


def test_expired_holder_is_taken_over_on_s3_and_loses_its_lease(bucket, s3fs_clean):
    uri = f"s3://{bucket}/leases"
    stalled = Lease(uri, "job", {"run_id": "stalled"}, ttl=1.0)
    stalled.acquire(wait=False)
    heir = Lease(uri, "job", {"run_id": "heir"}, ttl=30)
    with pytest.raises(LeaseHeld) as e:
        heir.acquire(wait=False)
    assert e.value.holder == {"run_id": "stalled"}
    seen = []
    t0 = time.monotonic()
    heir.acquire(poll=0.1, timeout=30, on_wait=lambda rec, waited: seen.append((rec["holder"], waited)))
    took = time.monotonic() - t0
    assert 0.5 < took < 20.0, took  # not before the stalled holder's ttl (1 s) ran out; room for a loaded machine
    assert seen and all(h == {"run_id": "stalled"} for h, _ in seen)
    assert heir.generation == 2
    with pytest.raises(LeaseLost):
        stalled.renew()
    stalled.release()
    records = _records(s3fs_clean, f"{bucket}/leases")
    assert records[2]["holder"] == {"run_id": "heir"} and "released" not in records[2]
    assert not Lease(uri, "job", {"run_id": "third"}).try_acquire()
    heir.release()
    assert Lease(uri, "job", {"run_id": "third"}).try_acquire()


def test_renewal_thread_keeps_an_s3_lease(bucket, s3fs_clean):
    uri = f"s3://{bucket}/leases"
    holder = Lease(uri, "job", {"run_id": "A"}, ttl=1.0)
    holder.acquire(wait=False)
    holder.start_renewing(every=0.2)
    time.sleep(1.6)
    other = Lease(uri, "job", {"run_id": "B"}, ttl=30)
    assert not other.try_acquire(), "a renewed lease was taken over"
    holder.check()
    assert holder.release() is True
    assert other.try_acquire() and other.generation == 2


def test_a_stale_listing_cache_does_not_hide_the_holder(bucket, s3fs_clean):
    """s3fs instances are shared: a listing of the lease prefix cached by other code must not blind the lease."""
    uri = f"s3://{bucket}/leases"
    a = Lease(uri, "job", {"run_id": "A"}, ttl=30)
    assert a._store.fs is s3fs_clean
    assert a.try_acquire()
    assert len(s3fs_clean.find(f"{bucket}/leases")) == 1  # now cached: generation 1 only
    a.release()
    b = Lease(uri, "job", {"run_id": "B"}, ttl=30)
    assert b.try_acquire() and b.generation == 2
    c = Lease(uri, "job", {"run_id": "C"}, ttl=30)
    assert not c.try_acquire()
    assert c.last_holder["holder"] == {"run_id": "B"}


def test_a_corrupt_record_on_s3_does_not_wedge_the_lease(bucket, s3fs_clean):
    s3fs_clean.pipe_file(f"{bucket}/leases/job.0000000002.json", b"")
    lease = Lease(f"s3://{bucket}/leases", "job", {"run_id": "new"}, ttl=1.0)
    assert not lease.try_acquire() and lease.last_holder["unreadable"]
    lease.acquire(poll=0.2, timeout=10)  # once the object is ttl old by its LastModified (1 s resolution)
    assert lease.generation == 3


def test_missing_bucket_is_refused_and_not_created(s3fs_clean):
    name = f"no-such-lease-bucket-{uuid.uuid4().hex[:8]}"
    lease = Lease(f"s3://{name}/leases", "job", {"run_id": "A"})
    with pytest.raises(BucketNotFound, match=name):
        lease.try_acquire()
    with pytest.raises(BucketNotFound):
        lease.acquire(wait=False)
    buckets = [b["Name"] for b in s3fs_clean.call_s3("list_buckets")["Buckets"]]
    assert name not in buckets


def test_a_store_that_ignores_if_none_match_is_refused(bucket, s3fs_clean):
    lease = Lease(f"s3://{bucket}/leases", "job", {"run_id": "A"})
    fs = lease._store.fs
    real = fs.call_s3

    def no_conditions(method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        return real(method, *args, **kwargs)

    fs.call_s3 = no_conditions  # an S3 look-alike that ignores If-None-Match
    try:
        with pytest.raises(LeaseUnsupported, match="If-None-Match"):
            lease.try_acquire()
    finally:
        del fs.call_s3
    s3fs_clean.invalidate_cache()
    assert s3fs_clean.find(bucket) == []  # the probe object was removed and no lease was written
