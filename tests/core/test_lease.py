"""The lease on a local directory: exclusive across threads and processes, waiting, expiry of a dead holder."""

from __future__ import annotations

import datetime as dt
import errno
import json
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from fkd_core.lease import Lease, LeaseHeld, LeaseLost, LeaseUnsupported, default_holder

FORK = mp.get_context("fork")  # children share the parent's imports: no 2 s torch import per racer


def _files(d: Path, name: str = "job") -> dict[int, dict | bytes]:
    """generation -> parsed record (raw bytes if unparsable) of every lease file under ``d``."""
    out = {}
    for p in sorted(d.iterdir()) if d.exists() else []:
        m = re.fullmatch(rf"{re.escape(name)}\.(\d+)\.json", p.name)
        if m:
            raw = p.read_bytes()
            try:
                out[int(m.group(1))] = json.loads(raw)
            except ValueError:
                out[int(m.group(1))] = raw
    return out


def _write_record(d: Path, generation: int, holder: dict, expires_in: float, token: str = "someone-else") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    rec = {
        "holder": holder,
        "generation": generation,
        "token": token,
        "ttl": 30.0,
        "acquired_at": now.isoformat(),
        "renewed_at": now.isoformat(),
        "expires_at": (now + dt.timedelta(seconds=expires_in)).isoformat(),
    }
    path = d / f"job.{generation:010d}.json"
    path.write_text(json.dumps(rec))
    return path


def _race_threads(d: Path, n: int, ttl: float = 30.0) -> tuple[list[Lease], list[bool]]:
    leases = [Lease(str(d), "job", {"thread": i}, ttl=ttl) for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[bool] = [False] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = leases[i].try_acquire()
        except BaseException as e:  # surfaced below: a thread's exception must fail the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    return leases, results


@pytest.mark.parametrize("start", ["empty", "expired", "released"])
def test_exactly_one_of_many_threads_wins(tmp_path, start):
    """Eight threads race for a lease that is free (a new directory), expired, or released: one wins each round."""
    for rnd in range(8):
        # a new directory (the lease creates it) per round, or the same one (holding the last round's records)
        d = tmp_path / (f"r{rnd}" if start == "empty" else "same") / "_leases"
        if start == "expired":
            _write_record(d, 10 * rnd + 5, {"run_id": "dead"}, expires_in=-1)
        want_gen = {"empty": 1, "expired": 10 * rnd + 6, "released": rnd + 1}[start]
        leases, results = _race_threads(d, 8)
        assert sum(results) == 1, f"round {rnd}: {results}"
        winner = results.index(True)
        files = _files(d)
        # the winner's record and its predecessor (kept for racing listers); anything older is cleaned up
        assert list(files) == [g for g in (want_gen - 1, want_gen) if g >= 1], files
        assert files[want_gen]["holder"] == {"thread": winner}
        assert leases[winner].generation == want_gen and leases[winner].held
        for i, lease in enumerate(leases):
            if i != winner:
                assert not lease.held
                assert lease.last_holder["holder"] == {"thread": winner}
        assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]  # no temporary files left behind
        assert leases[winner].release()
        assert _files(d)[want_gen]["released"] is True


def test_exactly_one_wins_without_hard_links(tmp_path, monkeypatch):
    """On a filesystem without hard links the O_EXCL fallback still lets exactly one racer in."""

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    for rnd in range(5):
        leases, results = _race_threads(tmp_path, 8)
        assert sum(results) == 1, results
        assert _files(tmp_path)[rnd + 1]["holder"] == {"thread": results.index(True)}
        leases[results.index(True)].release()


def _race_child(d: str, i: int, barrier, results) -> None:
    lease = Lease(d, "job", {"proc": i, "pid": os.getpid()}, ttl=30.0)
    barrier.wait(timeout=30)
    won = lease.try_acquire()
    results.put((i, won, lease.generation if won else None, lease.last_holder))
    # exits holding (when it won): the record stays, as a crashed holder's would


