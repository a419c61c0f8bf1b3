"""Flow ``annotate``: images under a directory or bucket prefix -> keypoint Parquet (resumable, shardable)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fkd_core.annotate import AnnotateSettings, ShardCounts, run_shard
from fkd_core.errors import RunConflict
from fkd_core.image_io import DEFAULT_MAX_PIXELS, check_bucket, check_exists, join_uri, list_images
from fkd_core.parquet_io import dataset, exists, part_uri, read_json, write_table
from fkd_core.predict import Predictor
from fkd_core.runs import RunRecord, finished_counts
from flows._common import IO_RETRY, chunks, flat_parameters, markdown_table
from flows.progress import ProgressBoard, progress_sink
from flows.settings import SERVED_MODEL, served_model

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
    model: str | None = Field(None, description=f"Checkpoint (.safetensors, its .json beside it); {SERVED_MODEL}")
    shard_size: int = Field(500, ge=1, le=100_000, description="Images per task")
    refine: bool = Field(
        True, description="Run a two-stage checkpoint's refining stage (off: first stage only, faster, less accurate)"
    )
    incremental: bool = Field(False, description="Only images not already in any run under `out`")
    dask_address: str | None = Field(None, description="Run shards on this Dask scheduler (tcp://host:port)")
    workers: int = Field(1, ge=1, le=64, description="Shards at once with the local runner")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Refuse images with more pixels (pixel bombs)")
    progress: bool = Field(False, description="Draw a progress bar on stderr (the CLI sets it on a terminal)")
    heartbeat_seconds: float = Field(
        30.0, ge=0.1, le=3600, description="How often the run record's heartbeat is rewritten while the run lives"
    )

    _model = model_validator(mode="after")(served_model)


def new_run_id() -> str:
    """A run id that sorts by start time.

    Inside a Prefect flow run it is derived from that flow run (its creation time and id), so a flow run that
    Prefect reschedules or retries (after a SIGTERM or a crash) resumes the same fkd run instead of starting
    another beside the unfinished one.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    if run is not None and run.created is not None:
        # the id's random tail: Prefect's flow run ids are time-ordered (UUIDv7), their heads alike within a second
        return run.created.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + run.id.hex[-8:]
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def preflight(cfg: AnnotateConfig):
    """What would make the run fail whatever it does, checked before anything is written; returns the model.

    A missing source path, a missing source or output bucket, a missing or broken model: each raises a
    :class:`~fkd_core.errors.UserError` naming it. Object stores have no directories, so an empty or absent
    prefix in an existing bucket is a run with nothing to do, not an error.
    """
    check_locations.fn(cfg.source, cfg.out)
    return Predictor.from_checkpoint(cfg.model, refine=cfg.refine)


@task(**IO_RETRY)
def check_locations(source: str, out: str) -> None:
    """The source exists (its bucket, on an object store) and so does the output's bucket; a store that does not
    answer is retried like any other storage call."""
    check_exists(source, "source", directory=True)
    check_bucket(out, "output bucket")


@task(**IO_RETRY)
def list_source(source: str) -> list[str]:
    return list_images(source)


@task(**IO_RETRY)
def already_annotated(out: str) -> set[str]:
    """Every image URI present in any run's finished ``images`` parts."""
    if not exists(join_uri(out, "images")):
        return set()
    tbl = dataset(join_uri(out, "images"), partitioning="runs").to_table(columns=["image_uri"])
    return set(tbl.column("image_uri").to_pylist())


@task(**IO_RETRY)
def save_plan(uri: str, shards: list[list[str]]) -> None:
    ids = [i for i, s in enumerate(shards) for _ in s]
    write_table(
        pa.table({"shard": pa.array(ids, pa.int32()), "image_uri": [u for s in shards for u in s]}), uri, PLAN_SCHEMA
    )


