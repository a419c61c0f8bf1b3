"""Listing and reading images over fsspec (local paths, ``file://``, ``s3://`` ...), and robust decoding.

Only this module, ``parquet_io`` and ``checkpoint`` touch storage. Everything here raises
:class:`~fkd_core.errors.ImageError` with a short reason rather than returning ``None``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import fsspec
import numpy as np
from PIL import Image

from fkd_core.errors import CREDENTIAL_HINT, AccessDenied, BucketNotFound, ImageError, SourceNotFound

# Files with these extensions are images without looking; any other file is sniffed (``sniff_image``).
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif",
    ".jp2", ".j2k", ".pbm", ".pgm", ".ppm", ".pnm",
)  # fmt: skip
# Magic numbers of the formats OpenCV decodes here, for files whose name does not say.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
)
SNIFF_BYTES = 32
# A file that takes longer than this to read from a store is recorded as an error, not waited for.
DEFAULT_READ_SECONDS = 120.0
# 50 megapixels: well above any camera photo we expect, far below what would exhaust a worker's memory.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024

# PIL only parses headers here; the pixel-bomb check is ours, so silence PIL's own warning/limit.
Image.MAX_IMAGE_PIXELS = None


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URI or local path to its filesystem and the path inside it."""
    return fsspec.core.url_to_fs(uri)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/``."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Give a path found by ``fs`` back in the form a user would pass (``s3://b/k`` or a local path)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def check_bucket(uri: str, what: str = "bucket") -> None:
    """On an object store, refuse a URI whose bucket does not exist (:class:`BucketNotFound`, naming it).

    Local paths pass. fkd never creates a bucket: writing into a missing one would, on some stores, make it.
    """
    fs, path = url_to_fs(uri)
    if is_local(fs):
        return
    bucket = path.split("/", 1)[0]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    missing = BucketNotFound(f"{what} {protocol}://{bucket} does not exist (for {uri}); fkd never creates buckets")
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

    Unlike fsspec's URL parsing, nothing in the name is syntax: ``a::b.jpg`` is a file name, not a URL chain
    (which would read the file ``a``).
    """
    if _CHAIN.search(uri):
        return url_to_fs(uri)  # a chained root the user gave (simplecache::s3://...), never a listed name
    if "://" not in uri:
        return fsspec.filesystem("file"), uri
    protocol, path = uri.split("://", 1)
    if protocol in ("file", "local"):
        return fsspec.filesystem("file"), path
    return fsspec.filesystem(protocol), path


_CHAIN = re.compile(r"::[A-Za-z][A-Za-z0-9+.-]*://")


def sniff_image(head: bytes) -> str | None:
    """The image format the first bytes of a file announce (``SNIFF_BYTES`` are enough), or None."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    # BMP: "BM", then a DIB header whose size is one of the known ones (two letters alone match text files)
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    ):
        return "BMP"
    if re.match(rb"P[1-6]\s+(#[^\n]*\n\s*)*\d+\s+\d+", head):
        return "PNM"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _walk_local(root: str, errors: list[tuple[str, str]]) -> Iterator[tuple[str, os.stat_result | None]]:
    """Every entry under ``root`` that is not a directory, following symlinked directories (each real directory
    once, so a link loop ends); with its ``stat`` (None for a broken link). Never opens a file. A directory that
    cannot be read is added to ``errors`` with the reason."""
    seen: set[str] = set()

    def unreadable(e: OSError) -> None:
        errors.append((e.filename or root, f"unreadable directory: {e.strerror or type(e).__name__}"))

    for d, dirs, files in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in files:
            p = os.path.join(d, name)
            try:
                yield p, os.stat(p)
            except OSError:
                yield p, None


def list_source(uri: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Listing:
    """Every file under a directory or bucket prefix, sorted, split into images and skipped files (with reasons).

    A file whose extension is an image's is an image without looking. Any other regular file is sniffed (its first
    bytes, ``sniff_image``): an image without an image's name (``photo``, ``x.jfif.bak``) is annotated, anything
    else is skipped as "not an image". FIFOs, sockets and devices are never opened: with an image's name they are
    listed (annotate records each as an error, "not a regular file"), otherwise skipped. Symlinked directories
    are followed. A URI that names a single file gives that file. An empty directory, or a prefix with no objects
    in an existing bucket, gives nothing; a missing local path or bucket raises a
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
        _list_local(path, exts, images, skipped, unknown)
    else:
        if fs.isfile(path):
            info = fs.info(path)
            return Listing([SourceFile(_to_uri(fs, path), info.get("size"), _store_version(info))], [])
        if not fs.isdir(path):
            check_exists(uri, "source", directory=True)  # a missing bucket: refused, naming it
            return Listing([], [])  # a prefix with no objects in an existing bucket
        for p, info in sorted(fs.find(path, detail=True).items()):
            f = SourceFile(_to_uri(fs, p), info.get("size"), _store_version(info))
            (images if p.lower().endswith(exts) else unknown).append(f)
    for f, head in zip(unknown, _heads([f.uri for f in unknown]), strict=True):
        if isinstance(head, Exception):
            skipped.append((f.uri, f"unreadable: {stable_reason(f'{type(head).__name__}: {head}')}"))
        elif sniff_image(head):
            images.append(f)
        else:
            skipped.append((f.uri, "not an image (no image extension, no image signature)"))
    return Listing(sorted(images, key=lambda f: f.uri), sorted(skipped))


def _list_local(path: str, exts: tuple[str, ...], images: list, skipped: list, unknown: list[SourceFile]) -> None:
    """Sort a local tree's files into images (by name), skipped (with reasons) and unknown (to sniff)."""
    for p, st in _walk_local(path, skipped):
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


def _heads(uris: list[str]) -> list[bytes | Exception]:
    """The first ``SNIFF_BYTES`` of each file (a few threads on object stores)."""

    def head(u: str) -> bytes | Exception:
        try:
            fs, p = split_uri(u)
            return fs.cat_file(p, start=0, end=SNIFF_BYTES)
        except Exception as e:  # one unreadable file is that file's reason
            return e

    if len(uris) < 8:
        return [head(u) for u in uris]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(head, uris))


