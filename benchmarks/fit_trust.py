"""Fit and measure the trust heads (face_prob, quality) of a checkpoint on the labelled training data.

    python benchmarks/fit_trust.py dump [--model M] [--cache DIR]     # run the pipeline, keep every face's signals
    python benchmarks/fit_trust.py fit  [--model M] [--cache DIR] [--out DIR]   # fit, report, write a checkpoint

``dump`` runs the checkpoint end to end (the Haar cascade with its settings, both stages) over every labelled
frame, and over two kinds of faceless image made from the same frames: each frame turned a quarter, a half and
three quarters (as ``bench_haar`` does), and the background strips beside each labelled face (the image with the
face's region cut away). Every box the cascade finds keeps its scalar signals (``fkd_core.trust.SIGNALS``), the
refining stage's hidden features and, where it is the labelled face, its NME.

``fit`` fits the two logistic heads and reports every figure of docs/model-card.md "Trust per face":

- ``face_prob`` is fitted on the training people's faces against the false boxes of their faceless images; its
  threshold is the ``--face-quantile`` (0.3 %) quantile of the validation people's faces (never trained on),
  where the report measures the share of faces kept and of false boxes rejected, also with the threshold
  cross-validated by person (set on four fifths of the people, scored on the fifth). The head is shifted so
  that its threshold reads 0.5.
- ``quality`` (P(NME > 0.10)) is fitted on every labelled face: the training people's (129 of 2,900 fail
  despite being trained on) and the validation people's. Its figures are cross-validated: the validation people
  in 5 folds, each scored by a head fitted without them (by person; and, for comparison, by random frame);
  the training people are never scored. The head shipped is fitted on all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from fkd_core import trust as tr
from fkd_core.checkpoint import DEFAULT_MODEL, write_checkpoint
from fkd_core.detect import match_box
from fkd_core.examples import LabelledRow, assign_split, parse_keypoints_csv, person_of
from fkd_core.geometry import keypoint_extent_box
from fkd_core.metrics import nme_per_face
from fkd_core.plots import risk_coverage_png
from fkd_core.predict import Predictor
from fkd_core.types import FAILURE_NME

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "facial-keypoints"
KINDS = ("face", "extra", "turned", "background")  # labelled face, other box on a frame, faceless kinds


def training_mean_shape(rows: list[LabelledRow]) -> np.ndarray:
    """The training people's mean face shape, each shape centred and scaled to unit RMS radius first."""
    s = np.stack([r.keypoints for r in rows]).astype(np.float64)
    s = s - s.mean(axis=1, keepdims=True)
    s /= np.sqrt((s**2).sum(axis=2).mean(axis=1))[:, None, None]
    return s.mean(axis=0)


def background(gray: np.ndarray, kps: np.ndarray) -> list[np.ndarray]:
    """The strips of a frame beside its labelled face (1.4 x the points' extent cut away), at least 64 px."""
    x, y, w, h = keypoint_extent_box(kps)
    cx, cy, half = x + w / 2, y + h / 2, 0.7 * max(w, h)
    x0, x1 = max(0, int(cx - half)), min(gray.shape[1], int(cx + half))
    y0, y1 = max(0, int(cy - half)), min(gray.shape[0], int(cy + half))
    strips = [gray[:, :x0], gray[:, x1:], gray[:y0, :], gray[y1:, :]]
    return [np.ascontiguousarray(s) for s in strips if min(s.shape) >= 64]


