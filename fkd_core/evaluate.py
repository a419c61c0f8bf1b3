"""End-to-end evaluation on labelled images (docs/design.md, "Evaluation and metrics"): match and score."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fkd_core import trust as tr
from fkd_core.detect import match_box
from fkd_core.errors import ImageError
from fkd_core.examples import LabelledRow
from fkd_core.geometry import crop_transform, normalise, square_from_box
from fkd_core.image_io import decode_gray
from fkd_core.metrics import by_pose, mse, nme_per_face, summarise, yaw
from fkd_core.parquet_io import keypoint_column
from fkd_core.plots import draw_faces, montage
from fkd_core.plots import risk_coverage_png as risk_coverage_png_of
from fkd_core.predict import Face, Located, Predictor
from fkd_core.types import FAILURE_NME, Box

EVAL_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("row_number", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # matched | unmatched | error
        pa.field("error", pa.string()),
        pa.field("n_detected", pa.int16(), nullable=False),
        pa.field("nme", pa.float64()),
        pa.field("mse", pa.float64()),
        pa.field("yaw", pa.float64(), nullable=False),  # of the labelled points (metrics.yaw)
        pa.field("box_x", pa.int32()),
        pa.field("box_y", pa.int32()),
        pa.field("box_w", pa.int32()),
        pa.field("box_h", pa.int32()),
        pa.field("det_score", pa.float32()),  # the matched face's trust columns (as in annotate's faces table)
        pa.field("pred_yaw", pa.float32()),
        pa.field("face_prob", pa.float32()),
        pa.field("quality", pa.float32()),
        pa.field("pred_x", pa.list_(pa.float32(), 68)),
        pa.field("pred_y", pa.list_(pa.float32(), 68)),
    ]
)


@dataclass
class FaceResult:
    row: LabelledRow
    status: str
    n_detected: int = 0
    error: str | None = None
    box: Box | None = None
    pred: np.ndarray | None = None  # (68, 2) original pixels
    nme: float | None = None
    mse: float | None = None
    face: Face | None = None  # the matched face with its trust columns


def evaluate_rows(
    rows: list[LabelledRow], reads: Iterable[tuple[str, bytes | ImageError]], predictor: Predictor
) -> list[FaceResult]:
    """Score labelled faces end to end, as annotate finds them: the predictor's detector, then its stages.

    ``reads`` gives each image the rows name once, as ``(image_id, bytes or error)`` (``storage.read_under``); rows
    naming the same image share one detection pass, and the model runs batched over all the images' faces.
    """
    by_image: dict[str, list[LabelledRow]] = {}
    for r in rows:
        by_image.setdefault(r.image_id, []).append(r)
    results: dict[str, list[FaceResult]] = {}  # per image, returned in the rows' order
    found: list[tuple[str, Located]] = []
    for image_id, data in reads:
        try:
            if isinstance(data, ImageError):
                raise data
            gray = decode_gray(data).gray
        except ImageError as e:
            results[image_id] = [FaceResult(r, "error", error=str(e)) for r in by_image[image_id]]
            continue
        found.append((image_id, predictor.locate(gray)))
    for (image_id, loc), faces in zip(found, predictor.faces_of([loc for _, loc in found]), strict=True):
        results[image_id] = [_score(r, loc, faces, predictor) for r in by_image[image_id]]
    missing = set(by_image) - set(results)
    if missing:
        raise ValueError(f"no image given for rows naming {sorted(missing)[:3]}")
    return [f for image_id in by_image for f in results[image_id]]


def _score(r: LabelledRow, loc: Located, faces: list, predictor: Predictor) -> FaceResult:
    """One labelled face against the detected faces of its image: matched to the box around its points, or not.
    Its MSE is measured in the first stage's crop, cut around the box the model was given."""
    boxes = loc.boxes
    cx, cy = r.keypoints.mean(axis=0)
    i = match_box(boxes, float(cx), float(cy))
    if i is None:
        return FaceResult(r, "unmatched", len(boxes))
    pred = faces[i].keypoints
    size = predictor.size
    t = crop_transform(square_from_box((loc.model_boxes or boxes)[i], predictor.policy), size)
    err = mse(normalise(t.to_crop(pred), size), normalise(t.to_crop(r.keypoints), size))
    nme = float(nme_per_face(pred[None], r.keypoints[None])[0])
    return FaceResult(r, "matched", len(boxes), box=boxes[i], pred=pred, nme=nme, mse=err, face=faces[i])


def face_yaw(results: list[FaceResult]) -> np.ndarray:
    """The yaw proxy (``metrics.yaw``) of each result's labelled keypoints."""
    if not results:
        return np.zeros(0)
    return yaw(np.stack([r.row.keypoints for r in results]))


def results_table(results: list[FaceResult]) -> pa.Table:
    pred = np.array([r.pred if r.pred is not None else np.full((68, 2), np.nan) for r in results], np.float32)
    pred = pred.reshape(-1, 68, 2)
    mask = pa.array([r.pred is None for r in results])

    def trust(attr: str) -> pa.Array:
        return pa.array([getattr(r.face, attr) if r.face else None for r in results], pa.float32())

    def box(attr: str) -> pa.Array:
        return pa.array([round(getattr(r.box, attr)) if r.box else None for r in results], pa.int32())

    return pa.table(
        {
            "image_id": [r.row.image_id for r in results],
            "row_number": pa.array([r.row.row_number for r in results], pa.int32()),
            "status": [r.status for r in results],
            "error": [r.error for r in results],
            "n_detected": pa.array([r.n_detected for r in results], pa.int16()),
            "nme": pa.array([r.nme for r in results], pa.float64()),
            "mse": pa.array([r.mse for r in results], pa.float64()),
            "yaw": pa.array(face_yaw(results), pa.float64()),
            "box_x": box("x"),
            "box_y": box("y"),
            "box_w": box("w"),
            "box_h": box("h"),
            "det_score": trust("det_score"),
            "pred_yaw": trust("yaw"),
            "face_prob": trust("face_prob"),
            "quality": trust("quality"),
            "pred_x": pc.if_else(
                mask, pa.nulls(len(results), EVAL_SCHEMA.field("pred_x").type), keypoint_column(pred[:, :, 0])
            ),
            "pred_y": pc.if_else(
                mask, pa.nulls(len(results), EVAL_SCHEMA.field("pred_y").type), keypoint_column(pred[:, :, 1])
            ),
        },
        schema=EVAL_SCHEMA,
    )


