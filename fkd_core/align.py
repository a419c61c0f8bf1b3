"""Second-stage crops: a square aligned to a face's own keypoints (centre, size and in-plane rotation).

The first stage sees a crop cut from the Haar box, so it must learn where the face sits in the box, how big it
is and how it is tilted, as well as its shape. A second NaimishNet (the same layer table) sees a crop whose
centre, scale and rotation come from the first stage's keypoints: the face is upright and in the same place
every time, so what is left to learn is the shape. This is the classic cascade of Sun et al. (CVPR 2013).

Alignment is a similarity (centre, RMS radius, eye-line angle) computed from 68 points; the crop is the
square of side ``side * radius`` around the centre, rotated by the angle, resized to ``size`` pixels.
Coordinates use the pixel-centre convention of OpenCV (pixel ``i`` has centre ``i``), like ``geometry``. The
aligned crop is cut from the canonical crop around the Haar box, in training and at inference alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from fkd_core.augment import jitter_intensity
from fkd_core.geometry import CANONICAL_MARGIN, CANONICAL_SIZE, affine_points, normalise
from fkd_core.types import IMAGE_LEFT_EYE, IMAGE_RIGHT_EYE


@dataclass(frozen=True)
class AlignPolicy:
    """How first-stage keypoints become the second stage's crop, and how training perturbs it.

    ``side``: the crop's side in RMS radii of the keypoints (the keypoints span about 2.7 radii, so about 0.7
    of the crop is face, as in the first stage's crop). The ``*_std`` values are the standard deviations of
    the Gaussian noise added in training to the alignment of the true keypoints, so the second stage learns to
    correct first-stage errors; the defaults are the first stage's errors measured on the validation split
    (centre 0.115 / 0.052 radii in x / y, log-scale 0.050, angle 4.1 degrees; docs/experiments.md).
    """

    side: float = 3.8
    shift_std: float = 0.08  # centre noise per axis, in radii
    scale_std: float = 0.05  # log-scale noise
    rotate_std_deg: float = 4.0
    # Inference runs the second stage this many times, each pass aligned by the last pass's keypoints.
    # Measured on the validation crops: 1 pass 0.0704, 2 passes 0.0693, 3 passes 0.0693 (docs/experiments.md).
    passes: int = 2
    # A pass after the first runs only on the faces whose frame the pass before moved by more than this
    # (``frame_change``); the others keep their keypoints. 0: every face takes every pass. A face whose frame
    # barely moved would get nearly the same crop again, so nearly the same answer (benchmarks/bench_refine.py).
    repeat_above: float = 0.0
    # The canonical crop the aligned crop is cut from (as ingest stores it).
    context_margin: float = CANONICAL_MARGIN
    context_size: int = CANONICAL_SIZE

    def __post_init__(self) -> None:
        if (
            self.passes < 1
            or self.side <= 0
            or self.context_size < 1
            or self.context_margin < 1
            or self.repeat_above < 0
        ):
            raise ValueError(
                f"invalid align policy {self}: passes >= 1, side > 0, context >= 1, repeat_above >= 0 needed"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Alignment:
    """A similarity frame of a face: centre (pixel-centre coordinates), RMS radius, eye-line angle (radians)."""

    cx: float
    cy: float
    radius: float
    angle: float

    def to_array(self) -> np.ndarray:
        return np.array([self.cx, self.cy, self.radius, self.angle])


def alignment_of(keypoints: np.ndarray) -> Alignment:
    """The similarity frame of (68, 2) keypoints."""
    kp = np.asarray(keypoints, np.float64)
    c = kp.mean(axis=0)
    radius = float(np.sqrt(np.mean(np.sum((kp - c) ** 2, axis=1))))
    d = kp[IMAGE_RIGHT_EYE].mean(axis=0) - kp[IMAGE_LEFT_EYE].mean(axis=0)
    angle = float(math.atan2(d[1], d[0]))
    return Alignment(float(c[0]), float(c[1]), max(radius, 1e-3), angle)


def frame_change(a: Alignment, b: Alignment) -> float:
    """How far a face's frame moved from ``a`` to ``b``: the centre's shift in ``b``'s radii, plus the radius' change
    as |log ratio|, plus the eye line's turn in radians."""
    turn = abs((b.angle - a.angle + math.pi) % (2 * math.pi) - math.pi)
    return math.hypot(b.cx - a.cx, b.cy - a.cy) / b.radius + abs(math.log(b.radius / a.radius)) + turn


def perturb(a: Alignment, rng: np.random.Generator, policy: AlignPolicy) -> Alignment:
    """``a`` with Gaussian noise on centre, log-scale and angle (training only)."""
    dx, dy = rng.normal(0.0, policy.shift_std, size=2) * a.radius
    s = math.exp(rng.normal(0.0, policy.scale_std))
    t = math.radians(rng.normal(0.0, policy.rotate_std_deg))
    return Alignment(a.cx + dx, a.cy + dy, a.radius * s, a.angle + t)


