"""Flow ``evaluate``: labelled images (CSV + images, dir or bucket) -> end-to-end metrics, Parquet, montage."""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from fkd_core.evaluate import (
    FaceResult,
    evaluate_rows,
    face_yaw,
    results_table,
    risk_coverage_png,
    trust_metrics,
    worst,
    worst_montage,
)
from fkd_core.examples import LabelledRow, assign_split
from fkd_core.metrics import by_pose, summarise
from fkd_core.parquet_io import write_table
from fkd_core.plots import png_bytes
from fkd_core.predict import Predictor
from fkd_core.storage import join_uri, read_under, write_bytes, write_json

from . import preflight
from ._common import IO_RETRY, chunks, flat_parameters, markdown_table
from .configs import EvaluateConfig
from .ingest import read_csv


@task(**IO_RETRY)
def score_shard(rows: list[LabelledRow], images: str, model: str, detector: str | None = None) -> list[FaceResult]:
    """Read a shard's images (one at a time) and score its labelled faces."""
    image_ids = list(dict.fromkeys(r.image_id for r in rows))
    return evaluate_rows(rows, read_under(images, image_ids), Predictor.from_checkpoint(model, detector=detector))


@task(**IO_RETRY)
def write_outputs(doc: dict, results: list[FaceResult], out: str, images: str, worst_k: int, title: str) -> None:
    """metrics.json, faces.parquet, risk_coverage.png and worst.png (the worst faces' images read again)."""
    write_json(doc, join_uri(out, "metrics.json"))
    write_table(results_table(results), join_uri(out, "faces.parquet"))
    curve = risk_coverage_png(results, title)
    if curve is not None:
        write_bytes(curve, join_uri(out, "risk_coverage.png"))
    faces = worst(results, worst_k)
    if faces:
        pixels = dict(read_under(images, dict.fromkeys(r.row.image_id for r in faces)))
        pixels = {k: v for k, v in pixels.items() if not isinstance(v, Exception)}
        faces = [r for r in faces if r.row.image_id in pixels]
        write_bytes(png_bytes(worst_montage(faces, pixels)), join_uri(out, "worst.png"))


def trust_report(loaded, detector: str | None) -> dict:
    """How the trust heads of the detector a run uses were fitted (the checkpoint's own, or another detector's)."""
    alt = loaded.detectors.get(detector) if detector else None
    fitted = alt.fitted.get("trust") if alt is not None else loaded.meta.get("trust")
    return (fitted or {}).get("report") or {}


@flow(name="evaluate")
@flat_parameters(EvaluateConfig)
def evaluate(cfg: EvaluateConfig) -> dict:
    """Score a checkpoint end to end (Haar + NaimishNet) on labelled images: metrics.json, faces.parquet, worst.png."""
    predictor = preflight.evaluate(cfg)
    loaded, model_id = predictor.checkpoint, predictor.model_id
    log = get_run_logger()
    split_doc = (loaded.meta.get("data") or {}).get("split") or {}
    split_by = cfg.split_by or split_doc.get("split_by") or "person"
    val_fraction = cfg.val_fraction if cfg.val_fraction is not None else split_doc.get("val_fraction", 0.15)
    seed = cfg.seed if cfg.seed is not None else split_doc.get("seed", 0)
    rows, refused = read_csv(cfg.csv)
    if cfg.split != "all":
        rows = [r for r in rows if assign_split(r.image_id, split_by, val_fraction, seed) == cfg.split]
    log.info("evaluating %s on %d labelled faces (%s split by %s)", model_id, len(rows), cfg.split, split_by)
    with ThreadPoolTaskRunner(max_workers=cfg.workers) as runner:
        futures = [
            runner.submit(score_shard, {"rows": s, "images": cfg.images, "model": cfg.model, "detector": cfg.detector})
            for s in chunks(rows, cfg.shard_size)
        ]
        results = [r for f in futures for r in f.result()]
    matched = [r for r in results if r.status == "matched"]
    nme = np.array([r.nme for r in matched])
    metrics = summarise(nme, len(results))
    metrics["mse"] = float(np.mean([r.mse for r in matched])) if matched else float("nan")
    metrics["errors"] = sum(r.status == "error" for r in results)
    metrics["refused_rows"] = len(refused)
    # where the failures are: frontal faces against turned heads (yaw of the labelled points)
    pose = by_pose(np.array([r.nme if r.status == "matched" else np.nan for r in results]), face_yaw(results))
    doc = {
        "model_id": model_id,
        "detector": predictor.detector.to_record(),  # part of the pipeline scored: it decides which faces are found
        "csv": cfg.csv,
        "images": cfg.images,
        "split": cfg.split,
        "split_by": split_by,
        "val_fraction": val_fraction,
        "seed": seed,
        "metrics": metrics,
        "by_pose": pose,
        "trust": trust_metrics(results, predictor.trust.face_threshold if predictor.trust else None),
    }
    fitted = trust_report(loaded, cfg.detector).get("quality", {}).get("person-grouped folds")
    if doc["trust"] and fitted:
        # the shipped heads were fitted on every labelled face of the training data: scoring them on those faces
        # is in-sample; the record holds the cross-validated figures
        doc["trust"]["heads_cross_validated_auroc"] = fitted["auroc"]
        log.warning(
            "the trust heads of %s were fitted on labelled faces of its training data; if this CSV holds them, the "
            "quality figures here are in-sample (cross-validated AUROC on its held-out people: %.3f)",
            model_id,
            fitted["auroc"],
        )
    title = f"{model_id}, {cfg.split} split by {split_by}"
    write_outputs(doc, results, cfg.out, cfg.images, cfg.worst if matched else 0, title)
    row = {"model": model_id, "split": f"{cfg.split} ({split_by})", "pose": "all", **metrics}
    rows = [row] + [{"model": model_id, "split": row["split"], **p} for p in pose]
    create_table_artifact(key="evaluate-metrics", table=rows, description="fkd end-to-end metrics, by pose")
    log.info("metrics:\n%s", markdown_table(rows))
    if predictor.why_untrusted:
        log.warning("%s: no trust section and no risk_coverage.png: %s", model_id, predictor.why_untrusted)
    if doc["trust"]:
        create_table_artifact(
            key="evaluate-trust", table=[doc["trust"]], description="how well quality sorts out the failures"
        )
        log.info("trust:\n%s", markdown_table([doc["trust"]]))
    return doc
