"""A crash-safe mutual-exclusion lease that lives with the data: in an output directory or an S3 prefix.

Two processes on different machines that share nothing but the store cannot both hold the same lease, and a
lease never outlives a dead holder: the holder renews it well within ``ttl``; one that dies (SIGKILL, OOM, a lost
machine) stops renewing, and the next acquirer takes the lease over once it has expired.

Layout: one small JSON file per *generation*, ``<dir>/<name>.<generation:010d>.json``::

    {"holder": {...the caller's dict: run_id, host, pid...}, "generation": 7, "token": "<random>", "ttl": 120.0,
     "acquired_at": "<UTC ISO>", "renewed_at": "<UTC ISO>", "expires_at": "<UTC ISO>"}

The holder is the highest generation whose file exists. To acquire, a process lists ``<name>.*.json``; if there
is none, or the highest has been released, has expired, or cannot be parsed and was last modified more than
``ttl`` ago, it creates generation ``max + 1`` with an **atomic create-if-absent**, so of several racing
acquirers exactly one wins a given generation. A loser re-lists and sees the winner. Renewal rewrites the
holder's own file with a later expiry (after checking it is still its own, by a random token).

The newest record is never deleted, because a listing that runs while files come and go may miss entries (POSIX
leaves a concurrently created or removed directory entry unspecified): were the winner of generation ``n + 1``
to delete ``n`` at once, a concurrent lister could see neither, find the directory "empty" and win generation 1
beside the real holder. So:

* release rewrites the holder's own record as released (``"released": true``, expiring at once), a tombstone
  that frees the lease for the next acquirer regardless of clocks (on a full disk, a compact tombstone written in
  the record's own blocks); it never touches another holder's file;
* a winner keeps its predecessor and deletes only generations below it (best effort), so a directory holds at
  most two records (plus strays of failed clean-ups) and never empties once used;
* a winner lists once more after its create and steps back (deleting its own, not-newest file) if a newer
  generation exists.

Atomic create-if-absent, per store:

* local filesystems: the record is written to a hidden temporary file in the same directory and hard-linked to
  its name (``os.link`` fails with ``FileExistsError`` if the name exists), so the name never appears empty or
  partial. Where the filesystem has no hard links, ``O_CREAT | O_EXCL`` is used instead (a reader may then
  briefly see a partial file, which counts as held until it is ``ttl`` old). The directory is created if
  missing.
* S3: ``PutObject`` with ``If-None-Match: *`` (a losing writer gets ``412 PreconditionFailed``; ``409
  ConditionalRequestConflict`` during a race counts as losing too). On first use of a bucket the store is probed
  once per process: a store that silently ignores the condition would break mutual exclusion, so it is refused
  (:class:`LeaseUnsupported`). Buckets are never created: a missing one is :class:`~fkd_core.errors.BucketNotFound`.
* any other fsspec protocol: refused with :class:`LeaseUnsupported`.

Clocks: expiry is judged with the *local* clock against the UTC ``expires_at`` the holder wrote (and, for an
unreadable file, against the store's modification time). A record never binds for longer than its ``ttl`` after
this process first saw it as it is: a live holder rewrites its record every ``ttl / 3``, so a record that stays
the same for a whole ``ttl`` belongs to a dead holder, whatever expiry it claims (a holder whose clock ran ahead,
a bad write, a file with a modification time in the future). A ``ttl`` that is not a number between 0 and a day
counts as this lease's own. ``ttl`` must therefore be much larger than the clock
skew between machines plus the time one store request can take; the default of 120 s with renewal every
``ttl / 3`` tolerates tens of seconds. A holder whose own clock says its lease has expired treats it as lost
(:meth:`Lease.renew` raises :class:`LeaseLost`) rather than renewing it, because another process may already
have taken it over.

This module does not import Prefect.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec.asyn

from fkd_core.errors import FkdError, OutputNotWritable, UserError, is_transient
from fkd_core.storage import check_bucket, is_local, join_uri, overwrite_in_place, removed_on_failure, url_to_fs

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*")
_MAX_TTL = 86_400.0  # a record claiming a longer ttl is read as having this lease's own
_MAX_ERRORS = 20  # renewal errors kept for inspection
# How often one attempt re-lists after losing a create race before it reports the lease as held.
_MAX_ROUNDS = 8


class LeaseHeld(FkdError):
    """Another process holds the lease. ``record`` is its record (``holder``, ``generation``, ``expires_at``...),
    ``holder`` the holder's own dict (None if its file is unreadable), ``waited`` the seconds spent waiting."""

    def __init__(self, message: str, record: dict | None, waited: float = 0.0):
        super().__init__(message)
        self.record = record or {}
        self.holder = self.record.get("holder")
        self.waited = waited