def list_images(uri: str) -> list[str]:
    """The URIs of the image files under a directory or bucket prefix, sorted (``list_source`` without the
    skipped files)."""
    return [f.uri for f in list_source(uri).images]


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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image as 8-bit grayscale, upright (EXIF orientation applied)."""

    gray: np.ndarray  # (H, W) uint8
    width: int
    height: int


# cv2.rotate/flip codes that undo each EXIF orientation value (2..8).
_EXIF_FIXES = {
    2: [("flip", 1)],
    3: [("rotate", cv2.ROTATE_180)],
    4: [("flip", 0)],
    5: [("rotate", cv2.ROTATE_90_CLOCKWISE), ("flip", 1)],
    6: [("rotate", cv2.ROTATE_90_CLOCKWISE)],
    7: [("rotate", cv2.ROTATE_90_COUNTERCLOCKWISE), ("flip", 1)],
    8: [("rotate", cv2.ROTATE_90_COUNTERCLOCKWISE)],
}


def apply_exif_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image stored with EXIF ``orientation`` upright."""
    for op, code in _EXIF_FIXES.get(orientation, []):
        img = cv2.rotate(img, code) if op == "rotate" else cv2.flip(img, code)
    return img


def _to_gray_u8(img: np.ndarray) -> np.ndarray:
    """8-bit grayscale; channels are merged first, at the image's own depth, so a deep image is converted once
    it is a single channel (a 16-bit RGBA frame never exists again as a full-size copy)."""
    if img.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ImageError(f"unsupported pixel type {img.dtype}")
    if img.dtype == np.float64:
        img = img.astype(np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    elif img.ndim != 2:
        raise ImageError(f"unsupported image shape {img.shape}")
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype == np.float32:
        return np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return img


class DecodeBudget:
    """Bytes that decodes in flight may take, shared by every thread of a process.

    A frame's decoded size, not its file size, is what costs memory: a 383 KB PNG of 7000 x 7000 16-bit RGBA
    decodes to 392 MB. Each decode holds its estimate (from the header) until its grayscale result exists, and
    waits while the others' would exceed the budget; one image larger than the whole budget decodes alone.
    """

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        n = min(nbytes, self.total)
        with self._cond:
            while self.used + n > self.total:
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


DECODE_BUDGET = DecodeBudget(1 << 30)  # 1 GiB of decodes in flight per process


def _full_depth(header: Image.Image) -> bool:
    """Whether an image is decoded at its own depth and then turned grey (JPEG, as training saw it; float
    images, which OpenCV's 8-bit grey decode would not scale) rather than decoded straight to 8-bit grey."""
    return header.format == "JPEG" or header.mode == "F"


def decoded_bytes(header: Image.Image) -> int:
    """An upper bound on what decoding this image to grey takes (bytes). A JPEG is decoded as 8-bit colour and
    turned grey (3 + 1 bytes a pixel); a float image at full depth (up to 4 float channels, a float grey copy and
    the 8-bit result); PNG, BMP and PNM straight to 8-bit grey (1 byte a pixel, plus the codec's slack); other
    formats are assumed to build a full-depth colour frame inside their codec (up to 16 bytes a pixel)."""
    width, height = header.size
    if header.format == "JPEG":
        per_pixel = 4
    elif header.mode == "F":
        per_pixel = 21
    elif header.format in ("PNG", "BMP", "PPM"):  # decoded row by row into the grey result
        per_pixel = 2
    else:  # TIFF, WebP, GIF, JPEG 2000...: codecs that may build a full-depth colour frame first
        per_pixel = 16
    return width * height * per_pixel


def decode_gray(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, budget: DecodeBudget = DECODE_BUDGET
) -> DecodedImage:
    """Decode encoded image bytes to upright 8-bit grayscale.

    The header is checked first, so a pixel bomb is refused before any pixel is allocated.
    Grayscale, RGB, RGBA and 16-bit inputs are all accepted.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = Image.open(io.BytesIO(data))
            width, height = header.size
    except Exception as e:  # PIL raises a zoo of types for junk input
        raise ImageError(f"not an image: {stable_reason(f'{type(e).__name__}: {e}')}") from e
    if width * height > max_pixels:
        raise ImageError(f"too many pixels: {width}x{height} > {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = int(header.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not worth refusing the pixels for
        orientation = 1
    buf = np.frombuffer(data, dtype=np.uint8)
    with budget.hold(decoded_bytes(header)):
        # IGNORE_ORIENTATION: orientation is applied below from the header we parsed, the same for every codec.
        # A multi-page TIFF or an animated GIF gives its first page or frame. Straight to 8-bit grey, a 16-bit
        # RGBA PNG of 49 MP takes 49 MB instead of 392 MB (values within one level of the full-depth path).
        flags = cv2.IMREAD_UNCHANGED if _full_depth(header) else cv2.IMREAD_GRAYSCALE
        img = cv2.imdecode(buf, flags | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:
            raise ImageError("decode failed (corrupt or truncated)")
        img = _to_gray_u8(img)
    gray = apply_exif_orientation(img, orientation)
    return DecodedImage(gray=np.ascontiguousarray(gray), width=gray.shape[1], height=gray.shape[0])


def read_gray(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode one image file to grayscale."""
    return decode_gray(read_bytes(uri), max_pixels=max_pixels)


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
