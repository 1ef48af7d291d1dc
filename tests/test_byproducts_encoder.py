"""ByproductEncoder: Z arrays from records, with NaN for what is missing."""

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from luab_sk.byproducts import (
    ByproductEncoder,
    COCOABRecord,
    ImageNetABRecord,
    ImageNetABTask,
    crop_points,
    heatmap_to_points,
    icon_positions,
    read_coco_ab,
    read_imagenet_ab,
)
from luab_sk.datasets.imagenet_ab_like import make_coco_ab_like, make_imagenet_ab_like


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet_ab")
    truth = make_imagenet_ab_like(folder, n_classes=4, n_per_class=10, random_state=0)
    return read_imagenet_ab(folder), truth


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    path = tmp_path_factory.mktemp("coco_ab") / "coco_ab.json"
    truth = make_coco_ab_like(path, n_images=40, p_move=0.5, p_remove=0.5, random_state=0)
    return read_coco_ab(path), truth


def test_point_is_the_mean_selected_click_and_missing_is_nan(imagenet):
    records, truth = imagenet
    keys = list(truth.image_keys) + ["n00000000/n00000000_1"]
    z = ByproductEncoder().fit(records).transform(records.align(keys))
    assert z.shape == (len(keys), 2) and z.dtype == np.float64
    np.testing.assert_allclose(z[:-1], truth.points, equal_nan=True)
    assert np.isnan(z[-1]).all()
    # Images nobody selected have no point; clicks land near the true object point.
    assert np.isnan(truth.true_points).any(axis=1).sum() == np.isnan(z[:-1]).any(axis=1).sum()
    ok = ~np.isnan(z[:-1, 0])
    assert np.abs(z[:-1][ok] - truth.true_points[ok]).max() < 0.2


@pytest.mark.parametrize("position", ["add", "final"])
def test_points_per_class_match_the_generator(coco, position):
    records, truth = coco
    enc = ByproductEncoder("points_per_class", per_class_position=position, classes=truth.classes)
    z = enc.fit_transform(records)
    expected = truth.add_points if position == "add" else truth.final_points
    np.testing.assert_allclose(z, expected, atol=1e-9, equal_nan=True)
    first = truth.classes[0]
    assert list(enc.get_feature_names_out()[:2]) == [f"point_{first}_x", f"point_{first}_y"]


def test_final_positions_are_closer_to_the_objects(coco):
    records, truth = coco
    add = ByproductEncoder("points_per_class", classes=truth.classes).fit_transform(records)
    final = ByproductEncoder("points_per_class", per_class_position="final", classes=truth.classes)
    final = final.fit_transform(records)
    # Removed wrong icons are present in "add" but gone in "final".
    assert np.isnan(final).sum() > np.isnan(add).sum()
    both = ~np.isnan(add) & ~np.isnan(final) & ~np.isnan(truth.true_points)
    assert np.abs(final - truth.true_points)[both].mean() < np.abs(add - truth.true_points)[both].mean()


def test_per_class_kinds_need_classes_in_the_label_order(coco):
    records, truth = coco
    for kind in ("points_per_class", "heatmaps_per_class"):
        with pytest.raises(ValueError, match=r"needs classes=.*mlb.classes_.*the records name \['"):
            ByproductEncoder(kind).fit(records)
    enc = ByproductEncoder("points_per_class", classes=truth.classes[::-1]).fit(records)
    assert list(enc.classes_) == truth.classes[::-1]  # the order given, not sorted
    # Image-level kinds need no class list.
    assert ByproductEncoder(["heatmap", "timing"]).fit(records).classes_.size == 0


def test_icon_positions_replays_moves_and_removes():
    rec = COCOABRecord(
        1,
        action_types=("add", "add", "move", "remove", "add"),
        icon_types=("dog", "dog", "dog", "dog", "cat"),
        points_from=np.array([[np.nan, np.nan], [np.nan, np.nan], [0.9, 0.9], [0.1, 0.1], [np.nan, np.nan]]),
        points_to=np.array([[0.1, 0.1], [0.9, 0.9], [0.7, 0.7], [np.nan, np.nan], [0.5, 0.5]]),
        action_times=np.arange(5.0),
    )
    assert icon_positions(rec)["dog"].tolist() == [[0.1, 0.1], [0.9, 0.9]]
    final = icon_positions(rec, "final")
    assert final["dog"].tolist() == [[0.7, 0.7]] and final["cat"].tolist() == [[0.5, 0.5]]
    with pytest.raises(ValueError, match="position must be"):
        icon_positions(rec, "last")


