"""Flow ``train``: examples Parquet -> a new NaimishNet checkpoint ``<out_dir>/<name>-<sha256>`` (+ loss curve)."""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Literal

import numpy as np
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from pydantic import BaseModel, ConfigDict, Field

from fkd_core.align import AlignPolicy
from fkd_core.augment import AugmentConfig
from fkd_core.checkpoint import LoadedModel, load_checkpoint, pack_checkpoint, save_new_checkpoint
from fkd_core.detect import DetectorConfig
from fkd_core.errors import UserError
from fkd_core.examples import CANONICAL_MARGIN, inner_fraction
from fkd_core.geometry import CropPolicy
from fkd_core.image_io import check_bucket, check_exists
from fkd_core.metrics import nme_per_face
from fkd_core.model import NaimishNetConfig
from fkd_core.parquet_io import dataset, read_examples, read_json, write_bytes
from fkd_core.plots import loss_curve_png
from fkd_core.train import EpochStats, History, TrainParams, evaluate_arrays, fit, predict_canonical
from flows._common import flat_parameters


class TrainConfig(BaseModel):
    """Train NaimishNet on an examples dataset made by the ingest flow."""

    model_config = ConfigDict(extra="forbid")

    examples: str = Field(description="Examples dataset (the ingest flow's <out>/examples)")
    out_dir: str = Field(
        "models", description="Where <name>-<sha256 head>.safetensors, .json and _loss.png are written"
    )
    name: str = Field(
        "naimishnet", pattern=r"^[A-Za-z0-9_.-]+$", description="Checkpoint name; the weights' sha256 head is appended"
    )
    force: bool = Field(False, description="Replace a checkpoint of the same name and weights (never done otherwise)")
    input_size: int = Field(96, ge=32, le=256, description="Model input S (S x S pixels)")
    epochs: int = Field(150, ge=1, le=10_000, description="Maximum epochs")
    batch_size: int = Field(32, ge=1, le=4096)
    patience: int = Field(20, ge=1, description="Early stopping: epochs without a better validation NME")
    seed: int = Field(0, description="Seed: same seed and data give the same weights")
    lr: float = Field(1e-3, gt=0, le=1, description="Adam's initial learning rate (the paper's 0.001)")
    schedule: Literal["plateau", "cosine"] = Field(
        "cosine", description="cosine: decay the rate to min_lr over `epochs`; plateau: halve it when validation stalls"
    )
    min_lr: float = Field(1e-6, ge=0, description="Lowest learning rate of either schedule")
    # Measured (docs/experiments.md): averaging smooths the +-0.01 epoch-to-epoch swing of validation NME.
    ema_decay: float = Field(
        0.998, ge=0, lt=1, description="> 0: validate and keep an exponential moving average of the weights"
    )
    ema_warmup: bool = Field(True, description="Warm the average's decay up from 0 (short and fine-tuning runs)")
    augment: bool = Field(True, description="Augment: brightness/contrast, plus the jitter, rotation and flip below")
    # Measured (docs/experiments.md, "Augmentation"): geometric jitter cost validation NME here, because every
    # crop, in training and inference, comes from the same cascade's box; so it is off unless asked for.
    shift: float = Field(0.0, ge=0, le=0.5, description="Box jitter: centre moves up to this fraction of the side")
    scale: float = Field(0.0, ge=0, lt=1, description="Box jitter: side times U(1 - scale, 1 + scale)")
    rotate: float = Field(0.0, ge=0, le=90, description="Rotation up to +- this many degrees")
    # Measured: this data set's labels are not mirror-symmetric (the mean shape and its mirror differ by NME
    # 0.077), and training with flips cost 0.006 validation NME against the same run without (docs/experiments.md).
    flip: float = Field(0.0, ge=0, le=1, description="Probability of a horizontal flip (with augment)")
    max_train: int | None = Field(None, ge=1, description="Use only the first N training examples (smoke runs)")
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: all cores)")
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$", description="Where the model trains: cpu, or cuda[:N] on a GPU"
    )
    init: str | None = Field(None, description="Start from this checkpoint's weights (fine-tuning, continuing)")
    refine_of: str | None = Field(
        None,
        description="Train a refining second stage for this first-stage checkpoint (on crops aligned to its "
        "keypoints; starts from its weights unless `init` is given); the checkpoint written holds both stages",
    )
    align_side: float = Field(
        AlignPolicy().side, gt=1, le=10, description="Refining stage: crop side in RMS radii of the keypoints"
    )


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
    report = read_json(examples.rstrip("/").rsplit("/", 1)[0] + "/ingest_report.json") or {}
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
    if first.refine is not None:
        raise UserError(f"refine_of: {cfg.refine_of} already has a refining stage; give its first stage alone")
    if first.policy != policy:
        raise UserError(
            f"refine_of: {cfg.refine_of} was trained on crops with {first.policy}, but the examples were cut "
            f"with {policy}; ingest with the checkpoint's crop policy"
        )
    return first