@pytest.mark.parametrize("start", ["empty", "expired"])
def test_exactly_one_of_six_processes_wins(tmp_path, start):
    if start == "expired":
        _write_record(tmp_path, 41, {"run_id": "dead"}, expires_in=-1)
    barrier, results = FORK.Barrier(6), FORK.Queue()
    procs = [FORK.Process(target=_race_child, args=(str(tmp_path), i, barrier, results)) for i in range(6)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    winners = [g for g in got if g[1]]
    assert len(winners) == 1, got
    i, _, gen, _ = winners[0]
    want_gen = 42 if start == "expired" else 1
    assert gen == want_gen
    files = _files(tmp_path)
    assert list(files) == ([41, 42] if start == "expired" else [1])
    assert files[want_gen]["holder"] == {"proc": i, "pid": procs[i].pid}
    for j, won, _, last in got:
        if not won:
            assert last["holder"] == {"proc": i, "pid": procs[i].pid}, (j, last)


def test_second_acquirer_waits_and_gets_the_lease_after_release(tmp_path):
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=30)
    b = Lease(str(tmp_path), "job", {"run_id": "B"}, ttl=30)
    assert a.try_acquire()
    calls: list[tuple[dict, float, float]] = []
    done = threading.Event()

    def wait_for_it():
        b.acquire(poll=0.1, on_wait=lambda rec, waited: calls.append((rec, waited, time.monotonic())))
        done.set()

    t = threading.Thread(target=wait_for_it, daemon=True)
    t.start()
    assert not done.wait(0.7), "the second acquirer got a held lease"
    assert not b.held
    a.release()
    assert done.wait(5), "the second acquirer did not get the lease after release"
    t.join(5)
    assert b.held and b.generation == 2 and _files(tmp_path)[2]["holder"] == {"run_id": "B"}
    # on_wait told the waiter who holds it and for how long it has waited, at once and then every ~poll
    assert len(calls) >= 3
    assert all(rec["holder"] == {"run_id": "A"} and rec["generation"] == 1 for rec, _, _ in calls)
    assert all("expires_at" in rec for rec, _, _ in calls)
    assert calls[0][1] < 0.1
    waited = [w for _, w, _ in calls]
    assert waited == sorted(waited) and waited[-1] >= 0.5
    gaps = [b2 - b1 for (_, _, b1), (_, _, b2) in zip(calls, calls[1:], strict=False)]
    assert min(gaps) >= 0.099, gaps  # never more often than every poll seconds
    b.release()


def test_on_wait_and_timeout_name_the_holder(tmp_path):
    holder = default_holder(run_id="nightly-1")
    assert holder["pid"] == os.getpid() and holder["host"]
    a = Lease(str(tmp_path), "job", holder, ttl=30)
    a.acquire(wait=False)
    b = Lease(str(tmp_path), "job", {"run_id": "cli"}, ttl=30)
    assert not b.try_acquire()
    assert b.last_holder["holder"] == holder
    with pytest.raises(LeaseHeld) as e:
        b.acquire(wait=False)
    assert e.value.holder == holder and "nightly-1" in str(e.value)
    seen = []
    t0 = time.monotonic()
    with pytest.raises(LeaseHeld) as e:
        b.acquire(poll=0.1, timeout=0.5, on_wait=lambda rec, waited: seen.append((rec["holder"], waited)))
    assert 0.5 <= time.monotonic() - t0 < 10.0  # the timeout, not forever (a loaded machine polls late)
    assert e.value.holder == holder and e.value.waited >= 0.5 and e.value.record["generation"] == 1
    assert 3 <= len(seen) <= 7, seen
    assert all(h == holder for h, _ in seen)
    assert a.held and list(_files(tmp_path)) == [1]


def _victim(d: str, ready, info) -> None:
    lease = Lease(d, "job", {"role": "victim", "pid": os.getpid()}, ttl=1.5)
    lease.acquire(timeout=10)
    lease.start_renewing(every=0.3)
    info.put(lease.generation)
    ready.set()
    time.sleep(120)  # until SIGKILLed


def test_a_killed_holder_is_taken_over_after_ttl(tmp_path):
    _write_record(tmp_path, 6, {"run_id": "older"}, expires_in=-1)
    ready, info = FORK.Event(), FORK.Queue()
    p = FORK.Process(target=_victim, args=(str(tmp_path), ready, info), daemon=True)
    p.start()
    try:
        assert ready.wait(20)
        victim_gen = info.get(timeout=5)
        assert victim_gen == 7
        heir = Lease(str(tmp_path), "job", {"role": "heir"}, ttl=1.5)
        assert not heir.try_acquire()
        assert heir.last_holder["holder"] == {"role": "victim", "pid": p.pid}
        time.sleep(2.2)  # longer than the ttl: the living holder's renewal thread keeps it
        assert not heir.try_acquire(), "a renewed lease was taken over"
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        killed = time.monotonic()
        heir.acquire(poll=0.1, timeout=10)
        took = time.monotonic() - killed
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
    assert took <= 1.5 + 2.0, f"takeover took {took:.2f} s for a ttl of 1.5 s"
    assert heir.generation == victim_gen + 1
    files = _files(tmp_path)
    assert list(files) == [victim_gen, victim_gen + 1]  # generation 6 cleaned up; the victim's kept as predecessor
    assert files[victim_gen]["holder"]["role"] == "victim" and "released" not in files[victim_gen]
    heir.release()


