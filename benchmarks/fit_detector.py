"""Fit another face detector into a checkpoint: the map from its boxes to the boxes the model was trained on.

    python benchmarks/fit_detector.py [--model M] [--detector yunet] [--out models] [--write] [--force]

The model learnt where a face sits in the boxes of the detector that cut its training crops (the Haar cascade for
the shipped model). Another detector's boxes sit elsewhere on a face (YuNet's are taller than wide and lower), so
its crops would not be the ones training saw. On the training people's labelled frames (the checkpoint's split;
the validation people are left for scoring), each frame's labelled face is found by both detectors, as ingest
would pick it (``examples.pick_haar_box`` for the trained detector; the other's box around the keypoints'
centroid), and a linear map from the other detection to (centre offset, side) of the trained detector's box is
fitted by least squares (``detect.DetectorMapping``: from its box and landmarks, in units of its size). The report
gives how far the mapped boxes land from the real ones on the validation people, against how far two boxes of the
trained detector itself land on the same face in the same frame flipped (its own noise). Where the detector gives
landmarks, a linear map from them to the 68 points is fitted too (``detect.LandmarkStart``): the refining stage
starts from it, so its faces skip the first stage. With ``--write`` the checkpoint
is written again under ``--out`` with that detector (its settings and mapping) in its ``detectors`` section; fit its
trust heads next (``benchmarks/fit_trust.py --detector``). Images come from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fkd_core.checkpoint import DEFAULT_MODEL, AlternateDetector, load_checkpoint, repack, write_checkpoint
from fkd_core.detect import DETECTORS, DetectorMapping, LandmarkStart, detect, match_box
from fkd_core.examples import LabelledRow, assign_split, parse_keypoints_csv, pick_haar_box
from fkd_core.geometry import flip_horizontal
from fkd_core.image_io import decode_gray
from fkd_core.metrics import nme_per_face
from fkd_core.types import Box

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "facial-keypoints"


def pairs(rows: list[LabelledRow], own, other) -> dict:
    """For each row whose face both detectors find: the other detector's box as (cx, cy, w, h) (``src``) and the
    trained detector's as (x, y, w, h) (``dst``), with the trained detector's box on the frame mirrored, mirrored
    back (``mirror``, as (cx, cy, w, h): its own noise); and how many faces each found."""
    out: dict = {"src": [], "dst": [], "mirror": [], "own": 0, "other": 0, "landmarks": [], "keypoints": []}

    def work(r: LabelledRow):
        gray = decode_gray((DATA / "training" / r.image_id).read_bytes()).gray
        mine = pick_haar_box([d.box for d in detect(gray, own)], r.keypoints)
        flipped = flip_horizontal(gray, r.keypoints)
        seen = pick_haar_box([d.box for d in detect(flipped[0], own)], flipped[1])
        if seen is not None:
            seen = Box(gray.shape[1] - seen.x - seen.w, seen.y, seen.w, seen.h)
        theirs = detect(gray, other)
        cx, cy = r.keypoints.mean(axis=0)
        i = match_box([d.box for d in theirs], float(cx), float(cy))
        return mine, seen, (theirs[i] if i is not None else None)

    with ThreadPoolExecutor(2) as pool:
        for r, (mine, seen, theirs) in zip(rows, pool.map(work, rows), strict=True):
            out["own"] += mine is not None
            out["other"] += theirs is not None
            if theirs is not None and theirs.landmarks is not None:
                out["landmarks"].append(np.reshape(theirs.landmarks, (5, 2)))
                out["keypoints"].append(r.keypoints)
            if mine is not None and theirs is not None and seen is not None:
                out["src"].append(theirs)
                out["dst"].append((mine.x, mine.y, mine.w, mine.h))
                out["mirror"].append((seen.cx, seen.cy, seen.w, seen.h))
    return out | {k: np.array(out[k], np.float64).reshape(-1, 4) for k in ("dst", "mirror")}


def errors(mapped: np.ndarray, dst: np.ndarray) -> dict:
    """How far boxes (cx, cy, side) land from the trained detector's: centre and side, in its box sides."""
    side = np.maximum(dst[:, 2], dst[:, 3])
    centre = np.hypot(mapped[:, 0] - (dst[:, 0] + dst[:, 2] / 2), mapped[:, 1] - (dst[:, 1] + dst[:, 3] / 2)) / side
    scale = np.abs(np.log(mapped[:, 2] / side))
    return {
        "faces": len(mapped),
        "centre_error_mean": round(float(centre.mean()), 4),
        "centre_error_p90": round(float(np.quantile(centre, 0.9)), 4),
        "log_side_error_mean": round(float(scale.mean()), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--detector", default="yunet", choices=sorted(DETECTORS))
    ap.add_argument("--out", default="models")
    ap.add_argument("--write", action="store_true", help="write the checkpoint with the detector under --out")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    loaded = load_checkpoint(args.model)
    other = DETECTORS[args.detector]()
    with open(DATA / "training_frames_keypoints.csv", newline="") as f:
        rows = [r for r in parse_keypoints_csv(f) if isinstance(r, LabelledRow)]
    split = (loaded.meta.get("data") or {}).get("split") or {"split_by": "person", "val_fraction": 0.15, "seed": 0}
    by_split: dict[str, list[LabelledRow]] = {"train": [], "val": []}
    for r in rows:
        by_split[assign_split(r.image_id, split["split_by"], split.get("val_fraction", 0.15), split["seed"])].append(r)
    t0 = time.perf_counter()
    found = {k: pairs(v, loaded.detector, other) for k, v in by_split.items()}
    dst = [Box(*b) for b in found["train"]["dst"]]
    mapping = DetectorMapping.fit(found["train"]["src"], dst)
    start = None
    if found["train"]["landmarks"]:  # where the refining stage starts, from the landmarks
        start = LandmarkStart.fit(found["train"]["landmarks"], found["train"]["keypoints"])
    report = {
        "on": loaded.model_id,
        "fitted_by": "benchmarks/fit_detector.py",
        "fitted_on": f"{len(found['train']['src'])} training people's faces that both detectors found",
        "faces_found": {
            k: {"labelled": len(by_split[k]), "own": f["own"], args.detector: f["other"]} for k, f in found.items()
        },
    }
    for k, f in found.items():
        mapped = np.array([[b.cx, b.cy, b.w] for b in map(mapping.map, f["src"])]).reshape(-1, 3)
        report[k] = {
            "mapped": errors(mapped, f["dst"]),
            "own detector, frame mirrored": errors(f["mirror"][:, :3], f["dst"]),
        }
        if start is not None:
            kp = np.stack([start.keypoints(lm) for lm in f["landmarks"]])
            report[k]["landmark start NME"] = round(float(nme_per_face(kp, np.stack(f["keypoints"])).mean()), 4)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"mapping": mapping.to_dict(), **report}, indent=2))
    if args.write:
        alt = AlternateDetector(other, mapping, None, {"mapping": report}, start)
        packed = repack(loaded, detectors={**loaded.detectors, args.detector: alt})
        path = write_checkpoint(packed, f"{args.out.rstrip('/')}/{packed.doc['name']}.safetensors", force=args.force)
        print("wrote", path, packed.model_id)


if __name__ == "__main__":
    main()
