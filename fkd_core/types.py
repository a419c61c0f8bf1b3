"""Constants and small value types shared by the whole library."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_KEYPOINTS = 68

# iBUG 300-W mirror permutation: index i of a horizontally flipped face takes the point FLIP_PERMUTATION[i]
# of the original (jaw 0<->16, brows 17<->26, nose wings, eyes 36<->45 ..., mouth corners 48<->54 ...).
_PAIRS = (
    [(i, 16 - i) for i in range(8)]
    + [(17 + i, 26 - i) for i in range(5)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)


def _flip_permutation() -> np.ndarray:
    perm = np.arange(NUM_KEYPOINTS)
    for a, b in _PAIRS:
        perm[a], perm[b] = b, a
    return perm


FLIP_PERMUTATION: np.ndarray = _flip_permutation()
FLIP_PERMUTATION.setflags(write=False)

# Landmark indices (iBUG 300-W), all of them here, named by the side of the image they are on in a frontal face:
# the image's left eye is the subject's right (points 36-41).
IMAGE_LEFT_EYE = slice(36, 42)
IMAGE_RIGHT_EYE = slice(42, 48)
IMAGE_LEFT_EYE_OUTER = 36  # the outer eye corners: the inter-ocular distance NME divides by
IMAGE_RIGHT_EYE_OUTER = 45
NOSE_TIP = 30

FAILURE_NME = 0.10  # a face whose NME is above this is a failure (FR@0.10; ``quality`` is P(NME > this))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in image pixels: top-left corner and size."""

    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    def contains(self, px: float, py: float) -> bool:
        return self.x <= px <= self.x + self.w and self.y <= py <= self.y + self.h