def test_renew_after_takeover_raises_lease_lost_and_release_spares_the_new_holder(tmp_path):
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=0.5)
    assert a.try_acquire()
    before = a.expires_at
    time.sleep(0.05)
    a.renew()
    assert a.expires_at > before and _files(tmp_path)[1]["expires_at"] == a.record["expires_at"]
    b = Lease(str(tmp_path), "job", {"run_id": "B"}, ttl=30)
    assert not b.try_acquire()
    time.sleep(0.6)  # A stops renewing (stalled): its lease expires
    assert b.try_acquire() and b.generation == 2
    with pytest.raises(LeaseLost, match="taken over|expired"):
        a.renew()
    assert not a.held
    with pytest.raises(LeaseLost):
        a.check()
    a.release()  # marks its own (generation 1, no longer the newest) record released, if anything
    assert _files(tmp_path)[2]["holder"] == {"run_id": "B"} and "released" not in _files(tmp_path)[2]
    b.renew()
    b.check()
    assert not Lease(str(tmp_path), "job", {"run_id": "C"}).try_acquire()


def test_renew_sees_a_newer_generation_even_if_its_own_file_survived(tmp_path):
    """The takeover's clean-up of older generations is best effort: renew must not rely on it."""
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=30)
    assert a.try_acquire()
    _write_record(tmp_path, 2, {"run_id": "B"}, expires_in=30)
    with pytest.raises(LeaseLost, match="generation 2"):
        a.renew()
    assert a.release() is True  # its own generation-1 file, still its token: marked released
    files = _files(tmp_path)
    assert files[1]["released"] and files[2]["holder"] == {"run_id": "B"} and "released" not in files[2]


def test_renew_after_local_expiry_raises_lease_lost(tmp_path):
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=0.3)
    assert a.try_acquire()
    time.sleep(0.4)
    with pytest.raises(LeaseLost, match="expired"):
        a.renew()


def test_release_never_deletes_another_holders_file(tmp_path):
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=30)
    assert a.try_acquire()
    # the same generation now holds another holder's record (generations restart at 1 once a directory empties)
    path = _write_record(tmp_path, 1, {"run_id": "other"}, expires_in=30, token="not-a")
    assert a.release() is False
    assert path.exists() and _files(tmp_path)[1]["holder"] == {"run_id": "other"}
    # a holder taken over after expiring leaves the new holder's record alone: the lease stays held
    c = Lease(str(tmp_path / "c"), "job", {"run_id": "C"}, ttl=0.2)
    assert c.try_acquire()
    time.sleep(0.3)
    d = Lease(str(tmp_path / "c"), "job", {"run_id": "D"}, ttl=30)
    assert d.try_acquire()
    c.release()
    assert _files(tmp_path / "c")[2]["holder"] == {"run_id": "D"} and "released" not in _files(tmp_path / "c")[2]
    assert not Lease(str(tmp_path / "c"), "job", {"run_id": "E"}).try_acquire()
    # a holder whose record a later takeover cleaned up writes nothing back on release
    e = Lease(str(tmp_path / "e"), "job", {"run_id": "E"}, ttl=30)
    assert e.try_acquire()
    (tmp_path / "e" / "job.0000000001.json").unlink()
    assert e.release() is False and _files(tmp_path / "e") == {}


@pytest.mark.parametrize(
    "content", [b"", b'{"holder": {"run_id": "x"}, "expi', b'{"holder": {"run_id": "x"}}', b"[1, 2]"]
)
def test_a_corrupt_lock_file_does_not_wedge_the_lease(tmp_path, content):
    path = tmp_path / "job.0000000003.json"
    path.write_bytes(content)
    lease = Lease(str(tmp_path), "job", {"run_id": "new"}, ttl=0.6)
    assert not lease.try_acquire()  # young: maybe a writer's first bytes, so it counts as held for now
    assert lease.last_holder["holder"] is None and lease.last_holder["generation"] == 3
    assert "unreadable" in lease.last_holder
    seen = []
    t0 = time.monotonic()
    lease.acquire(poll=0.1, timeout=20, on_wait=lambda rec, waited: seen.append(rec))
    assert time.monotonic() - t0 < 15.0  # about the ttl (0.6 s), with room for a loaded machine
    assert seen and seen[0]["unreadable"]
    assert lease.generation == 4
    assert _files(tmp_path)[4]["holder"] == {"run_id": "new"}


