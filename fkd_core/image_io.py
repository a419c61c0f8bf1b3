"""Listing and reading images over fsspec (local paths, ``file://``, ``s3://`` ...), and robust decoding.

Only this module, ``parquet_io`` and ``checkpoint`` touch storage. Everything here raises
:class:`~fkd_core.errors.ImageError` with a short reason rather than returning ``None``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import fsspec
import numpy as np
from PIL import Image

from fkd_core.errors import BucketNotFound, ImageError, SourceNotFound

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
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
    if not bucket or not fs.exists(bucket):
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        raise BucketNotFound(f"{what} {protocol}://{bucket} does not exist (for {uri}); fkd never creates buckets")


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


def list_images(uri: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """List the image files under a directory or bucket prefix, sorted, as full URIs.

    A URI that names a single image file gives a one-element list. An empty directory, or a bucket prefix
    with no objects under it, gives an empty list (object stores have no directories); a missing local path
    or a missing bucket raises a :class:`~fkd_core.errors.UserError` naming it.
    """
    fs, path = url_to_fs(uri)
    if fs.isfile(path):
        return [_to_uri(fs, path)]
    if not fs.isdir(path):
        check_exists(uri, "source", directory=True)  # a missing local path or bucket: refused, naming it
        return []  # a prefix with no objects in an existing bucket
    exts = tuple(e.lower() for e in extensions)
    found = [p for p in fs.find(path) if p.lower().endswith(exts)]
    return sorted(_to_uri(fs, p) for p in found)


def read_bytes(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole file, refusing files over ``max_bytes``."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise ImageError(f"not found: {uri}") from e
    except (OSError, PermissionError) as e:
        raise ImageError(f"unreadable: {type(e).__name__}: {e}") from e
    if len(data) > max_bytes:
        raise ImageError(f"file larger than {max_bytes} bytes")
    return data


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
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
    raise ImageError(f"unsupported image shape {img.shape}")


def decode_gray(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
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
        raise ImageError(f"not an image: {type(e).__name__}: {e}") from e
    if width * height > max_pixels:
        raise ImageError(f"too many pixels: {width}x{height} > {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = int(header.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not worth refusing the pixels for
        orientation = 1
    buf = np.frombuffer(data, dtype=np.uint8)
    # IGNORE_ORIENTATION: orientation is applied below from the header we parsed, the same for every codec.
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ImageError("decode failed (corrupt or truncated)")
    gray = apply_exif_orientation(_to_gray_u8(img), orientation)
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
    fs, _ = url_to_fs(uris[0])
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
