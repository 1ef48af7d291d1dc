"""Property tests for luab_sk.byproducts.geometry."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from luab_sk.byproducts.geometry import (
    center_crop_box,
    crop_points,
    heatmap_to_points,
    hflip_points,
    normalized_to_pixel,
    pixel_to_normalized,
    points_to_heatmap,
    sample_resized_crop_box,
    uncrop_points,
)

unit = st.floats(0.0, 1.0, allow_nan=False)
unit_or_nan = st.one_of(unit, st.just(float("nan")))
sizes = st.tuples(st.integers(1, 2000), st.integers(1, 2000))


def point_arrays(elements=unit_or_nan):
    """(n, 2K) arrays of interleaved points, n in 1..5 and K in 1..4."""
    return st.tuples(st.integers(1, 5), st.integers(1, 4)).flatmap(
        lambda nk: arrays(np.float64, (nk[0], 2 * nk[1]), elements=elements)
    )


@st.composite
def image_and_box(draw):
    w, h = draw(sizes)
    left = draw(st.integers(0, w - 1))
    top = draw(st.integers(0, h - 1))
    return (w, h), (left, top, draw(st.integers(1, w - left)), draw(st.integers(1, h - top)))


@given(point_arrays())
def test_flip_twice_is_identity(points):
    np.testing.assert_allclose(hflip_points(hflip_points(points)), points, atol=1e-12)


@given(point_arrays())
def test_flip_moves_x_only(points):
    flipped = hflip_points(points)
    np.testing.assert_array_equal(flipped[:, 1::2], points[:, 1::2])
    np.testing.assert_allclose(flipped[:, 0::2], 1 - points[:, 0::2])


@given(point_arrays(), sizes)
def test_identity_crop_is_identity(points, size):
    out = crop_points(points, (0, 0, *size), size)
    np.testing.assert_allclose(out, points, atol=1e-12)


@given(point_arrays(unit), image_and_box())
def test_crop_maps_inside_into_unit_square_and_outside_to_nan(points, image_box):
    size, box = image_box
    out = crop_points(points, box, size)
    px = points[:, 0::2] * size[0]
    py = points[:, 1::2] * size[1]
    inside = (px >= box[0]) & (px <= box[0] + box[2]) & (py >= box[1]) & (py <= box[1] + box[3])
    ox, oy = out[:, 0::2], out[:, 1::2]
    # Points clearly inside or outside (rounding may move a point lying on an edge).
    eps = 1e-9 * max(size)
    clear_in = (px >= box[0] + eps) & (px <= box[0] + box[2] - eps) & (py >= box[1] + eps)
    clear_in &= py <= box[1] + box[3] - eps
    assert np.all((ox[clear_in] >= 0) & (ox[clear_in] <= 1) & (oy[clear_in] >= 0) & (oy[clear_in] <= 1))
    assert np.isnan(ox[~inside]).all() and np.isnan(oy[~inside]).all()
    # Both coordinates of a pair are masked together.
    np.testing.assert_array_equal(np.isnan(ox), np.isnan(oy))
    # Crop then uncrop returns the points that survived.
    back = uncrop_points(out, box, size)
    kept = ~np.isnan(out)
    np.testing.assert_allclose(back[kept], points[kept], atol=1e-9)


@given(point_arrays(), sizes)
def test_pixel_round_trip(points, size):
    back = pixel_to_normalized(normalized_to_pixel(points, size), size)
    np.testing.assert_allclose(back, points, atol=1e-12)


@settings(max_examples=30)
@given(st.lists(image_and_box(), min_size=1, max_size=6), st.integers(1, 3), st.integers(0, 2**16))
def test_batched_boxes_match_row_by_row(image_boxes, k, seed):
    sizes_, boxes = (np.array(v, dtype=float) for v in zip(*image_boxes))
    points = np.random.default_rng(seed).uniform(0, 1, size=(len(boxes), 2 * k))
    batched = crop_points(points, boxes, sizes_)
    rows = np.array([crop_points(p, b, s) for p, b, s in zip(points, boxes, sizes_)])
    np.testing.assert_allclose(batched, rows, equal_nan=True)
    mask = ~np.isnan(batched)
    np.testing.assert_allclose(uncrop_points(batched, boxes, sizes_)[mask], points[mask], atol=1e-9)


def test_one_point_set_through_many_views():
    point = np.array([0.5, 0.5, 0.05, 0.05])  # two classes
    views = np.array([[0, 0, 100, 100], [40, 40, 20, 20], [0, 0, 10, 10]])
    out = crop_points(point, views, (100, 100))
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out[0], point)
    np.testing.assert_allclose(out[1], [0.5, 0.5, np.nan, np.nan])
    np.testing.assert_allclose(out[2], [np.nan, np.nan, 0.5, 0.5])
    tensor_out = crop_points(torch.tensor(point, dtype=torch.float64), views, (100, 100))
    np.testing.assert_allclose(tensor_out.numpy(), out, equal_nan=True)
    np.testing.assert_allclose(normalized_to_pixel(point[:2], [[10, 20], [30, 40]]), [[5, 10], [15, 20]])


def test_missing_stays_missing():
    points = np.array([[np.nan, np.nan, 0.5, 0.5]])
    for out in (hflip_points(points), crop_points(points, (0, 0, 10, 10), (10, 10))):
        assert np.isnan(out[0, :2]).all() and not np.isnan(out[0, 2:]).any()


def test_points_follow_the_pixels():
    """A lit pixel cut out with the sampled box (and flipped) lands where the mapped point says."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        w, h = (int(v) for v in rng.integers(20, 200, size=2))
        col, row = int(rng.integers(0, w)), int(rng.integers(0, h))
        image = torch.zeros(1, h, w)
        image[0, row, col] = 1.0
        point = np.array([[(col + 0.5) / w, (row + 0.5) / h]])
        left, top, cw, ch = sample_resized_crop_box((w, h), scale=(0.3, 1.0), random_state=rng)
        crop = TF.hflip(TF.crop(image, top, left, ch, cw))
        mapped = hflip_points(crop_points(point, (left, top, cw, ch), (w, h)))
        lit = torch.nonzero(crop[0])
        if len(lit) == 0:
            assert np.isnan(mapped).all()
        else:
            r, c = lit[0].tolist()
            np.testing.assert_allclose(mapped[0], [(c + 0.5) / cw, (r + 0.5) / ch], atol=1e-9)


