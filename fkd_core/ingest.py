"""Ingestion of labelled images into training examples, one shard at a time (the ingest flow's work): rows and
their image bytes in, an examples table out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fkd_core.detect import DetectorConfig, detect_faces
from fkd_core.errors import ImageError, RowError
from fkd_core.examples import (
    BoxMapping,
    LabelledRow,
    assign_split,
    check_inside,
    make_example,
    parse_keypoints_csv,
    person_of,
    pick_haar_box,
)
from fkd_core.geometry import CANONICAL_MARGIN, CANONICAL_SIZE, CropPolicy, inner_fraction, keypoint_extent_box
from fkd_core.image_io import decode_gray, sha256_hex
from fkd_core.parquet_io import EXAMPLES_SCHEMA, keypoint_column
from fkd_core.storage import open_text, read_under
from fkd_core.types import Box


@dataclass(frozen=True)
class IngestShardConfig:
    images: str  # directory or prefix the CSV's file names are relative to
    split_by: str = "person"
    val_fraction: float = 0.15
    seed: int = 0
    policy: CropPolicy = field(default_factory=CropPolicy)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    canonical_size: int = CANONICAL_SIZE
    canonical_margin: float = CANONICAL_MARGIN
    follow_links_out: bool = False  # read images that links in the images directory lead to outside it


@dataclass
class ShardResult:
    """What a shard reports back: counts, refusals, and what the box mapping is fitted on."""

    written: int = 0
    refused: list[str] = field(default_factory=list)
    kp_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    det_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    misses: list[LabelledRow] = field(default_factory=list)  # detector missed: cropped once the mapping is fitted


class _Rows:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {name: [] for name in EXAMPLES_SCHEMA.names}

    def add(
        self, row: LabelledRow, w: int, h: int, sha: str, gray: np.ndarray, box: Box, source: str, s: IngestShardConfig
    ):
        ex = make_example(gray, row.keypoints, box, s.policy, s.canonical_size, s.canonical_margin)
        c = self.cols
        c["image_id"].append(row.image_id)
        c["person"].append(person_of(row.image_id))
        c["split"].append(assign_split(row.image_id, s.split_by, s.val_fraction, s.seed))
        c["width"].append(w)
        c["height"].append(h)
        c["crop_size"].append(s.canonical_size)
        c["crop"].append(ex.crop.tobytes())
        c["keypoints_x"].append(ex.keypoints[:, 0])
        c["keypoints_y"].append(ex.keypoints[:, 1])
        for k, v in zip(("box_x", "box_y", "box_w", "box_h"), (box.x, box.y, box.w, box.h), strict=True):
            c[k].append(v)
        c["box_source"].append(source)
        c["sha256"].append(sha)

    def __len__(self) -> int:
        return len(self.cols["image_id"])

    def table(self) -> pa.Table:
        arrays = {k: v for k, v in self.cols.items() if not k.startswith("keypoints_")}
        tbl = pa.table(arrays)
        tbl = tbl.append_column("keypoints_x", keypoint_column(self.cols["keypoints_x"] or np.zeros((0, 68))))
        tbl = tbl.append_column("keypoints_y", keypoint_column(self.cols["keypoints_y"] or np.zeros((0, 68))))
        return tbl


def read_rows(
    rows: list[LabelledRow], images: str, links_out: bool = False
) -> Iterator[tuple[LabelledRow, bytes | ImageError]]:
    """Each row with its image file's bytes, or the error reading them raised (``storage.read_under``)."""
    for row, (_, data) in zip(rows, read_under(images, [r.image_id for r in rows], links_out), strict=True):
        yield row, data


def _decode(row: LabelledRow, data: bytes | ImageError) -> tuple[np.ndarray, int, int, str]:
    if isinstance(data, ImageError):
        raise data
    img = decode_gray(data)
    reason = check_inside(row.keypoints, img.width, img.height)
    if reason:
        raise ImageError(reason)
    return img.gray, img.width, img.height, sha256_hex(data)


