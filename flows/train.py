"""Flow ``train``: examples Parquet -> a new NaimishNet checkpoint ``<out_dir>/<name>-<sha256>`` (+ loss curve)."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from fkd_core import resume
from fkd_core.align import AlignPolicy
from fkd_core.checkpoint import LoadedModel, load_checkpoint, save_new_checkpoint
from fkd_core.detect import DetectorConfig
from fkd_core.errors import UserError
from fkd_core.geometry import CropPolicy
from fkd_core.ingest import CropRecord
from fkd_core.layout import IngestOutput
from fkd_core.metrics import nme_per_face
from fkd_core.netspec import NaimishNetConfig
from fkd_core.parquet_io import dataset, read_examples
from fkd_core.plots import loss_curve_png
from fkd_core.storage import read_json, write_bytes

from . import preflight
from ._common import flat_parameters
from .configs import TrainConfig

if TYPE_CHECKING:  # fkd_core.train needs torch (the train extra); fkd serve imports this module without it
    from fkd_core.train import History


@task
def load_split(examples: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    crops, kp, _ = read_examples(examples, split)
    if limit is not None:
        crops, kp = crops[:limit], kp[:limit]
    return crops, kp


@task
def data_fingerprint(examples: str) -> dict:
    """sha256 over (image id, source sha256, split) of every example, plus the ingest report's split policy."""
    tbl = dataset(examples).to_table(columns=["image_id", "sha256", "split"]).sort_by("image_id")
    h = hashlib.sha256()
    for i, s, sp in zip(*(tbl.column(c).to_pylist() for c in ("image_id", "sha256", "split")), strict=True):
        h.update(f"{i}\t{s}\t{sp}\n".encode())
    report = read_json(IngestOutput.of_examples(examples).report) or {}
    return {
        "examples": examples,
        "sha256": h.hexdigest(),
        "crop_policy": report.get("crop_policy"),
        "canonical_margin": report.get("canonical_margin"),
        "n_train": int(pc.sum(pc.equal(tbl.column("split"), "train")).as_py() or 0),
        "n_val": int(pc.sum(pc.equal(tbl.column("split"), "val")).as_py() or 0),
        "split": {k: report.get(k) for k in ("split_by", "val_fraction", "seed")},
        # the detector that cut the crops, which the checkpoint's inference must use too
        "detector": DetectorConfig.from_record(report["detector"]).to_record() if report.get("detector") else None,
    }


def stage_one(cfg: TrainConfig, policy: CropPolicy) -> LoadedModel | None:
    """The first-stage checkpoint a refining stage is trained for, checked against the examples."""
    if not cfg.refine_of:
        return None
    first = load_checkpoint(cfg.refine_of)
    if first.two_stage:
        raise UserError(f"refine_of: {cfg.refine_of} already has a refining stage; give its first stage alone")
    if first.policy != policy:
        raise UserError(
            f"refine_of: {cfg.refine_of} was trained on crops with {first.policy}, but the examples were cut "
            f"with {policy}; ingest with the checkpoint's crop policy"
        )
    return first


def loss_curves(history: History, ema_decay: float) -> tuple:
    """``loss_curve_png``'s arguments: with a weight average, its validation curves and the raw weights' NME."""
    e = history.epochs
    curves = ([s.epoch for s in e], [s.train_mse for s in e])
    if ema_decay > 0 and e and e[0].averaged_val_nme is not None:
        return (
            *curves,
            [s.averaged_val_mse for s in e],
            [s.averaged_val_nme for s in e],
            f"EMA {ema_decay:g}",
            [s.raw_val_nme for s in e],
        )
    return (*curves, [s.val_mse for s in e], [s.val_nme for s in e])


def checkpoint_record(cfg: TrainConfig, fingerprint: dict, inner: float, history: History, seconds: float) -> dict:
    """What a checkpoint's JSON records of its training run: data, seed, recipe, best-epoch metrics, history."""
    best = history.best
    return {
        "data": fingerprint,
        "seed": cfg.seed,
        "train": {
            **cfg.model_dump(),
            "inner": inner,
            "stopped_early": history.stopped_early,
            "best_epoch": history.best_epoch,
            "epochs_run": len(history.epochs),
            "seconds": round(seconds, 1),
        },
        "metrics": {"val_mse": best.val_mse, "val_nme": best.val_nme, "train_mse": best.train_mse},
        "history": history.to_dict(),
    }


@flow(name="train")
@flat_parameters(TrainConfig)
def train(cfg: TrainConfig) -> dict:
    """Train, early-stop on validation NME, and save the best checkpoint (float16 if it loses nothing)."""
    preflight.train(cfg)
    import torch

    from fkd_core.train import fit, start_model

    log = get_run_logger()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    fingerprint = data_fingerprint(cfg.examples)
    train_xy = load_split(cfg.examples, "train", cfg.max_train)
    val_xy = load_split(cfg.examples, "val", None)
    log.info("training on %d examples, validating on %d", len(train_xy[0]), len(val_xy[0]))
    crops = CropRecord.from_report(fingerprint)  # how ingest cut them: the checkpoint carries the same
    first, align, first_val = _refining_stage_inputs(cfg, crops, train_xy, val_xy, log)
    init = load_checkpoint(cfg.init) if cfg.init else None
    start = start_model(init, first, cfg.input_size)
    progress = _EpochProgress(cfg, log)
    starts = [c.model_id for c in (init, first) if c is not None]
    state_at = state_location(cfg, fingerprint, starts)
    state = _resumable_state(cfg, state_at, start, train_xy, val_xy, log)
    if state is not None:
        progress.at(state["epoch"])
    model, history = fit(
        train_xy,
        val_xy,
        model_cfg=NaimishNetConfig(input_size=cfg.input_size),
        params=cfg.params(),
        inner=crops.inner,
        on_epoch=progress.epoch_done,
        model=start,
        align=align,
        val_first=first_val,
        device=cfg.device,
        resume=state,
        on_state=lambda st: resume.save_state(state_at, st),
    )
    progress.at(cfg.epochs)
    _history_artifact(cfg, history)
    meta = checkpoint_record(cfg, fingerprint, crops.inner, history, time.perf_counter() - t0)
    meta["train"]["resumed_after_epoch"] = state["epoch"] if state is not None else None
    model_id, weights = _save(cfg, model, history, meta, crops, first, align, val_xy, log)
    resume.remove_state(state_at)  # the run is done: nothing to resume
    return {
        "model_id": model_id,
        "weights": weights,
        "best_epoch": history.best_epoch,
        "epochs_run": len(history.epochs),
        **meta["metrics"],
        "seconds": meta["train"]["seconds"],
    }


