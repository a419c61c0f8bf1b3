import numpy as np
import pytest

from fkd_core.metrics import by_pose, failure_rate, mse, nme_per_face, summarise, yaw


def test_nme_by_hand():
    t = np.zeros((1, 68, 2))
    t[0, 36] = [0, 0]
    t[0, 45] = [10, 0]  # inter-ocular 10
    p = t.copy()
    p[0, :, 0] += 3
    p[0, :, 1] += 4  # every point 5 px off
    assert nme_per_face(p, t) == pytest.approx([0.5])


def test_failure_rate_counts_unmatched_faces():
    assert failure_rate(np.array([0.05, 0.2, 0.08]), 0.1) == pytest.approx(1 / 3)
    assert failure_rate(np.array([0.05, 0.2, 0.08]), 0.1, unmatched=1) == pytest.approx(2 / 4)


def test_summary_and_mse():
    s = summarise(np.array([0.04, 0.06, 0.5]), n_labelled=4)
    assert s["detection_rate"] == 0.75
    assert s["nme_mean"] == pytest.approx(0.2) and s["nme_median"] == pytest.approx(0.06)
    assert s["fr@0.10"] == 0.5
    assert mse(np.array([1.0, -1.0]), np.array([0.0, 0.0])) == 1.0
    with pytest.raises(ValueError):
        nme_per_face(np.zeros((2, 68, 2)), np.zeros((1, 68, 2)))


def test_yaw_is_zero_frontal_and_one_with_the_nose_at_an_eye_corner():
    t = np.zeros((3, 68, 2))
    t[:, 36, 0], t[:, 45, 0] = 10.0, 30.0  # outer eye corners
    t[:, 30, 0] = [20.0, 30.0, 15.0]  # nose tip: midway, at the right corner, a quarter of the way
    assert yaw(t) == pytest.approx([0.0, 1.0, -0.5])


def test_by_pose_splits_faces_and_counts_unmatched_ones_in_their_group():
    nme = np.array([0.05, 0.2, 0.04, np.nan])  # the fourth face was not detected
    y = np.array([0.1, -0.8, 0.6, 0.2])
    frontal, profile = by_pose(nme, y)
    assert frontal["faces"] == 2 and frontal["nme_mean"] == pytest.approx(0.05) and frontal["fr@0.10"] == 0.5
    assert profile["faces"] == 2 and profile["nme_mean"] == pytest.approx(0.12) and profile["fr@0.10"] == 0.5
