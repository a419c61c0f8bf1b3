"""Flow ``annotate``: images under a directory or bucket prefix -> keypoint Parquet (resumable, shardable)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import sys
import time

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from fkd_core.annotate import AnnotateSettings, ShardCounts, run_shard
from fkd_core.checkpoint import DEFAULT_MODEL
from fkd_core.image_io import DEFAULT_MAX_PIXELS, join_uri, list_images
from fkd_core.parquet_io import dataset, exists, part_uri, read_json, write_json, write_table
from flows._common import IO_RETRIES, cached_predictor, chunks, markdown_table

PLAN_SCHEMA = pa.schema(
    [pa.field("shard", pa.int32(), nullable=False), pa.field("image_uri", pa.string(), nullable=False)]
)


class AnnotateConfig(BaseModel):
    """Find every face in a set of images and put 68 keypoints on each."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Image directory, bucket prefix (s3://...), any fsspec URL, or one image")
    out: str = Field(description="Output directory or prefix: images/, faces/ and runs/ go under it")
    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Run id; rerunning an existing one resumes it"
    )
    model: str = Field(str(DEFAULT_MODEL), description="Checkpoint (.safetensors, with its .json beside it)")
    shard_size: int = Field(500, ge=1, le=100_000, description="Images per task")
    refine: bool = Field(
        True, description="Run a two-stage checkpoint's refining stage (off: first stage only, faster, less accurate)"
    )
    incremental: bool = Field(False, description="Only images not already in any run under `out`")
    dask_address: str | None = Field(None, description="Run shards on this Dask scheduler (tcp://host:port)")
    workers: int = Field(1, ge=1, le=64, description="Shards at once with the local runner")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Refuse images with more pixels (pixel bombs)")
    progress: bool = Field(False, description="Draw a progress bar on stderr")


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@task(retries=IO_RETRIES[0], retry_delay_seconds=IO_RETRIES[1])
def list_source(source: str) -> list[str]:
    return list_images(source)


@task(retries=IO_RETRIES[0], retry_delay_seconds=IO_RETRIES[1])
def already_annotated(out: str) -> set[str]:
    """Every image URI present in any run's finished ``images`` parts."""
    if not exists(join_uri(out, "images")):
        return set()
    tbl = dataset(join_uri(out, "images"), partitioning="runs").to_table(columns=["image_uri"])
    return set(tbl.column("image_uri").to_pylist())


@task(retries=IO_RETRIES[0], retry_delay_seconds=IO_RETRIES[1])
def save_plan(uri: str, shards: list[list[str]]) -> None:
    ids = [i for i, s in enumerate(shards) for _ in s]
    write_table(
        pa.table({"shard": pa.array(ids, pa.int32()), "image_uri": [u for s in shards for u in s]}), uri, PLAN_SCHEMA
    )


@task(retries=IO_RETRIES[0], retry_delay_seconds=IO_RETRIES[1])
def load_plan(uri: str) -> list[list[str]]:
    tbl = dataset(uri, schema=PLAN_SCHEMA).to_table()
    shards: dict[int, list[str]] = {}
    for s, u in zip(tbl.column("shard").to_pylist(), tbl.column("image_uri").to_pylist(), strict=True):
        shards.setdefault(s, []).append(u)
    return [shards[i] for i in range(len(shards))]


@task(retries=IO_RETRIES[0], retry_delay_seconds=IO_RETRIES[1])
def annotate_shard(
    uris: list[str], shard: int, out: str, run_id: str, model: str, max_pixels: int, refine: bool = True
) -> ShardCounts:
    """Annotate one shard end to end and write its Parquet parts (idempotent: reruns overwrite the same parts)."""
    predictor, loaded = cached_predictor(model, refine)
    settings = AnnotateSettings(detector=loaded.detector, max_pixels=max_pixels)
    return run_shard(uris, shard, out, run_id, predictor, loaded.model_id, settings)