def test_heatmap_rows_sum_to_one_and_peak_at_the_click(imagenet, coco):
    records, truth = imagenet
    enc = ByproductEncoder("heatmap", heatmap_shape=(8, 8), heatmap_sigma=0.05).fit(records)
    z = enc.transform(records.align(truth.image_keys))
    observed = ~np.isnan(truth.points[:, 0])
    np.testing.assert_allclose(z[observed].sum(axis=1), 1.0)
    assert np.isnan(z[~observed]).all()
    peaks = heatmap_to_points(z[observed], (8, 8))
    assert np.abs(peaks - truth.points[observed]).max() <= 1 / 16 + 1e-9
    coco_z = ByproductEncoder("heatmap", heatmap_shape=(4, 6)).fit_transform(coco[0])
    assert coco_z.shape == (len(coco[0]), 24)
    np.testing.assert_allclose(coco_z.sum(axis=1), 1.0)


def test_trace_is_resampled_and_ends_at_the_click(imagenet, coco):
    records, truth = imagenet
    z = ByproductEncoder("trace", trace_length=8).fit(records).transform(records.align(truth.image_keys))
    assert z.shape == (len(truth.image_keys), 16)
    for rec, row in zip(records.align(truth.image_keys), z):
        task = next((t for t in rec.tasks if t.selected and len(t.trace)), None)
        if task is None:
            assert np.isnan(row).all()
        else:
            np.testing.assert_allclose(row[-2:], task.point, atol=1e-9)
            assert np.all((row >= 0) & (row <= 1))
    assert not np.isnan(z).all(axis=1).all()
    coco_z = ByproductEncoder("trace", trace_length=5).fit_transform(coco[0])
    np.testing.assert_allclose(coco_z[0, -2:], coco[0][0].trace[-1, 1:])


def test_trace_without_usable_times_and_with_a_missing_end():
    trace = np.array([[5.0, 0.0, 0.0], [5.0, 1.0, 1.0]])  # no usable clock: spaced by sample index
    task = ImageNetABTask(selected=True, point=(1.0, 0.0), selected_time=np.nan, trace=trace)
    z = ByproductEncoder("trace", trace_length=5).fit_transform([ImageNetABRecord("n1/n1_1", "p", (task,))])
    # The click (1, 0) is appended as the last sample.
    np.testing.assert_allclose(z.reshape(5, 2), [[0, 0], [0.5, 0.5], [1, 1], [1, 0.5], [1, 0]])


def test_trace_samples_are_ordered_by_time():
    trace = np.array([[30.0, 1.0, 1.0], [10.0, 0.0, 0.0], [20.0, 0.5, 0.5]])
    rec = COCOABRecord(1, trace=trace)
    z = ByproductEncoder("trace", trace_length=3, classes=["dog"]).fit_transform([rec])
    np.testing.assert_allclose(z.reshape(3, 2), [[0, 0], [0.5, 0.5], [1, 1]])


def test_timing_raw_and_robust(imagenet):
    records, truth = imagenet
    tasks = (
        ImageNetABTask(
            selected=True,
            point=(0.5, 0.5),
            estimate_time=0.0,
            hovered_count=2.0,
            selected_count=1.0,
            hover_actions=("enter", "leave", "enter", "leave"),
            hover_times=np.array([0.0, 100.0, 200.0, 500.0]),
        ),
        ImageNetABTask(
            selected=True, point=(0.5, 0.5), estimate_time=800.0, hovered_count=0.0, selected_count=3.0
        ),
    )
    rec = ImageNetABRecord("n1/n1_1", "p", tasks)
    raw = ByproductEncoder("timing", timing_scale=None).fit_transform([rec, None])
    # estimateTime 0 counts as missing; hover time 400 ms in task 1 and 0 in task 2.
    np.testing.assert_allclose(raw[0], [800.0, 1.0, 200.0, 2.0])
    assert np.isnan(raw[1]).all()
    enc = ByproductEncoder("timing").fit(records)
    z = enc.transform(records)
    assert enc.timing_scaler_ is not None
    np.testing.assert_allclose(np.nanmedian(z, axis=0), 0.0, atol=1e-9)
    assert list(enc.get_feature_names_out()) == [
        "timing_estimate_time",
        "timing_hovered_count",
        "timing_hover_time",
        "timing_selected_count",
    ]


