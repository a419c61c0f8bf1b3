"""Training NaimishNet: the recipe, the loop (arrays in, a trained model and its history out) and the checkpoint a
run becomes (start weights, float16 choice, assembly); no file access."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from fkd_core.align import AlignPolicy, invert, refine_passes, sample_aligned_batch
from fkd_core.augment import AugmentConfig, sample_batch, sample_matrix
from fkd_core.checkpoint import LoadedModel, PackedCheckpoint, pack_checkpoint
from fkd_core.detect import DetectorConfig
from fkd_core.errors import UserError
from fkd_core.geometry import CropPolicy, affine_points, denormalise, normalise
from fkd_core.metrics import nme_per_face
from fkd_core.model import NaimishNet, NaimishNetConfig
from fkd_core.recipe import FitConfig


@dataclass
class EpochStats:
    """One epoch. ``val_mse``/``val_nme`` score the weights this epoch offers: with a weight average, the better of
    the averaged and the raw weights (``weights`` says which; both are kept in the ``averaged_*``/``raw_*``
    fields), so averaging never makes a run worse than the same run without it."""

    epoch: int
    train_mse: float
    val_mse: float
    val_nme: float
    lr: float
    seconds: float
    weights: str = "raw"  # "raw" or "averaged"
    averaged_val_mse: float | None = None
    averaged_val_nme: float | None = None
    raw_val_mse: float | None = None
    raw_val_nme: float | None = None


@dataclass
class History:
    epochs: list[EpochStats] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    @property
    def best(self) -> EpochStats:
        return next(e for e in self.epochs if e.epoch == self.best_epoch)

    def to_dict(self) -> dict:
        return {
            "epochs": [asdict(e) for e in self.epochs],
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
        }

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls([EpochStats(**e) for e in d["epochs"]], d["best_epoch"], d["stopped_early"])


EMA_WARMUP_POWER = 2 / 3  # timm ModelEmaV3's default


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The weight average's decay at optimiser step ``step`` (1, 2, ...).

    With ``warmup`` it is timm ModelEmaV3's ``1 - (1 + step) ** -2/3``, capped at ``decay``: 0.37 after one step,
    0.95 after 100, 0.99 after 1,000, reaching 0.998 after about 11,000 steps. Without a warm-up, a 0.998
    average after 300 steps still weighs the random initial weights by 0.998 ** 300 = 0.55.
    """
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + step) ** -EMA_WARMUP_POWER)


def _ema_update(decay: float, warmup: bool):
    """``AveragedModel``'s ``multi_avg_fn`` for :func:`ema_decay_at`."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        d = ema_decay_at(int(n_averaged), decay, warmup)  # n_averaged: updates so far, the first one a copy
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _batch(
    crops: np.ndarray,
    kps: np.ndarray,
    idx: np.ndarray,
    size: int,
    inner: float,
    rng: np.random.Generator | None,
    aug: AugmentConfig,
    align: AlignPolicy | None,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of first-stage (Haar-box) crops, or of second-stage (aligned) crops when ``align`` is set."""
    if align is None:
        return sample_batch(crops, kps, idx, size, inner, rng, aug)
    return sample_aligned_batch(crops, kps, idx, size, align, rng, aug.brightness, aug.contrast)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate_arrays(
    model: nn.Module,
    crops: np.ndarray,
    keypoints: np.ndarray,
    inner: float,
    batch_size: int = 256,
    *,
    align: AlignPolicy | None = None,
    first: np.ndarray | None = None,
) -> tuple[float, float]:
    """Validation (MSE on normalised keypoints, mean NME) of un-augmented crops.

    With ``align`` the model is a refining stage, run as at inference (``fkd_core.align.refine_passes``) from ``first``,
    the first stage's keypoints (N, 68, 2) in canonical-crop pixels; its MSE is measured in the last pass's
    aligned crop, like its training loss.
    """
    if align is not None and first is None:
        raise ValueError("second-stage validation needs the first stage's keypoints")
    if len(crops) == 0:
        return float("nan"), float("nan")
    model.eval()
    size = model.cfg.input_size
    k = keypoints.shape[1]
    dev = _device_of(model)
    if align is not None:

        def predict(x: np.ndarray) -> np.ndarray:  # (N, S, S) uint8 aligned crops -> aligned-crop pixels
            out = [
                model(
                    torch.from_numpy(x[s : s + batch_size, None].astype(np.float32) * np.float32(1.0 / 255.0)).to(dev)
                ).cpu()
                for s in range(0, len(x), batch_size)
            ]
            return denormalise(torch.cat(out).numpy().reshape(len(x), k, 2).astype(np.float64), size)

        pred, mats = refine_passes(predict, crops, first, align, size)
        p = np.stack([normalise(affine_points(m, q), size) for m, q in zip(mats, pred, strict=True)])
        t = np.stack([normalise(affine_points(m, q), size) for m, q in zip(mats, keypoints, strict=True)])
        return float(np.mean((p - t) ** 2)), float(nme_per_face(pred, keypoints).mean())
    preds, targets = [], []
    for start in range(0, len(crops), batch_size):
        idx = np.arange(start, min(start + batch_size, len(crops)))
        x, y = sample_batch(crops, keypoints, idx, size, inner, None, AugmentConfig.none())
        preds.append(model(torch.from_numpy(x).to(dev)).cpu().numpy())
        targets.append(y)
    p, t = np.concatenate(preds), np.concatenate(targets)
    mse = float(np.mean((p.astype(np.float64) - t) ** 2))
    # NME is scale- and rotation-free, so crop pixels give the same value as original pixels for the same box.
    nme = nme_per_face(denormalise(p.reshape(-1, k, 2), size), denormalise(t.reshape(-1, k, 2), size))
    return mse, float(nme.mean())


def fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    model_cfg: NaimishNetConfig = NaimishNetConfig(),
    params: FitConfig = FitConfig(),
    inner: float,
    on_epoch: Callable[[EpochStats], None] | None = None,
    model: NaimishNet | None = None,
    align: AlignPolicy | None = None,
    val_first: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    resume: dict | None = None,
    on_state: Callable[[dict], None] | None = None,
) -> tuple[NaimishNet, History]:
    """Train NaimishNet on (crops, keypoints) arrays; returns the best-validation model and the history.

    ``inner`` is the model crop's side as a fraction of the canonical crop. With ``align`` the model is a second
    stage: it trains on crops aligned to the true keypoints with ``align``'s noise and is validated on crops
    aligned by ``val_first`` (the first stage's validation keypoints, canonical-crop pixels), as at inference.
    ``device`` is where the model trains ("cuda" on a GPU machine); batches are sampled on the CPU either way
    and the model comes back on the CPU. Deterministic for a seed on a given device.

    After each epoch ``on_state`` gets the whole training state (weights, optimiser, weight average, schedule,
    early-stopping state, history and every random generator: :func:`training_state`); ``resume`` is such a state,
    from which the run goes on as if it had never stopped (the same weights, bit for bit, as an uninterrupted run).
    """
    _check(params)
    seed_everything(params.seed)
    model = model or NaimishNet(model_cfg)
    # channels-last convolutions are about 1.4x faster on x86 CPUs for this network (benchmarks/bench_model.py)
    model = model.to(device=device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, betas=params.betas, eps=params.eps)
    if len(train[0]) == 0:
        raise ValueError("no training examples")
    sched = _scheduler(opt, params, math.ceil(len(train[0]) / params.batch_size))
    # With an average, both it and the raw weights are validated every epoch, and the better is what is kept.
    ema = None
    if params.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_ema_update(params.ema_decay, params.ema_warmup))
    rng = np.random.default_rng(params.seed)
    history = History()
    best_state, best_score, since_best = None, math.inf, 0
    first_epoch = 1
    if resume is not None:
        _check_resumable(resume, params, model.cfg, train, val)
        _restore(resume, model, opt, sched, ema, rng, device)
        history = History.from_dict(resume["history"])
        best_state, best_score, since_best = resume["best_state"], resume["best_score"], resume["since_best"]
        first_epoch = params.epochs + 1 if history.stopped_early else resume["epoch"] + 1
    for epoch in range(first_epoch, params.epochs + 1):
        t0 = time.perf_counter()
        train_mse = _train_epoch(model, opt, sched, ema, train, params, inner, rng, align, device)
        kept, val_mse, val_nme, extra = _validate_epoch(model, ema, val, inner, align, val_first)
        score = val_nme if math.isfinite(val_nme) else train_mse
        if params.schedule == "plateau":
            sched.step(score)
        lr = opt.param_groups[0]["lr"]
        stats = EpochStats(epoch, train_mse, val_mse, val_nme, lr, time.perf_counter() - t0, **extra)
        history.epochs.append(stats)
        if score < best_score:
            best_score, since_best, history.best_epoch = score, 0, epoch
            best_state = copy.deepcopy(kept.state_dict())
        else:
            since_best += 1
        if on_epoch:
            on_epoch(stats)
        if since_best >= params.patience:
            history.stopped_early = True
        if on_state is not None:
            on_state(training_state(epoch, params, model, opt, sched, ema, history, best_state, best_score,
                                    since_best, rng, device, train, val))  # fmt: skip
        if history.stopped_early:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.to(device="cpu", memory_format=torch.contiguous_format)
    model.eval()
    return model, history


