"""Inference: detector boxes -> crops -> batched model forward -> keypoints in original image pixels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fkd_core import align as al
from fkd_core import trust as tr
from fkd_core.checkpoint import DEFAULT_MODEL, LoadedModel, config_uri, load_checkpoint
from fkd_core.detect import Detection, DetectorConfig, detect
from fkd_core.examples import canonical_square
from fkd_core.geometry import CropPolicy, CropTransform, crop_square, denormalise, square_from_box
from fkd_core.model import DENSE_WIDTH, NaimishNet
from fkd_core.storage import read_json
from fkd_core.types import Box


@dataclass(frozen=True)
class Face:
    """One face: its box, 68 keypoints and how far to trust them (``fkd_core.trust``)."""

    box: Box
    keypoints: np.ndarray  # (68, 2) float32, original image pixels
    det_score: float | None = None  # the cascade's level weight; None for a box given by the caller
    yaw: float = 0.0  # head turn of the keypoints (metrics.yaw)
    face_prob: float | None = None  # P(the box holds a face); None without trust heads
    quality: float | None = None  # P(NME > 0.10): lower is better; None without trust heads

    def trusted(self, max_quality: float = 0.1, min_face_prob: float = 0.5) -> bool:
        """Whether the box is a face (``face_prob`` at least ``min_face_prob``, 0.5 being its default threshold) and
        its keypoints are likely right (``quality`` at most ``max_quality``). False without trust columns."""
        if self.face_prob is None or self.quality is None:
            return False
        return self.face_prob >= min_face_prob and self.quality <= max_quality


@dataclass
class Located:
    """One image's faces found and cropped, waiting for the model (``Predictor.locate``).

    Holds only the crops, not the image, so many can wait for one batched model pass.
    """

    boxes: list[Box]
    scores: list[float] = field(default_factory=list)  # cascade level weights (NaN for given boxes)
    fallback: bool = False  # the boxes came from the detector's fallback pass
    image_side: int = 0  # the image's shorter side
    crops: list[np.ndarray] = field(default_factory=list)  # first stage, (S, S) uint8
    transforms: list[CropTransform] = field(default_factory=list)
    contexts: list[np.ndarray] = field(default_factory=list)  # canonical crops, for the refining stage
    context_transforms: list[CropTransform] = field(default_factory=list)


@dataclass
class Analysis:
    """What :meth:`Predictor.analyse` saw of N faces (rows in the order of the images' boxes)."""

    keypoints: np.ndarray  # (N, 68, 2) float32 image pixels: the answer
    first: np.ndarray  # (N, 68, 2) the first stage's keypoints
    passes: list[np.ndarray]  # each refining pass's keypoints (empty without a refining stage)
    features: np.ndarray  # (N, 1000) the refining stage's last hidden layer, last pass ((N, 0) without one)
    signals: np.ndarray | None  # (N, len(trust.SIGNALS)); None when the predictor has no mean shape
    first_features: np.ndarray  # (N, 1000) the first stage's last hidden layer


_BUILD_LOCK = threading.Lock()  # one checkpoint build at a time, so concurrent callers share one predictor
_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: two exports at once corrupt each other


class Predictor:
    """A checkpoint ready for fast CPU inference: the detector, the crop policy and both model stages.

    Get one with :meth:`from_checkpoint` (built once per process and checkpoint, thread-safe), then either
    :meth:`predict` whole images, or :meth:`locate` faces image by image (in threads: it is only OpenCV) and run
    the model on many images' faces at once with :meth:`keypoints`, the one batch method that annotate and
    evaluate share.

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
        detector: DetectorConfig = DetectorConfig(),
        checkpoint: LoadedModel | None = None,
        trust: tr.TrustHeads | None = None,
    ):
        if backend not in ("onnx", "torch"):
            raise ValueError(f"backend must be 'onnx' or 'torch', got {backend!r}")
        if (refine is None) != (align is None):
            raise ValueError("a refining stage needs its align policy, and an align policy needs the stage")
        self.cfg = model.cfg
        self.policy = policy
        self.detector = detector
        self.batch_size = batch_size
        self.backend = backend
        self.align = align
        self.checkpoint = checkpoint  # what it was built from (model id, metadata), if from a checkpoint
        self.trust = trust  # the face_prob and quality heads, if the checkpoint has them
        # the shape the shape_residual signal compares with: the heads' own (analyse computes the signals only
        # with one; ``benchmarks/fit_trust.py`` sets it to fit the heads)
        self.mean_shape = trust.mean_shape if trust is not None else None
        self._nets = [_Net(model, backend)]
        if refine is not None:
            self._nets.append(_Net(refine, backend))

    @classmethod
    def from_checkpoint(
        cls, uri: str | Path = DEFAULT_MODEL, *, refine: bool = True, backend: str = "onnx"
    ) -> Predictor:
        """The predictor for a checkpoint: its detector settings, crop policy and stages, built once per process.

        Thread-safe: threads asking at once wait for one build and share it. The cache is keyed by a digest of
        the checkpoint's JSON (which names the weights' sha256 and holds the detector settings) as well as the
        path, so a checkpoint retrained or re-configured in place is picked up instead of the stale one.

        With ``refine=False`` a two-stage checkpoint runs its first stage only (faster, less accurate); its model
        id then ends in ``+first-stage``, so its keypoints are never mistaken for the full pipeline's.
        """
        uri = str(uri)
        doc = read_json(config_uri(uri)) or {}
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        with _BUILD_LOCK:
            return _cached(uri, digest, refine, backend)

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id if self.checkpoint is not None else "uncheckpointed"

    @property
    def size(self) -> int:
        return self.cfg.input_size

    @property
    def refines(self) -> bool:
        return len(self._nets) > 1

    def locate(self, gray: np.ndarray, boxes: list[Box] | None = None) -> Located:
        """Find the faces of a grayscale image (with this checkpoint's detector settings, unless ``boxes`` are
        given) and cut every crop the model stages need. Safe to call from many threads at once."""
        if gray is None:  # what cv2.imread gives for a path it cannot read
            raise ValueError("no image (None): was it read from a path that does not exist?")
        if boxes is None:
            dets = detect(gray, self.detector)
        else:
            dets = [Detection(b, float("nan")) for b in boxes]
        loc = Located(
            [d.box for d in dets],
            [d.score for d in dets],
            any(d.fallback for d in dets),
            min(gray.shape[:2]),
        )
        for b in loc.boxes:
            crop, t = crop_square(gray, square_from_box(b, self.policy), self.size)
            loc.crops.append(crop)
            loc.transforms.append(t)
            if self.refines:
                a = self.align
                ctx, ct = crop_square(gray, canonical_square(b, self.policy, a.context_margin), a.context_size)
                loc.contexts.append(ctx)
                loc.context_transforms.append(ct)
        return loc

    def keypoints(self, located: Sequence[Located]) -> list[list[Face]]:
        """The faces of many images at once: one batched pass per model stage over all their crops, then each
        face's trust columns (``fkd_core.trust``)."""
        a = self.analyse(located)
        if a is None:
            return [[] for _ in located]
        face_prob = quality = None
        if self.trust is not None and self.refines and a.signals is not None:
            face_prob, quality = self.trust(a.signals, a.first_features, a.features)
        yaws = tr.yaw_of(a.keypoints)
        out, i = [], 0
        for loc in located:
            faces = []
            for j, b in enumerate(loc.boxes):
                k = i + j
                faces.append(
                    Face(
                        b,
                        a.keypoints[k],
                        det_score=_score_of(loc, j),
                        yaw=float(yaws[k]),
                        face_prob=None if face_prob is None else float(face_prob[k]),
                        quality=None if quality is None else float(quality[k]),
                    )
                )
            out.append(faces)
            i += len(loc.boxes)
        return out

    def analyse(self, located: Sequence[Located]) -> Analysis | None:
        """Both stages over many images' faces, keeping what the trust heads read: each stage's and pass's
        keypoints, the refining stage's last hidden features and the scalar signals. None without faces."""
        crops = [c for loc in located for c in loc.crops]
        if not crops:
            return None
        pred, first_features = self._nets[0].predict(np.stack(crops), self.batch_size, features=True)
        transforms = [t for loc in located for t in loc.transforms]
        first = np.stack([t.to_image(p) for t, p in zip(transforms, pred, strict=True)]).astype(np.float32)
        passes: list[np.ndarray] = []
        features = np.zeros((len(first), 0), np.float32)
        if self.refines:
            contexts = np.stack([c for loc in located for c in loc.contexts])
            ctx_t = [t for loc in located for t in loc.context_transforms]
            passes, features = self._refine(contexts, ctx_t, first)
        boxes = [b for loc in located for b in loc.boxes]
        per_face = [(loc, len(loc.boxes)) for loc in located]
        if self.mean_shape is None:
            return Analysis(passes[-1] if passes else first, first, passes, features, None, first_features)
        sig = tr.signals(
            first.astype(np.float64),
            [p.astype(np.float64) for p in passes],
            boxes,
            np.array([_nan_if_none(_score_of(loc, j)) for loc in located for j in range(len(loc.boxes))]),
            np.array([loc.fallback for loc, n in per_face for _ in range(n)]),
            np.array([loc.image_side for loc, n in per_face for _ in range(n)], np.float64),
            np.array([n for _, n in per_face for _ in range(n)], np.float64),
            self.mean_shape,
        )
        return Analysis(passes[-1] if passes else first, first, passes, features, sig, first_features)

    def predict(self, grays: Sequence[np.ndarray], boxes: Sequence[list[Box]] | None = None) -> list[list[Face]]:
        """Every face of each grayscale image with its 68 keypoints (or the faces in the given ``boxes``)."""
        if boxes is None:
            return self.keypoints([self.locate(g) for g in grays])
        return self.keypoints([self.locate(g, b) for g, b in zip(grays, boxes, strict=True)])

    def predict_crops(self, crops: np.ndarray, stage: int = 0) -> np.ndarray:
        """(N, S, S) uint8 crops -> (N, 68, 2) keypoints in crop pixels, by the first (or the refining) stage."""
        return self._nets[stage].predict(crops, self.batch_size)

    def refine_keypoints(
        self, contexts: np.ndarray, transforms: list[CropTransform], keypoints: np.ndarray
    ) -> np.ndarray:
        """Second-stage keypoints (N, 68, 2) in image pixels from first-stage ones, given each face's canonical
        crop and its transform. Without a refining stage the keypoints come back unchanged."""
        if not self.refines or len(keypoints) == 0:
            return keypoints
        return self._refine(contexts, transforms, keypoints)[0][-1]

    def _refine(
        self, contexts: np.ndarray, transforms: list[CropTransform], keypoints: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """The refining stage's passes (``align.refine_passes``) from first-stage keypoints in image pixels: each
        pass's keypoints (N, 68, 2) float32 in image pixels, the last being the answer, and the last pass's hidden
        features (N, 1000)."""
        kp_ctx = [t.to_crop(k) for t, k in zip(transforms, keypoints, strict=True)]
        feats: list[np.ndarray] = []

        def stage2(x: np.ndarray) -> np.ndarray:
            kp, f = self._nets[1].predict(x, self.batch_size, features=True)
            feats[:] = [f]
            return kp

        trace: list[np.ndarray] = []
        al.refine_passes(stage2, contexts, kp_ctx, self.align, self._nets[1].size, trace=trace)
        passes = [
            np.stack([t.to_image(k) for t, k in zip(transforms, p, strict=True)]).astype(np.float32) for p in trace
        ]
        return passes, feats[0]


def _score_of(loc: Located, j: int) -> float | None:
    """Box ``j``'s cascade score, or None (a box the caller gave, or a ``Located`` built without scores)."""
    if len(loc.scores) != len(loc.boxes) or not np.isfinite(loc.scores[j]):
        return None
    return float(loc.scores[j])


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x


FIRST_STAGE_SUFFIX = "+first-stage"


@lru_cache(maxsize=4)
def _cached(uri: str, config_digest: str, refine: bool, backend: str) -> Predictor:
    loaded = load_checkpoint(uri)
    if not refine and loaded.refine is not None:
        loaded = dataclasses.replace(loaded, refine=None, align=None, model_id=loaded.model_id + FIRST_STAGE_SUFFIX)
    return Predictor(
        loaded.model,
        loaded.policy,
        backend,
        refine=loaded.refine,
        align=loaded.align,
        detector=loaded.detector,
        checkpoint=loaded,
        trust=loaded.trust if loaded.refine is not None else None,
    )


class _Net:
    """One network behind ONNX Runtime or eager PyTorch: (N, S, S) uint8 crops -> crop-pixel keypoints."""

    def __init__(self, model: NaimishNet, backend: str):
        self.model = model.eval()
        self.size = model.cfg.input_size
        self.num_keypoints = model.cfg.num_keypoints
        self.session = _onnx_session(self.model) if backend == "onnx" else None

    @torch.inference_mode()
    def predict(self, crops: np.ndarray, batch_size: int, features: bool = False):
        """Crop-pixel keypoints (N, 68, 2); with ``features`` also the last hidden layer (N, 1000) float32."""
        if len(crops) == 0:
            kp = np.zeros((0, self.num_keypoints, 2), np.float32)
            return (kp, np.zeros((0, DENSE_WIDTH), np.float32)) if features else kp
        out, hidden = [], []
        for start in range(0, len(crops), batch_size):
            # (B, 1, S, S) float32 in [0, 1]
            x = crops[start : start + batch_size, None].astype(np.float32) * np.float32(1.0 / 255.0)
            if self.session is not None:
                y, h = self.session.run(None, {"x": x})
            elif features:
                y, h = self._eager_with_features(torch.from_numpy(x))
            else:
                y, h = self.model(torch.from_numpy(x)).numpy(), None
            out.append(y)
            hidden.append(h)
        pred = np.concatenate(out).reshape(len(crops), -1, 2)  # (N, 68, 2) in [-1, 1]
        kp = denormalise(pred, self.size).astype(np.float32)
        return (kp, np.concatenate(hidden)) if features else kp  # hidden holds None here without features

    def _eager_with_features(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints and the last hidden layer in one eager pass. A subclass with its own ``forward`` (a stand-in
        network) is run as it is, with zero features: its hidden layer is not NaimishNet's."""
        if type(self.model).forward is NaimishNet.forward:
            y, h = _WithFeatures(self.model)(x)
            return y.numpy(), h.numpy()
        return self.model(x).numpy(), np.zeros((len(x), DENSE_WIDTH), np.float32)


class _WithFeatures(torch.nn.Module):
    """NaimishNet's forward pass that also returns its last hidden layer (the input of the keypoint output)."""

    def __init__(self, model: NaimishNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.head[:5](self.model.features(x))  # Flatten, Linear, ELU, Dropout, Linear
        return self.model.head[5:](h), h


def _onnx_session(model: NaimishNet):
    """Export ``model`` to ONNX in memory and open an ONNX Runtime session with as many threads as torch."""
    import io
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    size = model.cfg.input_size
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its own deprecation
        torch.onnx.export(
            _WithFeatures(model),
            torch.zeros(1, 1, size, size),
            buf,
            input_names=["x"],
            output_names=["y", "h"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}, "h": {0: "batch"}},
            dynamo=False,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # Two stages mean two sessions in one process: spinning worker threads of one would starve the other.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
