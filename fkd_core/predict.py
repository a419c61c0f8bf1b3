"""Inference: detector boxes -> crops -> batched model forward -> keypoints in original image pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fkd_core import align as al
from fkd_core.detect import DetectorConfig, detect_faces
from fkd_core.examples import canonical_square
from fkd_core.geometry import CropPolicy, CropTransform, crop_square, denormalise, square_from_box
from fkd_core.model import NaimishNet
from fkd_core.types import Box


@dataclass(frozen=True)
class Face:
    box: Box
    keypoints: np.ndarray  # (68, 2) float32, original image pixels


class Predictor:
    """A model ready for fast CPU inference.

    ``backend="onnx"`` (the default) exports the network in-process to ONNX and runs it with ONNX Runtime,
    about 2.9x the throughput of eager PyTorch on 2 CPU cores with outputs equal to 4e-5 px
    (``benchmarks/bench_model.py``); ``backend="torch"`` runs eager PyTorch.

    With ``refine`` (a second NaimishNet) and its ``align`` policy, each face's first-stage keypoints give a
    crop aligned to the face (centre, size, eye-line angle; ``fkd_core.align``), cut from the same canonical
    crop around the Haar box that training cut it from, and the second stage's keypoints are the answer (after
    ``align.passes`` passes, each aligned by the last one's keypoints).
    """

    def __init__(
        self,
        model: NaimishNet,
        policy: CropPolicy,
        backend: str = "onnx",
        batch_size: int = 64,
        refine: NaimishNet | None = None,
        align: al.AlignPolicy | None = None,
    ):
        if backend not in ("onnx", "torch"):
            raise ValueError(f"backend must be 'onnx' or 'torch', got {backend!r}")
        if (refine is None) != (align is None):
            raise ValueError("a refining stage needs its align policy, and an align policy needs the stage")
        self.cfg = model.cfg
        self.policy = policy
        self.batch_size = batch_size
        self.backend = backend
        self.align = align
        self._nets = [_Net(model, backend)]
        if refine is not None:
            self._nets.append(_Net(refine, backend))

    @property
    def size(self) -> int:
        return self.cfg.input_size

    @property
    def refines(self) -> bool:
        return len(self._nets) > 1

    def predict_crops(self, crops: np.ndarray, stage: int = 0) -> np.ndarray:
        """(N, S, S) uint8 crops -> (N, 68, 2) keypoints in crop pixels, by the first (or the refining) stage."""
        return self._nets[stage].predict(crops, self.batch_size)

    def crop(self, gray: np.ndarray, box: Box) -> tuple[np.ndarray, CropTransform]:
        """The first stage's crop for a detector box."""
        return crop_square(gray, square_from_box(box, self.policy), self.size)

    def context(self, gray: np.ndarray, box: Box) -> tuple[np.ndarray, CropTransform]:
        """The canonical crop around a detector box (as ingest stores it), which the refining stage cuts from."""
        a = self.align or al.AlignPolicy()
        return crop_square(gray, canonical_square(box, self.policy, a.context_margin), a.context_size)

    def refine_keypoints(
        self, contexts: np.ndarray, transforms: list[CropTransform], keypoints: np.ndarray
    ) -> np.ndarray:
        """Second-stage keypoints (N, 68, 2) in image pixels from first-stage ones, given each face's canonical
        crop and its transform (``context``). Without a refining stage the keypoints come back unchanged."""
        if not self.refines or len(keypoints) == 0:
            return keypoints
        kp_ctx = [t.to_crop(k) for t, k in zip(transforms, keypoints, strict=True)]
        kp_ctx, _ = al.refine_passes(
            lambda crops: self.predict_crops(crops, stage=1), contexts, kp_ctx, self.align, self._nets[1].size
        )
        return np.stack([t.to_image(k) for t, k in zip(transforms, kp_ctx, strict=True)]).astype(np.float32)

    def predict_boxes(self, gray: np.ndarray, boxes: list[Box]) -> list[Face]:
        """Keypoints for given boxes of one image."""
        if not boxes:
            return []
        crops, transforms = zip(*(self.crop(gray, b) for b in boxes), strict=True)
        pred = self.predict_crops(np.stack(crops))
        kps = np.stack([t.to_image(p) for t, p in zip(transforms, pred, strict=True)]).astype(np.float32)
        if self.refines:
            contexts, ctx_t = zip(*(self.context(gray, b) for b in boxes), strict=True)
            kps = self.refine_keypoints(np.stack(contexts), list(ctx_t), kps)
        return [Face(b, k) for b, k in zip(boxes, kps, strict=True)]

    def predict_image(self, gray: np.ndarray, detector: DetectorConfig = DetectorConfig()) -> list[Face]:
        """Detect every face in a grayscale image and put 68 keypoints on each."""
        return self.predict_boxes(gray, detect_faces(gray, detector))


class _Net:
    """One network behind ONNX Runtime or eager PyTorch: (N, S, S) uint8 crops -> crop-pixel keypoints."""

    def __init__(self, model: NaimishNet, backend: str):
        self.model = model.eval()
        self.size = model.cfg.input_size
        self.num_keypoints = model.cfg.num_keypoints
        self.session = _onnx_session(self.model) if backend == "onnx" else None

    @torch.inference_mode()
    def predict(self, crops: np.ndarray, batch_size: int) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.num_keypoints, 2), np.float32)
        out = []
        for start in range(0, len(crops), batch_size):
            # (B, 1, S, S) float32 in [0, 1]
            x = crops[start : start + batch_size, None].astype(np.float32) * np.float32(1.0 / 255.0)
            if self.session is not None:
                out.append(self.session.run(None, {"x": x})[0])
            else:
                out.append(self.model(torch.from_numpy(x)).numpy())
        pred = np.concatenate(out).reshape(len(crops), -1, 2)  # (N, 68, 2) in [-1, 1]
        return denormalise(pred, self.size).astype(np.float32)


def _onnx_session(model: NaimishNet):
    """Export ``model`` to ONNX in memory and open an ONNX Runtime session with as many threads as torch."""
    import io
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    size = model.cfg.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its own deprecation
        torch.onnx.export(
            model,
            torch.zeros(1, 1, size, size),
            buf,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            dynamo=False,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # Two stages mean two sessions in one process: spinning worker threads of one would starve the other.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
