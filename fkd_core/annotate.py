"""Batch annotation of one shard of images: the work of one annotate task, Prefect-free.

read -> decode -> Haar -> crops -> batched model forward -> keypoints in original pixels -> the ``images`` and
``faces`` Parquet parts of docs/design.md. A bad file becomes an ``error`` row with its reason; nothing stops the shard.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fkd_core.errors import FkdError, ImageError
from fkd_core.image_io import DEFAULT_MAX_PIXELS, decode_gray, sha256_hex
from fkd_core.parquet_io import keypoint_column
from fkd_core.predict import Face, Located, Predictor
from fkd_core.storage import DEFAULT_MAX_BYTES, stable_reason
from fkd_core.types import Box


@dataclass(frozen=True)
class ShardConfig:
    """How a shard is read and worked (the detector settings are the checkpoint's: see ``Predictor``)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    threads: int = 0  # decode + detect threads per shard; 0 = one per core
    model_every: int = 32  # images per batched model pass and per progress report (progress moves every <= 50)


@dataclass
class _Image:
    uri: str
    status: str = "ok"
    error: str | None = None
    width: int | None = None
    height: int | None = None
    nbytes: int = 0
    sha256: str | None = None
    boxes: list[Box] = field(default_factory=list)
    located: Located | None = None  # the faces' crops, until the model has run
    faces: list[Face] = field(default_factory=list)  # per box: keypoints in original pixels and trust columns
    version: str | None = None  # the source file's version as listed (size + mtime, or ETag)

    def fail(self, reason: str) -> None:
        self.status, self.error = "error", reason
        self.boxes, self.located = [], None


@dataclass
class ShardCounts:
    images: int = 0
    ok: int = 0
    no_face: int = 0
    error: int = 0
    faces: int = 0
    seconds: float = 0.0

    def add(self, other: ShardCounts) -> None:
        for k in ("images", "ok", "no_face", "error", "faces", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _prepare(uri: str, data: bytes | ImageError, predictor: Predictor, s: ShardConfig) -> _Image:
    img = _Image(uri)
    if isinstance(data, ImageError):
        img.status, img.error = "error", str(data)
        return img
    img.nbytes, img.sha256 = len(data), sha256_hex(data)
    try:
        decoded = decode_gray(data, s.max_pixels)
        img.width, img.height = decoded.width, decoded.height
        img.located = predictor.locate(decoded.gray)
        img.boxes = img.located.boxes
    except ImageError as e:
        img.fail(str(e))
    except Exception as e:  # an unexpected failure on one file must not stop the batch
        img.fail(f"internal error: {stable_reason(f'{type(e).__name__}: {e}')}")
    else:
        img.status = "ok" if img.boxes else "no_face"
    return img


def read_window(s: ShardConfig) -> int:
    """Files read ahead of the decoders: enough to keep every decode thread busy, few enough that memory holds a
    few decoded images whatever the shard size."""
    return 4 * (s.threads or os.cpu_count() or 1)


# The model's threads in annotate: one. Its batches run on a thread of their own beside the decode and detection
# threads, so every core is already busy, and ONNX Runtime on one thread does more per core-second than on all of
# them (annotate: 1.02 x the images/s; benchmarks/bench_annotate.py batching).
MODEL_THREADS = 1


class ShardCancelled(FkdError):
    """The run is stopping (interrupted, or another shard failed): a shard still running gives up at its next
    file, and writes nothing."""


def annotate_images(
    reads: Iterable[tuple[str, bytes | ImageError]],
    predictor: Predictor,
    s: ShardConfig = ShardConfig(),
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> list[_Image]:
    """Annotate files given as ``(uri, bytes or the error reading them raised)``, in order (``storage.iter_read``
    streams them): threads decode and detect; the model runs batched on every ``s.model_every`` images as they come,
    on a thread of its own, while the next images are decoded and detected.

    Running the model as images come (instead of once per shard) keeps only a few batches of crops in memory and
    lets ``progress(n, faces)`` report images that are really done, ``n`` at a time, with their faces. Once
    ``stop`` is set, the next file raises :class:`ShardCancelled`.
    """
    threads = s.threads or os.cpu_count() or 1
    window = read_window(s)
    images: list[_Image] = []
    batch: list[_Image] = []
    running: deque = deque()  # (future, images) of model batches, oldest first

    def done(keep: int) -> None:
        """Collect finished model batches, in order, until at most ``keep`` run."""
        while len(running) > keep:
            fut, b = running.popleft()
            fut.result()
            images.extend(b)
            if progress is not None:
                progress(len(b), sum(len(im.boxes) for im in b))

    def take(img: _Image, model: ThreadPoolExecutor) -> None:
        batch.append(img)
        if len(batch) >= s.model_every:
            running.append((model.submit(_run_model, list(batch), predictor), list(batch)))
            batch.clear()
            done(keep=1)  # one batch runs while the next is gathered: memory holds two batches' crops

    with ThreadPoolExecutor(1) as model, ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for u, d in reads:
            # checked as each file is read: a shard whose files are all read already finishes the few in flight
            # and writes its parts (harmless: parts are idempotent, and the run is recorded as stopped)
            if stop is not None and stop.is_set():
                raise ShardCancelled("the run is stopping")
            pending.append(pool.submit(_prepare, u, d, predictor, s))
            if len(pending) >= window:
                take(pending.popleft().result(), model)
        for f in pending:
            take(f.result(), model)
        if batch:
            running.append((model.submit(_run_model, list(batch), predictor), list(batch)))
        done(keep=0)
    return images


def _run_model(images: list[_Image], predictor: Predictor) -> None:
    """Keypoints, in original pixels, for every face of ``images`` (one batched pass per stage); frees the crops."""
    waiting = [im for im in images if im.located is not None]
    for im, faces in zip(waiting, predictor.faces_of([im.located for im in waiting]), strict=True):
        im.faces = faces
        im.located = None


def tables(images: list[_Image], model_id: str, created_at: dt.datetime) -> tuple[pa.Table, pa.Table]:
    """The ``images`` and ``faces`` tables (without ``run_id``: it is the partition) of annotated images."""
    n = len(images)
    ts = pa.array([created_at] * n, pa.timestamp("us", tz="UTC"))
    img_tbl = pa.table(
        {
            "image_uri": [im.uri for im in images],
            "status": [im.status for im in images],
            "error": [im.error for im in images],
            "width": pa.array([im.width for im in images], pa.int32()),
            "height": pa.array([im.height for im in images], pa.int32()),
            "n_faces": pa.array([len(im.boxes) for im in images], pa.int16()),
            "bytes": pa.array([im.nbytes for im in images], pa.int64()),
            "sha256": [im.sha256 for im in images],
            "created_at": ts,
            "source_version": pa.array([im.version for im in images], pa.string()),
        }
    )
    faces = [(im, k) for im in images for k in range(len(im.boxes))]
    kp = np.asarray([im.faces[k].keypoints for im, k in faces], np.float32).reshape(-1, 68, 2)

    def trust(attr: str) -> pa.Array:
        return pa.array([getattr(im.faces[k], attr) for im, k in faces], pa.float32())

    face_tbl = pa.table(
        {
            "image_uri": pa.array([im.uri for im, _ in faces], pa.string()),
            "face_index": pa.array([k for _, k in faces], pa.int16()),
            "box_x": pa.array([round(im.boxes[k].x) for im, k in faces], pa.int32()),
            "box_y": pa.array([round(im.boxes[k].y) for im, k in faces], pa.int32()),
            "box_w": pa.array([round(im.boxes[k].w) for im, k in faces], pa.int32()),
            "box_h": pa.array([round(im.boxes[k].h) for im, k in faces], pa.int32()),
            "keypoints_x": keypoint_column(kp[:, :, 0]),
            "keypoints_y": keypoint_column(kp[:, :, 1]),
            "det_score": trust("det_score"),
            "yaw": trust("yaw"),
            "face_prob": trust("face_prob"),
            "quality": trust("quality"),
            "model_id": pa.array([model_id] * len(faces), pa.string()),
            "created_at": pa.array([created_at] * len(faces), pa.timestamp("us", tz="UTC")),
        }
    )
    return img_tbl, face_tbl


@dataclass
class ShardOutput:
    """One annotated shard: its ``images`` and ``faces`` tables (without ``run_id``: it is the partition)."""

    images: pa.Table
    faces: pa.Table
    counts: ShardCounts


def annotate_to_tables(
    reads: Iterable[tuple[str, bytes | ImageError]],
    predictor: Predictor,
    s: ShardConfig = ShardConfig(),
    progress: Callable[[int, int], None] | None = None,
    versions: list[str | None] | None = None,
    stop: threading.Event | None = None,
) -> ShardOutput:
    """Annotate one shard's files, given as ``(uri, bytes or error)`` in order, into its tables; no storage I/O
    (the annotate flow's task reads with ``storage.iter_read`` and writes the parts, ``faces`` first).

    ``versions`` (one per file, as listed) go into the images table, so ``--incremental`` sees replaced files.
    """
    t0 = time.perf_counter()
    images = annotate_images(reads, predictor, s, progress, stop)
    for im, v in zip(images, versions or [None] * len(images), strict=True):
        im.version = v
    img_tbl, face_tbl = tables(images, predictor.model_id, dt.datetime.now(dt.UTC))
    c = ShardCounts(images=len(images), faces=face_tbl.num_rows, seconds=time.perf_counter() - t0)
    for im in images:
        setattr(c, im.status, getattr(c, im.status) + 1)
    return ShardOutput(img_tbl, face_tbl, c)
