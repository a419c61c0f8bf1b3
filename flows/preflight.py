"""What would make a flow fail whatever it does, checked before anything is written, and before Prefect is imported.

Each function takes its flow's config and raises :class:`~fkd_core.errors.UserError` naming what is wrong and
where: a missing path or bucket, an output that is a file, a model that does not load or has no mapping for the
detector asked for, a Dask scheduler that does not answer, a train extra that is not installed. The CLI calls them
first, so a refusal is one line within a second or two (no Prefect, no temporary server); each flow calls them
again where it runs (a deployment run has no CLI in front of it). No Prefect here.
"""

from __future__ import annotations

from fkd_core.annotate import MODEL_THREADS
from fkd_core.errors import UserError
from fkd_core.predict import Predictor
from fkd_core.storage import check_exists, check_output


def locations(source: str, out: str) -> None:
    """The source exists (its bucket, on an object store), and the output is somewhere fkd can write its files."""
    check_exists(source, "source", directory=True)
    check_output(out)


def annotate(cfg, paths: bool = True) -> Predictor:
    """An annotate run's source, output (unless ``paths`` is off: the flow checks them in a task of their own, so
    a store that does not answer is retried), Dask scheduler and model; returns the predictor the run will use.

    Object stores have no directories, so an empty or absent prefix in an existing bucket is a run with nothing to
    do, not an error.
    """
    if paths:
        locations(cfg.source, cfg.out)
    if cfg.dask_address:
        check_scheduler(cfg.dask_address)
    return predictor_of(cfg.model, cfg.refine, cfg.detector)


def predictor_of(model: str, refine: bool, detector: str | None) -> Predictor:
    """The predictor annotate runs (built once per process: preflight, the flow, every shard and each Dask worker
    ask for this same one)."""
    return Predictor.from_checkpoint(model, refine=refine, detector=detector, threads=MODEL_THREADS)


def check_scheduler(address: str, timeout: float = 10.0) -> None:
    """Refuse a Dask scheduler address where nothing answers (a typo, a stopped cluster), naming it, instead of
    a 30 s wait and a traceback; ``tcp://`` addresses are checked, others are left to Dask."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme != "tcp" or not parts.hostname:
        return
    try:
        socket.create_connection((parts.hostname, parts.port or 8786), timeout=timeout).close()
    except OSError as e:
        raise UserError(
            f"Dask scheduler {address} does not answer ({e.strerror or type(e).__name__}); check --dask-address "
            "or FKD_DASK_ADDRESS"
        ) from None


def ingest(cfg) -> None:
    """An ingest run's CSV, images and output."""
    labelled(cfg.csv, cfg.images, cfg.out)


def labelled(csv: str, images: str, out: str) -> None:
    """A keypoints CSV and its images exist, and the output is somewhere fkd can write (ingest and evaluate)."""
    check_exists(csv, "CSV")
    check_exists(images, "images", directory=True)
    check_output(out)


def evaluate(cfg) -> Predictor:
    """An evaluate run's CSV, images, output and model; returns the predictor it scores."""
    labelled(cfg.csv, cfg.images, cfg.out)
    # the same cached load the shards use: the CLI's check, the flow and every shard share one checkpoint load
    return Predictor.from_checkpoint(cfg.model, detector=cfg.detector)


def train(cfg) -> None:
    """What this machine lacks for training (the train extra, the device asked for) comes first, since no path
    would help; then the examples, output and start checkpoints.

    No name can clash with a served model: the checkpoint is named by its weights' sha256 (``save_new_checkpoint``).
    """
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("torch", "onnx")):  # each stage's graph is exported too
        raise UserError(
            "training needs torch and onnx, which this install of fkd lacks: pip install 'fkd[train]' (annotate "
            "and evaluate need neither)"
        )
    if cfg.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"device: {cfg.device!r} asked for, but torch sees no CUDA GPU on this machine")
    check_exists(cfg.examples, "examples", directory=True)
    check_output(cfg.out_dir)
    for what, uri in (("init", cfg.init), ("refine_of", cfg.refine_of)):
        if uri:
            check_exists(uri, what)
