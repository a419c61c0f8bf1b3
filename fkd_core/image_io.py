"""Images: which files are images (extensions, signatures), and robust decoding to 8-bit grayscale.

Storage (listing, reading) is ``fkd_core.storage``'s. Everything here raises :class:`~fkd_core.errors.ImageError`
with a short reason rather than returning ``None``.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from fkd_core.errors import ImageError
from fkd_core.storage import Listing, list_files, read_bytes, stable_reason

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
# 50 megapixels: well above any camera photo we expect, far below what would exhaust a worker's memory.
DEFAULT_MAX_PIXELS = 50_000_000

# PIL only parses headers here; the pixel-bomb check is ours, so silence PIL's own warning/limit.
Image.MAX_IMAGE_PIXELS = None


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


def list_source(uri: str, links_out: bool = False) -> Listing:
    """Every file under a directory or bucket prefix, split into the images to annotate and the skipped files
    with their reasons (:func:`fkd_core.storage.list_files` with image extensions and signatures; links that
    lead out of a local source are skipped unless ``links_out``)."""
    return list_files(uri, IMAGE_EXTENSIONS, sniff_image, SNIFF_BYTES, links_out=links_out)


def list_images(uri: str) -> list[str]:
    """The URIs of the image files under a directory or bucket prefix, sorted (``list_source`` without the
    skipped files)."""
    return [f.uri for f in list_source(uri).images]


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


# PNG chunks that may hold EXIF: eXIf itself, and the text chunks ImageMagick writes it into ("Raw profile type exif")
_PNG_EXIF_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")


def _png_may_hold_exif(data: bytes) -> bool:
    """Whether a PNG has a chunk that can carry EXIF, found by walking the chunk headers (no pixel is decoded)."""
    pos = 8  # after the signature: length (4 bytes), type (4), data, CRC (4) per chunk
    while pos + 8 <= len(data):
        kind = data[pos + 4 : pos + 8]
        if kind in _PNG_EXIF_CHUNKS:
            return True
        if kind == b"IEND":
            return False
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return False


def _orientation(header: Image.Image, data: bytes) -> int:
    """The EXIF orientation (1 = upright) of an image whose header PIL has parsed.

    PIL looks for a PNG's EXIF by decoding the whole image (it may follow the pixels); a PNG without any chunk that
    can carry EXIF (most of them) is known upright without that second decode, which cost as much as OpenCV's.
    """
    if header.format == "PNG" and not _png_may_hold_exif(data):
        return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(header.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not worth refusing the pixels for
        return 1


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
    orientation = _orientation(header, data)
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