def ingest_shard(
    reads: Iterable[tuple[LabelledRow, bytes | ImageError]], s: IngestShardConfig, source: str = "csv"
) -> tuple[ShardResult, pa.Table | None]:
    """Validate, detect and crop one shard of rows given with their image bytes (:func:`read_rows`); returns what
    it found and the examples table of the detector's hits (None if there are none). No storage I/O: the ingest
    flow's task reads and writes."""
    res, out = ShardResult(), _Rows()
    for row, data in reads:
        try:
            gray, w, h, sha = _decode(row, data)
        except ImageError as e:
            res.refused.append(f"{source} row {row.row_number} ({row.image_id}): {e}")
            continue
        box = pick_haar_box(detect_faces(gray, s.detector), row.keypoints)
        if box is None:
            res.misses.append(row)
            continue
        res.kp_boxes.append(keypoint_extent_box(row.keypoints))
        res.det_boxes.append((box.x, box.y, box.w, box.h))
        out.add(row, w, h, sha, gray, box, "haar", s)
    res.written = len(out)
    return res, (out.table() if len(out) else None)


def ingest_misses(
    reads: Iterable[tuple[LabelledRow, bytes | ImageError]], mapping: BoxMapping, s: IngestShardConfig
) -> tuple[ShardResult, pa.Table | None]:
    """Crop the rows the detector missed, with boxes derived from their keypoints by ``mapping``."""
    res, out = ShardResult(), _Rows()
    for row, data in reads:
        try:
            gray, w, h, sha = _decode(row, data)
        except ImageError as e:  # pragma: no cover - it was readable a moment ago
            res.refused.append(f"row {row.row_number} ({row.image_id}): {e}")
            continue
        out.add(row, w, h, sha, gray, mapping.box_for(row.keypoints), "keypoints", s)
    res.written = len(out)
    return res, (out.table() if len(out) else None)


def read_labelled_csv(uri: str) -> tuple[list[LabelledRow], list[str]]:
    """A keypoints CSV parsed as it streams (line by line): its valid rows, and each refused row's reason (naming
    the file and the row)."""
    rows, refused = [], []
    with open_text(uri) as f:
        for item in parse_keypoints_csv(f, source=uri.rsplit("/", 1)[-1]):
            (refused.append(str(item)) if isinstance(item, RowError) else rows.append(item))
    return rows, refused


@dataclass(frozen=True)
class CropRecord:
    """How an examples dataset's crops were cut, as its ingest report records it: what training must sample from
    them (``inner``, the refining stage's context margin) and what the checkpoint must carry (the crop policy and
    the detector its inference must use). A report from before these were recorded means the defaults."""

    policy: CropPolicy = CropPolicy()
    canonical_margin: float = CANONICAL_MARGIN
    detector: DetectorConfig = DetectorConfig()

    @property
    def inner(self) -> float:
        """The model's crop square as a fraction of the canonical crop."""
        return inner_fraction(self.canonical_margin)

    @classmethod
    def from_report(cls, report: dict) -> CropRecord:
        return cls(
            CropPolicy(**report["crop_policy"]) if report.get("crop_policy") else CropPolicy(),
            report.get("canonical_margin") or CANONICAL_MARGIN,
            DetectorConfig.from_record(report["detector"]) if report.get("detector") else DetectorConfig(),
        )


def fit_box_mapping(results: list[ShardResult]) -> BoxMapping:
    """The mapping from a face's keypoint box to the detector's box, fitted on every labelled face the detector
    found in any shard (it crops the faces the detector missed as the detector would have)."""
    return BoxMapping.fit(
        np.array([b for r in results for b in r.kp_boxes]).reshape(-1, 4),
        np.array([b for r in results for b in r.det_boxes]).reshape(-1, 4),
    )


def ingest_report(
    csv: str, examples: str, shard_cfg: IngestShardConfig, from_detector: int, from_keypoints: int,
    refused: list[str], mapping: BoxMapping, seconds: float,
) -> dict:  # fmt: skip
    """``ingest_report.json``: what was kept and refused (every reason), and how the crops were cut (crop policy,
    detector, canonical crop, box mapping) and split, which training reads back (:class:`CropRecord`)."""
    from dataclasses import asdict

    return {
        "csv": csv,
        "images": shard_cfg.images,
        "examples": examples,
        "rows_kept": from_detector + from_keypoints,
        "rows_refused": len(refused),
        "refused": refused,
        "boxes_from_haar": from_detector,
        "boxes_from_keypoints": from_keypoints,
        "box_mapping": mapping.to_dict(),
        "crop_policy": asdict(shard_cfg.policy),
        "detector": shard_cfg.detector.to_record(),
        "canonical_size": shard_cfg.canonical_size,
        "canonical_margin": shard_cfg.canonical_margin,
        "split_by": shard_cfg.split_by,
        "val_fraction": shard_cfg.val_fraction,
        "seed": shard_cfg.seed,
        "seconds": round(seconds, 2),
    }