@task(**IO_RETRY)
def load_plan(uri: str) -> list[list[str]]:
    tbl = dataset(uri, schema=PLAN_SCHEMA).to_table()
    shards: dict[int, list[str]] = {}
    for s, u in zip(tbl.column("shard").to_pylist(), tbl.column("image_uri").to_pylist(), strict=True):
        shards.setdefault(s, []).append(u)
    return [shards[i] for i in range(len(shards))]


def shard_threads() -> int:
    """Reading, decoding and Haar threads for one shard: on a Dask worker, the worker's own thread count (the
    cores it was given, however many the machine has); elsewhere 0, one per core."""
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except ValueError:  # not running on a Dask worker
        return 0


@task(**IO_RETRY)
def annotate_shard(
    uris: list[str],
    shard: int,
    out: str,
    run_id: str,
    model: str,
    max_pixels: int,
    refine: bool = True,
    progress_key: str | None = None,
) -> ShardCounts:
    """Annotate one shard end to end and write its Parquet parts (idempotent: reruns overwrite the same parts)."""
    predictor = Predictor.from_checkpoint(model, refine=refine)
    settings = AnnotateSettings(max_pixels=max_pixels, threads=shard_threads())
    return run_shard(uris, shard, out, run_id, predictor, settings, progress_sink(progress_key))


@task(**IO_RETRY)
def run_counts(out: str, run_id: str) -> dict:
    """Images per status and faces over the whole run (every attempt), from its finished ``images`` parts."""
    return finished_counts(out, run_id)