def test_coco_timing_counts_actions(coco):
    records, _ = coco
    raw = ByproductEncoder("timing", timing_scale=None).fit_transform(records)
    rec = records[0]
    assert raw[0, 0] == rec.time_spent and raw[0, 1] == rec.action_types.count("add")
    assert raw[:, 1:].sum() == sum(len(r.action_types) for r in records)


def test_concatenated_layout(imagenet):
    records, truth = imagenet
    enc = ByproductEncoder(["point", "heatmap", "trace", "timing"], heatmap_shape=(3, 4), trace_length=4)
    z = enc.fit(records).transform(records.align(truth.image_keys))
    names = enc.get_feature_names_out()
    assert z.shape[1] == enc.n_features_out_ == len(names) == 2 + 12 + 8 + 4
    assert enc.feature_slices_ == {
        "point": slice(0, 2),
        "heatmap": slice(2, 14),
        "trace": slice(14, 22),
        "timing": slice(22, 26),
    }
    assert names[2] == "heatmap_0_0" and names[14] == "trace_0_x" and names[-1] == "timing_selected_count"
    np.testing.assert_allclose(z[:, enc.feature_slices_["point"]], truth.points, equal_nan=True)
    # Point-like blocks are interleaved (x, y) pairs: they go through crop geometry directly.
    block = z[:, enc.feature_slices_["trace"]]
    assert crop_points(block, (0, 0, 10, 10), (10, 10)).shape == block.shape
    assert clone(enc).get_params() == enc.get_params()


@pytest.mark.parametrize(
    ("params", "data", "match"),
    [
        ({"kind": "clicks"}, "imagenet", "kind.* must be"),
        ({"kind": ["point", "point"]}, "imagenet", "kind must be"),
        ({"kind": []}, "imagenet", "kind must be"),
        ({"kind": "point"}, "coco", "use 'points_per_class'"),
        ({"kind": "points_per_class"}, "imagenet", "use 'point'"),
        ({"per_class_position": "last"}, "imagenet", "per_class_position"),
        ({"aggregate": "median"}, "coco", "aggregate"),
        ({"heatmap_shape": (0, 3)}, "imagenet", "heatmap_shape"),
        ({"heatmap_sigma": -1}, "imagenet", "heatmap_sigma"),
        ({"trace_length": 1}, "imagenet", "trace_length"),
        ({"timing_scale": "minmax"}, "imagenet", "timing_scale"),
        ({"kind": "points_per_class", "classes": ["a", "a"]}, "coco", "classes must be"),
    ],
)
def test_bad_parameters(imagenet, coco, params, data, match):
    records = imagenet[0] if data == "imagenet" else coco[0]
    with pytest.raises(ValueError, match=match):
        ByproductEncoder(**params).fit(records)


def test_bad_records(imagenet, coco):
    with pytest.raises(NotFittedError):
        ByproductEncoder().transform(imagenet[0])
    with pytest.raises(TypeError, match="X must be a ByproductRecords"):
        ByproductEncoder().fit(np.zeros((3, 2)))
    with pytest.raises(TypeError, match=r"X\[1\] is a dict"):
        ByproductEncoder().fit([imagenet[0][0], {}])
    with pytest.raises(ValueError, match="mixes"):
        ByproductEncoder().fit([imagenet[0][0], coco[0][0]])
    with pytest.raises(ValueError, match="holds no record"):
        ByproductEncoder().fit([None, None])
    enc = ByproductEncoder().fit(imagenet[0])
    with pytest.raises(ValueError, match="fitted on imagenet_ab"):
        enc.transform(coco[0])
    with pytest.raises(ValueError, match="needs classes"):
        ByproductEncoder("points_per_class").fit([COCOABRecord(1)])
    with pytest.raises(ValueError, match="y has 3 label columns but classes has 2"):
        ByproductEncoder("points_per_class", classes=["a", "b"]).fit([COCOABRecord(1)], np.zeros((1, 3)))
    assert np.isnan(enc.transform([None, None])).all()


