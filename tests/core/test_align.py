"""Second-stage (aligned) crops: the frame, the matrix, the pixels, and keypoints mapped back exactly."""

import math

import numpy as np
import pytest
import torch

from fkd_core.align import (
    Alignment,
    AlignPolicy,
    aligned_matrix,
    alignment_of,
    frame_change,
    invert,
    perturb,
    refine_passes,
    sample_aligned_batch,
    warp,
)
from fkd_core.geometry import CropPolicy, CropTransform, affine_points, denormalise, normalise
from fkd_core.model import NaimishNet
from fkd_core.predict import Predictor
from fkd_core.types import Box
from tests.conftest import SAMPLE


def _shape() -> np.ndarray:
    """A real labelled face from the bundled sample, (68, 2) image pixels."""
    row = (SAMPLE / "keypoints.csv").read_text().splitlines()[1].split(",")
    return np.array([float(v) for v in row[1:]]).reshape(68, 2)


def _similar(kp: np.ndarray, angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    t = math.radians(angle_deg)
    r = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) * scale
    c = kp.mean(axis=0)
    return (kp - c) @ r.T + c + np.array(shift)


def test_alignment_follows_a_similarity_transform():
    kp = _shape()
    a = alignment_of(kp)
    b = alignment_of(_similar(kp, 17.0, 1.6, (12.0, -30.0)))
    assert b.cx == pytest.approx(a.cx + 12.0) and b.cy == pytest.approx(a.cy - 30.0)
    assert b.radius == pytest.approx(a.radius * 1.6)
    assert math.degrees(b.angle - a.angle) == pytest.approx(17.0)


@pytest.mark.parametrize("angle", [0.0, 25.0, -40.0])
def test_aligned_crop_puts_every_face_in_the_same_upright_place(angle):
    """Whatever the face's pose in the image, its aligned keypoints are the same (the shape alone is left)."""
    kp = _shape()
    ref = affine_points(aligned_matrix(alignment_of(kp), 3.8, 96), kp)
    moved = _similar(kp, angle, 0.7, (40.0, 5.0))
    m = aligned_matrix(alignment_of(moved), 3.8, 96)
    got = affine_points(m, moved)
    assert np.allclose(got, ref, atol=1e-6)
    frame = alignment_of(got)
    assert (frame.cx, frame.cy) == pytest.approx((47.5, 47.5)) and frame.angle == pytest.approx(0.0, abs=1e-9)
    assert frame.radius == pytest.approx(96 / 3.8)
    assert np.allclose(affine_points(invert(m), got), moved, atol=1e-6)


def test_warped_pixels_sit_where_the_matrix_puts_the_points():
    crop = np.zeros((144, 144), np.uint8)
    crop[60, 90] = 255
    m = aligned_matrix(Alignment(70.0, 75.0, 24.0, math.radians(30.0)), 3.8, 96)
    out = warp(crop, m, 96).astype(np.float64)
    ys, xs = np.mgrid[0:96, 0:96]
    centroid = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
    assert np.allclose(centroid, affine_points(m, np.array([90.0, 60.0])), atol=0.05)


def test_training_batches_keep_points_on_pixels_and_noise_is_seeded():
    kp = _shape()
    kp = kp - kp.mean(axis=0) + 72.0  # a face in the middle of a 144 px canonical crop
    crop = np.zeros((1, 144, 144), np.uint8)
    p = np.round(kp[30]).astype(int)  # nose tip
    crop[0, p[1] - 1 : p[1] + 2, p[0] - 1 : p[0] + 2] = 255
    kp[30] = p
    pol = AlignPolicy()
    x0, y0 = sample_aligned_batch(crop, kp[None], np.array([0]), 96, pol)
    assert np.allclose(
        alignment_of(denormalise(y0[0].reshape(68, 2), 96)).to_array(), [47.5, 47.5, 96 / 3.8, 0.0], atol=1e-4
    )
    a1 = sample_aligned_batch(crop, kp[None], np.array([0]), 96, pol, rng=np.random.default_rng(1))
    a2 = sample_aligned_batch(crop, kp[None], np.array([0]), 96, pol, rng=np.random.default_rng(1))
    assert np.array_equal(a1[0], a2[0]) and np.array_equal(a1[1], a2[1])
    assert not np.allclose(a1[1], y0)  # the frame was perturbed
    for x, y in (a1, (x0, y0)):
        img = x[0, 0]
        yy, xx = np.nonzero(img > 0.2)
        w = img[yy, xx]
        assert np.allclose([(xx * w).sum() / w.sum(), (yy * w).sum() / w.sum()], denormalise(y[0, 60:62], 96), atol=0.3)


