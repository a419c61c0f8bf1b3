"""What each detector path finds and how well it annotates: this checkout's paths, and another checkout's, in one run.

    python benchmarks/bench_detectors.py [--detectors haar yunet] [--code-root ../other-checkout]

For each path (a checkout with its own shipped model, and a detector) in a child process of its own:

- the person-grouped validation split (546 frames of 53 people training never saw): labelled faces found, other
  boxes on those frames (false boxes: each frame holds one face), mean and median NME over the matched faces,
  FR@0.10 (a missed face counts as a failure), and the AUROC of ``quality`` for NME > 0.10 (the shipped heads were
  fitted on these people's faces too, so this AUROC is in-sample; ``fit_trust.py``'s report has the
  cross-validated one);
- the same frames turned a quarter and three quarters (no upright face): boxes found, and how many of them
  ``face_prob`` keeps at 0.5;
- the three photos (4, 2 and 1 faces): boxes found per photo.

Images come from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
PHOTOS = {"the_beatles": 4, "obamas": 2, "mona_lisa": 1}


def measure(detector: str | None) -> dict:
    import cv2
    import numpy as np

    import fkd_core
    from fkd_core.evaluate import evaluate_rows
    from fkd_core.examples import LabelledRow, assign_split, parse_keypoints_csv
    from fkd_core.metrics import summarise
    from fkd_core.predict import Predictor
    from fkd_core.storage import read_under
    from fkd_core.trust import auroc

    pred = Predictor.from_checkpoint(detector=detector) if detector else Predictor.from_checkpoint()
    with open(DATA / "facial-keypoints" / "training_frames_keypoints.csv", newline="") as f:
        rows = [r for r in parse_keypoints_csv(f) if isinstance(r, LabelledRow)]
    val = [r for r in rows if assign_split(r.image_id, "person", 0.15, 0) == "val"]
    images = str(DATA / "facial-keypoints" / "training")
    res = evaluate_rows(val, read_under(images, [r.image_id for r in val]), pred)
    matched = [r for r in res if r.status == "matched"]
    nme = np.array([r.nme for r in matched])
    out = {"model_id": pred.model_id, "code": fkd_core.__file__, "val": summarise(nme, len(res))}
    out["val"]["false_boxes"] = int(sum(r.n_detected for r in res) - len(matched))
    quality = [r.face.quality for r in matched]
    if all(q is not None for q in quality):
        out["val"]["quality_auroc_in_sample"] = round(auroc(np.array(quality), nme > 0.10), 4)
    grays = [cv2.imread(os.path.join(images, r.image_id), cv2.IMREAD_GRAYSCALE) for r in val]
    turned = [np.ascontiguousarray(np.rot90(g, k)) for g in grays for k in (1, 3)]
    faces = [f for batch in range(0, len(turned), 128) for fs in pred.predict(turned[batch : batch + 128]) for f in fs]
    out["turned"] = {
        "images": len(turned),
        "boxes": len(faces),
        "kept_by_face_prob": sum(f.face_prob is not None and f.face_prob >= 0.5 for f in faces),
    }
    photos = {}
    for name, want in PHOTOS.items():
        found = pred.predict([cv2.imread(str(DATA / "photos" / f"{name}.jpg"), cv2.IMREAD_GRAYSCALE)])[0]
        photos[name] = {"faces": want, "boxes": len(found), "kept_by_face_prob": sum(
            f.face_prob is not None and f.face_prob >= 0.5 for f in found)}  # fmt: skip
    out["photos"] = photos
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--detectors", nargs="+", default=["haar", "yunet"])
    ap.add_argument("--code-root", default=None, help="also measure another checkout (its default path)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child or None)))
        return
    paths = [(ROOT, d) for d in args.detectors]
    if args.code_root:
        paths.insert(0, (Path(args.code_root).resolve(), ""))
    report = {}
    for root, det in paths:
        env = {k: v for k, v in os.environ.items() if k not in ("FKD_MODEL", "FKD_DETECTOR")} | {
            "PYTHONPATH": str(root)
        }
        proc = subprocess.run(
            [sys.executable, __file__, "--child", det], capture_output=True, text=True, cwd=root, env=env
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        if not doc.pop("code").startswith(str(root)):
            raise SystemExit(f"{root}: its child ran another checkout's fkd_core")
        report[f"{'other' if root != ROOT else 'this'} {det or 'default'}"] = doc
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
