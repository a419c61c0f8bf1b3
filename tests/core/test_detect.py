import cv2
import numpy as np
import pytest

from fkd_core.detect import DetectorConfig, detect_faces, load_cascade, match_box
from fkd_core.types import Box


@pytest.fixture(scope="module")
def beatles(sample_dir):
    return cv2.imread(str(sample_dir / "photos" / "the_beatles.jpg"), cv2.IMREAD_GRAYSCALE)


def test_finds_the_four_beatles_in_a_stable_order(beatles):
    runs = [detect_faces(beatles) for _ in range(4)]
    assert all(r == runs[0] for r in runs)
    boxes = runs[0]
    assert len(boxes) == 4
    areas = [b.w * b.h for b in boxes]
    assert areas == sorted(areas, reverse=True)
    h, w = beatles.shape
    assert all(0 <= b.x and 0 <= b.y and b.x + b.w <= w + 1 and b.y + b.h <= h + 1 for b in boxes)


def test_downscaled_detection_maps_boxes_back_to_original_pixels(beatles):
    full = detect_faces(beatles, DetectorConfig(max_side=0))
    small = detect_faces(beatles, DetectorConfig(max_side=1024))
    # full resolution also fires on small textures (10 boxes here); each downscaled box has a full-size twin
    assert len(small) == 4 and len(full) >= 4
    for a in small:
        b = min(full, key=lambda b: abs(b.cx - a.cx) + abs(b.cy - a.cy))
        assert abs(a.cx - b.cx) < 0.15 * b.w and 0.75 < a.w / b.w < 1.33


def test_no_face_in_a_flat_image_and_input_checks():
    assert detect_faces(np.full((200, 200), 127, np.uint8)) == []
    with pytest.raises(ValueError):
        detect_faces(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(FileNotFoundError):
        load_cascade("/nonexistent.xml")


def test_match_box_prefers_the_nearest_centre_containing_the_point():
    boxes = [Box(0, 0, 100, 100), Box(45, 45, 20, 20), Box(200, 200, 10, 10)]
    assert match_box(boxes, 54, 54) == 1
    assert match_box(boxes, 10, 10) == 0
    assert match_box(boxes, 150, 150) is None


def test_fallback_pass_finds_a_face_the_strict_pass_misses_and_only_then(sample_dir, beatles):
    # a real training frame (Sally_Ride_40, labelled keypoint centroid about (70, 48)) where the cascade
    # finds nothing at min_neighbors 5
    gray = cv2.imread(str(sample_dir / "hard" / "Sally_Ride_40.jpg"), cv2.IMREAD_GRAYSCALE)
    assert detect_faces(gray, DetectorConfig(fallback_min_neighbors=0)) == []
    boxes = detect_faces(gray, DetectorConfig(fallback_min_neighbors=3))
    assert len(boxes) == 1 and match_box(boxes, 70.3, 48.2) == 0
    assert DetectorConfig().fallback_min_neighbors == 3  # the default, chosen by measurement (README)
    # an image with faces found at min_neighbors 5 is not searched again, so it gains no false boxes
    assert detect_faces(beatles, DetectorConfig(fallback_min_neighbors=1)) == detect_faces(
        beatles, DetectorConfig(fallback_min_neighbors=0)
    )
    # nor does a flat image get one
    assert detect_faces(np.full((200, 200), 127, np.uint8), DetectorConfig(fallback_min_neighbors=1)) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"fallback_min_neighbors": 5}, {"fallback_min_neighbors": -1}, {"scale_factor": 1.0}, {"min_size": 0}],
)
def test_detector_config_refuses_bad_values_naming_them(kwargs):
    with pytest.raises(ValueError, match="fallback_min_neighbors|scale_factor"):
        DetectorConfig(**kwargs)


def test_detector_record_round_trip_is_portable_and_reads_old_records():
    cfg = DetectorConfig(scale_factor=1.2, min_neighbors=4, fallback_min_neighbors=2)
    rec = cfg.to_record()
    assert rec["cascade"] == "haarcascade_frontalface_default.xml"  # a file name, resolved where it is read
    assert DetectorConfig.from_record(rec) == cfg
    old = {k: v for k, v in rec.items() if k != "fallback_min_neighbors"}
    assert DetectorConfig.from_record(old).fallback_min_neighbors == 0  # made before the fallback pass existed
    with pytest.raises(TypeError, match="min_neighbours"):
        DetectorConfig.from_record({**rec, "min_neighbours": 3})
