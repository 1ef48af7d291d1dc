import numpy as np
import pytest

from luab_sk.metrics import byproduct_error, group_accuracies, pointing_game, worst_group_accuracy


def test_group_accuracies_and_worst_group():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 0, 1, 1, 1, 0, 0, 0])
    groups = np.array([0, 0, 0, 3, 3, 2, 2, 1])
    assert group_accuracies(y, pred, groups) == {0: 2 / 3, 1: 1.0, 2: 0.0, 3: 1.0}
    assert worst_group_accuracy(y, pred, groups) == 0.0
    # average accuracy hides what the worst group shows
    assert np.mean(y == pred) == 0.625


def test_group_accuracies_with_string_labels():
    acc = group_accuracies(["cat", "dog"], ["cat", "cat"], ["land", "water"])
    assert acc == {"land": 1.0, "water": 0.0}


@pytest.mark.parametrize(
    "args, match",
    [
        (([0, 1], [0], [0, 1]), "inconsistent numbers of samples: y_true has 2, y_pred has 1, groups has 2"),
        (([0, 1], [0, 1], [0]), "groups has 1"),
        (([[0, 1]], [[0, 1]], [[0, 1]]), "1-d"),
        (([], [], []), "empty"),
        # NaN groups used to form a group of their own with accuracy NaN, which min() may or may not pick.
        (([0, 1, 1], [0, 1, 0], [0.0, np.nan, 1.0]), r"groups holds 1 missing value.*index 1"),
        (([0, 1, 1], [0, 1, 0], np.array(["a", None, "b"], dtype=object)), "groups holds 1 missing"),
        (([0.0, np.nan], [0.0, 1.0], [0, 1]), "y_true holds 1 missing"),
        (([0, 1], np.array([0, np.nan], dtype=object), [0, 1]), "y_pred holds 1 missing"),
    ],
)
def test_group_accuracy_input_errors(args, match):
    with pytest.raises(ValueError, match=match):
        worst_group_accuracy(*args)


def test_pointing_game_flat_and_grid_shapes_agree():
    rng = np.random.default_rng(0)
    att = rng.random((50, 3, 4))
    boxes = np.sort(rng.random((50, 2, 2)), axis=1).reshape(50, 4)[:, [0, 2, 1, 3]]
    boxes = np.c_[
        np.minimum(boxes[:, 0], boxes[:, 1]),
        np.minimum(boxes[:, 2], boxes[:, 3]),
        np.maximum(boxes[:, 0], boxes[:, 1]),
        np.maximum(boxes[:, 2], boxes[:, 3]),
    ]
    score3, hits3 = pointing_game(att, boxes, return_hits=True)
    score2, hits2 = pointing_game(att.reshape(50, 12), boxes, grid=(3, 4), return_hits=True)
    assert score3 == score2 and np.array_equal(hits3, hits2)
    # a brute-force check of the argmax cell centre
    for i in range(50):
        r, c = np.unravel_index(att[i].argmax(), (3, 4))
        x, y = (c + 0.5) / 4, (r + 0.5) / 3
        expected = boxes[i, 0] <= x <= boxes[i, 2] and boxes[i, 1] <= y <= boxes[i, 3]
        assert hits3[i] == expected


def test_pointing_game_tolerance_and_full_box():
    att = np.zeros((1, 7, 7))
    att[0, 3, 3] = 1.0  # centre (0.5, 0.5)
    assert pointing_game(att, [[0.0, 0.0, 1.0, 1.0]]) == 1.0
    assert pointing_game(att, [[0.55, 0.55, 0.9, 0.9]]) == 0.0
    assert pointing_game(att, [[0.55, 0.55, 0.9, 0.9]], tolerance=0.06) == 1.0