def test_an_old_corrupt_file_is_taken_over_at_once(tmp_path):
    path = tmp_path / "job.0000000009.json"
    path.write_bytes(b"")
    old = time.time() - 300
    os.utime(path, (old, old))
    lease = Lease(str(tmp_path), "job", {"run_id": "new"}, ttl=120)
    assert lease.try_acquire() and lease.generation == 10


def test_renewal_thread_keeps_the_lease_records_errors_and_stops_on_release(tmp_path, monkeypatch):
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=0.6)
    a.acquire()
    real_replace = a._store.replace
    failures = iter([True, True])

    def flaky_replace(key, data):
        if next(failures, False):
            raise ConnectionResetError(errno.ECONNRESET, "store briefly away")
        real_replace(key, data)

    monkeypatch.setattr(a._store, "replace", flaky_replace)
    first = a.expires_at
    a.start_renewing(every=0.1)
    time.sleep(1.2)  # twice the ttl
    b = Lease(str(tmp_path), "job", {"run_id": "B"}, ttl=30)
    assert not b.try_acquire(), "the renewal thread did not keep the lease"
    a.check()
    assert a.expires_at > first
    assert len(a.renew_errors) == 2 and all(transient for _, _, transient in a.renew_errors)
    assert "ConnectionResetError" in a.renew_errors[0][1]
    assert a.release() is True
    assert not [t for t in threading.enumerate() if t.name == "lease-renew-job"]
    assert b.try_acquire() and b.generation == 2
    b.release()


def test_renewal_thread_stops_when_the_lease_is_taken_over(tmp_path):
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=30)
    a.acquire()
    a.start_renewing(every=0.1)
    _write_record(tmp_path, 2, {"run_id": "B"}, expires_in=30)
    deadline = time.monotonic() + 3
    while a.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(a.lost, LeaseLost) and not a.held
    with pytest.raises(LeaseLost):
        a.check()
    a.release()
    assert _files(tmp_path)[2]["holder"] == {"run_id": "B"}


def test_context_manager_acquires_and_releases(tmp_path):
    with Lease(str(tmp_path / "sub"), "job", {"run_id": "A"}, ttl=30) as lease:
        assert lease.held and list(_files(tmp_path / "sub")) == [1]
        assert not Lease(str(tmp_path / "sub"), "job", {"run_id": "B"}).try_acquire()
    assert not lease.held and _files(tmp_path / "sub")[1]["released"] is True
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["job.0000000001.json"]  # no temporaries left
    # released: free at once, although it was written with an expiry 30 s ahead
    with Lease(str(tmp_path / "sub"), "job", {"run_id": "B"}, ttl=30).acquire(wait=False) as again:
        assert again.generation == 2


def test_an_acquirer_whose_listing_missed_the_holder_steps_back(tmp_path, monkeypatch):
    """A directory listing racing creates and deletes may miss entries; the post-create check catches it."""
    _write_record(tmp_path, 4, {"run_id": "old"}, expires_in=-1)
    a = Lease(str(tmp_path), "job", {"run_id": "A"}, ttl=30)
    assert a.try_acquire() and a.generation == 5
    b = Lease(str(tmp_path), "job", {"run_id": "B"}, ttl=30)
    real_list = b._store.list
    calls = []

    def blind_once():
        calls.append(1)
        return [] if len(calls) == 1 else real_list()

    monkeypatch.setattr(b._store, "list", blind_once)
    assert not b.try_acquire()  # it created generation 1 on the blind listing, saw generation 5, stepped back
    assert len(calls) >= 3 and b.last_holder["holder"] == {"run_id": "A"}
    assert list(_files(tmp_path)) == [4, 5]
    a.renew()