def _one_incremental_run_at_a_time(out: str):
    """A Prefect global concurrency limit of 1 per output location, for incremental runs.

    Two incremental runs planning at the same moment would both claim the same new images; holding this slot
    from listing to the last shard serialises them wherever they are launched from (a served schedule,
    a worker, the CLI), as long as they share a Prefect server.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = "fkd-incremental-" + hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
    return concurrency(name, occupy=1, strict=True)


@flow(name="annotate")
def annotate(cfg: AnnotateConfig) -> dict:
    """List -> plan shards -> annotate each (locally or on Dask) -> ``runs/<id>.json`` and an artifact."""
    if cfg.incremental:
        with _one_incremental_run_at_a_time(cfg.out):
            return _annotate(cfg)
    return _annotate(cfg)


def _annotate(cfg: AnnotateConfig) -> dict:
    log = get_run_logger()
    t0 = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    run_uri = join_uri(cfg.out, "runs", f"{run_id}.json")
    plan_uri = join_uri(cfg.out, "runs", f"{run_id}.plan.parquet")
    loaded = cached_predictor(cfg.model, cfg.refine)[1]  # fail fast on a bad checkpoint, before anything is written
    model_id = loaded.model_id
    # the detector settings travel in the checkpoint's JSON; the run records the ones it used
    detector = loaded.detector.to_record()
    previous = read_json(run_uri)
    if previous is not None and exists(plan_uri):
        for key, what, now in (("model_id", "model", model_id), ("detector", "detector settings", detector)):
            if previous.get(key, now) != now:
                raise ValueError(
                    f"run {run_id} was started with {what} {previous[key]}; resume it with that checkpoint "
                    f"or start a new run id (this one is {now})"
                )
        # A rerun of a run id keeps its original plan, so shards mean the same images as before.
        shards = load_plan(plan_uri)
        log.info("resuming run %s: %d shards planned", run_id, len(shards))
    else:
        uris = list_source(cfg.source)
        skipped = 0
        if cfg.incremental:
            done = already_annotated(cfg.out)
            skipped = sum(u in done for u in uris)
            uris = [u for u in uris if u not in done]
            log.info("incremental: %d images already annotated, %d new", skipped, len(uris))
        shards = list(chunks(uris, cfg.shard_size))
        save_plan(plan_uri, shards)
        write_json(
            {
                "run_id": run_id,
                "status": "running",
                "config": cfg.model_dump(),
                "model_id": model_id,
                "detector": detector,
                "skipped_existing": skipped,
                "started_at": dt.datetime.now(dt.UTC).isoformat(),
            },
            run_uri,
        )
    pending = [i for i in range(len(shards)) if not exists(part_uri(cfg.out, "images", run_id, i))]
    log.info("run %s: %d images in %d shards, %d to do", run_id, sum(map(len, shards)), len(shards), len(pending))
    totals = ShardCounts()
    runner = _task_runner(cfg)
    bar = _progress(cfg.progress, sum(len(shards[i]) for i in pending))
    with runner:
        futures = [
            runner.submit(
                annotate_shard,
                {
                    "uris": shards[i],
                    "shard": i,
                    "out": cfg.out,
                    "run_id": run_id,
                    "model": cfg.model,
                    "max_pixels": cfg.max_pixels,
                    "refine": cfg.refine,
                },
            )
            for i in pending
        ]
        for fut in as_completed(futures):
            counts: ShardCounts = fut.result()
            totals.add(counts)
            bar(counts.images)
            log.info(
                "shard done: %d images, %d faces, %d errors, %.1f images/s",
                counts.images,
                counts.faces,
                counts.error,
                counts.images / max(counts.seconds, 1e-9),
            )
    bar(None)
    seconds = time.perf_counter() - t0
    doc = read_json(run_uri) or {}
    doc.update(
        {
            "run_id": run_id,
            "status": "completed",
            "config": cfg.model_dump(),
            "model_id": model_id,
            "detector": detector,
            "source": cfg.source,
            "shards": len(shards),
            "shards_run_now": len(pending),
            "images_planned": sum(map(len, shards)),
            "counts": run_counts(cfg.out, run_id),
            "counts_this_attempt": vars(totals) | {"seconds": round(totals.seconds, 2)},
            "seconds": round(seconds, 2),
            "images_per_second": round(totals.images / seconds, 2) if seconds else None,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        }
    )
    write_json(doc, run_uri)
    summary = {
        "run_id": run_id,
        "images": totals.images,
        "ok": totals.ok,
        "no_face": totals.no_face,
        "error": totals.error,
        "faces": totals.faces,
        "seconds": round(seconds, 1),
    }
    create_markdown_artifact(
        key="annotate-run",
        markdown=f"# fkd annotate `{run_id}`\n\nsource `{cfg.source}` -> `{cfg.out}`, model `{model_id}`\n\n"
        + markdown_table([summary]),
        description="fkd annotate run summary",
    )
    log.info("run %s done: %s", run_id, summary)
    return doc


@task(retries=IO_RETRIES[0], retry_delay_seconds=IO_RETRIES[1])
def run_counts(out: str, run_id: str) -> dict:
    """Images per status and faces over the whole run (every attempt), from its finished ``images`` parts."""
    import pyarrow.compute as pc

    tbl = dataset(join_uri(out, "images", f"run_id={run_id}")).to_table(columns=["status", "n_faces"])
    counts = {s: 0 for s in ("ok", "no_face", "error")}
    for row in pc.value_counts(tbl.column("status")).to_pylist():
        counts[row["values"]] = row["counts"]
    return {"images": tbl.num_rows, **counts, "faces": int(pc.sum(tbl.column("n_faces")).as_py() or 0)}


def _task_runner(cfg: AnnotateConfig):
    if cfg.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.dask_address)
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


def _progress(enabled: bool, total: int):
    """A rich progress bar on stderr when asked for; returns ``advance(n)``, closed by ``advance(None)``."""
    if not enabled or total == 0:
        return lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    p = Progress("annotate", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr))
    task_id = p.add_task("images", total=total)
    p.start()

    def advance(n: int | None) -> None:
        if n is None:
            p.stop()
        else:
            p.advance(task_id, n)

    return advance