class LeaseLost(FkdError):
    """This process no longer holds the lease: it expired, or another process took it over."""


class LeaseUnsupported(UserError):
    """The lease cannot live where it was asked to (a protocol without atomic create, or a store that ignores
    conditional writes)."""


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_BOOT_ID = _boot_id()
_PID_NS = _pid_namespace()  # containers on one kernel (and one host name) see different PIDs


def default_holder(**extra: Any) -> dict:
    """A holder dict naming this process (``host``, ``pid``, the machine's ``boot_id`` where Linux has one) plus
    ``extra`` (a run id, a flow name...). With them, a holder that died on this machine is recognised at once
    (:func:`holder_died_here`) instead of after its lease expires."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _BOOT_ID, "pid_ns": _PID_NS, **extra}


def holder_died_here(record: dict) -> bool:
    """Whether a lease's holder was a process on this machine (same host name, boot and PID namespace) that no
    longer runs (killed, crashed, or from an earlier boot). Holders elsewhere, or whose process cannot be
    inspected, are never judged dead here: their leases expire as usual. A PID reused by a process started after
    the lease was taken is no holder."""
    import psutil

    h = record.get("holder") or {}
    pid = h.get("pid")
    if h.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    if h.get("boot_id") and _BOOT_ID and h["boot_id"] != _BOOT_ID:
        return True
    if not _PID_NS or h.get("pid_ns") != _PID_NS:
        return False  # another PID namespace (a container sharing the host name): its PIDs mean nothing here
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        acquired = _parse_time(record.get("acquired_at"))
        return acquired is not None and proc.create_time() > acquired.timestamp() + 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _parse_record(raw: bytes) -> dict | None:
    """A lease record, or None if it is not one (empty, truncated, not JSON, no valid ``expires_at``)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or _parse_time(doc.get("expires_at")) is None:
        return None
    return doc


@dataclass(frozen=True)
class _Entry:
    generation: int
    key: str  # path (local) or key (S3) of the file
    modified: float  # the store's modification time, seconds since the epoch


