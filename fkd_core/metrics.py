"""Keypoint metrics: arrays in, floats out."""

from __future__ import annotations

import numpy as np

from fkd_core.types import LEFT_EYE_OUTER, RIGHT_EYE_OUTER


def mse(pred_norm: np.ndarray, true_norm: np.ndarray) -> float:
    """Mean squared error of keypoints normalised to [-1, 1] in the model crop."""
    return float(np.mean((np.asarray(pred_norm, np.float64) - np.asarray(true_norm, np.float64)) ** 2))


def interocular(true_xy: np.ndarray) -> np.ndarray:
    """(N, 68, 2) -> (N,) distance between the outer eye corners (points 36 and 45)."""
    t = np.asarray(true_xy, np.float64)
    return np.linalg.norm(t[:, LEFT_EYE_OUTER] - t[:, RIGHT_EYE_OUTER], axis=-1)


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


def failure_rate(nme: np.ndarray, threshold: float = 0.10, unmatched: int = 0) -> float:
    """Share of faces with NME above ``threshold``; ``unmatched`` faces count as failures."""
    n = len(nme) + unmatched
    if n == 0:
        return float("nan")
    return float((np.sum(np.asarray(nme) > threshold) + unmatched) / n)


def summarise(nme: np.ndarray, n_labelled: int, threshold: float = 0.10) -> dict[str, float]:
    """The end-to-end metrics of DESIGN.md for matched faces' NME out of ``n_labelled`` labelled faces."""
    nme = np.asarray(nme, np.float64)
    unmatched = n_labelled - len(nme)
    return {
        "faces": float(n_labelled),
        "detection_rate": len(nme) / n_labelled if n_labelled else float("nan"),
        "nme_mean": float(nme.mean()) if len(nme) else float("nan"),
        "nme_median": float(np.median(nme)) if len(nme) else float("nan"),
        f"fr@{threshold:.2f}": failure_rate(nme, threshold, unmatched),
    }
