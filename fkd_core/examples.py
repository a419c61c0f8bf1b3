"""Training examples: CSV parsing and validation, splits, detector-consistent crops.

Pure functions over in-memory values; the ingest flow does the I/O.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from fkd_core.detect import match_box
from fkd_core.errors import RowError
from fkd_core.geometry import (
    CANONICAL_MARGIN,
    CANONICAL_SIZE,
    CropPolicy,
    canonical_square,
    crop_square,
    keypoint_extent_box,
)
from fkd_core.types import NUM_KEYPOINTS, Box

# A point more than this fraction of the image size outside the image is refused as "far outside".
OUTSIDE_TOLERANCE = 0.10


@dataclass(frozen=True)
class LabelledRow:
    """One valid CSV row: the file it names and its (68, 2) keypoints in image pixels."""

    row_number: int  # 1-based line number in the CSV, header included
    image_id: str
    keypoints: np.ndarray


def parse_keypoints_csv(lines: Iterable[str], source: str = "csv") -> Iterator[LabelledRow | RowError]:
    """Stream a keypoints CSV (header, then ``name, x0, y0, ... x67, y67``); yields rows or row errors."""
    reader = csv.reader(lines)
    expected = 1 + 2 * NUM_KEYPOINTS
    try:
        header = next(reader)
    except StopIteration:
        raise RowError(f"{source}: empty file (no header row)") from None
    if len(header) != expected:
        raise RowError(f"{source} row 1: header has {len(header)} columns, expected {expected}")
    for n, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != expected:
            yield RowError(f"{source} row {n}: {len(row)} columns, expected {expected}")
            continue
        name = row[0].strip()
        if not name:
            yield RowError(f"{source} row {n}: empty image name")
            continue
        if name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name):
            yield RowError(f"{source} row {n}: image name {name!r} leads out of the images directory")
            continue
        try:
            values = np.array([float(c) for c in row[1:]], dtype=np.float64)
        except ValueError:
            bad = next(i for i, c in enumerate(row[1:], start=1) if not _is_float(c))
            yield RowError(f"{source} row {n}: column {bad} is not a number: {row[bad]!r}")
            continue
        if not np.all(np.isfinite(values)):
            yield RowError(f"{source} row {n}: non-finite keypoint value")
            continue
        yield LabelledRow(n, name, values.reshape(NUM_KEYPOINTS, 2))


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def check_inside(keypoints: np.ndarray, width: int, height: int, tolerance: float = OUTSIDE_TOLERANCE) -> str | None:
    """Reason string if any keypoint lies far outside a ``width`` x ``height`` image, else None."""
    lo = -tolerance * np.array([width, height])
    hi = (1 + tolerance) * np.array([width, height])
    bad = np.any((keypoints < lo) | (keypoints > hi), axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        return (
            f"keypoint {i} at ({keypoints[i, 0]:.1f}, {keypoints[i, 1]:.1f}) is far outside the {width}x{height} image"
        )
    return None


_PERSON_RE = re.compile(r"^(.*?)_\d+$")


def person_of(image_id: str) -> str:
    """``Person_Name_NN.jpg`` -> ``Person_Name`` (frames of one person share it)."""
    stem = image_id.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    m = _PERSON_RE.match(stem)
    return m.group(1) if m else stem


def assign_split(image_id: str, by: str = "person", val_fraction: float = 0.15, seed: int = 0) -> str:
    """Deterministic ``train``/``val`` split by hashing the person (or the frame) with a seed."""
    if by not in ("person", "frame"):
        raise ValueError(f"split_by must be 'person' or 'frame', got {by!r}")
    key = person_of(image_id) if by == "person" else image_id
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return "val" if (h / 2**64) < val_fraction else "train"


def pick_haar_box(boxes: list[Box], keypoints: np.ndarray, ratio_range: tuple[float, float] = (0.6, 1.6)) -> Box | None:
    """The detector box belonging to a labelled face, or None if the detector missed it.

    Same rule as evaluation (the box must contain the keypoint centroid; nearest centre wins), plus a size
    sanity check: a box whose side is not within ``ratio_range`` of the keypoints' extent is a false match.
    """
    cx, cy = keypoints.mean(axis=0)
    i = match_box(boxes, float(cx), float(cy))
    if i is None:
        return None
    b = boxes[i]
    _, _, kw, kh = keypoint_extent_box(keypoints)
    r = max(kw, kh) / max(b.w, b.h)
    return b if ratio_range[0] <= r <= ratio_range[1] else None


@dataclass
class BoxMapping:
    """Linear map from the keypoints' extent to a detector-like box, fitted where both exist.

    Predicts ``(box_cx - kp_cx, box_cy - kp_cy, box_side)`` from ``(kp_w, kp_h, 1)``. The defaults were fitted
    on the full training set and are used when too few pairs are available to fit.
    """

    # rows: features (kp_w, kp_h, 1); columns: targets (dx, dy, side). Fitted on 3412 training images.
    coef: np.ndarray = field(
        default_factory=lambda: np.array(
            [[0.077802, 0.009331, 0.544519], [-0.076121, -0.202242, 0.576632], [-0.755175, 0.149839, 4.160697]]
        )
    )
    n_fitted: int = 0

    @classmethod
    def fit(cls, kp_boxes: np.ndarray, det_boxes: np.ndarray, min_pairs: int = 20) -> BoxMapping:
        """``kp_boxes`` (N, 4) as (cx, cy, w, h) of keypoints; ``det_boxes`` (N, 4) as (x, y, w, h)."""
        if len(kp_boxes) < min_pairs:
            return cls()
        kp, db = np.asarray(kp_boxes, np.float64), np.asarray(det_boxes, np.float64)
        side = np.maximum(db[:, 2], db[:, 3])
        y = np.stack([db[:, 0] + db[:, 2] / 2 - kp[:, 0], db[:, 1] + db[:, 3] / 2 - kp[:, 1], side], axis=1)
        x = np.stack([kp[:, 2], kp[:, 3], np.ones(len(kp))], axis=1)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return cls(coef=coef, n_fitted=len(kp))

    def box_for(self, keypoints: np.ndarray) -> Box:
        cx, cy, w, h = keypoint_extent_box(keypoints)
        dx, dy, side = np.array([w, h, 1.0]) @ self.coef
        side = max(float(side), 1.0)
        return Box(cx + dx - side / 2, cy + dy - side / 2, side, side)

    def to_dict(self) -> dict:
        return {"coef": np.round(self.coef, 6).tolist(), "n_fitted": self.n_fitted}


@dataclass(frozen=True)
class Example:
    """A canonical crop and its keypoints in crop pixels."""

    crop: np.ndarray  # (C, C) uint8
    keypoints: np.ndarray  # (68, 2) float32, canonical-crop pixels


def make_example(
    gray: np.ndarray,
    keypoints: np.ndarray,
    box: Box,
    policy: CropPolicy = CropPolicy(),
    size: int = CANONICAL_SIZE,
    margin: float = CANONICAL_MARGIN,
) -> Example:
    """Crop the canonical region around ``box`` with the one crop function and map the keypoints into it."""
    crop, t = crop_square(gray, canonical_square(box, policy, margin), size)
    return Example(crop, t.to_crop(keypoints).astype(np.float32))
