"""Haar cascade settings: hit rate on labelled faces, false boxes on photos with known face counts and on
faceless images, and time.

    python benchmarks/bench_haar.py [--n 600]

A labelled face is hit when a box contains its keypoint centroid with a plausible size (the ingest rule).
The photos (obamas 2, the_beatles 4, mona_lisa 1 faces) count boxes beyond the true faces. The faceless
images are the same frames turned a quarter turn (real image statistics, no upright face): the share of them
that get any box is the false-box rate, and their time per image is the cost of a fallback pass, which runs
only on images where the strict pass finds nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from fkd_core.detect import DetectorConfig, detect_faces
from fkd_core.examples import LabelledRow, parse_keypoints_csv, pick_haar_box

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "facial-keypoints"
PHOTOS = {"obamas.jpg": 2, "the_beatles.jpg": 4, "mona_lisa.jpg": 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    args = ap.parse_args()
    with open(DATA / "training_frames_keypoints.csv", newline="") as f:
        rows = [r for r in parse_keypoints_csv(f) if isinstance(r, LabelledRow)]
    rows = [rows[i] for i in np.random.default_rng(0).choice(len(rows), args.n, replace=False)]
    images = [cv2.imread(str(DATA / "training" / r.image_id), cv2.IMREAD_GRAYSCALE) for r in rows]
    photos = {k: cv2.imread(str(ROOT / "data" / "sample" / "photos" / k), cv2.IMREAD_GRAYSCALE) for k in PHOTOS}
    results = []
    faceless = [np.ascontiguousarray(np.rot90(img)) for img in images]
    for scale_factor, min_neighbors, max_side, fallback in [
        (1.05, 4, 1024, 0),
        (1.1, 3, 1024, 0),
        (1.1, 5, 1024, 0),
        (1.2, 3, 1024, 0),
        (1.3, 5, 1024, 0),
        (1.1, 5, 0, 0),
        (1.1, 5, 1024, 3),  # the default
        (1.1, 5, 1024, 2),
    ]:
        cfg = DetectorConfig(
            scale_factor=scale_factor,
            min_neighbors=min_neighbors,
            max_side=max_side,
            fallback_min_neighbors=fallback,
        )
        t0 = time.perf_counter()
        hits = sum(
            pick_haar_box(detect_faces(img, cfg), r.keypoints) is not None for img, r in zip(images, rows, strict=True)
        )
        per_image_ms = 1000 * (time.perf_counter() - t0) / len(rows)
        extra = {k: len(detect_faces(img, cfg)) - PHOTOS[k] for k, img in photos.items()}
        t0 = time.perf_counter()
        false_boxed = sum(bool(detect_faces(img, cfg)) for img in faceless)
        faceless_ms = 1000 * (time.perf_counter() - t0) / len(faceless)
        results.append(
            {
                "scale_factor": scale_factor,
                "min_neighbors": min_neighbors,
                "fallback_min_neighbors": fallback,
                "max_side": max_side,
                "hit_rate": round(hits / len(rows), 4),
                "ms_per_training_image": round(per_image_ms, 2),
                "photo_boxes_minus_faces": extra,
                "faceless_images_with_a_box": round(false_boxed / len(faceless), 4),
                "ms_per_faceless_image": round(faceless_ms, 2),
            }
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