@pytest.mark.parametrize(
    "att, boxes, kwargs, match",
    [
        (np.ones((2, 12)), np.zeros((2, 4)), {}, "pass grid"),
        (np.ones((2, 12)), np.zeros((2, 4)), {"grid": (3, 3)}, "grid"),
        (np.ones((2, 3, 4)), np.zeros((2, 4)), {"grid": (4, 3)}, "disagrees"),
        (np.ones((2, 4)), np.zeros((2, 3)), {}, "boxes"),
        (np.ones((2, 4)), np.zeros((3, 4)), {}, "inconsistent"),
        (np.full((2, 4), np.nan), np.zeros((2, 4)), {}, "NaN"),
        (np.ones(4), np.zeros((1, 4)), {}, "attention must be"),
        (np.ones((2, 4)), np.zeros((2, 4)), {"tolerance": -0.1}, "tolerance"),
        (np.ones((2, 4)), np.zeros((2, 4)), {"tolerance": np.nan}, "tolerance"),
        (np.ones((2, 4)), np.zeros((2, 4)), {"tolerance": "0.1"}, "tolerance"),
        (np.ones((2, 4)), np.zeros((3, 4)), {}, "attention has 2, boxes has 3"),
    ],
)
def test_pointing_game_errors(att, boxes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pointing_game(att, boxes, **kwargs)


def test_byproduct_error_ignores_missing_entries():
    Z = np.array([[0.0, 0.0, 0.5, 0.5], [np.nan, np.nan, 1.0, 1.0], [0.2, np.nan, 0.0, 0.0]])
    pred = np.array([[0.3, 0.4, 0.5, 0.5], [9.0, 9.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # points observed: (row 0, pt 0) d=0.5, (0, 1) d=0, (1, 1) d=1, (2, 1) d=0; (2, 0) is half missing
    assert byproduct_error(Z, pred) == pytest.approx(1.5 / 4)
    observed = ~np.isnan(Z)
    err = (Z - pred)[observed]
    assert byproduct_error(Z, pred, metric="mae") == pytest.approx(np.abs(err).mean())
    assert byproduct_error(Z, pred, metric="rmse") == pytest.approx(np.sqrt((err**2).mean()))
    assert byproduct_error([0.0, 1.0], [1.0, 1.0], metric="mae") == 0.5  # 1-d targets are one column


@pytest.mark.parametrize(
    "Z, pred, kwargs, match",
    [
        (np.zeros((2, 2)), np.zeros((2, 3)), {}, "same shape"),
        (np.full((2, 2), np.nan), np.zeros((2, 2)), {}, "no observed"),
        (np.zeros((2, 2)), np.full((2, 2), np.nan), {}, "finite"),
        (np.zeros((2, 3)), np.zeros((2, 3)), {}, "3 columns"),
        (np.array([[0.0, np.nan]]), np.zeros((1, 2)), {}, "fully observed"),
        (np.zeros((2, 2)), np.zeros((2, 2)), {"metric": "mse"}, "metric"),
        (np.zeros((2, 3)), np.zeros((2, 3)), {"metric": "mse"}, "metric must be"),  # checked first
        (np.array([[0.0, np.inf]]), np.zeros((1, 2)), {}, "Z_true holds infinite"),
        (np.array([[0.0, 0.5]]), np.array([[0.0, np.inf]]), {"metric": "mae"}, "Z_pred must be finite"),
    ],
)
def test_byproduct_error_errors(Z, pred, kwargs, match):
    with pytest.raises(ValueError, match=match):
        byproduct_error(Z, pred, **kwargs)


# Each of these boxes was scored without complaint before (pixel boxes almost always as misses).
@pytest.mark.parametrize(
    "box, match",
    [
        (
            [34, 50, 200, 180],
            r"normalised \[0, 1\].*row 1 is \[34.0, 50.0, 200.0, 180.0\].*divide x0, x1 by the image width",
        ),
        ([np.nan] * 4, r"finite; row 1.*no missing-box value"),
        ([0.2, np.inf, 0.4, 0.5], "finite"),
        ([0.6, 0.2, 0.4, 0.5], r"x0 <= x1 and y0 <= y1; row 1 is \[0.6, 0.2, 0.4, 0.5\]"),
        ([0.2, 0.6, 0.4, 0.5], "x0 <= x1 and y0 <= y1"),
        ([-0.1, 0.2, 0.4, 0.5], r"normalised \[0, 1\]"),
    ],
)
def test_pointing_game_rejects_bad_boxes(box, match):
    att = np.zeros((2, 2, 2))
    att[:, 1, 1] = 1.0
    with pytest.raises(ValueError, match=match):
        pointing_game(att, [[0.0, 0.0, 1.0, 1.0], box])


def test_pointing_game_accepts_degenerate_and_edge_boxes():
    att = np.zeros((2, 2, 2))
    att[:, 1, 1] = 1.0  # centre (0.75, 0.75)
    assert pointing_game(att, [[0.0, 0.0, 1.0, 1.0], [0.75, 0.75, 0.75, 0.75]]) == 1.0
    assert pointing_game(att, [[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]]) == 0.0


def test_worst_group_accuracy_accepts_string_and_object_groups():
    groups = np.array(["a", "b", "b"], dtype=object)
    assert worst_group_accuracy([0, 1, 1], [0, 1, 0], groups) == 0.5


def test_attention_grid_uses_the_shared_grid_inference_with_its_own_messages():
    from luab_sk._grid import infer_grid
    from luab_sk.metrics import attention_grid

    maps = np.arange(24.0).reshape(2, 12)
    assert attention_grid(maps, grid=(3, 4)).shape == (2, *infer_grid(12, (3, 4)))
    assert attention_grid(np.ones((2, 1, 16))).shape == (2, *infer_grid(16))
    with pytest.raises(ValueError, match=r"maps has 12 cells per map, not a square grid: pass grid=\(H, W\)"):
        attention_grid(maps, name="maps")
    for grid in [(3, 3), (12,), (2, "x")]:
        with pytest.raises(ValueError, match=r"grid=.* does not fit attention: its maps have 12 cells"):
            attention_grid(maps, grid=grid)