def test_torch_tensors_match_numpy_and_keep_dtype():
    points = np.array([[0.1, 0.2, np.nan, np.nan], [0.7, 0.9, 0.3, 0.4]])
    tensor = torch.tensor(points, dtype=torch.float32)
    box, size = (10, 20, 50, 60), (100, 100)
    for fn, args in [
        (hflip_points, ()),
        (crop_points, (box, size)),
        (uncrop_points, (box, size)),
        (pixel_to_normalized, (size,)),
        (normalized_to_pixel, (size,)),
    ]:
        out = fn(tensor, *args)
        assert torch.is_tensor(out) and out.dtype == torch.float32 and out.shape == tensor.shape
        np.testing.assert_allclose(out.numpy(), fn(points, *args), atol=1e-5, equal_nan=True)
    assert crop_points(torch.tensor([[1, 1]]), (0, 0, 2, 2), (2, 2)).is_floating_point()
    assert tensor[1, 0] == pytest.approx(0.7)  # inputs are not modified in place


def test_float32_numpy_keeps_dtype():
    assert hflip_points(np.zeros((3, 2), dtype=np.float32)).dtype == np.float32


@settings(max_examples=50)
@given(sizes, st.integers(0, 2**32 - 1))
def test_sampled_box_lies_inside_the_image(size, seed):
    left, top, cw, ch = sample_resized_crop_box(size, random_state=seed)
    assert all(isinstance(v, int) for v in (left, top, cw, ch))
    assert 0 <= left and left + cw <= size[0] and 0 <= top and top + ch <= size[1] and cw > 0 and ch > 0


def test_sampled_boxes_follow_scale_and_ratio():
    rng = np.random.default_rng(1)
    boxes = np.array([sample_resized_crop_box((640, 480), (0.2, 0.6), (0.5, 2.0), rng) for _ in range(500)])
    area = boxes[:, 2] * boxes[:, 3] / (640 * 480)
    aspect = boxes[:, 2] / boxes[:, 3]
    assert area.min() > 0.19 and area.max() < 0.61
    assert aspect.min() > 0.48 and aspect.max() < 2.1
    # log-uniform aspect: as many wide crops as tall ones
    assert 0.4 < np.mean(aspect > 1) < 0.6
    # the same seed gives the same box
    same_seed = [sample_resized_crop_box((64, 48), random_state=3) for _ in range(2)]
    assert same_seed[0] == same_seed[1]
    legacy = np.random.RandomState(0)
    assert len(sample_resized_crop_box((64, 48), random_state=legacy)) == 4


