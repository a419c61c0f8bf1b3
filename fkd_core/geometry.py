"""The one crop function, its inverse, and keypoint transforms.

Every crop in fkd, at ingestion, training and inference, is made by :func:`crop_square`: a square region of
the image (padded with zeros beyond the borders) resized to ``size`` pixels. Its transform is
``crop = image * scale + offset`` per axis, so keypoints map both ways exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from fkd_core.types import FLIP_PERMUTATION, Box


@dataclass(frozen=True)
class CropPolicy:
    """How a detector box becomes the model's square crop.

    ``scale`` multiplies the box's longer side; ``shift_y`` moves the centre down by that fraction of the box
    height (Haar boxes sit high on the face: the chin lies below them). Measured on the training set: the
    keypoints span about 0.88 of the Haar box side and their centre sits 0.12 box heights below its centre.
    1.3 leaves the face about two thirds of the crop (a model trained with 1.5 scored worse, docs/experiments.md).
    Checkpoints carry the policy they were trained with; this default is what ingest uses.
    """

    scale: float = 1.3
    shift_y: float = 0.12


@dataclass(frozen=True)
class Square:
    """A square region in image pixels (top-left and side), possibly beyond the image borders."""

    x0: float
    y0: float
    side: float


@dataclass(frozen=True)
class CropTransform:
    """Maps image pixels to crop pixels: ``crop = image * scale + offset``."""

    scale: float
    offset_x: float
    offset_y: float

    def to_crop(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) image pixels -> crop pixels."""
        return xy * self.scale + np.array([self.offset_x, self.offset_y], dtype=np.float64)

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) crop pixels -> image pixels."""
        return (xy - np.array([self.offset_x, self.offset_y], dtype=np.float64)) / self.scale


def square_from_box(box: Box, policy: CropPolicy = CropPolicy()) -> Square:
    """The crop square for a detector box under ``policy``."""
    side = policy.scale * max(box.w, box.h)
    cx = box.cx
    cy = box.cy + policy.shift_y * box.h
    return Square(cx - side / 2, cy - side / 2, side)


def enlarge(square: Square, factor: float) -> Square:
    """The same square scaled about its centre."""
    side = square.side * factor
    cx, cy = square.x0 + square.side / 2, square.y0 + square.side / 2
    return Square(cx - side / 2, cy - side / 2, side)


def crop_transform(square: Square, size: int) -> CropTransform:
    # Pixel centres: image pixel i covers [i, i+1) and has centre i + 0.5; the square's edge x0 maps to 0 and
    # x0 + side to `size`, so a point at image coordinate x lands at (x + 0.5 - x0) * s - 0.5 in the crop.
    s = size / square.side
    return CropTransform(s, (0.5 - square.x0) * s - 0.5, (0.5 - square.y0) * s - 0.5)


def crop_square(gray: np.ndarray, square: Square, size: int) -> tuple[np.ndarray, CropTransform]:
    """Cut ``square`` out of ``gray`` (zero padding outside the image) and resize it to ``size`` x ``size``."""
    t = crop_transform(square, size)
    h, w = gray.shape[:2]
    # Work on the part of the image under the square only, so a face in a large photo costs the same as one
    # in a small photo.
    x_lo, y_lo = max(0, int(np.floor(square.x0))), max(0, int(np.floor(square.y0)))
    x_hi = min(w, int(np.ceil(square.x0 + square.side)) + 1)
    y_hi = min(h, int(np.ceil(square.y0 + square.side)) + 1)
    if x_hi <= x_lo or y_hi <= y_lo:
        return np.zeros((size, size), dtype=gray.dtype), t
    src = gray[y_lo:y_hi, x_lo:x_hi]
    # Downscaling by warpAffine alone aliases; pre-shrink with INTER_AREA when the square is much larger.
    pre_x = pre_y = 1.0
    shrink = square.side / size
    if shrink >= 2.0:
        f = 1.0 / np.floor(shrink)
        sh, sw = src.shape[:2]
        small = cv2.resize(src, (max(1, round(sw * f)), max(1, round(sh * f))), interpolation=cv2.INTER_AREA)
        pre_x, pre_y = small.shape[1] / sw, small.shape[0] / sh
        src = small
    # Source pixel u (after the pre-shrink) sits at sub-image coordinate (u + 0.5) / pre - 0.5, i.e. image
    # coordinate x = (u + 0.5) / pre - 0.5 + x_lo; compose with `t` so the pixels agree with the keypoints.
    m = np.array(
        [
            [t.scale / pre_x, 0.0, t.offset_x + t.scale * (0.5 / pre_x - 0.5 + x_lo)],
            [0.0, t.scale / pre_y, t.offset_y + t.scale * (0.5 / pre_y - 0.5 + y_lo)],
        ]
    )
    crop = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, t


def keypoint_extent_box(keypoints: np.ndarray) -> tuple[float, float, float, float]:
    """(cx, cy, w, h) of the keypoints' bounding box."""
    lo, hi = keypoints.min(axis=0), keypoints.max(axis=0)
    c = (lo + hi) / 2
    return float(c[0]), float(c[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])


def flip_horizontal(img: np.ndarray, keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an image and its (68, 2) keypoints (pixel-centre convention), relabelling left and right."""
    w = img.shape[1]
    flipped = keypoints.copy()
    flipped[:, 0] = (w - 1) - flipped[:, 0]
    return np.ascontiguousarray(img[:, ::-1]), flipped[FLIP_PERMUTATION]


def affine_points(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (N, 2) points."""
    return xy @ m[:, :2].T + m[:, 2]


def normalise(xy_crop: np.ndarray, size: int) -> np.ndarray:
    """Crop pixels -> [-1, 1] (pixel centres of the crop edge map to +-(1 - 1/size))."""
    return (xy_crop + 0.5) / size * 2.0 - 1.0


def denormalise(xy_norm: np.ndarray, size: int) -> np.ndarray:
    """[-1, 1] -> crop pixels; the inverse of :func:`normalise`."""
    return (xy_norm + 1.0) / 2.0 * size - 0.5


# The canonical crop stored at ingestion covers CANONICAL_MARGIN times the model's crop square, so training
# can jitter scale and shift without running out of pixels; its size makes the inner square exactly 96 px.
# Ingest cuts it, training samples the model's crop from it, inference cuts it again (predict, align).
CANONICAL_MARGIN = 1.5
CANONICAL_SIZE = 144


def canonical_square(box: Box, policy: CropPolicy = CropPolicy(), margin: float = CANONICAL_MARGIN) -> Square:
    """The region stored at ingestion: the model's crop square, enlarged by ``margin``."""
    return enlarge(square_from_box(box, policy), margin)


def inner_fraction(margin: float = CANONICAL_MARGIN) -> float:
    """Side of the model's crop square as a fraction of the canonical crop."""
    if not math.isfinite(margin) or margin < 1:
        raise ValueError("margin must be >= 1")
    return 1.0 / margin
