"""Model speed: training seconds per epoch, inference faces/s for eager torch vs ONNX Runtime (shipped), and
the cost of the refining second stage (faces/s of the whole per-face path, one stage vs two).

    python benchmarks/bench_model.py [--examples OUT/examples] [--model saved_models/naimishnet.safetensors]

Prints one JSON document; ratios are what to compare across machines (2 cores here).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fkd_core.augment import AugmentConfig, sample_batch
from fkd_core.checkpoint import DEFAULT_MODEL, load_checkpoint
from fkd_core.model import NaimishNet, NaimishNetConfig
from fkd_core.predict import Predictor


def train_epoch_seconds(size: int, n: int, channels_last: bool, batch: int = 32) -> float:
    """Seconds for one epoch of `n` examples (forward, backward, Adam step, augmentation included)."""
    torch.manual_seed(0)
    model = NaimishNet(NaimishNetConfig(input_size=size)).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    c = int(size * 1.5)
    crops = rng.integers(0, 255, size=(64, c, c), dtype=np.uint8)
    kp = rng.uniform(c * 0.3, c * 0.7, size=(64, 68, 2)).astype(np.float32)
    steps = max(2, min(12, n // batch))
    t0 = time.perf_counter()
    for s in range(steps + 1):
        if s == 1:
            t0 = time.perf_counter()  # first step warms up allocators and kernels
        x, y = sample_batch(crops, kp, rng.integers(0, 64, batch), size, 1 / 1.5, rng, AugmentConfig())
        xb = torch.from_numpy(x)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xb), torch.from_numpy(y)).backward()
        opt.step()
    per_sample = (time.perf_counter() - t0) / (steps * batch)
    return per_sample * n


def faces_per_second(pred: Predictor, crops: np.ndarray, repeat: int = 3) -> float:
    pred.predict_crops(crops[:64])
    t0 = time.perf_counter()
    for _ in range(repeat):
        pred.predict_crops(crops)
    return repeat * len(crops) / (time.perf_counter() - t0)


def stages_per_second(loaded, images: str, n: int, repeat: int = 3) -> dict:
    """Faces/s of ``Predictor.predict`` (crops, model(s), mapping back; boxes detected beforehand) on real
    frames, first stage alone vs first + refining stage, both on ONNX Runtime."""
    from pathlib import Path

    from fkd_core.detect import detect_faces
    from fkd_core.image_io import read_gray

    paths = sorted(Path(images).glob("*.jpg"))[:n]
    grays = [read_gray(str(p)).gray for p in paths]
    boxes = [detect_faces(g, loaded.detector) for g in grays]
    faces = sum(len(b) for b in boxes)
    one = Predictor(loaded.model, loaded.policy)
    two = Predictor(loaded.model, loaded.policy, refine=loaded.refine, align=loaded.align)
    out = {"frames": len(grays), "faces": faces}
    for name, pred in (("first_stage", one), ("two_stage", two)):
        pred.predict(grays[:1], boxes[:1])
        t0 = time.perf_counter()
        for _ in range(repeat):
            for g, b in zip(grays, boxes, strict=True):
                pred.predict([g], [b])
        out[f"{name}_faces_per_s"] = round(repeat * faces / (time.perf_counter() - t0), 1)
    out["two_stage_cost"] = round(out["first_stage_faces_per_s"] / out["two_stage_faces_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--n-train", type=int, default=2916, help="examples per epoch (the person-grouped train split)")
    ap.add_argument("--faces", type=int, default=512)
    ap.add_argument("--skip-224", action="store_true")
    ap.add_argument("--images", default="../shared/data/facial-keypoints/training", help="real frames (two-stage)")
    ap.add_argument("--frames", type=int, default=300)
    args = ap.parse_args()
    loaded = load_checkpoint(args.model)
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 255, size=(args.faces, 96, 96), dtype=np.uint8)
    eager = Predictor(loaded.model, loaded.policy, backend="torch")
    fast = Predictor(loaded.model, loaded.policy, backend="onnx")
    diff = float(np.abs(eager.predict_crops(crops[:128]) - fast.predict_crops(crops[:128])).max())
    eager_fps, fast_fps = faces_per_second(eager, crops), faces_per_second(fast, crops)
    out = {
        "torch_threads": torch.get_num_threads(),
        "inference": {
            "eager_faces_per_s": round(eager_fps, 1),
            "onnxruntime_faces_per_s": round(fast_fps, 1),
            "speedup": round(fast_fps / eager_fps, 3),
            "max_abs_diff_px": diff,
        },
        "train_seconds_per_epoch": {
            "S96_eager": round(train_epoch_seconds(96, args.n_train, False), 1),
            "S96_channels_last": round(train_epoch_seconds(96, args.n_train, True), 1),
        },
    }
    if loaded.refine is not None:
        out["predict_boxes"] = stages_per_second(loaded, args.images, args.frames)
    if not args.skip_224:
        out["train_seconds_per_epoch"]["S224_channels_last"] = round(train_epoch_seconds(224, args.n_train, True), 1)
        big = NaimishNet(NaimishNetConfig(input_size=224)).eval()
        p224 = Predictor(big, loaded.policy, backend="onnx")
        out["inference"]["S224_onnxruntime_faces_per_s"] = round(
            faces_per_second(p224, rng.integers(0, 255, size=(128, 224, 224), dtype=np.uint8)), 1
        )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