def aligned_matrix(a: Alignment, side: float, size: int) -> np.ndarray:
    """(2, 3) affine from source pixels to aligned-crop pixels: the frame's centre lands on the crop's centre,
    the eye line becomes horizontal and ``side * radius`` source pixels span ``size`` crop pixels."""
    k = size / (side * a.radius)
    cos, sin = math.cos(a.angle) * k, math.sin(a.angle) * k
    rot = np.array([[cos, sin], [-sin, cos]])  # rotation by -angle, scaled
    c_dst = (size - 1) / 2.0
    t = np.array([c_dst, c_dst]) - rot @ np.array([a.cx, a.cy])
    return np.hstack([rot, t[:, None]])


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine."""
    return cv2.invertAffineTransform(np.asarray(m, np.float64))


def warp(crop: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """The aligned crop: a canonical crop through ``m`` into ``size`` x ``size`` (zeros beyond it).

    Training and inference both cut the aligned crop from the canonical crop around the Haar box (ingest's
    ``examples.make_example``; ``Predictor.context``), with this one function, so the pixels agree."""
    m = np.asarray(m, np.float64)
    return cv2.warpAffine(crop, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def sample_aligned_batch(
    crops: np.ndarray,
    keypoints: np.ndarray,
    idx: np.ndarray,
    size: int,
    policy: AlignPolicy,
    rng: np.random.Generator | None = None,
    brightness: float = 0.0,
    contrast: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Second-stage inputs (B, 1, S, S) float32 in [0, 1] and targets (B, 136) in [-1, 1] for examples ``idx``.

    ``crops`` (N, C, C) uint8 and ``keypoints`` (N, 68, 2) are canonical crops and their true points. Each crop
    is aligned to its true points, perturbed by ``policy``'s noise when ``rng`` is given (training).
    ``brightness``/``contrast`` jitter the intensities like ``augment.sample_batch`` (with ``rng``).
    """
    n = len(idx)
    x = np.empty((n, 1, size, size), np.float32)
    y = np.empty((n, keypoints.shape[1] * 2), np.float32)
    for j, i in enumerate(idx):
        a = alignment_of(keypoints[i])
        if rng is not None:
            a = perturb(a, rng, policy)
        m = aligned_matrix(a, policy.side, size)
        img = warp(crops[i], m, size).astype(np.float32) * (1.0 / 255.0)
        if rng is not None and (brightness or contrast):
            img = jitter_intensity(img, rng, brightness, contrast)
        x[j, 0] = img
        y[j] = normalise(affine_points(m, keypoints[i].astype(np.float64)), size).reshape(-1)
    return x, y


def refine_passes(
    predict: Callable[[np.ndarray], np.ndarray],
    contexts: np.ndarray,
    keypoints: np.ndarray,
    policy: AlignPolicy,
    size: int,
    trace: list[np.ndarray] | None = None,
    ran: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The refining stage at inference, on canonical crops: up to ``policy.passes`` times, cut from each canonical
    crop the crop aligned to its current keypoints, predict, and map the answer back. After the first pass, only
    the faces whose frame the last pass moved by more than ``policy.repeat_above`` go again.

    ``predict`` maps (N, size, size) uint8 aligned crops to (N, 68, 2) keypoints in aligned-crop pixels;
    ``keypoints`` (N, 68, 2) are the first stage's, in canonical-crop pixels. Returns the refined keypoints
    (N, 68, 2) float64 in canonical-crop pixels and each face's last matrix (canonical -> aligned crop).
    Validation (``train.evaluate_arrays``) and the ``Predictor`` both run this one function. ``trace``, if given,
    receives every face's keypoints (N, 68, 2) after each pass, in canonical-crop pixels (a face that sat a pass
    out keeps its last ones), and ``ran`` the indices of the faces each pass predicted, in ``predict``'s order.
    """
    kp = np.array(keypoints, np.float64)
    mats: list[np.ndarray] = [np.zeros((2, 3))] * len(kp)
    if not len(kp):
        return kp, []
    active = np.arange(len(kp))
    frames: list[Alignment] = []  # the frames the last pass cut its crops along, one per active face
    for p in range(policy.passes):
        if p and policy.repeat_above:
            moved = np.array([frame_change(f, alignment_of(kp[i])) for f, i in zip(frames, active, strict=True)])
            active = active[moved > policy.repeat_above]
        frames = [alignment_of(kp[i]) for i in active]
        if len(active):
            m = [aligned_matrix(f, policy.side, size) for f in frames]
            pred = predict(np.stack([warp(contexts[i], mi, size) for i, mi in zip(active, m, strict=True)]))
            for i, mi, q in zip(active, m, pred, strict=True):
                kp[i], mats[i] = affine_points(invert(mi), q.astype(np.float64)), mi
        if trace is not None:
            trace.append(kp.copy())
        if ran is not None:
            ran.append(active)
    return kp, mats
