"""How far to trust each face: the signals the pipeline already has, and two small heads that read them.

Every face the pipeline annotates gets four trust columns (docs/design.md, "Trust per face"):

- ``det_score``: the Haar cascade's level weight for the box (``detect.Detection.score``).
- ``yaw``: the head turn read off the predicted keypoints (:func:`fkd_core.metrics.yaw`): 0 frontal, +-1 with
  the nose tip in line with an outer eye corner, measured along the eye line so in-plane tilt does not count.
- ``face_prob``: the probability that the box holds a face at all.
- ``quality``: the expected error of the keypoints, as the probability that the face's NME exceeds 0.10
  (lower is better).

The two probabilities come from logistic heads over the same inputs: the scalar signals of :data:`SIGNALS`
and both stages' last hidden layers (the 1000 features before each keypoint output; the refining stage's of
its last pass). The heads are fitted by ``benchmarks/fit_trust.py`` and travel in the checkpoint (``trust.*`` tensors).
Pure numpy: the heads cost one dot product per face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fkd_core.metrics import yaw as yaw_of
from fkd_core.netspec import DENSE_WIDTH
from fkd_core.types import IMAGE_LEFT_EYE, IMAGE_RIGHT_EYE, NUM_KEYPOINTS, Box

TRUST_PREFIX = "trust."  # tensor names of the heads in a checkpoint

# The scalar signals, in the heads' input order. Distances are in RMS radii of the face's final keypoints.
SIGNALS = (
    "det_score",  # the detector's score: the cascade's level weight, or YuNet's confidence (heads are per detector)
    "fallback",  # 1 when the box came from the detector's looser fallback pass
    "log_size",  # log of the box side over the image's shorter side
    "log_faces",  # log(1 + boxes in the image)
    "stage_gap",  # mean point distance between the first stage's and the final keypoints
    "pass_gap",  # mean point distance between the last two refining passes (0 with one pass)
    "abs_yaw",  # |yaw|
    "roll",  # |eye-line angle|, radians
    "shape_residual",  # RMS distance to the training mean shape after a similarity fit
    "iod_ratio",  # outer-eye-corner distance over the radius (small for profiles)
    "spread",  # radius over the box side
    "offset_x",  # keypoint centroid minus box centre, over the box side
    "offset_y",
)


def inputs(sig: np.ndarray, first: np.ndarray, refine: np.ndarray) -> np.ndarray:
    """The heads' input rows: the scalar signals, the first stage's and the refining stage's hidden features."""
    return np.concatenate([sig, first.astype(np.float64), refine.astype(np.float64)], axis=1)


def eye_line_angle(kps: np.ndarray) -> np.ndarray:
    """(N, 68, 2) -> (N,) the angle of the line through the two eye centres, radians (0 upright)."""
    d = kps[:, IMAGE_RIGHT_EYE].mean(axis=1) - kps[:, IMAGE_LEFT_EYE].mean(axis=1)
    return np.arctan2(d[:, 1], d[:, 0])


def similarity_residual(kps: np.ndarray, mean_shape: np.ndarray) -> np.ndarray:
    """(N, 68, 2) -> (N,) RMS distance of each shape to ``mean_shape`` after the best similarity fit, in radii."""
    x = kps - kps.mean(axis=1, keepdims=True)
    r = np.sqrt((x**2).sum(axis=2).mean(axis=1))
    x = x / np.maximum(r, 1e-9)[:, None, None]
    m = mean_shape - mean_shape.mean(axis=0)
    m = m / math.sqrt((m**2).sum(axis=1).mean())
    # complex-number Procrustes: the similarity z -> a z best mapping m onto x
    zx = x[..., 0] + 1j * x[..., 1]
    zm = m[:, 0] + 1j * m[:, 1]
    a = (zx @ zm.conj()) / (zm @ zm.conj()).real
    res = zx - a[:, None] * zm[None]
    return np.sqrt((np.abs(res) ** 2).mean(axis=1))


