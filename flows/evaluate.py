"""Flow ``evaluate``: labelled images (CSV + images, dir or bucket) -> end-to-end metrics, Parquet, montage."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from fkd_core.evaluate import (
    FaceResult,
    cross_validated_auroc,
    evaluate_rows,
    results_table,
    risk_coverage_png,
    score_summary,
    split_settings,
    trust_metrics,
    worst,
    worst_montage,
)
from fkd_core.examples import LabelledRow, assign_split
from fkd_core.parquet_io import write_table
from fkd_core.plots import png_bytes
from fkd_core.predict import Predictor
from fkd_core.storage import join_uri, read_under, write_bytes, write_json

from . import preflight
from ._common import IO_RETRY, chunks, flat_parameters, markdown_table, read_csv
from .configs import EvaluateConfig


@task(**IO_RETRY)
def score_shard(
    rows: list[LabelledRow], images: str, model: str, detector: str | None = None, links_out: bool = False
) -> list[FaceResult]:
    """Read a shard's images (one at a time) and score its labelled faces."""
    image_ids = list(dict.fromkeys(r.image_id for r in rows))
    reads = read_under(images, image_ids, links_out)
    return evaluate_rows(rows, reads, Predictor.from_checkpoint(model, detector=detector))


@task(**IO_RETRY)
def write_outputs(
    doc: dict, results: list[FaceResult], out: str, images: str, worst_k: int, title: str, links_out: bool = False
) -> None:
    """metrics.json, faces.parquet, risk_coverage.png and worst.png (the worst faces' images read again)."""
    write_json(doc, join_uri(out, "metrics.json"))
    write_table(results_table(results), join_uri(out, "faces.parquet"))
    curve = risk_coverage_png(results, title)
    if curve is not None:
        write_bytes(curve, join_uri(out, "risk_coverage.png"))
    faces = worst(results, worst_k)
    if faces:
        pixels = dict(read_under(images, dict.fromkeys(r.row.image_id for r in faces), links_out))
        pixels = {k: v for k, v in pixels.items() if not isinstance(v, Exception)}
        faces = [r for r in faces if r.row.image_id in pixels]
        write_bytes(png_bytes(worst_montage(faces, pixels)), join_uri(out, "worst.png"))


@flow(name="evaluate")
@flat_parameters(EvaluateConfig)
def evaluate(cfg: EvaluateConfig) -> dict:
    """Score a checkpoint end to end (Haar + NaimishNet) on labelled images: metrics.json, faces.parquet, worst.png."""
    predictor = preflight.evaluate(cfg)
    model_id = predictor.model_id
    log = get_run_logger()
    split_by, val_fraction, seed = split_settings(predictor.checkpoint, cfg.split_by, cfg.val_fraction, cfg.seed)
    rows, refused = read_csv(cfg.csv)
    if cfg.split != "all":
        rows = [r for r in rows if assign_split(r.image_id, split_by, val_fraction, seed) == cfg.split]
    log.info("evaluating %s on %d labelled faces (%s split by %s)", model_id, len(rows), cfg.split, split_by)
    with ThreadPoolTaskRunner(max_workers=cfg.workers) as runner:
        futures = [
            runner.submit(
                score_shard,
                {
                    "rows": s,
                    "images": cfg.images,
                    "model": cfg.model,
                    "detector": cfg.detector,
                    "links_out": cfg.follow_links_out,
                },
            )  # fmt: skip
            for s in chunks(rows, cfg.shard_size)
        ]
        results = [r for f in futures for r in f.result()]
    metrics, pose = score_summary(results, len(refused))
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
    fitted_auroc = cross_validated_auroc(predictor.checkpoint, cfg.detector)
    if doc["trust"] and fitted_auroc is not None:
        # the shipped heads were fitted on every labelled face of the training data: scoring them on those faces
        # is in-sample; the record holds the cross-validated figures
        doc["trust"]["heads_cross_validated_auroc"] = fitted_auroc
        log.warning(
            "the trust heads of %s were fitted on labelled faces of its training data; if this CSV holds them, the "
            "quality figures here are in-sample (cross-validated AUROC on its held-out people: %.3f)",
            model_id,
            fitted_auroc,
        )
    title = f"{model_id}, {cfg.split} split by {split_by}"
    worst_k = cfg.worst if any(r.status == "matched" for r in results) else 0
    write_outputs(doc, results, cfg.out, cfg.images, worst_k, title, cfg.follow_links_out)
    _artifacts(doc, predictor, log)
    return doc


def _artifacts(doc: dict, predictor: Predictor, log) -> None:
    model_id, metrics = doc["model_id"], doc["metrics"]
    row = {"model": model_id, "split": f"{doc['split']} ({doc['split_by']})", "pose": "all", **metrics}
    rows = [row] + [{"model": model_id, "split": row["split"], **p} for p in doc["by_pose"]]
    create_table_artifact(key="evaluate-metrics", table=rows, description="fkd end-to-end metrics, by pose")
    log.info("metrics:\n%s", markdown_table(rows))
    if predictor.why_untrusted:
        log.warning("%s: no trust section and no risk_coverage.png: %s", model_id, predictor.why_untrusted)
    if doc["trust"]:
        create_table_artifact(
            key="evaluate-trust", table=[doc["trust"]], description="how well quality sorts out the failures"
        )
        log.info("trust:\n%s", markdown_table([doc["trust"]]))
