"""Keypoint metrics: arrays in, floats out."""

from __future__ import annotations

import numpy as np

from fkd_core.types import FAILURE_NME, IMAGE_LEFT_EYE_OUTER, IMAGE_RIGHT_EYE_OUTER, NOSE_TIP

PROFILE_YAW = (
    0.5  # |yaw| from here on is a profile or strongly turned head (docs/experiments.md, "Frontal and turned faces")
)


def mse(pred_norm: np.ndarray, true_norm: np.ndarray) -> float:
    """Mean squared error of keypoints normalised to [-1, 1] in the model crop."""
    return float(np.mean((np.asarray(pred_norm, np.float64) - np.asarray(true_norm, np.float64)) ** 2))


def interocular(true_xy: np.ndarray) -> np.ndarray:
    """(N, 68, 2) -> (N,) distance between the outer eye corners (points 36 and 45)."""
    t = np.asarray(true_xy, np.float64)
    return np.linalg.norm(t[:, IMAGE_LEFT_EYE_OUTER] - t[:, IMAGE_RIGHT_EYE_OUTER], axis=-1)


def nme_per_face(pred_xy: np.ndarray, true_xy: np.ndarray) -> np.ndarray:
    """(N, 68, 2) predictions and truth in pixels -> (N,) normalised mean error per face."""
    p, t = np.asarray(pred_xy, np.float64), np.asarray(true_xy, np.float64)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"shapes differ or are not (N, K, 2): {p.shape} vs {t.shape}")
    err = np.linalg.norm(p - t, axis=-1).mean(axis=-1)
    iod = interocular(t)
    if np.any(iod <= 0):
        raise ValueError("inter-ocular distance is zero for some face")
    return err / iod


def failure_rate(nme: np.ndarray, threshold: float = FAILURE_NME, unmatched: int = 0) -> float:
    """Share of faces with NME above ``threshold``; ``unmatched`` faces count as failures."""
    n = len(nme) + unmatched
    if n == 0:
        return float("nan")
    return float((np.sum(np.asarray(nme) > threshold) + unmatched) / n)


def summarise(nme: np.ndarray, n_labelled: int, threshold: float = FAILURE_NME) -> dict[str, float]:
    """The end-to-end metrics of docs/design.md for matched faces' NME out of ``n_labelled`` labelled faces."""
    nme = np.asarray(nme, np.float64)
    unmatched = n_labelled - len(nme)
    return {
        "faces": float(n_labelled),
        "detection_rate": len(nme) / n_labelled if n_labelled else float("nan"),
        "nme_mean": float(nme.mean()) if len(nme) else float("nan"),
        "nme_median": float(np.median(nme)) if len(nme) else float("nan"),
        f"fr@{threshold:.2f}": failure_rate(nme, threshold, unmatched),
    }


def yaw(xy: np.ndarray) -> np.ndarray:
    """(N, 68, 2) -> (N,) a yaw proxy: where the nose tip sits between the outer eye corners along the line through
    them, 0 when it is midway (frontal), +-1 when it is in line with one corner (roughly 45-60 degrees of turn),
    beyond that past it. Positive when the nose tip is nearer the image-right corner (point 45: the subject's
    left eye), i.e. the subject has turned to their left. Measured along the eye line, so in-plane tilt (roll)
    does not count as turn."""
    p = np.asarray(xy, np.float64)
    left, right, nose = p[:, IMAGE_LEFT_EYE_OUTER], p[:, IMAGE_RIGHT_EYE_OUTER], p[:, NOSE_TIP]
    axis = right - left
    span = np.maximum(np.linalg.norm(axis, axis=-1), 1e-9)
    along = np.sum((nose - left) * axis, axis=-1) / span  # nose tip's distance from the left corner, on the line
    return (2 * along - span) / span


def by_pose(nme: np.ndarray, yaws: np.ndarray, threshold: float = FAILURE_NME) -> list[dict]:
    """``summarise`` per pose: frontal (|yaw| < PROFILE_YAW) and turned faces (profiles, strongly turned heads).

    ``nme`` and ``yaws`` are per labelled face, ``nme`` NaN where the face was not matched (such faces count as
    failures in their group)."""
    nme = np.asarray(nme, np.float64)
    turned = np.abs(np.asarray(yaws, np.float64)) >= PROFILE_YAW
    matched = np.isfinite(nme)
    rows = []
    for pose, group in (
        (f"frontal (yaw within ±{PROFILE_YAW})", ~turned),
        (f"turned (yaw beyond ±{PROFILE_YAW})", turned),
    ):
        rows.append({"pose": pose, **summarise(nme[group & matched], int(group.sum()), threshold)})
    return rows