def signals(
    first: np.ndarray,
    passes: list[np.ndarray],
    boxes: list[Box],
    scores: np.ndarray,
    fallback: np.ndarray,
    image_sides: np.ndarray,
    faces_in_image: np.ndarray,
    mean_shape: np.ndarray,
) -> np.ndarray:
    """(N, len(SIGNALS)) float64 scalar signals of N faces.

    ``first``: first-stage keypoints (N, 68, 2) in image pixels; ``passes``: each refining pass's keypoints in
    image pixels, the last being the answer (empty without a refining stage, when the first stage is the answer).
    ``scores`` NaN (a box given by the caller) is read as the median level weight of faces, 6.8.
    """
    final = passes[-1] if passes else first
    n = len(final)
    c = final.mean(axis=1)
    r = np.maximum(np.sqrt(((final - c[:, None]) ** 2).sum(axis=2).mean(axis=1)), 1e-6)
    side = np.array([b.w for b in boxes], np.float64).reshape(n)
    centre = np.array([[b.cx, b.cy] for b in boxes], np.float64).reshape(n, 2)

    def gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.norm(a - b, axis=2).mean(axis=1) / r

    cols = {
        "det_score": np.where(np.isfinite(scores), scores, 6.8),
        "fallback": fallback.astype(np.float64),
        "log_size": np.log(np.maximum(side, 1.0) / np.maximum(image_sides, 1.0)),
        "log_faces": np.log1p(faces_in_image),
        "stage_gap": gap(first, final),
        "pass_gap": gap(passes[-2], passes[-1]) if len(passes) >= 2 else np.zeros(n),
        "abs_yaw": np.abs(yaw_of(final)),
        "roll": np.abs(eye_line_angle(final)),
        "shape_residual": similarity_residual(final, mean_shape),
        "iod_ratio": np.linalg.norm(final[:, 36] - final[:, 45], axis=1) / r,
        "spread": r / np.maximum(side, 1.0),
        "offset_x": (c[:, 0] - centre[:, 0]) / np.maximum(side, 1.0),
        "offset_y": (c[:, 1] - centre[:, 1]) / np.maximum(side, 1.0),
    }
    return np.stack([np.asarray(cols[k], np.float64).reshape(n) for k in SIGNALS], axis=1)


@dataclass(frozen=True)
class Head:
    """A logistic head over :func:`inputs`: ``sigmoid(w . [signals, first features, refining features] + b)``."""

    weight: np.ndarray  # (len(SIGNALS) + 2000,)
    bias: float

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(z @ self.weight + self.bias, -40, 40)))


@dataclass(frozen=True)
class TrustHeads:
    """The fitted heads and the mean shape their ``shape_residual`` signal compares with.

    Both heads read the raw :func:`inputs`: any standardisation or projection used in fitting is folded into their
    weights. ``face`` is shifted so that its default threshold is 0.5.
    """

    mean_shape: np.ndarray  # (68, 2), unit RMS radius
    face: Head
    quality: Head
    face_threshold: float  # the default: keep faces with face_prob >= this (0.5 by construction)

    def __call__(self, sig: np.ndarray, first: np.ndarray, refine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(face_prob, quality), each (N,), for N faces' signals and both stages' hidden features."""
        z = inputs(sig, first, refine)
        return self.face(z), self.quality(z)

    def to_tensors(self, prefix: str = TRUST_PREFIX) -> dict[str, np.ndarray]:
        """The heads as checkpoint tensors named ``<prefix>face.weight`` ...: the checkpoint's own detector's heads
        under ``trust.``, another detector's under ``trust.<detector>.``."""
        return {
            prefix + "mean_shape": self.mean_shape,
            prefix + "face.weight": self.face.weight,
            prefix + "face.bias": np.array([self.face.bias]),
            prefix + "quality.weight": self.quality.weight,
            prefix + "quality.bias": np.array([self.quality.bias]),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], face_threshold: float, prefix: str = TRUST_PREFIX) -> TrustHeads:
        def g(k: str) -> np.ndarray:
            return np.asarray(t[prefix + k], np.float64)

        width = len(SIGNALS) + 2 * DENSE_WIDTH
        shapes = {"mean_shape": (NUM_KEYPOINTS, 2), "face.weight": (width,), "quality.weight": (width,)}
        shapes |= {"face.bias": (1,), "quality.bias": (1,)}
        for k, shape in shapes.items():
            if prefix + k not in t or g(k).shape != shape:
                got = g(k).shape if prefix + k in t else "missing"
                raise ValueError(f"trust head tensor {prefix + k}: expected shape {shape}, got {got}")
        return cls(
            g("mean_shape"),
            Head(g("face.weight"), float(g("face.bias")[0])),
            Head(g("quality.weight"), float(g("quality.bias")[0])),
            face_threshold,
        )


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count a half); NaN without both classes."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def risk_coverage(risk: np.ndarray, failed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keeping faces in order of lowest ``risk`` first: coverage (share kept) and failure rate among the kept."""
    order = np.argsort(np.asarray(risk, np.float64), kind="mergesort")
    f = np.asarray(failed, np.float64)[order]
    kept = np.arange(1, len(f) + 1)
    return kept / max(len(f), 1), np.cumsum(f) / kept


def failure_rate_at(risk: np.ndarray, failed: np.ndarray, coverage: float) -> float:
    """Failure rate among the ``coverage`` share of faces with the lowest ``risk``."""
    if len(risk) == 0:
        return float("nan")
    k = max(1, int(round(coverage * len(risk))))
    order = np.argsort(np.asarray(risk, np.float64), kind="mergesort")[:k]
    return float(np.mean(np.asarray(failed, bool)[order]))
