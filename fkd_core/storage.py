"""Storage: every file fkd reads or writes goes through here, on any fsspec store (local paths, ``file://``,
``s3://`` ...).

URIs (``url_to_fs``, ``split_uri``, ``join_uri``), existence checks that name what is missing
(``check_exists``, ``check_bucket``), listing (``list_files``), bounded reads (``read_bytes``, ``iter_read``), and
atomic writes (``write_bytes``, ``write_json``). A read's failure is an :class:`~fkd_core.errors.ImageError`
with a short reason (it becomes that file's error row), never ``None``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec

from fkd_core.errors import (
    CREDENTIAL_HINT,
    AccessDenied,
    BucketNotFound,
    ImageError,
    SourceNotFound,
    UserError,
    output_error,
)

# A file that takes longer than this to read from a store is recorded as an error, not waited for.
DEFAULT_READ_SECONDS = 120.0
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URI or local path to its filesystem and the path inside it."""
    return fsspec.core.url_to_fs(uri)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/``."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


LOCAL_PROTOCOLS = ("file", "local")  # fsspec's names for the local filesystem: the one place they are spelt


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return any(p in LOCAL_PROTOCOLS for p in _protocols(fs))


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Give a path found by ``fs`` back in the form a user would pass (``s3://b/k`` or a local path)."""
    return path if is_local(fs) else f"{_protocols(fs)[0]}://{path}"


def check_bucket(uri: str, what: str = "bucket") -> None:
    """On an object store, refuse a URI whose bucket does not exist (:class:`BucketNotFound`, naming it).

    Local paths pass. fkd never creates a bucket: writing into a missing one would, on some stores, make it.
    """
    fs, path = url_to_fs(uri)
    if is_local(fs):
        return
    bucket = path.split("/", 1)[0]
    missing = BucketNotFound(
        f"{what} {_protocols(fs)[0]}://{bucket} does not exist (for {uri}); fkd never creates buckets"
    )
    if not bucket:
        raise missing
    try:
        if hasattr(fs, "call_s3"):  # S3: ask the bucket itself, so refused credentials are not taken for "missing"
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except PermissionError:
                # HeadBucket needs the whole bucket; a policy that grants only this prefix may still list it
                prefix = path.split("/", 1)[1] if "/" in path else ""
                fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        elif not fs.exists(bucket):
            raise missing
    except PermissionError as e:
        raise access_denied(uri, e) from None
    except FileNotFoundError:
        raise missing from None


def access_denied(uri: str, e: BaseException) -> AccessDenied:
    """A refused request, said as: which location, what the store answered, and where credentials come from
    (variable names only, never their values)."""
    return AccessDenied(f"access denied to {uri} ({stable_reason(str(e)) or type(e).__name__}); {CREDENTIAL_HINT}")


def check_exists(uri: str, what: str, directory: bool = False) -> None:
    """Refuse a path the user gave that does not exist, naming it (:class:`SourceNotFound`, or
    :class:`BucketNotFound` for a missing bucket). A ``directory`` on an object store is a prefix, which exists as
    soon as its bucket does."""
    fs, path = url_to_fs(uri)
    if not is_local(fs):
        check_bucket(uri, f"{what} bucket")
        if directory:
            return
    if not fs.exists(path):
        raise SourceNotFound(f"{what} {uri} does not exist")


def check_output(uri: str, what: str = "output") -> None:
    """Refuse an output location that cannot hold fkd's files: a missing bucket (:class:`BucketNotFound`), or a
    file where a directory or prefix should be (:class:`UserError`, naming it)."""
    check_bucket(uri, f"{what} bucket")
    fs, path = url_to_fs(uri)
    if fs.isfile(path):
        raise UserError(f"{what} {uri} is a file; give a directory or a bucket prefix to write into")
    if is_local(fs):
        check_writable(path, f"{what} {uri}")


def check_writable(path: str, what: str) -> None:
    """Refuse a local directory this process cannot create or write in (a read-only mount, another user's
    volume), naming it and the errno. Checked where it already exists, or else in its nearest existing parent, with
    a nameless file (nothing is left behind, and nothing is created if the check fails)."""
    import tempfile

    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    try:
        if not os.path.isdir(here):
            raise NotADirectoryError(20, "Not a directory", here)
        tempfile.TemporaryFile(dir=here).close()
    except OSError as e:
        where = "" if here == os.path.abspath(path) else f" (its parent {here})"
        raise UserError(f"{what} is not writable{where}: {e.strerror or type(e).__name__} (errno {e.errno})") from None


@dataclass(frozen=True)
class SourceFile:
    """A file found under a source: its URI, size and a version that changes when the file is replaced."""

    uri: str
    size: int | None = None
    version: str | None = None  # local: "<size>-<mtime ns>"; object stores: the ETag (else size and time)


@dataclass
class Listing:
    """What a source holds: the image files to annotate, and every other file with why it was left out."""

    images: list[SourceFile]
    skipped: list[tuple[str, str]]  # (uri, reason)


def split_uri(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of one file's URI as a listing gave it.

    Unlike fsspec's URL parsing, nothing in the name is syntax: ``s3://b/x.jpg::memory://y.jpg`` is the key
    ``x.jpg::memory://y.jpg`` in bucket ``b``, not a URL chain (which would read another file on another store).
    Only a URI that starts with a chain (``simplecache::s3://...``, as a user may give a source) is parsed as one.
    """
    if _CHAIN.match(uri):
        return url_to_fs(uri)  # a chained root the user gave, never a listed name (those start with a protocol)
    if "://" not in uri:
        return fsspec.filesystem("file"), uri
    protocol, path = uri.split("://", 1)
    if protocol in LOCAL_PROTOCOLS:
        return fsspec.filesystem("file"), path
    return fsspec.filesystem(protocol), path


_CHAIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*::")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def inside(path: str, root: str) -> bool:
    """Whether local ``path`` resolves (links followed) to ``root`` or somewhere under it."""
    return _under(os.path.realpath(path), os.path.realpath(root))


def _under(real: str, top: str) -> bool:
    """Whether resolved path ``real`` is resolved directory ``top`` or under it."""
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def leaves(path: str, root: str, what: str = "source") -> str | None:
    """Why reading local ``path`` would leave ``root`` (a link out of it, or ``..``), or None if it stays inside."""
    if inside(path, root):
        return None
    return f"link leaves the {what} (-> {os.path.realpath(path)})"


def _walk_local(
    root: str, errors: list[tuple[str, str]], links_out: bool = False
) -> Iterator[tuple[str, os.stat_result | None]]:
    """Every entry under ``root`` that is not a directory, following symlinked directories (each real directory
    once, so a link loop ends); with its ``stat`` (None for a broken link). Never opens a file. A directory that
    cannot be read is added to ``errors`` with the reason; so is every link that leads out of ``root`` (a file or a
    directory elsewhere), unless ``links_out``."""
    seen: set[str] = set()
    top = os.path.realpath(root)

    def unreadable(e: OSError) -> None:
        errors.append((e.filename or root, f"unreadable directory: {e.strerror or type(e).__name__}"))

    def outside(real: str) -> bool:
        return not links_out and not _under(real, top)

    for d, dirs, files in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        if outside(real):
            errors.append((d, f"link leaves the source (-> {real})"))
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in files:
            p = os.path.join(d, name)
            if os.path.islink(p) and outside(target := os.path.realpath(p)):
                errors.append((p, f"link leaves the source (-> {target})"))
                continue
            try:
                yield p, os.stat(p)
            except OSError:
                yield p, None


def list_files(
    uri: str,
    extensions: tuple[str, ...],
    sniff: Callable[[bytes], object],
    sniff_bytes: int = 32,
    links_out: bool = False,
) -> Listing:
    """Every file under a directory or bucket prefix, sorted, split into the files wanted and the skipped ones
    (with reasons).

    A file whose extension is one of ``extensions`` is wanted without looking. Any other regular file is sniffed:
    ``sniff(its first sniff_bytes)`` true means wanted (an image without an image's name: ``photo``,
    ``x.jfif.bak``), else it is skipped as "not an image". FIFOs, sockets and devices are never opened: with a
    wanted name they are listed (annotate records each as an error, "not a regular file"), otherwise skipped.
    Symbolic links are followed within the directory; one that leads out of it (``p.jpg -> /etc/passwd``,
    ``d -> /elsewhere``) is skipped with its target as the reason, never opened, unless ``links_out``. A URI that
    names a single file gives that file. An empty directory, or a
    prefix with no objects in an existing bucket, gives nothing; a missing local path or bucket raises a
    :class:`~fkd_core.errors.UserError` naming it.
    """
    exts = tuple(e.lower() for e in extensions)
    fs, path = url_to_fs(uri)
    images: list[SourceFile] = []
    skipped: list[tuple[str, str]] = []
    unknown: list[SourceFile] = []
    if is_local(fs):
        if os.path.isfile(path) or (os.path.exists(path) and not os.path.isdir(path)):
            return Listing([_local_file(path, os.stat(path))], [])
        if not os.path.isdir(path):
            check_exists(uri, "source", directory=True)  # a missing path: refused, naming it
        _list_local(path, exts, images, skipped, unknown, links_out)
    else:
        if fs.isfile(path):
            info = fs.info(path)
            return Listing([SourceFile(to_uri(fs, path), info.get("size"), _store_version(info))], [])
        if not fs.isdir(path):
            check_exists(uri, "source", directory=True)  # a missing bucket: refused, naming it
            return Listing([], [])  # a prefix with no objects in an existing bucket
        for p, info in sorted(fs.find(path, detail=True).items()):
            f = SourceFile(to_uri(fs, p), info.get("size"), _store_version(info))
            (images if p.lower().endswith(exts) else unknown).append(f)
    for f, head in zip(unknown, heads([f.uri for f in unknown], sniff_bytes), strict=True):
        if isinstance(head, Exception):
            skipped.append((f.uri, f"unreadable: {stable_reason(f'{type(head).__name__}: {head}')}"))
        elif sniff(head):
            images.append(f)
        else:
            skipped.append((f.uri, "not an image (no image extension, no image signature)"))
    return Listing(sorted(images, key=lambda f: f.uri), sorted(skipped))


def _list_local(
    path: str, exts: tuple[str, ...], images: list, skipped: list, unknown: list[SourceFile], links_out: bool
) -> None:
    """Sort a local tree's files into images (by name), skipped (with reasons) and unknown (to sniff)."""
    for p, st in _walk_local(path, skipped, links_out):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are no UTF-8 cannot be a URI in the tables: say so instead
            skipped.append((p.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "name is not UTF-8"))
            continue
        named = p.lower().endswith(exts)
        if st is None:
            (images.append(SourceFile(p)) if named else skipped.append((p, "broken link")))
        elif not stat.S_ISREG(st.st_mode):
            (images.append(SourceFile(p, None, None)) if named else skipped.append((p, _kind(st.st_mode))))
        else:
            (images if named else unknown).append(_local_file(p, st))


def _local_file(path: str, st: os.stat_result) -> SourceFile:
    return SourceFile(path, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")


def _store_version(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    return f"{info.get('size')}-{modified}" if modified is not None else None


def heads(uris: list[str], n: int) -> list[bytes | Exception]:
    """The first ``n`` bytes of each file, or what reading them raised (a few threads on object stores)."""

    def head(u: str) -> bytes | Exception:
        try:
            fs, p = split_uri(u)
            return fs.cat_file(p, start=0, end=n)
        except Exception as e:  # one unreadable file is that file's reason
            return e

    if len(uris) < 8:
        return [head(u) for u in uris]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(head, uris))


def stable_reason(reason: str) -> str:
    """A reason that is the same for the same problem: no object addresses (``<_io.BytesIO object at 0x7f…>``)."""
    return re.sub(r"\s+at 0x[0-9a-fA-F]+", "", reason)


def read_bytes(uri: str, max_bytes: int = DEFAULT_MAX_BYTES, max_seconds: float = DEFAULT_READ_SECONDS) -> bytes:
    """Read a whole file, refusing files over ``max_bytes``, files that are not regular files (a FIFO would block
    forever) and, on object stores, reads that take longer than ``max_seconds``. Every failure is an
    :class:`ImageError` with a reason."""
    try:
        fs, path = split_uri(uri)
        if is_local(fs):
            # non-blocking open, then check what was opened: a FIFO swapped in after the listing cannot block
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ImageError(f"not a regular file ({_kind(st.st_mode)})")
                if st.st_size > max_bytes:
                    raise ImageError(f"file larger than {max_bytes} bytes")
                os.set_blocking(fd, True)
                data = f.read(max_bytes + 1)
        else:
            data = _read_store(fs, path, max_bytes, max_seconds)
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"not found: {uri}") from e
    except Exception as e:  # whatever reading one file raises is that file's reason
        raise ImageError(f"unreadable: {stable_reason(f'{type(e).__name__}: {e}')}") from e
    if len(data) > max_bytes:
        raise ImageError(f"file larger than {max_bytes} bytes")
    return data


def _read_store(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int, max_seconds: float) -> bytes:
    """Read at most ``max_bytes + 1`` bytes within ``max_seconds``, so a store that trickles or stalls cannot hold
    a shard: on an asynchronous filesystem (s3fs) the whole request is cancelled at the deadline; on others the
    deadline is checked between 1 MB blocks."""
    if getattr(fs, "async_impl", False) and hasattr(fs, "_cat_file"):
        import fsspec.asyn

        try:
            return fsspec.asyn.sync(fs.loop, fs._cat_file, path, start=0, end=max_bytes + 1, timeout=max_seconds)
        except fsspec.asyn.FSTimeoutError:
            raise ImageError(f"read took longer than {max_seconds:g} s") from None
    deadline = time.monotonic() + max_seconds
    chunks: list[bytes] = []
    size = 0
    with fs.open(path, "rb") as f:
        while size <= max_bytes:
            block = f.read(1 << 20)
            if not block:
                break
            chunks.append(block)
            size += len(block)
            if time.monotonic() > deadline:
                raise ImageError(f"read took longer than {max_seconds:g} s")
    return b"".join(chunks)


def iter_read(
    uris: list[str], max_bytes: int = DEFAULT_MAX_BYTES, window: int = 16
) -> Iterator[tuple[str, bytes | ImageError]]:
    """Yield ``(uri, bytes)`` or ``(uri, error)`` for each URI, in order.

    Remote stores are read by a few threads, at most ``window`` files ahead of the consumer, so memory stays
    bounded however large the list or the files.
    """
    if not uris:
        return
    fs, _ = split_uri(uris[0])  # a listed name, like read_bytes reads it: never parsed as a URL chain
    if is_local(fs):
        for u in uris:
            try:
                yield u, read_bytes(u, max_bytes)
            except ImageError as e:
                yield u, e
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def _one(u: str) -> bytes | ImageError:
        try:
            return read_bytes(u, max_bytes)
        except ImageError as e:
            return e

    with ThreadPoolExecutor(min(window, 8)) as pool:
        pending: deque = deque()
        for u in uris:
            pending.append((u, pool.submit(_one, u)))
            if len(pending) >= window:
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()


def read_under(base: str, names: Iterable[str], links_out: bool = False) -> Iterator[tuple[str, bytes | ImageError]]:
    """Each of ``names`` (relative to ``base``) with its bytes, or the error reading it raised: ``iter_read`` over
    their URIs, so remote stores are read a few files ahead, as consumed. In a local ``base``, a name that
    resolves outside it (a link out, ``..``) is not opened unless ``links_out``: its error says where it leads."""
    names = list(names)
    fs, root = url_to_fs(base)
    refused: dict[str, ImageError] = {}
    if is_local(fs) and not links_out:
        for n in names:
            why = leaves(join_uri(root, n), root, "images directory")
            if why is not None:
                refused[n] = ImageError(why)
    allowed = [n for n in names if n not in refused]
    reads = iter_read([join_uri(base, n) for n in allowed])
    for name in names:
        yield (name, refused[name]) if name in refused else (name, next(reads)[1])


def write_json(obj: dict, uri: str) -> None:
    """Write a JSON document atomically (same rule as :func:`write_table`)."""
    write_bytes(json_bytes(obj), uri)


def json_bytes(obj: dict) -> bytes:
    """A JSON document as fkd writes one (indented, keys sorted, anything else as text)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def write_bytes(data: bytes, uri: str) -> None:
    """Write a whole file atomically: write-then-rename locally, one PUT on an object store.

    Local parent directories are created; on an object store nothing is created but the object itself (a
    missing bucket is an error, never made).
    """
    fs, path = url_to_fs(uri)
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        # Hidden and not ending in .parquet, so neither our readers nor a `*.parquet` glob ever see it.
        tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
        with removed_on_failure(tmp, path):  # a full disk, a read-only mount, an interrupt: no temporary file stays
            fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def overwrite_in_place(uri: str, data: bytes) -> None:
    """Rewrite an existing local file in place, for when :func:`write_bytes` cannot: a full disk has no room for a
    second copy, but usually still for new bytes in the blocks the file already holds. Not atomic: a reader may
    see it partial for a moment (readers of run records and leases treat that as unreadable). Local files only."""
    fs, path = url_to_fs(uri)
    if not is_local(fs):
        raise ValueError(f"{uri}: in-place rewrites are for local files")
    try:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise output_error(e, path) from None


@contextmanager
def removed_on_failure(path: str, target: str) -> Iterator[None]:
    """Remove local ``path`` (a temporary or partial file) if the block fails, however it fails; an ``OSError`` that
    says the place cannot take the write (a full disk, a read-only mount...) is raised as
    :class:`~fkd_core.errors.OutputNotWritable` naming ``target``."""
    try:
        yield
    except BaseException as e:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise output_error(e, target) if isinstance(e, OSError) else e from None


def read_json(uri: str) -> dict | None:
    """A JSON document, or None if it does not exist."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


@contextmanager
def open_text(uri: str) -> Iterator:
    """A text file opened for streaming, line by line (CSV parsing never holds the whole file)."""
    with fsspec.open(uri, "rt", newline="") as f:
        yield f