def val_nme(loaded: LoadedModel, val_xy: tuple[np.ndarray, np.ndarray], inner: float) -> float:
    """Validation NME on the examples of a (one- or two-stage) checkpoint, as its pipeline predicts."""
    if loaded.refine is None:
        return evaluate_arrays(loaded.model, *val_xy, inner)[1]
    first = predict_canonical(loaded.model, val_xy[0], inner)
    return evaluate_arrays(loaded.refine, *val_xy, inner, align=loaded.align, first=first)[1]


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


def preflight(cfg: TrainConfig) -> None:
    """Refuse, naming it, what cannot work: no GPU, missing examples, a missing output bucket or start checkpoint.

    No name can clash with a served model: the checkpoint is named by its weights' sha256 (``save_new_checkpoint``).
    """
    import torch

    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"device: {cfg.device!r} asked for, but torch sees no CUDA GPU on this machine")
    check_exists(cfg.examples, "examples", directory=True)
    check_bucket(cfg.out_dir, "output bucket")
    for what, uri in (("init", cfg.init), ("refine_of", cfg.refine_of)):
        if uri:
            check_exists(uri, what)


@flow(name="train")
@flat_parameters(TrainConfig)
def train(cfg: TrainConfig) -> dict:
    """Train, early-stop on validation NME, and save the best checkpoint (float16 if it loses nothing)."""
    import torch

    log = get_run_logger()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preflight(cfg)
    t0 = time.perf_counter()
    fingerprint = data_fingerprint(cfg.examples)
    train_xy = load_split(cfg.examples, "train", cfg.max_train)
    val_xy = load_split(cfg.examples, "val", None)
    log.info("training on %d examples, validating on %d", len(train_xy[0]), len(val_xy[0]))
    params = TrainParams(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        patience=cfg.patience,
        seed=cfg.seed,
        lr=cfg.lr,
        schedule=cfg.schedule,
        min_lr=cfg.min_lr,
        ema_decay=cfg.ema_decay,
        ema_warmup=cfg.ema_warmup,
        augment=AugmentConfig(scale=cfg.scale, shift=cfg.shift, rotate_deg=cfg.rotate, flip=cfg.flip)
        if cfg.augment
        else AugmentConfig.none(),
    )
    # The crops were cut by ingest with its crop policy: the checkpoint must carry that same policy.
    policy = CropPolicy(**fingerprint["crop_policy"]) if fingerprint.get("crop_policy") else CropPolicy()
    inner = inner_fraction(fingerprint.get("canonical_margin") or CANONICAL_MARGIN)
    progress = create_progress_artifact(progress=0.0, key="train-progress", description="epochs done / max epochs")

    def on_epoch(s: EpochStats) -> None:
        log.info(
            "epoch %3d/%d  train MSE %.5f  val MSE %.5f  val NME %.4f (%s weights)  lr %.1e  %.1f s",
            s.epoch,
            cfg.epochs,
            s.train_mse,
            s.val_mse,
            s.val_nme,
            s.weights,
            s.lr,
            s.seconds,
        )
        update_progress_artifact(progress, progress=100.0 * s.epoch / cfg.epochs)

    first = stage_one(cfg, policy)
    align, first_val = None, None
    if first is not None:
        align = AlignPolicy(
            side=cfg.align_side,
            context_margin=fingerprint.get("canonical_margin") or CANONICAL_MARGIN,
            context_size=train_xy[0].shape[-1],
        )
        first_val = predict_canonical(first.model, val_xy[0], inner)
        first_nme = float(nme_per_face(first_val, val_xy[1]).mean()) if len(first_val) else float("nan")
        log.info("refining stage for %s (its val NME %.4f)", first.model_id, first_nme)
    # a refining stage starts from the first stage's weights, or from `init`'s own refining stage if it has one
    init = load_checkpoint(cfg.init) if cfg.init else None
    start = (init.refine if first is not None and init.refine is not None else init.model) if init else None
    if start is None and first is not None:
        start = copy.deepcopy(first.model)
    if start is not None and start.cfg.input_size != cfg.input_size:
        raise UserError(f"init checkpoint has input_size {start.cfg.input_size}, config asks for {cfg.input_size}")
    model, history = fit(
        train_xy,
        val_xy,
        model_cfg=NaimishNetConfig(input_size=cfg.input_size),
        params=params,
        inner=inner,
        on_epoch=on_epoch,
        model=start,
        align=align,
        val_first=first_val,
        device=cfg.device,
    )
    update_progress_artifact(progress, progress=100.0)
    best = history.best
    rows = [
        {
            "epoch": e.epoch,
            "train_mse": e.train_mse,
            "val_mse": e.val_mse,
            "val_nme": e.val_nme,
            "lr": e.lr,
            "seconds": round(e.seconds, 2),
        }
        for e in history.epochs
    ]
    create_table_artifact(key="train-history", table=rows, description=f"{cfg.name}: MSE per epoch")

    meta = checkpoint_record(cfg, fingerprint, inner, history, time.perf_counter() - t0)
    detector = DetectorConfig.from_record(fingerprint["detector"]) if fingerprint["detector"] else DetectorConfig()
    stages: dict = {"model": model}
    if first is not None:
        # the file holds the first stage as trained and this run's model as its refining stage
        detector = first.detector
        stages = {"model": first.model, "refine": model, "align": align}
        meta["refine_of"] = {"model_id": first.model_id, "metrics": first.meta.get("metrics")}
    # float16 weights halve the checkpoint; keep them only if validation NME is unchanged to 1e-4.
    packed = pack_checkpoint(name=cfg.name, policy=policy, detector=detector, meta=meta, **stages)
    nme16 = val_nme(packed.load(), val_xy, inner)
    keep16 = not np.isfinite(nme16) or abs(nme16 - best.val_nme) <= 1e-4
    if not keep16:
        log.info("float16 changes val NME %.5f -> %.5f: storing float32", best.val_nme, nme16)
    packed = pack_checkpoint(
        name=cfg.name,
        **stages,
        policy=policy,
        detector=detector,
        meta={**meta, "float16_val_nme": nme16},
        dtype=torch.float16 if keep16 else torch.float32,
    )
    model_id = packed.model_id
    weights = save_new_checkpoint(packed, cfg.out_dir, force=cfg.force)
    png = loss_curve_png(*loss_curves(history, cfg.ema_decay))
    write_bytes(png, f"{cfg.out_dir.rstrip('/')}/{model_id}_loss.png")
    log.info("saved %s as %s (best epoch %d, val NME %.4f)", model_id, weights, history.best_epoch, best.val_nme)
    return {
        "model_id": model_id,
        "weights": weights,
        "best_epoch": history.best_epoch,
        "epochs_run": len(history.epochs),
        **meta["metrics"],
        "seconds": meta["train"]["seconds"],
    }