def test_perturbation_has_the_policy_spread():
    a = Alignment(0.0, 0.0, 10.0, 0.0)
    rng = np.random.default_rng(0)
    pol = AlignPolicy(shift_std=0.1, scale_std=0.05, rotate_std_deg=4.0)
    s = np.array([perturb(a, rng, pol).to_array() for _ in range(4000)])
    assert np.std(s[:, 0] / 10.0) == pytest.approx(0.1, rel=0.1)
    assert np.std(np.log(s[:, 2] / 10.0)) == pytest.approx(0.05, rel=0.1)
    assert np.degrees(np.std(s[:, 3])) == pytest.approx(4.0, rel=0.1)


class _Const(NaimishNet):
    """A stand-in network that always answers the same normalised keypoints."""

    def __init__(self, out: np.ndarray):
        super().__init__()
        self.out = torch.as_tensor(out, dtype=torch.float32).reshape(1, -1)

    def forward(self, x):
        return self.out.expand(x.shape[0], -1)


def test_two_stage_prediction_maps_the_refined_points_back_to_the_image():
    """If the second stage answers the first stage's shape in aligned coordinates, the result is the first
    stage's keypoints, wherever and however large the face is: every transform inverts exactly."""
    shape = _shape()
    shape = (shape - shape.mean(axis=0)) / np.abs(shape - shape.mean(axis=0)).max() * 30 + 47.5  # in a 96 px crop
    first = _Const(normalise(shape, 96))
    aligned = affine_points(aligned_matrix(alignment_of(shape), 3.8, 96), shape)
    second = _Const(normalise(aligned, 96))
    gray = np.random.default_rng(0).integers(0, 255, size=(480, 640), dtype=np.uint8)
    boxes = [Box(100, 80, 150, 150), Box(500, 300, 60, 60), Box(-20, 400, 120, 120)]
    one = Predictor(first.eval(), CropPolicy(), backend="torch").predict([gray], [boxes])[0]
    pred = Predictor(first.eval(), CropPolicy(), backend="torch", refine=second.eval(), align=AlignPolicy())
    two = pred.predict([gray], [boxes])[0]
    for a, b in zip(one, two, strict=True):
        assert np.allclose(a.keypoints, b.keypoints, atol=1e-3)
    # and a second stage that answers something else moves the points
    other = _Const(normalise(aligned + np.array([3.0, 0.0]), 96))
    moved = Predictor(first.eval(), CropPolicy(), backend="torch", refine=other.eval(), align=AlignPolicy())
    k = moved.predict([gray], [boxes[:1]])[0][0].keypoints
    assert np.linalg.norm(k - one[0].keypoints, axis=1).mean() > 1.0


def test_a_refining_stage_needs_its_policy():
    with pytest.raises(ValueError, match="align policy"):
        Predictor(NaimishNet(), CropPolicy(), backend="torch", refine=NaimishNet())


@pytest.mark.parametrize("passes", [1, 2])
def test_validation_scores_what_the_predictor_predicts(passes):
    """Training validates the second stage on canonical crops with true points; inference runs it through the
    Predictor on image crops. Both must give the same keypoints, or the recorded validation NME would not be
    the shipped pipeline's."""
    from fkd_core.geometry import CropTransform
    from fkd_core.metrics import nme_per_face
    from fkd_core.train import evaluate_arrays, predict_canonical

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, size=(6, 144, 144), dtype=np.uint8)
    kp = np.stack([_shape() - _shape().mean(axis=0) + 72 + rng.normal(0, 2, size=(68, 2)) for _ in range(6)])
    first, second = NaimishNet().eval(), NaimishNet().eval()
    policy = AlignPolicy(passes=passes)
    p1 = predict_canonical(first, crops, 1 / 1.5)
    _, nme = evaluate_arrays(second, crops, kp, 1 / 1.5, align=policy, first=p1)
    pred = Predictor(first, CropPolicy(), backend="torch", refine=second, align=policy)
    identity = [CropTransform(1.0, 0.0, 0.0)] * len(crops)
    got = pred.refine_keypoints(crops, identity, p1.astype(np.float32))
    assert nme_per_face(got, kp).mean() == pytest.approx(nme, rel=1e-4)
    with pytest.raises(ValueError, match="passes >= 1"):
        AlignPolicy(passes=0)


