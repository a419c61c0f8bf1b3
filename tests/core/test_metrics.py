import numpy as np
import pytest

from fkd_core.metrics import failure_rate, mse, nme_per_face, summarise


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
