import numpy as np
import pytest

from fkd_core.geometry import (
    CropPolicy,
    Square,
    crop_square,
    crop_transform,
    denormalise,
    enlarge,
    flip_horizontal,
    normalise,
    square_from_box,
)
from fkd_core.types import FLIP_PERMUTATION, Box


@pytest.mark.parametrize("square", [Square(10.3, -5.7, 80.2), Square(-40, -40, 300), Square(100, 50, 25)])
@pytest.mark.parametrize("size", [96, 144, 224])
def test_crop_transform_round_trip_below_0_01_px(square, size):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-50, 500, size=(68, 2))
    t = crop_transform(square, size)
    back = t.to_image(t.to_crop(pts))
    assert np.abs(back - pts).max() < 0.01


@pytest.mark.parametrize(
    "square,size", [(Square(120.3, 80.7, 60.0), 96), (Square(50, 20, 250), 96), (Square(-30, -40, 200), 144)]
)
def test_crop_pixels_agree_with_the_keypoint_transform(square, size):
    # A bright 9x9 blob: its intensity centroid in the crop must be where the transform puts its centre.
    img = np.zeros((300, 400), np.uint8)
    img[96:105, 146:155] = 255
    crop, t = crop_square(img, square, size)
    expected = t.to_crop(np.array([150.0, 100.0]))
    ys, xs = np.nonzero(crop)
    w = crop[ys, xs].astype(float)
    centroid = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    assert np.abs(centroid - expected).max() < 0.35


def test_crop_pads_outside_the_image_with_zeros():
    img = np.full((50, 50), 200, np.uint8)
    crop, _ = crop_square(img, Square(-50, -50, 100), 100)
    assert crop[:40, :40].max() == 0
    assert crop[60:, 60:].min() == 200


def test_crop_square_entirely_outside_is_black():
    crop, _ = crop_square(np.full((20, 20), 9, np.uint8), Square(100, 100, 10), 16)
    assert crop.shape == (16, 16) and crop.max() == 0


def test_square_from_box_follows_policy():
    sq = square_from_box(Box(100, 100, 50, 40), CropPolicy(scale=2.0, shift_y=0.25))
    assert sq.side == 100
    assert sq.x0 + sq.side / 2 == pytest.approx(125)
    assert sq.y0 + sq.side / 2 == pytest.approx(120 + 10)
    big = enlarge(sq, 1.5)
    assert big.side == 150 and big.x0 + 75 == pytest.approx(125)


def test_flip_permutation_is_an_involution_that_swaps_sides():
    p = FLIP_PERMUTATION
    assert sorted(p) == list(range(68))
    assert np.array_equal(p[p], np.arange(68))
    assert p[36] == 45 and p[0] == 16 and p[48] == 54 and p[30] == 30 and p[8] == 8


def test_flip_moves_pixels_and_points_together():
    img = np.zeros((20, 30), np.uint8)
    kp = np.tile([[3.0, 4.0]], (68, 1))
    kp[45] = [20.0, 7.0]
    img[7, 20] = 255
    flipped, fkp = flip_horizontal(img, kp)
    # point 45 (right eye corner) becomes point 36 after the mirror, at the mirrored pixel
    assert tuple(fkp[36]) == (9.0, 7.0)
    assert flipped[7, 9] == 255
    assert np.allclose(flip_horizontal(flipped, fkp)[1], kp)


def test_normalise_round_trip_and_range():
    xy = np.array([[-0.5, 95.5], [47.5, 0.0]])
    n = normalise(xy, 96)
    assert n[0, 0] == pytest.approx(-1.0) and n[0, 1] == pytest.approx(1.0) and n[1, 0] == pytest.approx(0.0)
    assert np.allclose(denormalise(n, 96), xy)


def test_crop_transform_follows_the_pixel_centre_convention_absolutely():
    """Image pixel i has its centre at i and covers [i - 0.5, i + 0.5); the square's edges are the crop's. So the
    centre of the square's first image pixel is the crop's first pixel centre when the scale is 1, and the square's
    edges land on the crop's edges (-0.5 and size - 0.5) at any scale. (A round trip cannot see a wrong offset.)"""
    t = crop_transform(Square(10.0, 20.0, 100.0), 50)
    edges = t.to_crop(np.array([[9.5, 19.5], [109.5, 119.5], [59.5, 69.5]]))
    np.testing.assert_allclose(edges, [[-0.5, -0.5], [49.5, 49.5], [24.5, 24.5]], atol=1e-12)
    one = crop_transform(Square(10.0, 20.0, 50.0), 50)
    np.testing.assert_allclose(one.to_crop(np.array([[10.0, 20.0], [59.0, 69.0]])), [[0, 0], [49, 49]], atol=1e-12)


@pytest.mark.parametrize("side", [400.0, 613.0])  # shrink 4.2 and 6.4: the INTER_AREA pre-shrink path
def test_a_pre_shrunk_crop_puts_a_smooth_blob_where_the_transform_says_within_a_twentieth_of_a_pixel(side):
    yy, xx = np.mgrid[0:800, 0:900]
    centre = np.array([437.3, 401.6])
    img = (250 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 30.0**2))).astype(np.uint8)
    square = Square(centre[0] - side / 2 + 13.1, centre[1] - side / 2 - 7.7, side)
    crop, t = crop_square(img, square, 96)
    ys, xs = np.mgrid[0:96, 0:96]
    w = crop.astype(float)
    centroid = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    assert np.abs(centroid - t.to_crop(centre)).max() < 0.05
