"""The adaptive second refining pass: which faces need it, and what skipping it costs in NME.

    python benchmarks/bench_refine.py [--model M] [--detector haar] [--thresholds 0.06 0.07 0.08 0.09 0.1]

End to end on the labelled frames (the checkpoint's detector, crops, both stages), for the person-grouped
validation people and a third of the training people: every matched face's starting keypoints (the first stage's,
or a detector's landmark start) and its keypoints after one and after two refining passes. A second pass cut from
nearly the same crop as the first gives nearly the same answer, so the rule reads how far the first pass moved the
face's frame (``fkd_core.align.frame_change``: centre shift in radii + |log scale| + turn in radians). For each
threshold it reports the share of faces that take the second pass and the mean NME against every face taking it; the
other signals tried (keypoint movement, and each part of the frame alone) at the same shares; and, for the
checkpoint's own ``repeat_above``, the mean NME of the Predictor itself. Images come from ../shared/data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from fkd_core.align import alignment_of, frame_change
from fkd_core.checkpoint import DEFAULT_MODEL
from fkd_core.detect import match_box
from fkd_core.examples import LabelledRow, assign_split, parse_keypoints_csv
from fkd_core.image_io import decode_gray
from fkd_core.metrics import nme_per_face
from fkd_core.predict import Predictor

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "facial-keypoints"


def passes_of(pred: Predictor, rows: list[LabelledRow]) -> dict[str, np.ndarray]:
    """The labelled faces the detector found, run with the predictor's own align policy: each one's start (first
    stage or landmark start), first and second refining pass (the first again where it took no second), and the
    truth."""
    locs = [pred.locate(decode_gray((DATA / "training" / r.image_id).read_bytes()).gray) for r in rows]
    out: dict[str, list] = {"first": [], "one": [], "two": [], "truth": []}
    for start in range(0, len(rows), 256):
        chunk, found = rows[start : start + 256], locs[start : start + 256]
        a = pred.analyse(found)
        k = 0
        for r, loc in zip(chunk, found, strict=True):
            cx, cy = r.keypoints.mean(axis=0)
            i = match_box(loc.boxes, float(cx), float(cy))
            if i is not None:
                for key, kp in (("first", a.first), ("one", a.passes[0]), ("two", a.passes[1])):
                    out[key].append(kp[k + i])
                out["truth"].append(r.keypoints)
            k += len(loc.boxes)
    return {k: np.stack(v).astype(np.float64) for k, v in out.items()}


def signals(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidate rules, each a number per face computed from the first stage's and the first pass's keypoints."""
    frames = [(alignment_of(f), alignment_of(p)) for f, p in zip(d["first"], d["one"], strict=True)]
    r = np.array([b.radius for _, b in frames])
    return {
        "frame_change": np.array([frame_change(a, b) for a, b in frames]),
        "keypoint_move": np.linalg.norm(d["one"] - d["first"], axis=2).mean(axis=1) / r,
        "centre_shift": np.array([np.hypot(a.cx - b.cx, a.cy - b.cy) / b.radius for a, b in frames]),
        "turn": np.array(
            [frame_change(dataclasses.replace(a, cx=b.cx, cy=b.cy, radius=b.radius), b) for a, b in frames]
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--detector", default="haar")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.06, 0.07, 0.08, 0.09, 0.10, 0.12])
    ap.add_argument("--write", metavar="DIR", help="write the checkpoint with --set as its rule under DIR")
    ap.add_argument("--set", type=float, help="the rule's threshold to write (align.repeat_above)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if args.write:
        from fkd_core.checkpoint import load_checkpoint, repack, write_checkpoint

        loaded = load_checkpoint(args.model)
        packed = repack(loaded, align=dataclasses.replace(loaded.align, repeat_above=args.set))
        dest = f"{args.write.rstrip('/')}/{packed.doc['name']}.safetensors"
        print("wrote", write_checkpoint(packed, dest, force=args.force), packed.model_id)
        return
    pred = Predictor.from_checkpoint(args.model, detector=args.detector)
    shipped = pred.align
    with open(DATA / "training_frames_keypoints.csv", newline="") as f:
        rows = [r for r in parse_keypoints_csv(f) if isinstance(r, LabelledRow)]
    split = (pred.checkpoint.meta.get("data") or {}).get("split") or {"split_by": "person", "seed": 0}
    groups = {"val": [], "train": []}
    for r in rows:
        groups[assign_split(r.image_id, split["split_by"], split.get("val_fraction", 0.15), split["seed"])].append(r)
    groups["train"] = groups["train"][::3]
    report: dict = {"model": pred.model_id, "shipped_repeat_above": shipped.repeat_above}
    for name, group in groups.items():
        pred.align = dataclasses.replace(shipped, passes=2, repeat_above=0.0)  # every face takes both passes
        d = passes_of(pred, group)
        one, two = nme_per_face(d["one"], d["truth"]), nme_per_face(d["two"], d["truth"])
        sig = signals(d)
        rep = {
            "faces": len(one),
            "mean_nme": {
                "start": float(nme_per_face(d["first"], d["truth"]).mean()),
                "one_pass": float(one.mean()),
                "two_passes": float(two.mean()),
            },  # fmt: skip
            "by_threshold": {
                str(t): {
                    "second_pass_share": round(float((sig["frame_change"] > t).mean()), 3),
                    "nme_rise": round(float(np.where(sig["frame_change"] > t, two, one).mean() - two.mean()), 5),
                }
                for t in args.thresholds
            },
            "other_signals_nme_rise_at_share": {
                k: {
                    f"{share:.0%}": round(
                        float(np.where(s >= np.quantile(s, 1 - share), two, one).mean() - two.mean()), 5
                    )
                    for share in (0.2, 0.3, 0.4)
                }
                for k, s in sig.items()
            },
        }
        if shipped.repeat_above:  # the Predictor itself, with the checkpoint's rule
            pred.align = shipped
            d2 = passes_of(pred, group)
            took = [not np.array_equal(a, b) for a, b in zip(d2["one"], d2["two"], strict=True)]
            rep["predictor_with_rule"] = {"mean_nme": float(nme_per_face(d2["two"], d2["truth"]).mean()),
                                          "second_pass_share": round(float(np.mean(took)), 3)}  # fmt: skip
        report[name] = rep
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
