"""Face detection with OpenCV Haar cascades."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from fkd_core.resources import shipped_dir
from fkd_core.types import Box

CASCADE_DIR = shipped_dir("detector_architectures")
# fkd ships the cascade (in the package, or at the checkout root); failing that, the identical file
# inside the OpenCV wheel.
DEFAULT_CASCADE = CASCADE_DIR / "haarcascade_frontalface_default.xml"
if not DEFAULT_CASCADE.is_file():  # pragma: no cover
    DEFAULT_CASCADE = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class DetectorConfig:
    """Haar cascade settings; the defaults were chosen by measurement (docs/design.md, "Detection")."""

    cascade: str = str(DEFAULT_CASCADE)
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 30
    # Images are detected at most this long on their longer side (boxes are scaled back), which bounds
    # detection time on large photos; 0 disables the downscale.
    max_side: int = 1024
    # When an image yields no box at ``min_neighbors``, detect once more at this looser value (0: never). Images
    # with a face found are untouched, so crowded photos gain no false boxes; see docs/design.md ("Detection").
    fallback_min_neighbors: int = 3

    def __post_init__(self) -> None:
        if self.scale_factor <= 1.0 or self.min_neighbors < 0 or self.min_size < 1 or self.max_side < 0:
            raise ValueError(
                f"invalid detector config {self}: scale_factor > 1, min_neighbors >= 0, min_size >= 1, max_side >= 0"
            )
        if not 0 <= self.fallback_min_neighbors < max(self.min_neighbors, 1):
            raise ValueError(
                f"fallback_min_neighbors must be 0 (off) or below min_neighbors ({self.min_neighbors}), "
                f"got {self.fallback_min_neighbors}"
            )

    def to_record(self) -> dict:
        """The settings as checkpoints, ingest reports and run records store them: the cascade by file name, so the
        record is portable."""
        return asdict(self) | {"cascade": Path(self.cascade).name}

    @classmethod
    def from_record(cls, record: dict) -> DetectorConfig:
        """Settings from a stored record. The cascade is resolved by file name next to the default cascade; a record
        written before the fallback pass existed means no fallback pass, as the record's data was made without one.
        """
        d = dict(record)
        d["cascade"] = str(DEFAULT_CASCADE.parent / Path(d.get("cascade") or DEFAULT_CASCADE.name).name)
        d.setdefault("fallback_min_neighbors", 0)
        return cls(**d)


_local = threading.local()


def load_cascade(path: str = str(DEFAULT_CASCADE)) -> cv2.CascadeClassifier:
    """A Haar cascade from an XML file, loaded once per thread.

    ``CascadeClassifier.detectMultiScale`` keeps per-call scratch state inside the object, so one instance
    shared by threads fails with ``scaleIdx`` assertions; each thread gets its own.
    """
    cache = _local.__dict__.setdefault("cascades", {})
    if path not in cache:
        cache[path] = _load_cascade(path)
    return cache[path]


def _load_cascade(path: str) -> cv2.CascadeClassifier:
    if not Path(path).is_file():
        raise FileNotFoundError(f"cascade file not found: {path}")
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise ValueError(f"not a valid cascade file: {path}")
    return cascade


@dataclass(frozen=True)
class Detection:
    """A face box with the cascade's confidence in it.

    ``score`` is the cascade's level weight (``detectMultiScale3`` with reject levels): the sum of the last
    stage's weak classifiers for the best window of the box's group, about 2-12 here, higher meaning more
    face-like. ``fallback`` says the box came from the looser fallback pass (``fallback_min_neighbors``).
    """

    box: Box
    score: float
    fallback: bool = False


def detect_faces(gray: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> list[Box]:
    """Detect faces in an 8-bit grayscale image; boxes in original pixels, largest first."""
    return [d.box for d in detect(gray, cfg)]


def detect(gray: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> list[Detection]:
    """:func:`detect_faces` with each box's cascade score; the same boxes in the same order.

    ``detectMultiScale3`` with ``outputRejectLevels`` keeps only windows that pass every stage and groups them
    as ``detectMultiScale`` does, so the boxes are identical (checked on 400 training frames) at the same cost.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 image, got {gray.shape} {gray.dtype}")
    h, w = gray.shape
    scale = 1.0
    img = gray
    if cfg.max_side and max(h, w) > cfg.max_side:
        scale = cfg.max_side / max(h, w)
        img = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    min_size = max(1, round(cfg.min_size * scale)) if scale < 1 else cfg.min_size
    cascade = load_cascade(cfg.cascade)

    def run(min_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
        found, _, weights = cascade.detectMultiScale3(
            img,
            scaleFactor=cfg.scale_factor,
            minNeighbors=min_neighbors,
            minSize=(min_size, min_size),
            outputRejectLevels=True,
        )
        return np.asarray(found).reshape(-1, 4), np.asarray(weights, np.float64).reshape(-1)

    found, weights = run(cfg.min_neighbors)
    fallback = False
    if len(found) == 0 and cfg.fallback_min_neighbors:
        found, weights = run(cfg.fallback_min_neighbors)
        fallback = True
    dets = [
        Detection(Box(*(round(float(v) / scale) for v in b)), float(s), fallback)
        for b, s in zip(found, weights, strict=True)
    ]
    # detectMultiScale collects candidates from parallel threads, so its raw order varies from run to run;
    # a fixed order (largest face first, then left to right, top to bottom) makes face_index reproducible.
    return sorted(dets, key=lambda d: (-d.box.w * d.box.h, d.box.x, d.box.y))


def match_box(boxes: list[Box], cx: float, cy: float) -> int | None:
    """Index of the box whose centre is nearest to (cx, cy) among boxes that contain it, or None."""
    best, best_d = None, float("inf")
    for i, b in enumerate(boxes):
        if b.contains(cx, cy):
            d = (b.cx - cx) ** 2 + (b.cy - cy) ** 2
            if d < best_d:
                best, best_d = i, d
    return best