def test_leases_of_other_names_do_not_interfere(tmp_path):
    a = Lease(str(tmp_path), "job", {"run_id": "A"})
    b = Lease(str(tmp_path), "job.other", {"run_id": "B"})
    assert a.try_acquire() and b.try_acquire()
    assert list(_files(tmp_path, "job")) == [1] and list(_files(tmp_path, "job.other")) == [1]
    assert a.release() and list(_files(tmp_path, "job.other")) == [1]


def test_refuses_protocols_without_atomic_create_and_bad_names(tmp_path):
    with pytest.raises(LeaseUnsupported, match="local path or s3"):
        Lease("memory://somewhere/leases", "job", {"run_id": "A"})
    with pytest.raises(ValueError):
        Lease(str(tmp_path), "a/b", {"run_id": "A"})
    with pytest.raises(TypeError):
        Lease(str(tmp_path), "job", {"when": object()})


def test_a_dead_holder_is_recognised_only_on_its_own_machine_and_pid_namespace():
    import socket

    from fkd_core.lease import holder_died_here

    me = default_holder()
    gone = 4_194_303  # above the default pid_max: no process has it
    now = dt.datetime.now(dt.UTC).isoformat()

    def rec(**holder):
        return {"holder": me | holder, "acquired_at": now}

    assert holder_died_here(rec(pid=gone))
    assert not holder_died_here(rec(pid=gone, host=socket.gethostname() + "-elsewhere"))
    assert not holder_died_here(rec(pid=gone, pid_ns="pid:[1]"))  # a container sharing the host name
    assert not holder_died_here(rec(pid=os.getppid()))  # alive
    assert not holder_died_here(rec())  # this very process
    # a PID taken over by a process started after the lease was: the holder is gone
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=365 * 30)).isoformat()
    assert holder_died_here({"holder": me | {"pid": os.getppid()}, "acquired_at": old})


ELSEWHERE = {"run_id": "far", "host": "another-host", "pid": 1}  # never judged dead from here: only expiry frees it


@pytest.mark.parametrize("claimed_ttl", [0.6, 1e12, "x"])
def test_a_record_claiming_a_far_expiry_binds_only_ttl_after_it_last_changed(tmp_path, claimed_ttl):
    """A holder whose clock ran ahead, or a bad write, claims "until 2099": unrenewed, the record still binds no
    longer than ttl after this process first saw it (a nonsense claimed ttl counts as the lease's own)."""
    path = _write_record(tmp_path, 4, ELSEWHERE, expires_in=0)
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "ttl": claimed_ttl, "expires_at": "2099-01-01T00:00:00+00:00"}))
    lease = Lease(str(tmp_path), "job", {"run_id": "next"}, ttl=0.6)
    seen: list[dict] = []
    t0 = time.monotonic()
    lease.acquire(poll=0.1, timeout=20, on_wait=lambda r, waited: seen.append(r))
    assert 0.5 <= time.monotonic() - t0 < 15.0 and lease.generation == 5  # the ttl, not 2099
    # while it waited it said the real deadline, and what the record claimed
    assert seen[0]["claimed_expires_at"].startswith("2099") and seen[0]["expires_at"] < "2098"


def test_an_unreadable_record_dated_in_the_future_expires_like_any_other(tmp_path):
    path = tmp_path / "job.0000000002.json"
    path.write_bytes(b"\x00garbage")
    future = dt.datetime(2099, 1, 1, tzinfo=dt.UTC).timestamp()
    os.utime(path, (future, future))
    lease = Lease(str(tmp_path), "job", {"run_id": "next"}, ttl=0.6)
    assert not lease.try_acquire()  # it may be a writer's first bytes: held for now
    t0 = time.monotonic()
    lease.acquire(poll=0.1, timeout=20)
    assert time.monotonic() - t0 < 15.0 and lease.generation == 3  # the ttl, not 2099


def test_a_live_holder_that_renews_is_never_taken_over(tmp_path):
    """The cap counts from the record's last change: a holder that renews every ttl/3 keeps its lease."""
    # a 3 s ttl renewed every second: a renewal would have to run 2 s late to lose it, even on a loaded machine
    holder = Lease(str(tmp_path), "job", ELSEWHERE, ttl=3.0)
    assert holder.try_acquire()
    holder.start_renewing()
    other = Lease(str(tmp_path), "job", {"run_id": "next"}, ttl=3.0)
    try:
        with pytest.raises(LeaseHeld):
            other.acquire(poll=0.1, timeout=6.0)  # twice the ttl: without renewal it would have been taken
        holder.check()
    finally:
        holder.release()
    assert other.try_acquire()
