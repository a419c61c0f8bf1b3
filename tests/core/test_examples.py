import io

import numpy as np
import pytest

from fkd_core.errors import RowError
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
from fkd_core.types import Box

HEADER = "," + ",".join(str(i) for i in range(136))


def _row(name: str, values) -> str:
    return name + "," + ",".join(str(v) for v in values)


def test_csv_rows_are_parsed_and_bad_ones_refused_with_row_number():
    good = np.arange(136, dtype=float)
    lines = [
        HEADER,
        _row("a_01.jpg", good),
        _row("b_01.jpg", good[:-1]),  # row 3: too few columns
        _row("c_01.jpg", [*good[:10], "abc", *good[11:]]),  # row 4: column 11 not a number
        _row("d_01.jpg", [*good[:-1], "nan"]),  # row 5: non-finite
        "",  # blank line skipped
        _row("", good),  # row 7: empty name
        _row("../../etc/passwd", good),  # row 8: out of the images directory
        _row("/etc/passwd", good),  # row 9: an absolute path
        _row("sub/e..f_01.jpg", good),  # dots inside a name are fine
    ]
    items = list(parse_keypoints_csv(io.StringIO("\n".join(lines)), source="kp.csv"))
    rows = [i for i in items if isinstance(i, LabelledRow)]
    errors = [str(i) for i in items if isinstance(i, RowError)]
    assert [r.image_id for r in rows] == ["a_01.jpg", "sub/e..f_01.jpg"]
    assert rows[0].row_number == 2 and rows[0].keypoints.shape == (68, 2)
    assert rows[0].keypoints[1].tolist() == [2.0, 3.0]
    assert errors == [
        "kp.csv row 3: 136 columns, expected 137",
        "kp.csv row 4: column 11 is not a number: 'abc'",
        "kp.csv row 5: non-finite keypoint value",
        "kp.csv row 7: empty image name",
        "kp.csv row 8: image name '../../etc/passwd' leads out of the images directory",
        "kp.csv row 9: image name '/etc/passwd' leads out of the images directory",
    ]


def test_csv_with_wrong_header_is_refused_naming_the_file():
    with pytest.raises(RowError, match="kp.csv row 1: header has 3 columns"):
        list(parse_keypoints_csv(io.StringIO("a,b,c\n"), source="kp.csv"))
    with pytest.raises(RowError, match="empty file"):
        list(parse_keypoints_csv(io.StringIO(""), source="kp.csv"))


def test_points_far_outside_the_image_are_refused():
    kp = np.full((68, 2), 50.0)
    assert check_inside(kp, 100, 100) is None
    kp[7] = [50, 112]  # 12 % below the bottom edge
    assert "keypoint 7" in check_inside(kp, 100, 100)
    kp[7] = [50, 105]  # within tolerance
    assert check_inside(kp, 100, 100) is None


def test_person_and_split_are_grouped_and_deterministic():
    assert person_of("Luis_Fonsi_21.jpg") == "Luis_Fonsi"
    assert person_of("dir/Abdel_Aziz_Al-Hakim_00.jpg") == "Abdel_Aziz_Al-Hakim"
    names = [f"Person_{p}_{f:02d}.jpg" for p in range(200) for f in range(5)]
    splits = {n: assign_split(n, "person", 0.2, seed=1) for n in names}
    for p in range(200):
        assert len({splits[f"Person_{p}_{f:02d}.jpg"] for f in range(5)}) == 1
    share = sum(s == "val" for s in splits.values()) / len(names)
    assert 0.12 < share < 0.28
    assert splits == {n: assign_split(n, "person", 0.2, seed=1) for n in names}
    assert splits != {n: assign_split(n, "person", 0.2, seed=2) for n in names}
    frame = {n: assign_split(n, "frame", 0.2) for n in names}
    assert any(len({frame[f"Person_{p}_{f:02d}.jpg"] for f in range(5)}) == 2 for p in range(200))
    with pytest.raises(ValueError, match="split_by"):
        assign_split("x", "random")


def test_pick_haar_box_needs_the_centroid_inside_and_a_plausible_size():
    kp = np.random.default_rng(0).uniform(100, 180, size=(68, 2))
    good, far, huge = Box(90, 90, 90, 90), Box(0, 0, 50, 50), Box(0, 0, 600, 600)
    assert pick_haar_box([far, good, huge], kp) == good
    assert pick_haar_box([far], kp) is None
    assert pick_haar_box([huge], kp) is None


def test_box_mapping_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    n = 200
    kp = np.column_stack(
        [rng.uniform(50, 150, n), rng.uniform(50, 150, n), rng.uniform(40, 90, n), rng.uniform(40, 90, n)]
    )
    side = 1.1 * kp[:, 3] + 3
    cx, cy = kp[:, 0] + 0.01 * kp[:, 2], kp[:, 1] - 0.1 * kp[:, 3]
    det = np.column_stack([cx - side / 2, cy - side / 2, side, side])
    m = BoxMapping.fit(kp, det)
    assert m.n_fitted == n
    pts = np.array([[100.0, 100.0], [160.0, 170.0]])  # extent box: centre (130, 135), w 60, h 70
    b = m.box_for(pts)
    assert b.w == pytest.approx(1.1 * 70 + 3, abs=1e-6)
    assert b.cx == pytest.approx(130 + 0.6, abs=1e-6) and b.cy == pytest.approx(135 - 7, abs=1e-6)
    assert BoxMapping.fit(kp[:5], det[:5]).n_fitted == 0  # too few pairs: the shipped default


def test_make_example_maps_keypoints_into_the_canonical_crop():
    img = np.zeros((200, 200), np.uint8)
    kp = np.full((68, 2), 100.0)
    img[98:103, 98:103] = 255
    ex = make_example(img, kp, Box(70, 60, 60, 60))
    assert ex.crop.shape == (144, 144)
    ys, xs = np.nonzero(ex.crop)
    w = ex.crop[ys, xs].astype(float)
    centroid = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    assert np.abs(ex.keypoints[0] - centroid).max() < 0.3


def test_a_crop_record_reads_how_ingest_cut_the_crops_and_an_old_report_means_the_defaults():
    from fkd_core.detect import DetectorConfig
    from fkd_core.geometry import CANONICAL_MARGIN, CropPolicy
    from fkd_core.ingest import CropRecord

    old = CropRecord.from_report({"examples": "x", "crop_policy": None, "canonical_margin": None, "detector": None})
    assert old == CropRecord(CropPolicy(), CANONICAL_MARGIN, DetectorConfig()) and old.inner == 1 / CANONICAL_MARGIN
    detector = DetectorConfig(min_neighbors=7)
    report = {"crop_policy": {"scale": 1.5, "shift_y": 0.05}, "canonical_margin": 2.0, "detector": detector.to_record()}
    rec = CropRecord.from_report(report)
    assert rec.policy == CropPolicy(scale=1.5, shift_y=0.05) and rec.canonical_margin == 2.0 and rec.inner == 0.5
    assert rec.detector.min_neighbors == 7 and rec.detector.to_record() == detector.to_record()