@pytest.mark.parametrize("size", [(1000, 10), (10, 1000)])
def test_sampler_falls_back_to_centre_crop_like_torchvision(size):
    # A strip cannot hold a crop of 90% of its area with aspect ratio in [3/4, 4/3].
    image = torch.zeros(1, size[1], size[0])
    top, left, height, width = RandomResizedCrop.get_params(image, (0.9, 1.0), (3 / 4, 4 / 3))
    assert sample_resized_crop_box(size, scale=(0.9, 1.0), random_state=0) == (left, top, width, height)


def test_center_crop_box_matches_resize_then_center_crop():
    size = (300, 200)
    box = center_crop_box(size, crop_fraction=0.875)
    assert box == pytest.approx((62.5, 12.5, 175.0, 175.0))
    # The centre of the image stays the centre; a corner point falls outside.
    out = crop_points(np.array([[0.5, 0.5], [0.0, 0.0]]), box, size)
    np.testing.assert_allclose(out[0], [0.5, 0.5])
    assert np.isnan(out[1]).all()


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(2, 12), st.integers(2, 12))
def test_heatmap_peaks_at_the_point_and_sums_to_one(x, y, gh, gw):
    hm = points_to_heatmap(np.array([[x, y]]), (gh, gw), sigma=0.05)
    assert hm.shape == (1, gh * gw)
    assert hm.sum() == pytest.approx(1.0)
    cx, cy = heatmap_to_points(hm, (gh, gw))[0]
    assert abs(cx - x) <= 0.5 / gw + 1e-9 and abs(cy - y) <= 0.5 / gh + 1e-9


def test_heatmap_missing_rows_batches_and_torch():
    points = np.array([[[0.2, 0.3]], [[np.nan, np.nan]]])  # (n, K=1, 2), as per-class points reshaped
    hm = points_to_heatmap(points, (4, 5))
    assert hm.shape == (2, 1, 20)
    assert np.isnan(hm[1]).all() and hm[0].sum() == pytest.approx(1.0)
    hm_t = points_to_heatmap(torch.tensor(points, dtype=torch.float32), (4, 5))
    np.testing.assert_allclose(hm_t.numpy(), hm, atol=1e-6, equal_nan=True)
    back = heatmap_to_points(hm_t, (4, 5), method="mean")
    assert torch.isnan(back[1]).all() and back.shape == (2, 1, 2)
    # The soft-argmax of a Gaussian well inside the grid recovers the point.
    centred = points_to_heatmap(np.array([[0.45, 0.55]]), (32, 32), sigma=0.05)
    soft = heatmap_to_points(centred, (32, 32), method="mean")
    np.testing.assert_allclose(soft[0], [0.45, 0.55], atol=1e-3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hflip_points(np.zeros((2, 3))), "points must have a last axis"),
        (lambda: crop_points(np.zeros((1, 2)), (0, 0, 1, 1), (0, 5)), "image_size must be"),
        (lambda: crop_points(np.zeros((1, 2)), (0, 0, 1, 1), "ab"), "image_size must be"),
        (lambda: crop_points(np.zeros((1, 2)), (0, 0, 0, 1), (5, 5)), "box must have"),
        (lambda: crop_points(np.zeros((1, 2)), (0, 0, 1), (5, 5)), "box must be"),
        (lambda: sample_resized_crop_box((5, 5), scale=(0.5, 0.1)), "scale must be"),
        (lambda: sample_resized_crop_box([[5, 5], [6, 6]]), "image_size must be"),
        (lambda: crop_points(np.zeros((1, 2)), [(0, 0, 1, 1), (0, 0, -1, 1)], (5, 5)), "box must have"),
        (lambda: crop_points(np.zeros((1, 2)), "abcd", (5, 5)), "box must be"),
        (lambda: sample_resized_crop_box((5, 5), ratio=(0, 1)), "ratio must be"),
        (lambda: sample_resized_crop_box((5, 5), random_state="x"), "random_state must be"),
        (lambda: center_crop_box((5, 5), crop_fraction=1.5), "crop_fraction must"),
        (lambda: points_to_heatmap(np.zeros((1, 4)), (3, 3)), "Reshape per-class"),
        (lambda: points_to_heatmap(np.zeros((1, 2)), (0, 3)), "grid_shape must be"),
        (lambda: points_to_heatmap(np.zeros((1, 2)), (3, 3), sigma=0), "sigma must be"),
        (lambda: heatmap_to_points(np.zeros((1, 8)), (3, 3)), "heatmaps must have"),
        (lambda: heatmap_to_points(np.zeros((1, 9)), (3, 3), method="max"), "method must be"),
    ],
)
def test_bad_input_raises_precise_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