def test_encoder_treats_impossible_coordinates_and_timings_as_missing():
    """Hand-built records with non-finite or off-image values give NaN, never inf or an off-image heatmap."""
    bad_points = [(np.inf, 0.5), (1.7, 0.2), (0.5, -0.1), (np.nan, 0.5), (-np.inf, np.nan)]
    tasks = [
        ImageNetABTask(selected=True, point=p, estimate_time=np.inf, hovered_count=-1.0) for p in bad_points
    ]
    recs = [ImageNetABRecord(f"n1/n1_{i}", "x.xml", (task,)) for i, task in enumerate(tasks)]
    mixed = ImageNetABRecord(
        "n1/n1_9",
        "x.xml",
        (
            ImageNetABTask(selected=True, point=(0.2, 0.4), estimate_time=900.0),
            ImageNetABTask(selected=True, point=(3.0, 0.4)),
            ImageNetABTask(
                selected=True,
                point=(0.6, 0.6),
                trace=np.array([[0, 0.1, 0.1], [1, np.inf, 0.2], [2, 5.0, 0.3], [3, 0.6, 0.6]]),
            ),
        ),
    )
    kinds = ["point", "heatmap", "trace", "timing"]
    enc = ByproductEncoder(kind=kinds, timing_scale=None).fit([*recs, mixed])
    Z = enc.transform([*recs, mixed])
    assert not np.isinf(Z).any()
    assert np.isnan(Z[:-1, enc.feature_slices_["point"]]).all()
    assert np.isnan(Z[:-1, enc.feature_slices_["heatmap"]]).all()
    assert np.isnan(Z[:-1, enc.feature_slices_["timing"]][:, :2]).all()
    np.testing.assert_allclose(Z[-1, enc.feature_slices_["point"]], [0.4, 0.5])  # the valid clicks only
    trace = Z[-1, enc.feature_slices_["trace"]].reshape(-1, 2)
    assert np.isfinite(trace).all() and ((trace >= 0) & (trace <= 1)).all()
    with warnings.catch_warnings():  # all-NaN columns: numpy warns, the scaler works
        warnings.simplefilter("ignore", RuntimeWarning)
        robust = ByproductEncoder(kind="timing").fit([*recs, mixed])  # no scaler error on infinities
        assert not np.isinf(robust.transform(recs)).any()


def test_encoder_ignores_off_image_icons():
    rec = COCOABRecord(
        1,
        time_spent=np.inf,
        action_types=("add", "add", "move", "add"),
        icon_types=("dog", "cat", "cat", "cup"),
        points_from=np.array([[np.nan, np.nan], [np.nan, np.nan], [0.3, 0.3], [np.nan, np.nan]]),
        points_to=np.array([[0.5, 0.5], [0.3, 0.3], [1.5, 0.3], [np.inf, 0.2]]),
        action_times=np.zeros(4),
        trace=np.array([[0, 0.1, 0.1], [1, np.nan, 2.0], [2, -3.0, 0.5]]),
    )
    for position in ("add", "final"):
        enc = ByproductEncoder(
            kind=["points_per_class", "heatmap", "trace", "timing"], classes=["cat", "cup", "dog"],
            per_class_position=position, timing_scale=None,
        ).fit([rec])  # fmt: skip
        Z = enc.transform([rec])
        assert not np.isinf(Z).any()
        np.testing.assert_allclose(Z[0, :6], [0.3, 0.3, np.nan, np.nan, 0.5, 0.5])  # cat kept, cup missing
        assert np.isnan(Z[0, enc.feature_slices_["timing"]][0])
        np.testing.assert_allclose(Z[0, enc.feature_slices_["trace"]], 0.1)  # only the on-image sample
