"""Flow ``ingest``: keypoints CSV + images (directory or bucket) -> the training examples Parquet."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from fkd_core.detect import DetectorConfig
from fkd_core.examples import BoxMapping, LabelledRow
from fkd_core.geometry import CropPolicy
from fkd_core.ingest import (
    IngestShardConfig,
    ShardResult,
    fit_box_mapping,
    ingest_misses,
    ingest_report,
    ingest_shard,
    read_rows,
)
from fkd_core.layout import IngestOutput
from fkd_core.parquet_io import EXAMPLES_SCHEMA, write_table
from fkd_core.storage import url_to_fs, write_json

from . import preflight
from ._common import IO_RETRY, chunks, flat_parameters, markdown_table, read_csv
from .configs import IngestConfig


@task(**IO_RETRY)
def process_shard(
    rows: list[LabelledRow],
    shard: int,
    settings: IngestShardConfig,
    out: str,
    source: str,
    mapping: BoxMapping | None = None,
) -> ShardResult:
    """Read a shard's images, crop them, and write its examples part (idempotent: a retry rewrites the part).
    With ``mapping``, the rows are ones the detector missed, cropped with boxes derived from their keypoints."""
    reads = read_rows(rows, settings.images, settings.follow_links_out)
    if mapping is None:
        result, table = ingest_shard(reads, settings, source)
    else:
        result, table = ingest_misses(reads, mapping, settings)
    if table is not None:
        write_table(table, IngestOutput(out).part(shard), EXAMPLES_SCHEMA)
    return result


@task(**IO_RETRY)
def write_report(report: dict, uri: str) -> None:
    write_json(report, uri)


@task
def clear_output(uri: str) -> None:
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@flow(name="ingest", log_prints=False)
@flat_parameters(IngestConfig)
def ingest(cfg: IngestConfig) -> dict:
    """Turn a keypoints CSV and its images into `<out>/examples/part-*.parquet` and `<out>/ingest_report.json`."""
    preflight.ingest(cfg)
    log = get_run_logger()
    t0 = time.perf_counter()
    output = IngestOutput(cfg.out)
    shard_cfg = IngestShardConfig(
        images=cfg.images, split_by=cfg.split_by, val_fraction=cfg.val_fraction, seed=cfg.seed,
        policy=CropPolicy(), detector=DetectorConfig(), follow_links_out=cfg.follow_links_out,
    )  # fmt: skip
    rows, refused = read_csv(cfg.csv)
    log.info("CSV: %d valid rows, %d refused", len(rows), len(refused))
    clear_output(output.examples)
    shards = list(chunks(rows, cfg.shard_size))
    source = cfg.csv.rsplit("/", 1)[-1]
    with ThreadPoolTaskRunner(max_workers=cfg.workers) as runner:
        futures = [
            runner.submit(
                process_shard, {"rows": s, "shard": i, "settings": shard_cfg, "out": cfg.out, "source": source}
            )
            for i, s in enumerate(shards)
        ]
        results: list[ShardResult] = [f.result() for f in futures]
    refused += [m for r in results for m in r.refused]
    misses = [m for r in results for m in r.misses]
    mapping = fit_box_mapping(results)
    from_keypoints = 0
    if misses:  # the faces the detector missed, cropped from their keypoints' box mapped to a detector box
        res = process_shard(misses, len(shards), shard_cfg, cfg.out, source, mapping)
        from_keypoints = res.written
        refused += res.refused
    from_detector = sum(r.written for r in results)
    report = ingest_report(cfg.csv, output.examples, shard_cfg, from_detector, from_keypoints, refused, mapping,
                           time.perf_counter() - t0)  # fmt: skip
    write_report(report, output.report)
    log.info(
        "ingest: %d examples (%d Haar boxes, %d from keypoints), %d refused, %.1f s",
        report["rows_kept"], from_detector, from_keypoints, len(refused), report["seconds"],
    )  # fmt: skip
    _report_artifact(report)
    return report


def _report_artifact(report: dict) -> None:
    keys = ("rows_kept", "rows_refused", "boxes_from_haar", "boxes_from_keypoints", "seconds")
    body = "# Ingest report\n\n" + markdown_table([{k: report[k] for k in keys}])
    if report["refused"]:
        body += "\n\n## Refused rows (first 50)\n\n" + "\n".join(f"- {r}" for r in report["refused"][:50])
    create_markdown_artifact(key="ingest-report", markdown=body, description="fkd ingest")