def _resume_key(params: FitConfig, model_cfg, train, val) -> dict:
    """What a saved state must match to be resumed: the recipe, the network and the data's shapes."""
    return {
        "params": repr(params),
        "model": repr(model_cfg),
        "train": list(np.shape(train[0])) + list(np.shape(train[1])),
        "val": list(np.shape(val[0])) + list(np.shape(val[1])),
    }


def training_state(
    epoch, params, model, opt, sched, ema, history, best_state, best_score, since_best, rng, device, train, val
) -> dict:
    """Everything :func:`fit` needs to go on after ``epoch`` as if it had never stopped; tensors, numbers, strings
    and lists only, so it loads with ``torch.load(..., weights_only=True)`` (no pickled code)."""
    rng_state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    legacy = np.random.get_state()
    rng_state["numpy_global"] = [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]]
    if torch.device(device).type == "cuda":
        rng_state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return {
        "format": "fkd-train-state/1",
        "key": _resume_key(params, model.cfg, train, val),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "average": ema.state_dict() if ema is not None else None,
        "history": history.to_dict(),
        "best_state": best_state,
        "best_score": best_score,
        "since_best": since_best,
        "rng": rng_state,
    }


_STATE_KEYS = ("epoch", "model", "optimizer", "scheduler", "average", "history", "best_state", "best_score")
_STATE_KEYS += ("since_best", "rng")


def _check_resumable(state: dict, params: FitConfig, model_cfg, train, val) -> None:
    why = why_not_resumable(state, params, model_cfg, train, val)
    if why:
        raise ValueError(why)


def why_not_resumable(state: dict, params: FitConfig, model_cfg, train, val) -> str | None:
    """Why :func:`fit` cannot go on from ``state`` with these arguments (another fkd's format, another recipe,
    network or data), or None if it can."""
    if state.get("format") != "fkd-train-state/1" or any(k not in state for k in _STATE_KEYS):
        return "this training state was written by another version of fkd"
    if state.get("key") != _resume_key(params, model_cfg, train, val):
        return "this training state is from another run (recipe, network or data differ)"
    return None


def _restore(state: dict, model, opt, sched, ema, rng: np.random.Generator, device) -> None:
    """Put the weights, optimiser, schedule, average and random generators back as ``state`` has them."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["average"])
    rng.bit_generator.state = state["rng"]["numpy"]
    rng_state = state["rng"]
    torch.set_rng_state(rng_state["torch"])
    kind, keys, *rest = rng_state["numpy_global"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in rng_state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(rng_state["cuda"], torch.device(device))


def _check(params: FitConfig) -> None:
    if params.schedule not in ("plateau", "cosine"):
        raise ValueError(f"schedule must be 'plateau' or 'cosine', got {params.schedule!r}")
    if not 0.0 <= params.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {params.ema_decay}")


def _scheduler(opt: torch.optim.Optimizer, params: FitConfig, steps_per_epoch: int):
    """Cosine decay per step over the whole run, or halving on a validation plateau (stepped per epoch)."""
    if params.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=params.epochs * steps_per_epoch, eta_min=params.min_lr
        )
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.5, patience=params.lr_patience, min_lr=params.min_lr
    )


def _train_epoch(model, opt, sched, ema, train, params: FitConfig, inner, rng, align, device) -> float:
    """One pass over the training examples in a random order; returns the epoch's mean training MSE."""
    crops, kps = train
    n = len(crops)
    model.train()
    loss_fn = nn.MSELoss()
    order = rng.permutation(n)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, n, params.batch_size):
        idx = order[start : start + params.batch_size]
        x, y = _batch(crops, kps, idx, model.cfg.input_size, inner, rng, params.augment, align)
        opt.zero_grad(set_to_none=True)
        xb = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(xb), torch.from_numpy(y).to(device))
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        if params.schedule == "cosine":
            sched.step()
        total += loss.detach() * len(idx)  # summed on the device: no sync per step
        count += len(idx)
    return float(total) / count


