"""Inference: detector boxes -> crops -> batched model forward -> keypoints in original image pixels."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fkd_core import align as al
from fkd_core import trust as tr
from fkd_core.checkpoint import DEFAULT_MODEL, LoadedModel, config_uri, load_checkpoint
from fkd_core.detect import (
    Detection,
    Detector,
    DetectorConfig,
    DetectorMapping,
    LandmarkStart,
    detect,
    detector_name,
)
from fkd_core.errors import CheckpointError
from fkd_core.geometry import CropPolicy, CropTransform, canonical_square, crop_square, denormalise, square_from_box
from fkd_core.netspec import DENSE_WIDTH, NaimishNetConfig
from fkd_core.storage import read_json
from fkd_core.types import Box

if TYPE_CHECKING:
    from fkd_core.model import NaimishNet


@dataclass(frozen=True)
class Face:
    """One face: its box, 68 keypoints and how far to trust them (``fkd_core.trust``)."""

    box: Box
    keypoints: np.ndarray  # (68, 2) float32, original image pixels
    det_score: float | None = (
        None  # the detector's score (cascade level weight, YuNet confidence); None for a box given
    )
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

    boxes: list[Box]  # as the detector gave them (what the faces table records)
    scores: list[float] = field(default_factory=list)  # the detector's scores (NaN for given boxes)
    fallback: bool = False  # the boxes came from the detector's fallback pass
    image_side: int = 0  # the image's shorter side
    crops: list[np.ndarray] = field(default_factory=list)  # first stage, (S, S) uint8
    transforms: list[CropTransform] = field(default_factory=list)
    contexts: list[np.ndarray] = field(default_factory=list)  # canonical crops, for the refining stage
    context_transforms: list[CropTransform] = field(default_factory=list)
    model_boxes: list[Box] = field(default_factory=list)  # the boxes the crops are cut around (see ``locate``)
    # where the refining stage starts for each face, from its detector's landmarks (image pixels), or None where
    # the first stage finds it (``Predictor.start``)
    starts: list[np.ndarray | None] = field(default_factory=list)


@dataclass
class Analysis:
    """What :meth:`Predictor.analyse` saw of N faces (rows in the order of the images' boxes)."""

    keypoints: np.ndarray  # (N, 68, 2) float32 image pixels: the answer
    first: np.ndarray  # (N, 68, 2) the first stage's keypoints (or, with a landmark start, where the refining began)
    passes: list[np.ndarray]  # each refining pass's keypoints (empty without a refining stage)
    features: np.ndarray  # (N, 1000) the refining stage's last hidden layer, last pass ((N, 0) without one)
    signals: np.ndarray | None  # (N, len(trust.SIGNALS)); None when the predictor has no mean shape
    first_features: np.ndarray  # (N, 1000) the first stage's last hidden layer (zeros for faces it did not see)


_BUILD_LOCK = threading.Lock()  # one checkpoint build at a time, so concurrent callers share one predictor


@dataclass(frozen=True)
class OnnxStage:
    """A model stage as its ONNX graph (what a checkpoint ships), runnable without torch."""

    graph: bytes
    cfg: NaimishNetConfig


class Predictor:
    """A checkpoint ready for fast CPU inference: the detector, the crop policy and both model stages.

    Get one with :meth:`from_checkpoint` (built once per process and checkpoint, thread-safe), then either
    :meth:`predict` whole images, or :meth:`locate` faces image by image (in threads: it is only OpenCV) and run
    the model on many images' faces at once with :meth:`keypoints`, the one batch method that annotate and
    evaluate share.

    ``backend="onnx"`` (the default) runs each stage's ONNX graph with ONNX Runtime (a checkpoint's own graphs;
    a stage given as a PyTorch network is exported in-process), about 2.9x the throughput of eager PyTorch on 2
    CPU cores with outputs equal to 4e-5 px (``benchmarks/bench_model.py``); ``backend="torch"`` runs eager
    PyTorch. Only the torch backend and in-process export import torch.

    ``detector`` finds the faces; with ``box_map`` (a detector other than the one the model was trained behind)
    each of its boxes is mapped to the box the model's crops expect, and with ``start`` the refining stage starts
    from the 68 points its landmarks give, instead of the first stage's.

    With ``refine`` (a second NaimishNet) and its ``align`` policy, each face's first-stage keypoints give a
    crop aligned to the face (centre, size, eye-line angle; ``fkd_core.align``), cut from the same canonical
    crop around the Haar box that training cut it from, and the second stage's keypoints are the answer (after
    ``align.passes`` passes, each aligned by the last one's keypoints).
    """

    def __init__(
        self,
        model: NaimishNet | OnnxStage,
        policy: CropPolicy,
        backend: str = "onnx",
        batch_size: int = 64,
        refine: NaimishNet | OnnxStage | None = None,
        align: al.AlignPolicy | None = None,
        detector: Detector = DetectorConfig(),
        checkpoint: LoadedModel | None = None,
        trust: tr.TrustHeads | None = None,
        box_map: DetectorMapping | None = None,
        model_id: str | None = None,
        threads: int | None = None,
        start: LandmarkStart | None = None,
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
        self.box_map = box_map
        # the refining stage starts from the detector's landmarks, not the first stage (a pass fewer a face)
        self.start = start if refine is not None else None
        self._model_id = model_id or (checkpoint.model_id if checkpoint is not None else "uncheckpointed")
        self.trust = trust  # the face_prob and quality heads, if the checkpoint has them
        # the shape the shape_residual signal compares with: the heads' own (analyse computes the signals only
        # with one; ``benchmarks/fit_trust.py`` sets it to fit the heads)
        self.mean_shape = trust.mean_shape if trust is not None else None
        self.threads = threads or _cores()  # ONNX Runtime threads of each stage
        self._nets = [_Net(model, backend, self.threads)]
        if refine is not None:
            self._nets.append(_Net(refine, backend, self.threads))

    @classmethod
    def from_checkpoint(
        cls,
        uri: str | Path = DEFAULT_MODEL,
        *,
        refine: bool = True,
        backend: str = "onnx",
        detector: str | None = None,
        threads: int | None = None,
    ) -> Predictor:
        """The predictor for a checkpoint: its detector settings, crop policy and stages, built once per process.

        Thread-safe: threads asking at once wait for one build and share it. The cache is keyed by a digest of
        the checkpoint's JSON (which names the weights' and graphs' sha256 and holds the detector settings) as well
        as the path, so a checkpoint retrained or re-configured in place is picked up instead of the stale one.

        With ``refine=False`` a two-stage checkpoint runs its first stage only (faster, less accurate); its model
        id then ends in ``+first-stage``, so its keypoints are never mistaken for the full pipeline's.

        ``detector`` (``haar``, ``yunet``; None: the checkpoint's own) picks the face detector. Another detector than
        the one the model was trained behind runs with the box mapping and trust heads the checkpoint holds for it,
        and its model id ends in ``+<detector>-<digest of its settings>``, so rows of the two paths never mix.

        ``threads``: ONNX Runtime's threads per stage (None: one per core); annotate runs the model on a thread of
        its own beside its decode threads and asks for ``annotate.MODEL_THREADS``.
        """
        uri = str(uri)
        doc = read_json(config_uri(uri)) or {}
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        if detector == (doc.get("detector") or {}).get("kind", "haar"):
            detector = None  # the model's own detector, by name: the same predictor
        with _BUILD_LOCK:
            return _cached(uri, digest, refine, backend, detector, threads or _cores())

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def size(self) -> int:
        return self.cfg.input_size

    @property
    def refines(self) -> bool:
        return len(self._nets) > 1

    @property
    def why_untrusted(self) -> str | None:
        """Why this predictor's faces will have no ``face_prob`` and ``quality``, or None when they will."""
        if self.trust is not None:
            return None
        if not self.refines and self.checkpoint is not None and self.checkpoint.two_stage:
            return "its refining stage is off (--no-refine), and the trust heads read it"
        if not self.refines:
            return ("it has no refining stage, which the trust heads read (a first stage, as `fkd train` writes it; "
                    "train one with --refine-of)")  # fmt: skip
        return "it has no trust heads (benchmarks/fit_trust.py fits them)"

    def locate(self, gray: np.ndarray, boxes: list[Box] | None = None) -> Located:
        """Find the faces of a grayscale image (with this predictor's detector, unless ``boxes`` are given, in the
        sense of the detector the model was trained behind) and cut every crop the model stages need. Safe to call
        from many threads at once."""
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
        mapped = self.box_map is not None and boxes is None
        loc.model_boxes = [self.box_map.map(d) if mapped else d.box for d in dets]
        loc.starts = [
            self.start.keypoints(np.asarray(d.landmarks)) if self.start and d.landmarks is not None else None
            for d in dets
        ]
        for b in loc.model_boxes:
            crop, t = crop_square(gray, square_from_box(b, self.policy), self.size)
            loc.crops.append(crop)
            loc.transforms.append(t)
            if self.refines:
                a = self.align
                ctx, ct = crop_square(gray, canonical_square(b, self.policy, a.context_margin), a.context_size)
                loc.contexts.append(ctx)
                loc.context_transforms.append(ct)
        return loc

    def faces_of(self, located: Sequence[Located]) -> list[list[Face]]:
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
        transforms = [t for loc in located for t in loc.transforms]
        starts = [s for loc in located for s in (loc.starts or [None] * len(loc.boxes))]
        first = np.zeros((len(crops), self.cfg.num_keypoints, 2), np.float32)
        first_features = np.zeros((len(crops), DENSE_WIDTH), np.float32)
        need = [k for k, s in enumerate(starts) if s is None]  # faces the first stage places
        if need:
            pred, first_features[need] = self._nets[0].predict(
                np.stack([crops[k] for k in need]), self.batch_size, True
            )
            first[need] = np.stack([transforms[k].to_image(p) for k, p in zip(need, pred, strict=True)])
        for k, s in enumerate(starts):
            if s is not None:
                first[k] = s
        passes: list[np.ndarray] = []
        features = np.zeros((len(first), 0), np.float32)
        if self.refines:
            contexts = np.stack([c for loc in located for c in loc.contexts])
            ctx_t = [t for loc in located for t in loc.context_transforms]
            passes, features = self._refine(contexts, ctx_t, first)
        boxes = [b for loc in located for b in (loc.model_boxes or loc.boxes)]
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
            return self.faces_of([self.locate(g) for g in grays])
        return self.faces_of([self.locate(g, b) for g, b in zip(grays, boxes, strict=True)])

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
        kp_ctx = np.stack([t.to_crop(k) for t, k in zip(transforms, keypoints, strict=True)])
        feats: list[np.ndarray] = []

        def stage2(x: np.ndarray) -> np.ndarray:
            kp, f = self._nets[1].predict(x, self.batch_size, features=True)
            feats.append(f)
            return kp

        trace: list[np.ndarray] = []
        ran: list[np.ndarray] = []
        al.refine_passes(stage2, contexts, kp_ctx, self.align, self._nets[1].size, trace, ran)
        features = np.zeros((len(kp_ctx), DENSE_WIDTH), np.float32)
        for idx, f in zip((r for r in ran if len(r)), feats, strict=True):  # each face's features from its last pass
            features[idx] = f
        passes = [
            np.stack([t.to_image(k) for t, k in zip(transforms, p, strict=True)]).astype(np.float32) for p in trace
        ]
        return passes, features


def _score_of(loc: Located, j: int) -> float | None:
    """Box ``j``'s cascade score, or None (a box the caller gave, or a ``Located`` built without scores)."""
    if len(loc.scores) != len(loc.boxes) or not np.isfinite(loc.scores[j]):
        return None
    return float(loc.scores[j])


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else x


FIRST_STAGE_SUFFIX = "+first-stage"


@lru_cache(maxsize=4)
def _cached(uri: str, config_digest: str, refine: bool, backend: str, detector: str | None, threads: int) -> Predictor:
    loaded = load_checkpoint(uri)
    model_id, det, trust, box_map, start = loaded.model_id, loaded.detector, loaded.trust, None, None
    own = detector_name(loaded.detector)
    if detector is not None and detector != own:
        alt = loaded.detectors.get(detector)
        if alt is None:
            known = ", ".join([own, *loaded.detectors])
            raise CheckpointError(
                f"model {uri} has no box mapping for the {detector} detector (it runs behind {known}); fit one with "
                f"benchmarks/fit_detector.py"
            )
        record = json.dumps(alt.record(), sort_keys=True).encode()
        model_id = f"{model_id}+{detector}-{hashlib.sha256(record).hexdigest()[:6]}"
        det, trust, box_map, start = alt.detector, alt.trust, alt.mapping, alt.start
    two = loaded.two_stage and refine
    if loaded.two_stage and not refine:
        model_id += FIRST_STAGE_SUFFIX
    return Predictor(
        _stage(loaded, "first", backend),
        loaded.policy,
        backend,
        refine=_stage(loaded, "refine", backend) if two else None,
        align=loaded.align if two else None,
        detector=det,
        checkpoint=loaded,
        trust=trust if two else None,
        box_map=box_map,
        model_id=model_id,
        threads=threads,
        start=start,
    )


def _stage(loaded: LoadedModel, stage: str, backend: str) -> NaimishNet | OnnxStage:
    """A checkpoint's stage as its backend runs it: the shipped ONNX graph, or the PyTorch network (torch)."""
    cfg = loaded.cfg if stage == "first" else loaded.refine_cfg
    if backend == "onnx" and stage in loaded.graphs:
        return OnnxStage(loaded.graphs[stage], cfg)
    try:
        return loaded.model if stage == "first" else loaded.refine
    except ImportError:
        raise CheckpointError(
            f"model {loaded.model_id} has no ONNX graph for its {stage} stage, and torch, which would export one, is "
            "not installed: write its graphs with `fkd export-onnx MODEL` where fkd[train] is installed"
        ) from None


class _Net:
    """One network behind ONNX Runtime or eager PyTorch: (N, S, S) uint8 crops -> crop-pixel keypoints."""

    def __init__(self, stage: NaimishNet | OnnxStage, backend: str, threads: int):
        self.cfg = stage.cfg
        self.size = stage.cfg.input_size
        self.num_keypoints = stage.cfg.num_keypoints
        self.model = None if isinstance(stage, OnnxStage) else stage.eval()
        if isinstance(stage, OnnxStage):
            self.session = _onnx_session(stage.graph, threads)
        elif backend == "onnx":
            from fkd_core.export import stage_graph

            self.session = _onnx_session(stage_graph(stage), threads)
        else:
            self.session = None

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
            else:
                y, h = self._eager(x, features)
            out.append(y)
            hidden.append(h)
        pred = np.concatenate(out).reshape(len(crops), -1, 2)  # (N, 68, 2) in [-1, 1]
        kp = denormalise(pred, self.size).astype(np.float32)
        return (kp, np.concatenate(hidden)) if features else kp  # hidden holds None here without features

    def _eager(self, x: np.ndarray, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Keypoints (and with ``features`` the last hidden layer) in one eager PyTorch pass. A subclass with its own
        ``forward`` (a stand-in network) is run as it is, with zero features: its hidden layer is not NaimishNet's."""
        import torch

        from fkd_core.export import WithFeatures
        from fkd_core.model import NaimishNet

        with torch.inference_mode():
            t = torch.from_numpy(x)
            if not features:
                return self.model(t).numpy(), None
            if type(self.model).forward is NaimishNet.forward:
                y, h = WithFeatures(self.model)(t)
                return y.numpy(), h.numpy()
            return self.model(t).numpy(), np.zeros((len(x), DENSE_WIDTH), np.float32)


def _onnx_session(graph: bytes, threads: int):
    """An ONNX Runtime session over a stage's graph, with ``threads`` threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Two stages mean two sessions in one process: spinning worker threads of one would starve the other.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