def _one_incremental_run_at_a_time(out: str):
    """A Prefect global concurrency limit of 1 per output location, for incremental runs.

    Two incremental runs planning at the same moment would both claim the same new images; holding this slot
    from listing to the last shard serialises them wherever they are launched from (a served schedule,
    a worker, the CLI), as long as they share a Prefect server. (Served nightly runs also wait for the
    deployment's own concurrency limit, in Prefect, before any process starts.)
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = "fkd-incremental-" + hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    with get_client(sync_client=True) as client:
        # look first: creating one that exists makes the Prefect server log a long traceback on every run
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it in between
                pass
    return concurrency(name, occupy=1, strict=True)


@flow(name="annotate")
@flat_parameters(AnnotateConfig)
def annotate(cfg: AnnotateConfig) -> dict:
    """Find every face in the images under `source` and write 68 keypoints per face as Parquet under `out`.

    Lists the source, plans shards, annotates each (locally or on Dask), and keeps `runs/<id>.json` true
    (running, completed, failed or interrupted). Rerunning a run id resumes it.
    """
    check_locations(cfg.source, cfg.out)
    # a missing or broken model fails here, before any write
    predictor = Predictor.from_checkpoint(cfg.model, refine=cfg.refine)
    if cfg.incremental:
        with _one_incremental_run_at_a_time(cfg.out):
            return _annotate(cfg, predictor)
    return _annotate(cfg, predictor)


def _annotate(cfg: AnnotateConfig, predictor: Predictor) -> dict:
    log = get_run_logger()
    t0 = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    run_uri = join_uri(cfg.out, "runs", f"{run_id}.json")
    plan_uri = join_uri(cfg.out, "runs", f"{run_id}.plan.parquet")
    model_id = predictor.model_id
    # the detector settings travel in the checkpoint's JSON; the run records the ones it used
    detector = predictor.detector.to_record()
    previous = read_json(run_uri)
    if previous is not None and exists(plan_uri):
        for key, what, now in (("model_id", "model", model_id), ("detector", "detector settings", detector)):
            if previous.get(key, now) != now:
                raise RunConflict(
                    f"run {run_id} was started with {what} {previous[key]}; resume it with that checkpoint "
                    f"or start a new run id (this one is {now})"
                )
        # A rerun of a run id keeps its original plan, so shards mean the same images as before.
        shards = load_plan(plan_uri)
        doc = previous
        log.info("resuming run %s (%s before): %d shards planned", run_id, previous.get("status"), len(shards))
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
        doc = {
            "run_id": run_id,
            "source": cfg.source,
            "model_id": model_id,
            "detector": detector,
            "skipped_existing": skipped,
            "shards": len(shards),
            "images_planned": sum(map(len, shards)),
        }
    doc["config"] = cfg.model_dump()
    record = RunRecord(
        run_uri, doc, cfg.heartbeat_seconds, on_error=lambda e: log.warning("run record heartbeat not written: %s", e)
    )
    record.start()
    try:
        totals, pending = _run_shards(cfg, run_id, shards, log)
        counts = run_counts(cfg.out, run_id)
    except BaseException as e:
        # an Exception is a failure; anything else (SIGTERM as Prefect's TerminationSignal, Ctrl-C) an interruption
        status = "failed" if isinstance(e, Exception) else "interrupted"
        try:
            record.finish(status, error=_describe(e))
        except Exception as write_error:  # noqa: BLE001 - the run's own error is the one to raise
            log.warning("could not record run %s as %s: %s", run_id, status, write_error)
        raise
    seconds = time.perf_counter() - t0
    record.finish(
        "completed",
        shards_run_now=len(pending),
        counts=counts,
        counts_this_attempt=vars(totals) | {"seconds": round(totals.seconds, 2)},
        seconds=round(seconds, 2),
        images_per_second=round(totals.images / seconds, 2) if seconds else None,
    )
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
    return record.doc


def _describe(e: BaseException) -> str:
    """What stopped a run, for its record: the error, or the signal that interrupted it."""
    if isinstance(e, Exception):
        return f"{type(e).__name__}: {e}"
    import signal

    signum = getattr(e, "signal", None)  # Prefect's TerminationSignal carries the signal number
    how = signal.Signals(signum).name if signum else type(e).__name__
    return f"interrupted by {how}; rerun the run id to resume"


def _run_shards(cfg: AnnotateConfig, run_id: str, shards: list[list[str]], log) -> tuple[ShardCounts, list[int]]:
    """Run the shards not finished yet; the board shows images done as they come, shard logs show throughput."""
    pending = [i for i in range(len(shards)) if not exists(part_uri(cfg.out, "images", run_id, i))]
    total = sum(len(shards[i]) for i in pending)
    log.info("run %s: %d images in %d shards, %d shards (%d images) to do", run_id, sum(map(len, shards)),
             len(shards), len(pending), total)  # fmt: skip
    totals = ShardCounts()
    board = ProgressBoard(total, f"annotate {run_id}", bar=cfg.progress)
    try:
        runner = _task_runner(cfg)
        with runner:
            board.listen_to(runner)
            if cfg.dask_address and pending:
                _load_model_on_workers(runner, cfg, log)
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
                        "progress_key": board.key,
                    },
                )
                for i in pending
            ]
            try:
                not_done = set(futures)
                while not_done:
                    done, not_done = wait(list(not_done), timeout=1.0)
                    for fut in done:
                        counts: ShardCounts = fut.result()
                        totals.add(counts)
                        board.shard_done(counts.images)
                        log.info(
                            "shard done: %d images, %d faces, %d errors, %.1f images/s",
                            counts.images,
                            counts.faces,
                            counts.error,
                            counts.images / max(counts.seconds, 1e-9),
                        )
                    board.tick()
            except BaseException:
                board.cancel()  # so leaving the runner does not wait for every running shard to finish
                raise
    finally:
        board.close()
    return totals, pending


def _load_model_on_workers(runner, cfg: AnnotateConfig, log) -> None:
    """Have every Dask worker build the predictor before the shards go out (and any worker that joins later)."""
    from flows.workers import ModelOnWorkers

    t0 = time.perf_counter()
    runner.client.register_plugin(ModelOnWorkers(cfg.model, cfg.refine))
    log.info("model loaded on the Dask workers in %.1f s", time.perf_counter() - t0)


def _task_runner(cfg: AnnotateConfig):
    if cfg.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.dask_address)
    return ThreadPoolTaskRunner(max_workers=cfg.workers)
