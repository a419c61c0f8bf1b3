"""Inference: detector boxes -> crops -> batched model forward -> keypoints in original image pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fkd_core.detect import DetectorConfig, detect_faces
from fkd_core.geometry import CropPolicy, CropTransform, crop_square, denormalise, square_from_box
from fkd_core.model import NaimishNet
from fkd_core.types import Box


@dataclass(frozen=True)
class Face:
    box: Box
    keypoints: np.ndarray  # (68, 2) float32, original image pixels


class Predictor:
    """A model ready for fast CPU inference.

    ``fast=True`` traces and freezes the network with TorchScript (dropout removed, conv+ELU fused where the
    backend can); outputs equal eager mode to float tolerance (see ``benchmarks/bench_model.py``).
    """

    def __init__(self, model: NaimishNet, policy: CropPolicy, fast: bool = True, batch_size: int = 64):
        self.cfg = model.cfg
        self.policy = policy
        self.batch_size = batch_size
        model = model.eval()
        self._fn = model
        if fast:
            with torch.inference_mode():
                example = torch.zeros(1, 1, self.cfg.input_size, self.cfg.input_size)
                traced = torch.jit.trace(model, example, check_trace=False)
                self._fn = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    @property
    def size(self) -> int:
        return self.cfg.input_size

    @torch.inference_mode()
    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 crops -> (N, 68, 2) keypoints in crop pixels."""
        if len(crops) == 0:
            return np.zeros((0, self.cfg.num_keypoints, 2), np.float32)
        out = []
        for start in range(0, len(crops), self.batch_size):
            x = torch.from_numpy(crops[start : start + self.batch_size]).unsqueeze(1).float().mul_(1.0 / 255.0)
            out.append(self._fn(x).numpy())
        pred = np.concatenate(out).reshape(len(crops), -1, 2)
        return denormalise(pred, self.size).astype(np.float32)

    def crop(self, gray: np.ndarray, box: Box) -> tuple[np.ndarray, CropTransform]:
        return crop_square(gray, square_from_box(box, self.policy), self.size)

    def predict_boxes(self, gray: np.ndarray, boxes: list[Box]) -> list[Face]:
        """Keypoints for given boxes of one image."""
        if not boxes:
            return []
        crops, transforms = zip(*(self.crop(gray, b) for b in boxes), strict=True)
        pred = self.predict_crops(np.stack(crops))
        return [Face(b, t.to_image(p).astype(np.float32)) for b, t, p in zip(boxes, transforms, pred, strict=True)]

    def predict_image(self, gray: np.ndarray, detector: DetectorConfig = DetectorConfig()) -> list[Face]:
        """Detect every face in a grayscale image and put 68 keypoints on each."""
        return self.predict_boxes(gray, detect_faces(gray, detector))