def test_frame_change_adds_shift_scale_and_turn():
    a = Alignment(10.0, 20.0, 5.0, 0.1)
    assert frame_change(a, a) == 0.0
    b = Alignment(13.0, 24.0, 10.0, 0.1 - 0.2)  # shifted 5 px (half of b's radius), radius doubled, turned 0.2 rad
    assert frame_change(a, b) == pytest.approx(0.5 + math.log(2) + 0.2)
    wrapped = Alignment(10.0, 20.0, 5.0, 0.1 + 2 * math.pi - 0.3)  # a turn of 0.3 rad the long way round
    assert frame_change(a, wrapped) == pytest.approx(0.3)


def test_a_face_whose_frame_barely_moved_skips_the_next_pass():
    """The stand-in stage answers the face it is shown shifted right by a tenth of the crop's brightness: bright
    faces move far in the first pass (so go again), dark ones barely (so keep the first pass's keypoints)."""
    size, side = 96, 3.8
    shape = _shape() - _shape().mean(axis=0) + 72
    centred = affine_points(aligned_matrix(alignment_of(shape), side, size), shape)  # the face as a pass sees it
    levels = np.array([10, 200, 30, 250], np.uint8)
    contexts = np.stack([np.full((144, 144), v, np.uint8) for v in levels])
    shown: list[int] = []

    def predict(crops: np.ndarray) -> np.ndarray:
        shown.append(len(crops))
        return np.stack([centred + [c[size // 2, size // 2] / 10.0, 0.0] for c in crops])

    first = np.stack([shape] * len(levels))
    always, _ = refine_passes(predict, contexts, first, AlignPolicy(passes=2), size)
    assert shown == [4, 4]
    trace, ran = [], []
    got, _ = refine_passes(predict, contexts, first, AlignPolicy(passes=2, repeat_above=0.5), size, trace, ran)
    assert shown[2:] == [4, 2] and [list(r) for r in ran] == [[0, 1, 2, 3], [1, 3]]
    assert len(trace) == 2 and np.array_equal(trace[1], got)
    np.testing.assert_array_equal(got[[0, 2]], trace[0][[0, 2]])  # the dark faces kept their first pass
    np.testing.assert_allclose(got[[1, 3]], always[[1, 3]])  # the bright ones went again, as with every face
    assert not np.allclose(got[[1, 3]], trace[0][[1, 3]])


def test_faces_that_skip_a_pass_keep_that_pass_s_features():
    """The trust heads read each face's refining features from the last pass it took."""
    torch.manual_seed(0)
    first, second = NaimishNet().eval(), NaimishNet().eval()
    rng = np.random.default_rng(1)
    n = 6
    contexts = rng.integers(0, 255, size=(n, 144, 144), dtype=np.uint8)
    kp = np.stack([_shape() - _shape().mean(axis=0) + 72 + rng.normal(0, 3, size=(68, 2)) for _ in range(n)])
    identity = [CropTransform(1.0, 0.0, 0.0)] * n

    def run(policy: AlignPolicy):
        pred = Predictor(first, CropPolicy(), backend="torch", refine=second, align=policy)
        return pred._refine(contexts, identity, kp.astype(np.float32))

    once, f_once = run(AlignPolicy(passes=1))
    twice, f_twice = run(AlignPolicy(passes=2))
    moved = np.array([frame_change(alignment_of(a), alignment_of(b)) for a, b in zip(kp, once[0], strict=True)])
    threshold = float(np.median(moved))
    again = moved > threshold
    assert 0 < again.sum() < n
    some, f_some = run(AlignPolicy(passes=2, repeat_above=threshold))
    np.testing.assert_array_equal(some[-1][~again], once[-1][~again])
    np.testing.assert_array_equal(f_some[~again], f_once[~again])
    np.testing.assert_allclose(some[-1][again], twice[-1][again], atol=1e-4)
    np.testing.assert_allclose(f_some[again], f_twice[again], atol=1e-4)
    assert not np.allclose(f_once[again], f_twice[again], atol=1e-3)