class _EpochProgress:
    """Each epoch's log line, and the progress artifact (epochs done of the most the run may take)."""

    def __init__(self, cfg: TrainConfig, log) -> None:
        self.cfg, self.log = cfg, log
        self.artifact = create_progress_artifact(
            progress=0.0, key="train-progress", description="epochs done / max epochs"
        )

    def at(self, epoch: int) -> None:
        update_progress_artifact(self.artifact, progress=100.0 * min(epoch, self.cfg.epochs) / self.cfg.epochs)

    def epoch_done(self, s) -> None:
        self.log.info(
            "epoch %3d/%d  train MSE %.5f  val MSE %.5f  val NME %.4f (%s weights)  lr %.1e  %.1f s",
            s.epoch, self.cfg.epochs, s.train_mse, s.val_mse, s.val_nme, s.weights, s.lr, s.seconds,
        )  # fmt: skip
        self.at(s.epoch)


def _refining_stage_inputs(cfg: TrainConfig, crops: CropRecord, train_xy, val_xy, log):
    """For a refining stage (``refine_of``): its first stage, the alignment policy, and the first stage's
    validation keypoints it is validated from; (None, None, None) for a first stage."""
    from fkd_core.train import predict_canonical

    first = stage_one(cfg, crops.policy)
    if first is None:
        return None, None, None
    align = AlignPolicy(side=cfg.align_side, context_margin=crops.canonical_margin, context_size=train_xy[0].shape[-1])
    first_val = predict_canonical(first.model, val_xy[0], crops.inner)
    first_nme = float(nme_per_face(first_val, val_xy[1]).mean()) if len(first_val) else float("nan")
    log.info("refining stage for %s (its val NME %.4f)", first.model_id, first_nme)
    return first, align, first_val


def _resumable_state(cfg: TrainConfig, state_at: str, start, train_xy, val_xy, log) -> dict | None:
    """The state the same run, stopped earlier, left at ``state_at`` (or None: none, unreadable, or not one this run
    can go on from, which is said and started over)."""
    from fkd_core.train import why_not_resumable

    state, why_not = resume.load_state(state_at) if cfg.resume else (None, None)
    if state is not None:
        model_cfg = start.cfg if start is not None else NaimishNetConfig(input_size=cfg.input_size)
        why_not = why_not_resumable(state, cfg.params(), model_cfg, train_xy, val_xy)
        if why_not:
            why_not, state = f"{state_at}: {why_not}; starting over", None
    if why_not:
        log.warning(why_not)
    if state is not None:
        log.info("resuming after epoch %d of a stopped run (state %s)", state["epoch"], state_at)
    return state


def state_location(cfg: TrainConfig, fingerprint: dict, starts: list[str] = ()) -> str:
    """Where a run keeps its state after each epoch: keyed by everything that decides its result but ``threads``,
    ``force`` and ``resume`` (the data by its fingerprint, the start checkpoints, init's then refine_of's, by
    their ids), so the same command on the same data resumes."""
    key = cfg.model_dump(exclude={"force", "resume", "threads"}) | {"data": fingerprint["sha256"]}
    key |= {"start": list(starts)}
    return resume.state_uri(cfg.out_dir, cfg.name, key)


def _history_artifact(cfg: TrainConfig, history: History) -> None:
    keys = ("epoch", "train_mse", "val_mse", "val_nme", "lr")
    rows = [{k: getattr(e, k) for k in keys} | {"seconds": round(e.seconds, 2)} for e in history.epochs]
    create_table_artifact(key="train-history", table=rows, description=f"{cfg.name}: MSE per epoch")


def _save(cfg: TrainConfig, model, history: History, meta: dict, crops: CropRecord, first, align, val_xy, log):
    """Pack the best model (float16 where it loses nothing) with its record, write it under a new name, and its
    loss curve beside it; returns (model id, weights URI)."""
    from fkd_core.train import pack_trained

    best = history.best
    packed = pack_trained(
        model, cfg.name, first=first, align=align, policy=crops.policy, detector=crops.detector, meta=meta,
        val=val_xy, inner=crops.inner, best_val_nme=best.val_nme,
    )  # fmt: skip
    if packed.doc["dtype"] != "float16":
        log.info("float16 changes val NME %.5f -> %.5f: storing float32", best.val_nme, packed.doc["float16_val_nme"])
    weights = save_new_checkpoint(packed, cfg.out_dir, force=cfg.force)
    png = loss_curve_png(*loss_curves(history, cfg.ema_decay))
    write_bytes(png, f"{cfg.out_dir.rstrip('/')}/{packed.model_id}_loss.png")
    log.info("saved %s as %s (best epoch %d, val NME %.4f)", packed.model_id, weights, history.best_epoch, best.val_nme)
    return packed.model_id, weights
