"""Training-time sampling of model inputs from canonical crops, with augmentation.

Without augmentation the sampled input is exactly the inference crop (same square, same size), so the model
is trained on what it sees at inference; augmentation jitters that square like a noisy detector would.
"""

from __future__ import annotations

import cv2
import numpy as np

from fkd_core.geometry import affine_points, flip_horizontal, normalise
from fkd_core.recipe import AugmentConfig


def sample_matrix(
    canonical_size: int, inner: float, size: int, rng: np.random.Generator | None, aug: AugmentConfig
) -> np.ndarray:
    """(2, 3) affine from canonical-crop pixels to model-input pixels (pixel-centre convention)."""
    c_src = (canonical_size - 1) / 2.0
    c_dst = (size - 1) / 2.0
    side = canonical_size * inner
    theta, s, dx, dy = 0.0, 1.0, 0.0, 0.0
    if rng is not None:
        s = 1.0 + rng.uniform(-aug.scale, aug.scale)
        dx, dy = rng.uniform(-aug.shift, aug.shift, size=2) * side
        theta = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    k = size / (side * s)
    cos, sin = np.cos(theta) * k, np.sin(theta) * k
    a = np.array([[cos, -sin], [sin, cos]])
    centre = np.array([c_src + dx, c_src + dy])
    t = np.array([c_dst, c_dst]) - a @ centre
    return np.hstack([a, t[:, None]])


def jitter_intensity(img: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float) -> np.ndarray:
    """``img`` in [0, 1] with contrast x U(1 - contrast, 1 + contrast) about 0.5 and brightness + U(+-brightness)."""
    a = 1.0 + rng.uniform(-contrast, contrast)
    b = rng.uniform(-brightness, brightness)
    return np.clip((img - 0.5) * a + 0.5 + b, 0.0, 1.0)


def sample_batch(
    crops: np.ndarray,
    keypoints: np.ndarray,
    idx: np.ndarray,
    size: int,
    inner: float,
    rng: np.random.Generator | None = None,
    aug: AugmentConfig = AugmentConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (B, 1, S, S) float32 in [0, 1] and targets (B, 136) in [-1, 1] for examples ``idx``.

    ``crops`` is (N, C, C) uint8 and ``keypoints`` (N, 68, 2) in canonical-crop pixels. ``rng=None`` gives the
    un-augmented inference crop.
    """
    n, c = len(idx), crops.shape[1]
    x = np.empty((n, 1, size, size), np.float32)
    y = np.empty((n, keypoints.shape[1] * 2), np.float32)
    for j, i in enumerate(idx):
        m = sample_matrix(c, inner, size, rng, aug)
        img = cv2.warpAffine(crops[i], m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        kp = affine_points(m, keypoints[i].astype(np.float64))
        img = img.astype(np.float32) * (1.0 / 255.0)
        if rng is not None:
            if rng.random() < aug.flip:
                img, kp = flip_horizontal(img, kp)
            if aug.contrast or aug.brightness:
                img = jitter_intensity(img, rng, aug.brightness, aug.contrast)
        x[j, 0] = img
        y[j] = normalise(kp, size).reshape(-1)
    return x, y