def dump(args: argparse.Namespace) -> None:
    pred = Predictor.from_checkpoint(args.model, detector=args.detector)
    with open(DATA / "training_frames_keypoints.csv", newline="") as f:
        rows = [r for r in parse_keypoints_csv(f) if isinstance(r, LabelledRow)]
    split = (pred.checkpoint.meta.get("data") or {}).get("split") or {"split_by": "person", "seed": 0}
    splits = [assign_split(r.image_id, split["split_by"], split.get("val_fraction", 0.15), split["seed"]) for r in rows]
    pred.mean_shape = training_mean_shape([r for r, s in zip(rows, splits, strict=True) if s == "train"])
    if args.limit:
        rows, splits = rows[: args.limit], splits[: args.limit]
    out: dict[str, list] = {k: [] for k in ("signals", "features", "first_features", "kind", "nme", "image", "split")}

    def work(i: int):
        r = rows[i]
        gray = cv2.imread(str(DATA / "training" / r.image_id), cv2.IMREAD_GRAYSCALE)
        views = [("frame", gray)]
        views += [("turned", np.ascontiguousarray(np.rot90(gray, k))) for k in (1, 2, 3)]
        views += [("background", s) for s in background(gray, r.keypoints)]
        located = [(kind, pred.locate(g)) for kind, g in views]
        return i, r, located

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(rows), 200):
            done = list(pool.map(work, range(start, min(len(rows), start + 200))))
            located = [loc for _, _, views in done for _, loc in views]
            a = pred.analyse(located)
            if a is None:
                continue
            k = 0
            for i, r, views in done:
                for kind, loc in views:
                    n = len(loc.boxes)
                    if kind == "frame":
                        cx, cy = r.keypoints.mean(axis=0)
                        hit = match_box(loc.boxes, float(cx), float(cy))
                        kinds = ["face" if j == hit else "extra" for j in range(n)]
                    else:
                        kinds = [kind] * n
                    for j in range(n):
                        nme = np.nan
                        if kinds[j] == "face":
                            nme = float(nme_per_face(a.keypoints[k + j][None], r.keypoints[None])[0])
                        out["signals"].append(a.signals[k + j])
                        out["features"].append(a.features[k + j].astype(np.float16))
                        out["first_features"].append(a.first_features[k + j].astype(np.float16))
                        out["kind"].append(kinds[j])
                        out["nme"].append(nme)
                        out["image"].append(r.image_id)
                        out["split"].append(splits[i])
                    k += n
            print(f"{start + len(done)} frames, {len(out['kind'])} boxes, {time.perf_counter() - t0:.0f} s", flush=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        cache / "faces.npz",
        signals=np.stack(out["signals"]),
        features=np.stack(out["features"]),
        first_features=np.stack(out["first_features"]),
        kind=np.array(out["kind"]),
        nme=np.array(out["nme"]),
        image=np.array(out["image"]),
        split=np.array(out["split"]),
        mean_shape=pred.mean_shape,
        model_id=np.array(pred.model_id),
    )
    n_labelled = sum(s == "val" for s in splits), sum(s == "train" for s in splits)
    print(f"dumped {len(out['kind'])} boxes from {len(rows)} frames (val, train frames: {n_labelled})")


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, weight: np.ndarray | None = None) -> tr.Head:
    """L2-regularised logistic regression (L-BFGS, float64); the bias is not penalised."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float64))
    wt = torch.from_numpy(weight) if weight is not None else torch.ones(len(y), dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xt @ w + b
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")).sum() / wt.sum()
        loss = loss + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return tr.Head(w.detach().numpy().copy(), float(b.detach()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("dump", "fit"))
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--detector", default=None, help="fit the heads of this detector (default: the model's own)")
    ap.add_argument("--cache", default=None, help="where dump keeps the faces (default: /tmp/fkd-trust-<detector>)")
    ap.add_argument("--out", default="models")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--face-pcs", type=int, default=512, help="face_prob: components of each stage's features")
    ap.add_argument("--face-quantile", type=float, default=0.003, help="face_prob: share of faces below threshold")
    ap.add_argument("--quality-pcs", type=int, default=16, help="quality: components of the refining features")
    ap.add_argument("--l2-face", type=float, default=1e-3)
    ap.add_argument("--l2-quality", type=float, default=1e-2)
    ap.add_argument("--write", action="store_true", help="write the checkpoint with the heads under --out")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    args.cache = args.cache or f"/tmp/fkd-trust-{args.detector or 'own'}"
    if args.cmd == "dump":
        dump(args)
    else:
        fit(args)


class Space:
    """The linear space a head is fitted in: the standardised signals and each stage's hidden features projected on
    their first principal components (whitened on the training people's faces). :meth:`fold` turns a head fitted
    here into the same head on the raw inputs ``[signals, first features, refining features]``."""

    def __init__(self, d: dict, first_k: int, refine_k: int):
        self.sig = d["signals"]
        ref = (d["split"] == "train") & (d["kind"] == "face")
        self.mu, self.sd = self.sig[ref].mean(axis=0), self.sig[ref].std(axis=0) + 1e-9
        self.blocks = []  # (features, mean, components) per stage
        for key, k in (("first_features", first_k), ("features", refine_k)):
            f = d[key].astype(np.float64)
            mu = f[ref].mean(axis=0)
            pcs = np.zeros((0, f.shape[1]))
            if k:
                _, sv, vt = np.linalg.svd(f[ref] - mu, full_matrices=False)
                # components that vary (none where a stage did not run: a detector's landmark start skips the first)
                keep = sv[:k] > 1e-9 * max(float(sv[0]), 1e-300)
                pcs = vt[:k][keep] / (sv[:k][keep, None] / np.sqrt(ref.sum()))
            self.blocks.append((f, mu, pcs))

    def x(self, rows: np.ndarray, drop: int | None = None) -> np.ndarray:
        z = (self.sig[rows] - self.mu) / self.sd
        if drop is not None:
            z[:, drop] = 0.0
        return np.concatenate([z] + [(f[rows] - mu) @ pcs.T for f, mu, pcs in self.blocks], axis=1)

    def raw(self, rows: np.ndarray) -> np.ndarray:
        return tr.inputs(self.sig[rows], self.blocks[0][0][rows], self.blocks[1][0][rows])

    def fold(self, head: tr.Head, shift: float = 0.0) -> tr.Head:
        """``head`` on the raw inputs, its logit lowered by ``shift``."""
        w, b = head.weight, head.bias - shift
        ws = w[: len(self.mu)] / self.sd
        b -= float(ws @ self.mu)
        parts, i = [ws], len(self.mu)
        for _, mu, pcs in self.blocks:
            wf = pcs.T @ w[i : i + len(pcs)]
            b -= float(wf @ mu)
            parts.append(wf)
            i += len(pcs)
        return tr.Head(np.concatenate(parts), b)


def person_folds(persons: np.ndarray, seed: int = 0, k: int = 5) -> np.ndarray:
    """A fold number per row: the people dealt at random into ``k`` folds (a person's rows share one)."""
    names = np.unique(persons)
    fold_of = {g: i % k for i, g in enumerate(np.random.default_rng(seed).permutation(names))}
    return np.array([fold_of[g] for g in persons])


def fit_face(d: dict, args: argparse.Namespace, report: dict) -> tr.Head:
    """face_prob: fitted on the training people's faces against their faceless images' false boxes; its threshold
    is the ``--face-quantile`` quantile of the validation people's faces, cross-validated by person for the report;
    returned folded and shifted so that its threshold is 0.5."""
    kind, split = d["kind"], d["split"]
    space = Space(d, args.face_pcs, args.face_pcs)
    neg = np.isin(kind, ("turned", "background"))
    rows = np.flatnonzero((split == "train") & ((kind == "face") | neg))
    y = (kind[rows] == "face").astype(float)
    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))  # both classes weigh the same
    head = fit_logistic(space.x(rows), y, args.l2_face, weight)
    faces = np.flatnonzero((split == "val") & (kind == "face"))
    false = np.flatnonzero((split == "val") & neg)
    pf, pn = head(space.x(faces)), head(space.x(false))
    threshold = float(np.quantile(pf, args.face_quantile))
    # cross-validated: the threshold from four fifths of the validation people, scored on the fifth
    ff, fn = person_folds(d["person"][faces]), person_folds(d["person"][false])
    kept = rejected = 0
    for f in range(5):
        t = np.quantile(pf[ff != f], args.face_quantile)
        kept += int(np.sum(pf[ff == f] >= t))
        rejected += int(np.sum(pn[fn == f] < t))
    lost = faces[pf < threshold]
    report["face_prob"] = {
        "fitted_on": f"{len(rows)} boxes of training people ({int(y.sum())} faces, {int(len(y) - y.sum())} false)",
        "val_faces": len(faces),
        "val_false_boxes": len(false),
        "val_false_boxes_by_kind": {k: int(np.sum(kind[false] == k)) for k in ("turned", "background")},
        "auroc": tr.auroc(np.r_[pf, pn], np.r_[np.ones(len(pf)), np.zeros(len(pn))].astype(bool)),
        "faces_kept": float(np.mean(pf >= threshold)),
        "false_boxes_rejected": float(np.mean(pn < threshold)),
        "rejected_by_kind": {k: float(np.mean(pn[kind[false] == k] < threshold)) for k in ("turned", "background")},
        "cv_faces_kept": kept / len(faces),
        "cv_false_boxes_rejected": rejected / len(false),
        "faces_lost": [(str(d["image"][i]), round(float(d["nme"][i]), 3)) for i in lost],
    }
    print(json.dumps(report["face_prob"], indent=1))
    logit = float(np.log(threshold / (1 - threshold)))
    folded = space.fold(head, shift=logit)
    assert np.allclose(folded(space.raw(faces)), 1 / (1 + np.exp(-(np.log(pf / (1 - pf)) - logit))), atol=1e-6)
    return folded