class _LocalStore:
    def __init__(self, directory: str, name: str):
        self.dir = directory.rstrip("/") or "/"
        self.name = name
        self.mtime_resolution = 0.0
        self._re = re.compile(rf"{re.escape(name)}\.(\d+)\.json")

    def path(self, generation: int) -> str:
        return f"{self.dir}/{self.name}.{generation:010d}.json"

    def prepare(self) -> None:
        os.makedirs(self.dir, exist_ok=True)

    def list(self) -> list[_Entry]:
        out = []
        try:
            it = os.scandir(self.dir)
        except FileNotFoundError:
            return []
        with it:
            for e in it:
                m = self._re.fullmatch(e.name)
                if not m:
                    continue
                try:
                    mtime = e.stat().st_mtime
                except FileNotFoundError:
                    continue
                out.append(_Entry(int(m.group(1)), f"{self.dir}/{e.name}", mtime))
        return sorted(out, key=lambda x: x.generation)

    def read(self, key: str) -> bytes:
        with open(key, "rb") as f:
            return f.read()

    def _tmp(self, key: str, data: bytes) -> str:
        tmp = f"{self.dir}/.{key.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
        with removed_on_failure(tmp, key), open(tmp, "wb") as f:  # a full disk leaves no empty record behind
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` holding ``data`` unless it exists; True if this call created it."""
        tmp = self._tmp(key, data)
        try:
            os.link(tmp, key)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        # No hard links here: exclusive create, then write (a reader may see it partial for a moment).
        try:
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with removed_on_failure(key, key), os.fdopen(fd, "wb") as f:  # a partial record would be unreadable
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def replace(self, key: str, data: bytes) -> None:
        tmp = self._tmp(key, data)
        with removed_on_failure(tmp, key):
            os.replace(tmp, key)

    def overwrite(self, key: str, data: bytes) -> None:
        """Rewrite ``key`` in place (what a full disk still allows): see ``storage.overwrite_in_place``."""
        overwrite_in_place(key, data)

    def delete(self, key: str) -> None:
        try:
            os.unlink(key)
        except FileNotFoundError:
            pass


def _client_error(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of the botocore error behind ``exc`` (s3fs raises it ``from`` one), or ("", 0)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code, int(status) if isinstance(status, int) else 0
        e = e.__cause__ or e.__context__
    return "", 0


def _lost_create_race(exc: BaseException) -> bool:
    """True if a conditional PUT failed because the object exists (412) or a concurrent write won (409)."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of 412 with Condition: If-None-Match
        return True
    code, status = _client_error(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


# (filesystem token, bucket) pairs whose conditional writes this process has verified.
_VERIFIED: set[tuple[str, str]] = set()
_VERIFIED_LOCK = threading.Lock()


class _S3Store:
    def __init__(self, fs, path: str, name: str, uri: str, verify: bool):
        self.fs = fs
        self.bucket, _, prefix = path.strip("/").partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.name = name
        self.mtime_resolution = 1.0  # LastModified is whole seconds
        self.uri = uri
        self.verify = verify
        self._re = re.compile(rf"{re.escape(self.prefix + name)}\.(\d+)\.json")

    def path(self, generation: int) -> str:
        return f"{self.prefix}{self.name}.{generation:010d}.json"

    def prepare(self) -> None:
        check_bucket(self.uri, "lease bucket")
        token = (str(getattr(self.fs, "_fs_token", id(self.fs))), self.bucket)
        if not self.verify or token in _VERIFIED:
            return
        with _VERIFIED_LOCK:
            if token in _VERIFIED:
                return
            probe = f"{self.prefix}.{self.name}.probe-{uuid.uuid4().hex}.tmp"
            try:
                if not self.create(probe, b"1"):
                    raise LeaseUnsupported(f"s3://{self.bucket}/{probe} existed before it was written")
                if self.create(probe, b"2"):
                    raise LeaseUnsupported(
                        f"the store behind s3://{self.bucket} ignores If-None-Match on PutObject, so a lease there "
                        "cannot exclude anyone; use a store with conditional writes (AWS S3, MinIO...) or a local path"
                    )
            finally:
                try:
                    self.delete(probe)
                except Exception:  # a leftover probe is a hidden, harmless object
                    pass
            _VERIFIED.add(token)

    def list(self) -> list[_Entry]:
        out = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{self.prefix}{self.name}."}
        while True:
            resp = self.fs.call_s3("list_objects_v2", **kwargs)  # never the s3fs listing cache
            for obj in resp.get("Contents", []):
                m = self._re.fullmatch(obj["Key"])
                if m:
                    modified = obj.get("LastModified")
                    ts = modified.timestamp() if isinstance(modified, dt.datetime) else 0.0
                    out.append(_Entry(int(m.group(1)), obj["Key"], ts))
            if not resp.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]
        return sorted(out, key=lambda x: x.generation)

    def read(self, key: str) -> bytes:
        # Not fs.cat_file: it asks the instance's shared listing cache for the size first, and a listing of this
        # prefix cached by anyone before the object was written makes it raise FileNotFoundError.
        return fsspec.asyn.sync(self.fs.loop, self._get, key)

    async def _get(self, key: str) -> bytes:
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key)
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except Exception as e:
            if _lost_create_race(e):
                return False
            raise

    def replace(self, key: str, data: bytes) -> None:
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)


class Lease:
    """A named lease under ``dir_uri`` (a local directory or ``s3://bucket/prefix``), held by ``holder``.

    ``holder`` is any JSON-serialisable dict; it is what a waiting process is shown (see :func:`default_holder`).
    ``ttl`` is how long the lease lasts without renewal: a dead holder blocks others for at most this long.

    One ``Lease`` object is one would-be holder; use one object per process or thread that competes::

        lease = Lease(out, "annotate", default_holder(run_id=run_id), ttl=120)
        with lease.acquire(on_wait=lambda rec, s: log.info("waiting %.0fs for %s", s, rec["holder"])):
            lease.start_renewing()
            ...  # the work; lease.check() raises LeaseLost if the lease was lost meanwhile
    """

    def __init__(self, dir_uri: str, name: str, holder: dict, ttl: float = 120.0, verify_store: bool = True):
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"lease name {name!r} must be letters, digits and _.=- (no slashes)")
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, not {ttl}")
        json.dumps(holder)  # refuse a holder that cannot be written, now rather than at acquire time
        self.dir_uri = dir_uri
        self.name = name
        self.holder = dict(holder)
        self.ttl = float(ttl)
        fs, path = url_to_fs(dir_uri)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if is_local(fs):
            self._store: _LocalStore | _S3Store = _LocalStore(path, name)
        elif "s3" in protocols or "s3a" in protocols:
            self._store = _S3Store(fs, path, name, dir_uri, verify_store)
        else:
            raise LeaseUnsupported(
                f"a lease needs a local path or s3:// (atomic create-if-absent), not {protocols[0]}:// ({dir_uri})"
            )
        self._prepared = False
        self._lock = threading.RLock()
        self._token: str | None = None
        self._generation: int | None = None
        self._record: dict | None = None
        self._expires: dt.datetime | None = None
        self._lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        #: the record of whoever held the lease at the last failed attempt (None before one)
        self.last_holder: dict | None = None
        #: (UTC ISO time, repr, transient?) of the latest errors the renewal thread swallowed
        self.renew_errors: list[tuple[str, str, bool]] = []
        # the newest record as last seen, (generation, digest of its bytes), and when this process first saw it
        self._sighting: tuple[tuple[int, str], float] | None = None

    def __repr__(self) -> str:
        state = f"held gen {self._generation}" if self.held else "not held"
        return f"Lease({join_uri(self.dir_uri, self.name)!r}, {state})"

    # ----- state

    @property
    def held(self) -> bool:
        """True while this object believes it holds the lease (see :meth:`check` for a stricter test)."""
        return self._token is not None and self._lost is None

    @property
    def generation(self) -> int | None:
        return self._generation

    @property
    def record(self) -> dict | None:
        """This holder's current record, while held."""
        return dict(self._record) if self._record is not None and self.held else None

    @property
    def expires_at(self) -> dt.datetime | None:
        return self._expires if self.held else None

    @property
    def lost(self) -> LeaseLost | None:
        """Why the lease was lost (set by :meth:`renew` or the renewal thread), or None."""
        return self._lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this object holds the lease and, by the local clock, it has not expired."""
        if self._lost is not None:
            raise self._lost
        if self._token is None or self._expires is None:
            raise LeaseLost(f"{self!r} is not held")
        if _now() >= self._expires:
            raise LeaseLost(f"{self!r} expired at {_iso(self._expires)} without being renewed")

    # ----- acquiring

    def _prepare(self) -> None:
        if not self._prepared:
            self._store.prepare()
            self._prepared = True

    def _new_record(self, generation: int, token: str, acquired_at: str | None = None) -> tuple[dict, dt.datetime]:
        now = _now()
        expires = now + dt.timedelta(seconds=self.ttl)
        rec = {
            "holder": self.holder,
            "generation": generation,
            "token": token,
            "ttl": self.ttl,
            "acquired_at": acquired_at or _iso(now),
            "renewed_at": _iso(now),
            "expires_at": _iso(expires),
        }
        return rec, expires

    def _attempt(self) -> tuple[bool, dict | None]:
        """One non-waiting try: (True, own record) if this object now holds the lease, else (False, holder's record)."""
        self._prepare()
        seen: dict | None = None  # the newest record seen, for the caller should every round be lost to a racer
        for _ in range(_MAX_ROUNDS):
            state, generation, holder = self._newest()
            if state == "retry":
                continue
            if state == "held":
                return False, holder
            won = self._create(generation)
            if won is not None:
                return True, won
            _, _, seen = self._newest()  # a racer won this generation: it is whom we now wait for
        return False, seen

    def _first_seen(self, generation: int, raw: bytes) -> dt.datetime:
        """When this process first saw the newest record as it is now (generation and bytes), by the local clock."""
        import hashlib

        ident = (generation, hashlib.sha256(raw).hexdigest())
        now = time.monotonic()
        if self._sighting is None or self._sighting[0] != ident:
            self._sighting = (ident, now)
        return _now() - dt.timedelta(seconds=now - self._sighting[1])

    @staticmethod
    def _ttl_of(rec: dict | None, default: float) -> float:
        ttl = rec.get("ttl") if rec else None
        ok = isinstance(ttl, int | float) and not isinstance(ttl, bool) and 0 < ttl <= _MAX_TTL
        return float(ttl) if ok else default

    def _newest(self) -> tuple[str, int, dict | None]:
        """The newest record: ("held", its generation, holder) while it binds, ("free", the next generation, None)
        when it is absent, released or expired, or ("retry", 0, None) when it vanished since the listing."""
        entries = self._store.list()
        if not entries:
            return "free", 1, None
        top = entries[-1]
        try:
            raw = self._store.read(top.key)
        except FileNotFoundError:
            return "retry", 0, None  # released or cleaned up since the listing: look again
        rec = _parse_record(raw)
        first_seen = self._first_seen(top.generation, raw)
        ttl = self._ttl_of(rec, self.ttl)
        if rec is None:
            # maybe a writer's first bytes (O_EXCL fallback), maybe a dead one's: held until ttl after it was
            # written (by the store's clock, or by ours where the store's says the future)
            written = min(dt.datetime.fromtimestamp(top.modified, dt.UTC), first_seen)
            until = written + dt.timedelta(seconds=ttl + self._store.mtime_resolution)
            if _now() < until:
                return (
                    "held",
                    top.generation,
                    {
                        "holder": None,
                        "generation": top.generation,
                        "unreadable": f"{len(raw)} bytes that are not a lease record",
                        "modified_at": _iso(dt.datetime.fromtimestamp(top.modified, dt.UTC)),
                        "expires_at": _iso(until),
                    },
                )
        else:
            rec = {**rec, "generation": top.generation}
            claimed = _parse_time(rec["expires_at"])
            until = min(claimed, first_seen + dt.timedelta(seconds=ttl))  # never beyond ttl unrenewed
            if until < claimed:
                rec["expires_at"], rec["claimed_expires_at"] = _iso(until), rec["expires_at"]
            if not rec.get("released") and _now() < until and not holder_died_here(rec):
                return "held", top.generation, rec
        return "free", top.generation + 1, None

    def _create(self, generation: int) -> dict | None:
        """Create ``generation``'s record; this object's record if it now holds the lease, else None (look again)."""
        token = uuid.uuid4().hex
        rec, expires = self._new_record(generation, token)
        key = self._store.path(generation)
        won = self._store.create(key, json.dumps(rec, sort_keys=True).encode())
        if not won:
            # Someone else made this generation, or a retried PUT of ours found our own first attempt.
            try:
                won = (_parse_record(self._store.read(key)) or {}).get("token") == token
            except FileNotFoundError:
                won = False
        if not won:
            return None  # re-list: the winner is now the newest
        # A listing that raced other writers may have missed a newer generation: if one exists, step back.
        after = self._store.list()
        if any(e.generation > generation for e in after):
            self._delete_quietly(key)  # not the newest record, so nobody's lease depends on it
            return None
        self._token, self._generation, self._record, self._expires = token, generation, rec, expires
        self._lost = None
        self._stop = threading.Event()
        for e in after:  # best effort; the predecessor stays for listers racing this create (module doc)
            if e.generation < generation - 1:
                self._delete_quietly(e.key)
        return dict(rec)

    def _delete_quietly(self, key: str) -> None:
        try:
            self._store.delete(key)
        except Exception:
            pass

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired; never waits. False if another process holds it (its record is
        then in :attr:`last_holder`). True, too, if this object already holds it."""
        with self._lock:
            if self.held:
                return True
            won, rec = self._attempt()
            if not won:
                self.last_holder = rec
            return won

    def acquire(
        self,
        wait: bool = True,
        poll: float = 2.0,
        on_wait: Callable[[dict, float], None] | None = None,
        timeout: float | None = None,
    ) -> Lease:
        """Take the lease, waiting while another process holds it; returns this object (a context manager).

        Every ``poll`` seconds (or sooner, when the holder's lease is due to expire) it tries again. ``on_wait``
        is called with the holder's record (``holder``, ``generation``, ``expires_at``...; ``holder`` is None
        and ``unreadable`` says why if its file cannot be read) and the seconds waited so far: at once, then at
        most every ``poll`` seconds, so the caller can log what it waits for and for how long. Raises
        :class:`LeaseHeld` if ``wait`` is false and the lease is held, or after ``timeout`` seconds.
        """
        start = time.monotonic()
        last_call: float | None = None
        while True:
            with self._lock:
                if self.held:
                    return self
                won, rec = self._attempt()
                if won:
                    return self
                self.last_holder = rec
            waited = time.monotonic() - start
            where = join_uri(self.dir_uri, self.name)
            who = (
                f"{rec.get('holder')} (generation {rec.get('generation')}, until {rec.get('expires_at')})"
                if rec
                else "?"
            )
            if not wait:
                raise LeaseHeld(f"lease {where} is held by {who}", rec)
            if timeout is not None and waited >= timeout:
                raise LeaseHeld(f"lease {where} is still held by {who} after {waited:.1f} s", rec, waited)
            if on_wait is not None and rec is not None and (last_call is None or time.monotonic() - last_call >= poll):
                last_call = time.monotonic()
                on_wait(dict(rec), waited)
            delay = poll * random.uniform(1.0, 1.1)  # a little jitter, so waiters do not move in lockstep
            expires = _parse_time(rec.get("expires_at")) if rec else None
            if expires is not None:
                delay = min(delay, max(0.05, (expires - _now()).total_seconds() + 0.05))
            if timeout is not None:
                delay = min(delay, max(0.0, timeout - waited))
            time.sleep(max(delay, 0.01))

    # ----- holding

    def _mark_lost(self, message: str) -> LeaseLost:
        self._lost = LeaseLost(message)
        return self._lost

    def renew(self) -> None:
        """Push this holder's expiry ``ttl`` seconds ahead.

        Raises :class:`LeaseLost` (and the lease counts as lost from then on) if it is not held, has already
        expired by the local clock, or another process has taken it over (a newer generation exists, or this
        generation's file is gone or is not this holder's).
        """
        with self._lock:
            self._check_held()
            where = join_uri(self.dir_uri, self.name)
            if _now() >= self._expires:
                raise self._mark_lost(f"lease {where} expired at {_iso(self._expires)} before it was renewed")
            key = self._store.path(self._generation)
            entries = self._store.list()
            newer = [e.generation for e in entries if e.generation > self._generation]
            if newer:
                raise self._mark_lost(f"lease {where} was taken over (generation {max(newer)})")
            try:
                current = _parse_record(self._store.read(key))
            except FileNotFoundError:
                current = None
            if current is None or current.get("token") != self._token:
                raise self._mark_lost(f"lease {where} generation {self._generation} is no longer this holder's")
            rec, expires = self._new_record(self._generation, self._token, self._record["acquired_at"])
            self._store.replace(key, json.dumps(rec, sort_keys=True).encode())
            # A takeover may have raced the rewrite: if so, step back and leave the lease to the newer holder.
            newer = [e.generation for e in self._store.list() if e.generation > self._generation]
            if newer:
                try:
                    self._store.delete(key)
                except Exception:
                    pass
                raise self._mark_lost(f"lease {where} was taken over (generation {max(newer)})")
            self._record, self._expires = rec, expires

    def _check_held(self) -> None:
        """Raise :class:`LeaseLost` if this object does not hold the lease or has learnt it lost it."""
        if self._lost is not None:
            raise self._lost
        if self._token is None:
            raise LeaseLost(f"{self!r} is not held")

    def start_renewing(self, every: float | None = None) -> None:
        """Renew in a daemon thread every ``every`` seconds (default ``ttl / 3``) until :meth:`release`.

        The thread swallows errors (a store briefly down), recording them in :attr:`renew_errors` and retrying
        sooner; it stops when the lease is lost (:attr:`lost`, and :meth:`check` raises). Work that must not
        continue without the lease should call :meth:`check` between steps.
        """
        every = self.ttl / 3 if every is None else float(every)
        if not 0 < every < self.ttl:
            raise ValueError(f"renew every {every} s must be positive and below the ttl of {self.ttl} s")
        with self._lock:
            self._check_held()
            if self._renewer is not None and self._renewer.is_alive():
                return
            stop = self._stop
            self._renewer = threading.Thread(
                target=self._renew_loop, args=(every, stop), name=f"lease-renew-{self.name}", daemon=True
            )
            self._renewer.start()

    def _renew_loop(self, every: float, stop: threading.Event) -> None:
        delay = every
        while not stop.wait(delay):
            try:
                with self._lock:
                    if stop.is_set():
                        return
                    self.renew()
                delay = every
            except LeaseLost:
                return
            except Exception as e:
                self.renew_errors.append((_iso(_now()), f"{type(e).__name__}: {e}", is_transient(e)))
                del self.renew_errors[:-_MAX_ERRORS]
                delay = max(min(every, 1.0), every / 4)

    def release(self) -> bool:
        """Stop renewing and mark this holder's record released (freeing the lease at once), never touching
        another's; True if it did.

        Errors from the store are recorded in :attr:`renew_errors`, not raised: an unreleased lease just expires
        after ``ttl``. The object can acquire again afterwards.
        """
        self._stop.set()
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join()
        with self._lock:
            self._renewer = None
            if self._token is None:
                return False
            token, key = self._token, self._store.path(self._generation)
            self._token = self._record = self._expires = None
            self._lost = None
            try:
                current = _parse_record(self._store.read(key))
                if current is None or current.get("token") != token:
                    return False
                now = _iso(_now())
                tomb = {**current, "released": True, "released_at": now, "expires_at": now}
                self._store.replace(key, json.dumps(tomb, sort_keys=True).encode())
                return True
            except FileNotFoundError:
                return False
            except OutputNotWritable:
                # a full disk has no room for a second copy: a compact tombstone in the record's own blocks (the
                # newest record is never deleted, see above)
                try:
                    self._store.overwrite(
                        key, json.dumps({"token": token, "released": True, "expires_at": now}).encode()
                    )
                    return True
                except Exception as e:
                    self.renew_errors.append((_iso(_now()), f"release: {type(e).__name__}: {e}", False))
                    return False
            except Exception as e:
                self.renew_errors.append((_iso(_now()), f"release: {type(e).__name__}: {e}", is_transient(e)))
                return False

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
