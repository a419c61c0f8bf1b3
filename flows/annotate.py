"""Flow ``annotate``: images under a directory or bucket prefix -> keypoint Parquet (resumable, shardable)."""

from __future__ import annotations

import datetime as dt
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from fkd_core import image_io
from fkd_core.annotate import ShardConfig, ShardCounts, annotate_to_tables, read_window
from fkd_core.errors import RunConflict, UserError
from fkd_core.layout import AnnotateOutput
from fkd_core.lease import Lease, LeaseUnsupported, default_holder
from fkd_core.parquet_io import FACES_SCHEMA, IMAGES_SCHEMA, dataset, write_table
from fkd_core.predict import Predictor
from fkd_core.runs import RunRecord, check_identity, finished_counts
from fkd_core.storage import Listing, SourceFile, exists, iter_read, read_json

from . import preflight
from ._common import IO_RETRY, chunks, flat_parameters, markdown_table
from .configs import AnnotateConfig
from .progress import ProgressBoard, progress_sink, stop_event

PLAN_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("source_version", pa.string()),  # as listed; written to the images table
    ]
)
SKIPPED_SCHEMA = pa.schema(
    [pa.field("uri", pa.string(), nullable=False), pa.field("reason", pa.string(), nullable=False)]
)


def new_run_id() -> str:
    """A run id: a UTC time and eight hex digits (``20250101T020000Z-1a2b3c4d``).

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
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


@task(**IO_RETRY)
def check_locations(source: str, out: str) -> None:
    """``preflight.locations`` as a task: a store that does not answer is retried like any other storage call."""
    preflight.locations(source, out)


@task(**IO_RETRY)
def list_source(source: str, links_out: bool = False) -> Listing:
    return image_io.list_source(source, links_out=links_out)


@task(**IO_RETRY)
def already_annotated(out: str, uris: list[str]) -> set[tuple[str, str | None, int | None]]:
    """What earlier runs under ``out`` annotated of ``uris``: a set of (URI, source version, bytes) of finished
    rows with a status other than ``error`` (the version is None in rows written before versions existed)."""
    import pyarrow.compute as pc

    images = AnnotateOutput(out).table("images")
    if not uris or not exists(images):
        return set()
    tbl = dataset(images, schema=IMAGES_SCHEMA, partitioning="runs").to_table(
        columns=["image_uri", "status", "source_version", "bytes"],
        filter=pc.field("status") != "error",
    )
    tbl = tbl.filter(pc.is_in(tbl.column("image_uri"), value_set=pa.array(uris, pa.string())))
    cols = (tbl.column(c).to_pylist() for c in ("image_uri", "source_version", "bytes"))
    return set(zip(*cols, strict=True))


def is_done(f: SourceFile, done: set[tuple[str, str | None, int | None]]) -> bool:
    """Whether an incremental run may skip a listed file: an earlier run annotated this very file (status ok or
    no_face, same version; rows from before versions were recorded match on size). Errors are tried again."""
    return (f.uri, f.version, f.size) in done or (f.version is not None and (f.uri, None, f.size) in done)


@task(**IO_RETRY)
def save_plan(uri: str, shards: list[list[SourceFile]]) -> None:
    ids = [i for i, s in enumerate(shards) for _ in s]
    files = [f for s in shards for f in s]
    write_table(
        pa.table(
            {
                "shard": pa.array(ids, pa.int32()),
                "image_uri": [f.uri for f in files],
                "source_version": pa.array([f.version for f in files], pa.string()),
            }
        ),
        uri,
        PLAN_SCHEMA,
    )


@task(**IO_RETRY)
def save_skipped(uri: str, skipped: list[tuple[str, str]]) -> None:
    write_table(pa.table({"uri": [u for u, _ in skipped], "reason": [r for _, r in skipped]}), uri, SKIPPED_SCHEMA)


@task(**IO_RETRY)
def load_plan(uri: str) -> list[list[SourceFile]]:
    tbl = dataset(uri, schema=PLAN_SCHEMA).to_table()
    shards: dict[int, list[SourceFile]] = {}
    for s, u, v in zip(*(tbl.column(c).to_pylist() for c in ("shard", "image_uri", "source_version")), strict=True):
        shards.setdefault(s, []).append(SourceFile(u, None, v))
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
    versions: list[str | None] | None = None,
    detector: str | None = None,
) -> ShardCounts:
    """Annotate one shard end to end: read its files (streamed), annotate them, write its Parquet parts, the
    ``images`` part last as the mark of a finished shard (idempotent: reruns overwrite the same parts)."""
    t0 = time.perf_counter()
    predictor = preflight.predictor_of(model, refine, detector)
    shard_cfg = ShardConfig(max_pixels=max_pixels, threads=shard_threads())
    reads = iter_read(uris, shard_cfg.max_bytes, read_window(shard_cfg))
    sink, stop = progress_sink(progress_key), stop_event(progress_key)
    result = annotate_to_tables(reads, predictor, shard_cfg, sink, versions, stop)
    meta = {"model_id": predictor.model_id, "run_id": run_id}
    output = AnnotateOutput(out)
    write_table(result.faces, output.part("faces", run_id, shard), FACES_SCHEMA, meta)
    write_table(result.images, output.part("images", run_id, shard), IMAGES_SCHEMA, meta)
    result.counts.seconds = time.perf_counter() - t0
    return result.counts


@task(**IO_RETRY)
def run_counts(out: str, run_id: str) -> dict:
    """Images per status and faces over the whole run (every attempt), from its finished ``images`` parts."""
    return finished_counts(out, run_id)


@contextmanager
def _leases(cfg: AnnotateConfig, run_id: str, log) -> Iterator[list[Lease]]:
    """Hold, in ``<out>/locks/`` itself, the run's own lease and, for an incremental run, the output's.

    They live with the data, not in a Prefect server, so they exclude runs launched from anywhere (two CLIs,
    two machines, a served schedule and a manual run), and a holder that dies stops renewing its lease, which
    then expires after ``lease_seconds``. A run id already running elsewhere is refused at once; an incremental
    run waits for the one before it, saying what it waits for.
    """
    locks = AnnotateOutput(cfg.out).locks
    held: list[Lease] = []
    try:
        try:
            run = Lease(locks, f"run-{run_id}", default_holder(run_id=run_id), ttl=cfg.lease_seconds)
            free = run.try_acquire()
        except LeaseUnsupported as e:
            if cfg.incremental:  # two incremental runs there could claim the same images: refuse, naming why
                raise UserError(f"--incremental needs an output where runs can exclude each other: {e}") from None
            # a store without atomic create (not local, not S3) can still be annotated, only without exclusion
            log.warning("runs on %s cannot exclude each other (%s): do not start two on it at once", cfg.out, e)
            yield held
            return
        if not free:
            h = run.last_holder or {}
            raise RunConflict(
                f"run {run_id} is already in progress under {cfg.out} ({_who(h)}); wait for it, or if its process "
                f"died, rerun after its lease expires at {h.get('expires_at')}"
            )
        held.append(run)  # before anything else can fail, so the finally releases it
        run.start_renewing()
        if cfg.incremental:
            logged = [-math.inf]

            def waiting(record: dict, waited: float) -> None:
                if waited - logged[0] >= 30 or waited == 0:
                    logged[0] = waited
                    log.info("waiting for the incremental lease on %s, held by %s until %s; waited %.0f s so far",
                             cfg.out, _who(record), record.get("expires_at"), waited)  # fmt: skip

            inc = Lease(locks, "incremental", default_holder(run_id=run_id), ttl=cfg.lease_seconds)
            inc.acquire(poll=min(5.0, cfg.lease_seconds / 4), on_wait=waiting)
            held.append(inc)
            inc.start_renewing()
        yield held
    finally:
        for lease in reversed(held):
            if lease.lost is not None:
                log.warning("lease %s was lost while the run held it: %s", lease.name, lease.lost)
            lease.release()


def _who(record: dict) -> str:
    h = record.get("holder") or {}
    return f"run {h.get('run_id')} on {h.get('host')}, pid {h.get('pid')}" if h else "an unreadable lease record"


@flow(name="annotate")
@flat_parameters(AnnotateConfig)
def annotate(cfg: AnnotateConfig) -> dict:
    """Find every face in the images under `source` and write 68 keypoints per face as Parquet under `out`.

    Lists the source, plans shards, annotates each (locally or on Dask), and keeps `runs/<id>.json` true
    (running, completed, failed or interrupted). Rerunning a run id resumes it.
    """
    check_locations(cfg.source, cfg.out)
    # the CLI's checks, again where the flow runs: a Dask scheduler that does not answer, a missing or broken
    # model, a detector it has no mapping for (or that is not installed) fail here
    predictor = preflight.annotate(cfg, paths=False)
    run_id = cfg.run_id or new_run_id()
    log = get_run_logger()
    if predictor.why_untrusted:
        log.warning("%s: face_prob and quality will be null: %s", predictor.model_id, predictor.why_untrusted)
    with _leases(cfg, run_id, log) as leases:
        return _annotate(cfg, predictor, run_id, log, leases)


def _check_leases(leases: list[Lease]) -> None:
    """Stop (LeaseLost) if this run no longer holds its leases: paused or cut off from the store for longer than
    their lifetime, another run may have taken them over, and going on would claim its images."""
    for lease in leases:
        lease.check()


def _annotate(cfg: AnnotateConfig, predictor: Predictor, run_id: str, log, leases: list[Lease]) -> dict:
    t0 = time.perf_counter()
    output = AnnotateOutput(cfg.out)
    # the detector settings travel in the checkpoint's JSON; the run records the ones it used
    identity = {"source": cfg.source, "model_id": predictor.model_id, "detector": predictor.detector.to_record()}
    previous = read_json(output.record(run_id))
    if previous is not None and exists(output.plan(run_id)):
        check_identity(previous, run_id, **identity)  # a run's identity never changes
        # A rerun of a run id keeps its original plan, so shards mean the same images as before.
        shards, doc = load_plan(output.plan(run_id)), previous
        log.info("resuming run %s (%s before): %d shards planned", run_id, previous.get("status"), len(shards))
    else:
        shards, doc = _new_plan(cfg, run_id, output, log, leases)
        doc = {"run_id": run_id, **identity, **doc}
    doc["config"] = cfg.model_dump()
    record = RunRecord(
        output.record(run_id), doc, cfg.heartbeat_seconds,
        on_error=lambda e: log.warning("run record heartbeat not written: %s", e),
    )  # fmt: skip
    record.start()
    try:
        totals, pending = _run_shards(cfg, run_id, shards, log, leases)
        counts = run_counts(cfg.out, run_id)
    except BaseException as e:
        _record_stopped(record, e, run_id, log)
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
    _summary_artifact(cfg, record.doc, totals, seconds, log)
    return record.doc


def _new_plan(cfg: AnnotateConfig, run_id: str, output: AnnotateOutput, log, leases: list[Lease]):
    """List the source (less what an incremental run skips), cut it into shards and save the plan; returns the
    shards and what the run record says of them."""
    listing = list_source(cfg.source, cfg.follow_links_out)
    files, skipped = listing.images, 0
    if cfg.incremental:
        done = already_annotated(cfg.out, [f.uri for f in listing.images])
        files = [f for f in listing.images if not is_done(f, done)]
        skipped = len(listing.images) - len(files)
        log.info("incremental: %d images already annotated, %d new or changed", skipped, len(files))
    if listing.skipped:
        # every file under the source is accounted for: what is not annotated is listed with the reason
        save_skipped(output.skipped(run_id), listing.skipped)
        log.info("%d files under the source are not images (runs/%s.skipped.parquet says why)",
                 len(listing.skipped), run_id)  # fmt: skip
    warnings = []
    if not listing.images:  # a quiet night lists images it skips; a typo in the prefix lists nothing at all
        found = f"{len(listing.skipped)} files but no image" if listing.skipped else "nothing"
        warnings.append(f"source {cfg.source} lists {found}: check the path or prefix; this run annotates nothing")
        log.warning(warnings[-1])
    shards = list(chunks(files, cfg.shard_size))
    _check_leases(leases)  # the plan claims these images: only while the leases are ours
    save_plan(output.plan(run_id), shards)
    doc = {
        "skipped_existing": skipped,
        "skipped_files": len(listing.skipped),
        "shards": len(shards),
        "images_planned": sum(map(len, shards)),
    }
    return shards, doc | ({"warnings": warnings} if warnings else {})


def _record_stopped(record: RunRecord, e: BaseException, run_id: str, log) -> None:
    """Record a run that stopped: an Exception is a failure; anything else (SIGTERM as Prefect's
    TerminationSignal, Ctrl-C) an interruption. The run's own error is the one raised, not the record's."""
    status = "failed" if isinstance(e, Exception) else "interrupted"
    try:
        record.finish(status, error=_describe(e))  # on a full disk, in the record's own blocks
    except Exception as write_error:
        log.warning("could not record run %s as %s: %s", run_id, status, write_error)


def _summary_artifact(cfg: AnnotateConfig, doc: dict, totals: ShardCounts, seconds: float, log) -> None:
    run_id = doc["run_id"]
    summary = {"run_id": run_id} | {k: getattr(totals, k) for k in ("images", "ok", "no_face", "error", "faces")}
    summary["seconds"] = round(seconds, 1)
    warned = "".join(f"\n\n**Warning:** {w}" for w in doc.get("warnings", []))
    create_markdown_artifact(
        key="annotate-run",
        markdown=f"# fkd annotate `{run_id}`\n\nsource `{cfg.source}` -> `{cfg.out}`, model `{doc['model_id']}`"
        f"{warned}\n\n" + markdown_table([summary]),
        description="fkd annotate run summary" + (" (with warnings)" if warned else ""),
    )
    log.info("run %s done: %s", run_id, summary)


def _describe(e: BaseException) -> str:
    """What stopped a run, for its record: the error, or the signal that interrupted it."""
    if isinstance(e, Exception):
        return f"{type(e).__name__}: {e}"
    import signal

    signum = getattr(e, "signal", None)  # Prefect's TerminationSignal carries the signal number
    if signum:
        how = signal.Signals(signum).name
    else:
        how = "SIGINT (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else type(e).__name__
    return f"interrupted by {how}; rerun the run id to resume"


def _run_shards(
    cfg: AnnotateConfig, run_id: str, shards: list[list[SourceFile]], log, leases: list[Lease]
) -> tuple[ShardCounts, list[int]]:
    """Run the shards not finished yet; the board shows images done as they come, shard logs show throughput."""
    output = AnnotateOutput(cfg.out)
    pending = [i for i in range(len(shards)) if not exists(output.part("images", run_id, i))]
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
                        "uris": [f.uri for f in shards[i]],
                        "versions": [f.version for f in shards[i]],
                        "shard": i,
                        "out": cfg.out,
                        "run_id": run_id,
                        "model": cfg.model,
                        "max_pixels": cfg.max_pixels,
                        "refine": cfg.refine,
                        "detector": cfg.detector,
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
                        board.shard_done(counts.images, counts.faces)
                        log.info(
                            "shard done: %d images, %d faces, %d errors, %.1f images/s",
                            counts.images,
                            counts.faces,
                            counts.error,
                            counts.images / max(counts.seconds, 1e-9),
                        )
                    board.tick()
                    _check_leases(leases)
            except BaseException:
                board.cancel()  # so leaving the runner does not wait for every running shard to finish
                raise
    finally:
        board.close()
    return totals, pending


def _load_model_on_workers(runner, cfg: AnnotateConfig, log) -> None:
    """Have every Dask worker build the predictor before the shards go out (and any worker that joins later)."""
    from .workers import ModelOnWorkers

    t0 = time.perf_counter()
    client = runner.client
    client.register_plugin(ModelOnWorkers(cfg.model, cfg.refine, cfg.detector))
    log.info("model loaded on the Dask workers in %.1f s", time.perf_counter() - t0)
    # a worker without this flow's Prefect API starts a temporary server of its own (seconds per worker) and
    # records the shards' task runs there, out of sight
    from prefect.settings import PREFECT_API_URL

    ours = PREFECT_API_URL.value()
    theirs = client.run(lambda: __import__("os").environ.get("PREFECT_API_URL"))
    apart = sorted(w for w, url in theirs.items() if url != ours)
    if apart:
        log.warning("%d Dask worker(s), e.g. %s, report to another Prefect API than this flow (%s), so the shards' "
                    "task runs are recorded there (a worker without PREFECT_API_URL starts a temporary server of "
                    "its own, seconds each); point the flow and the workers at one Prefect server with "
                    "PREFECT_API_URL", len(apart), apart[0],
                    ours or "which runs on a temporary server")  # fmt: skip


def _task_runner(cfg: AnnotateConfig):
    if cfg.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.dask_address)
    return ThreadPoolTaskRunner(max_workers=cfg.workers)