def fit_quality(d: dict, args: argparse.Namespace, report: dict) -> tuple[tr.Head, np.ndarray]:
    """quality = P(NME > 0.10): fitted on every labelled face; scored on the validation people by 5-fold
    cross-validation (each fold's people out of the fit), and by random frames for comparison."""
    kind, split, nme = d["kind"], d["split"], d["nme"]
    space = Space(d, 0, args.quality_pcs)
    train = np.flatnonzero((split == "train") & (kind == "face"))
    val = np.flatnonzero((split == "val") & (kind == "face"))
    failed_t, failed = nme[train] > FAILURE_NME, nme[val] > FAILURE_NME

    def oof(folds: np.ndarray, cols: list[int] | None = None, drop: int | None = None) -> np.ndarray:
        xt, xv = space.x(train, drop), space.x(val, drop)
        if cols is not None:
            xt, xv = xt[:, cols], xv[:, cols]
        out = np.empty(len(val))
        for f in range(5):
            keep = folds != f
            head = fit_logistic(np.r_[xt, xv[keep]], np.r_[failed_t, failed[keep]].astype(float), args.l2_quality)
            out[~keep] = head(xv[~keep])
        return out

    by_person = person_folds(d["person"][val])
    by_frame = np.random.default_rng(0).permutation(len(val)) % 5
    score, frame_score = oof(by_person), oof(by_frame)
    q: dict = {
        "fitted_on": f"{len(train)} training people's faces ({int(failed_t.sum())} over 0.10) and the validation "
        f"people's outside the scored fold",
        "val_faces": len(val),
        "val_failures": int(failed.sum()),
    }
    for name, s in (("person-grouped folds", score), ("random-frame folds", frame_score)):
        q[name] = {"auroc": tr.auroc(s, failed)}
        for cov in (0.8, 0.9, 1.0):
            q[name][f"fr@0.10 at {cov:.0%}"] = tr.failure_rate_at(s, failed, cov)
        kept = s <= 0.1  # the README's "faces you can trust" threshold
        q[name]["quality <= 0.1"] = {"kept": float(kept.mean()), "fr@0.10 among kept": float(failed[kept].mean())}
    n_sig = len(tr.SIGNALS)
    gaps = [tr.SIGNALS.index("stage_gap"), tr.SIGNALS.index("pass_gap")]
    q["auroc of subsets (person-grouped)"] = {
        "disagreement only (stage_gap, pass_gap)": tr.auroc(oof(by_person, gaps), failed),
        "signals only": tr.auroc(oof(by_person, list(range(n_sig))), failed),
        "features only": tr.auroc(oof(by_person, list(range(n_sig, n_sig + args.quality_pcs))), failed),
    }
    q["auroc of each signal alone"] = {
        s: max(tr.auroc(d["signals"][val, i], failed), 1 - tr.auroc(d["signals"][val, i], failed))
        for i, s in enumerate(tr.SIGNALS)
    }
    q["auroc without each signal (person-grouped)"] = {
        s: tr.auroc(oof(by_person, drop=i), failed) for i, s in enumerate(tr.SIGNALS)
    }
    report["quality"] = q
    print(json.dumps(q, indent=1))
    head = fit_logistic(np.r_[space.x(train), space.x(val)], np.r_[failed_t, failed].astype(float), args.l2_quality)
    folded = space.fold(head)
    assert np.allclose(folded(space.raw(val)), head(space.x(val)), atol=1e-6)
    return folded, score