def _validate_epoch(model, ema, val, inner, align, val_first) -> tuple[nn.Module, float, float, dict]:
    """Validate the raw weights and, with an average, the averaged ones; the better is kept (and recorded)."""
    raw = evaluate_arrays(model, *val, inner, align=align, first=val_first)
    if ema is None:
        return model, raw[0], raw[1], {}
    averaged = evaluate_arrays(ema.module, *val, inner, align=align, first=val_first)
    extra = dict(averaged_val_mse=averaged[0], averaged_val_nme=averaged[1], raw_val_mse=raw[0], raw_val_nme=raw[1])
    # early in a run the average still lags the weights; it is kept as soon as it validates as well
    if not averaged[1] > raw[1]:  # (also when there is no validation set: NaN)
        return ema.module, averaged[0], averaged[1], extra | {"weights": "averaged"}
    return model, raw[0], raw[1], extra


@torch.inference_mode()
def predict_canonical(model: nn.Module, crops: np.ndarray, inner: float, batch_size: int = 256) -> np.ndarray:
    """A first-stage model's keypoints (N, 68, 2) in canonical-crop pixels, from the inference crop of each."""
    model.eval()
    size = model.cfg.input_size
    dev = _device_of(model)
    dummy = np.zeros((len(crops), model.cfg.num_keypoints, 2), np.float32)
    preds = []
    for start in range(0, len(crops), batch_size):
        idx = np.arange(start, min(start + batch_size, len(crops)))
        x, _ = sample_batch(crops, dummy, idx, size, inner)
        preds.append(model(torch.from_numpy(x).to(dev)).cpu().numpy())
    if not preds:
        return dummy
    pred = denormalise(np.concatenate(preds).reshape(len(crops), -1, 2).astype(np.float64), size)
    m = sample_matrix(crops.shape[1], inner, size, None, AugmentConfig.none())  # canonical -> model input
    return affine_points(invert(m), pred.reshape(-1, 2)).reshape(pred.shape)


def start_model(init: LoadedModel | None, first: LoadedModel | None, input_size: int) -> NaimishNet | None:
    """The weights a run starts from, or None for fresh ones.

    A refining stage (``first`` given) starts from ``init``'s own refining stage if it has one, else from
    ``init``'s first stage, else from ``first``'s weights; a first stage from ``init``'s first stage. Refuses an
    ``init`` whose input size is not ``input_size``.
    """
    start = None
    if init is not None:
        start = init.refine if first is not None and init.two_stage else init.model
    elif first is not None:
        start = copy.deepcopy(first.model)
    if start is not None and start.cfg.input_size != input_size:
        raise UserError(f"init checkpoint has input_size {start.cfg.input_size}, config asks for {input_size}")
    return start


def checkpoint_val_nme(loaded: LoadedModel, val: tuple[np.ndarray, np.ndarray], inner: float) -> float:
    """Validation NME on examples of a (one- or two-stage) checkpoint, as its pipeline predicts."""
    if not loaded.two_stage:
        return evaluate_arrays(loaded.model, *val, inner)[1]
    first = predict_canonical(loaded.model, val[0], inner)
    return evaluate_arrays(loaded.refine, *val, inner, align=loaded.align, first=first)[1]


def pack_trained(
    model: NaimishNet,
    name: str,
    *,
    first: LoadedModel | None,
    align: AlignPolicy | None,
    policy: CropPolicy,
    detector: DetectorConfig,
    meta: dict,
    val: tuple[np.ndarray, np.ndarray],
    inner: float,
    best_val_nme: float,
) -> PackedCheckpoint:
    """A trained model as its checkpoint: with ``first``, the file holds that first stage and ``model`` as its
    refining stage (and ``first``'s detector). Float16 weights halve the file; they are kept only if the
    validation NME stays within 1e-4 of ``best_val_nme`` (``meta["float16_val_nme"]`` records it)."""
    stages: dict = {"model": model}
    meta = dict(meta)
    if first is not None:
        detector = first.detector
        stages = {"model": first.model, "refine": model, "align": align}
        meta["refine_of"] = {"model_id": first.model_id, "metrics": first.meta.get("metrics")}
    half = pack_checkpoint(name=name, policy=policy, detector=detector, meta=meta, **stages)
    nme16 = checkpoint_val_nme(half.load(), val, inner)
    keep16 = not np.isfinite(nme16) or abs(nme16 - best_val_nme) <= 1e-4
    return pack_checkpoint(
        name=name,
        **stages,
        policy=policy,
        detector=detector,
        meta={**meta, "float16_val_nme": nme16},
        dtype=torch.float16 if keep16 else torch.float32,
    )