def worst(results: list[FaceResult], k: int = 12) -> list[FaceResult]:
    """The ``k`` matched faces with the highest NME, worst first."""
    return sorted((r for r in results if r.status == "matched"), key=lambda r: -(r.nme or 0))[:k]


def worst_montage(faces: list[FaceResult], images: dict[str, bytes], tile: int = 200) -> np.ndarray:
    """Tiles of ``faces`` (:func:`worst`), from their images' bytes by image id: predicted points in colour, ground
    truth as white rings."""
    tiles = []
    for r in faces:
        gray = decode_gray(images[r.row.image_id]).gray
        img = draw_faces(gray, [r.box], [r.pred], truth=[r.row.keypoints], radius=1)
        b = r.box
        side = int(max(b.w, b.h) * 1.6)
        x0, y0 = int(b.cx - side / 2), int(b.cy - side / 2 + 0.1 * b.h)
        pad = np.zeros((side, side, 3), np.uint8)
        xs, ys = max(0, x0), max(0, y0)
        xe, ye = min(img.shape[1], x0 + side), min(img.shape[0], y0 + side)
        pad[ys - y0 : ye - y0, xs - x0 : xe - x0] = img[ys:ye, xs:xe]
        cv2.putText(
            pad,
            f"{r.nme:.3f}",
            (3, max(12, side // 12)),
            cv2.FONT_HERSHEY_SIMPLEX,
            max(0.3, side / 400),
            (0, 255, 255),
            1,
            cv2.LINE_AA,
        )
        tiles.append(pad)
    return montage(tiles, cols=min(6, max(1, len(tiles))), size=tile)


def _rated(results: list[FaceResult]) -> list[FaceResult]:
    """The matched faces that have a ``quality`` (a checkpoint with trust heads)."""
    return [r for r in results if r.status == "matched" and r.face is not None and r.face.quality is not None]


def trust_metrics(results: list[FaceResult], face_threshold: float | None) -> dict:
    """How well the trust columns sort the matched faces: the AUROC of ``quality`` for NME > 0.10, the failure rate
    among the 80 / 90 / 100 % of faces with the best ``quality``, and the share of faces ``face_prob`` keeps."""
    matched = _rated(results)
    if not matched:
        return {}
    quality = np.array([r.face.quality for r in matched])
    failed = np.array([r.nme > FAILURE_NME for r in matched])
    out = {"quality_auroc": tr.auroc(quality, failed)}  # NaN (null in JSON) without both failures and successes
    for cov in (0.8, 0.9, 1.0):
        out[f"fr@0.10 at {cov:.0%} coverage"] = tr.failure_rate_at(quality, failed, cov)
    if face_threshold is not None:
        out["faces kept by face_prob"] = float(np.mean([r.face.face_prob >= face_threshold for r in matched]))
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


def risk_coverage_png(results: list[FaceResult], title: str) -> bytes | None:
    """The risk-coverage curve of the matched faces' ``quality`` (:func:`fkd_core.plots.risk_coverage_png`)."""
    matched = _rated(results)
    if not matched:
        return None
    return risk_coverage_png_of(np.array([r.face.quality for r in matched]), np.array([r.nme for r in matched]), title)


def split_settings(
    loaded, split_by: str | None, val_fraction: float | None, seed: int | None
) -> tuple[str, float, int]:
    """How to split the labelled rows: as given, else as the checkpoint's training data was split (its record),
    else by person, 15 % held out, seed 0."""
    recorded = (loaded.meta.get("data") or {}).get("split") or {}
    return (
        split_by or recorded.get("split_by") or "person",
        val_fraction if val_fraction is not None else recorded.get("val_fraction", 0.15),
        seed if seed is not None else recorded.get("seed", 0),
    )


def score_summary(results: list[FaceResult], refused_rows: int) -> tuple[dict, list[dict]]:
    """The run's metrics (NME, failure rate, MSE, matched/missed, errors, refused rows) and the same by pose (the
    yaw of the labelled points): where the failures are, frontal faces or turned heads."""
    matched = [r for r in results if r.status == "matched"]
    metrics = summarise(np.array([r.nme for r in matched]), len(results))
    metrics["mse"] = float(np.mean([r.mse for r in matched])) if matched else float("nan")
    metrics["errors"] = sum(r.status == "error" for r in results)
    metrics["refused_rows"] = refused_rows
    pose = by_pose(np.array([r.nme if r.status == "matched" else np.nan for r in results]), face_yaw(results))
    return metrics, pose


def cross_validated_auroc(loaded, detector: str | None) -> float | None:
    """The cross-validated (person-grouped folds) quality AUROC recorded when the trust heads of ``detector``'s
    path (the checkpoint's own, or another detector's) were fitted; None if none is recorded."""
    alt = loaded.detectors.get(detector) if detector else None
    fitted = alt.fitted.get("trust") if alt is not None else loaded.meta.get("trust")
    report = (fitted or {}).get("report") or {}
    folds = report.get("quality", {}).get("person-grouped folds")
    return folds["auroc"] if folds else None