def fit(args: argparse.Namespace) -> None:
    d = dict(np.load(Path(args.cache) / "faces.npz"))
    d["person"] = np.array([person_of(i) for i in d["image"]])
    report: dict = {"model_id": str(d["model_id"]), "boxes": {k: int((d["kind"] == k).sum()) for k in KINDS}}
    face = fit_face(d, args, report)
    quality, oof_score = fit_quality(d, args, report)
    np.save(Path(args.cache) / "quality_oof.npy", oof_score)
    val = (d["split"] == "val") & (d["kind"] == "face")
    title = f"quality on the validation people, cross-validated by person (stages of {d['model_id']})"
    (Path(args.cache) / "risk_coverage.png").write_bytes(risk_coverage_png(oof_score, d["nme"][val], title))
    heads = tr.TrustHeads(d["mean_shape"], face, quality, 0.5)
    (Path(args.cache) / "report.json").write_text(json.dumps(report, indent=1))
    if args.write:
        write_model(args, heads, report)


def write_model(args: argparse.Namespace, heads: tr.TrustHeads, report: dict) -> None:
    """The checkpoint again with these heads: its own detector's, or (``--detector``) another detector's."""
    import dataclasses

    from fkd_core.checkpoint import load_checkpoint, repack
    from fkd_core.detect import detector_name

    loaded = load_checkpoint(args.model)
    fitted = {
        "fitted_by": "benchmarks/fit_trust.py",
        "on": Predictor.from_checkpoint(args.model, detector=args.detector).model_id,
        "settings": {
            k: getattr(args, k) for k in ("face_pcs", "face_quantile", "quality_pcs", "l2_face", "l2_quality")
        },
        "report": report,
    }
    if args.detector in (None, detector_name(loaded.detector)):
        packed = repack(loaded, trust=heads, record={"trust": fitted})
    else:
        alt = loaded.detectors[args.detector]
        alt = dataclasses.replace(alt, trust=heads, fitted={**alt.fitted, "trust": fitted})
        packed = repack(loaded, detectors={**loaded.detectors, args.detector: alt})
    path = write_checkpoint(packed, f"{args.out.rstrip('/')}/{packed.doc['name']}.safetensors", force=args.force)
    print("wrote", path, packed.model_id)


if __name__ == "__main__":
    main()
