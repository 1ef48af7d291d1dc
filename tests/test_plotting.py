import sys

import matplotlib
import numpy as np
import pytest

from luab_sk.plotting import plot_attention_overlays, plot_byproduct_weight_curve

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_attention_overlays_one_row_per_map_set():
    images = np.random.default_rng(0).integers(0, 255, (3, 28, 28, 3), dtype=np.uint8)
    maps = {
        "no Z": np.full((3, 49), 1 / 49),
        "Z": np.eye(49)[[0, 10, 48]],
        "per-map": np.ones((3, 1, 49)) / 49,
    }
    fig = plot_attention_overlays(
        images,
        maps,
        boxes=np.tile([0.1, 0.1, 0.5, 0.5], (3, 1)),
        points=[[0.3, 0.3], [np.nan, np.nan], [0.9, 0.9]],
        titles=["a", "b", "c"],
    )
    assert len(fig.axes) == 9
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["no Z", "Z", "per-map"]
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    first = fig.axes[0]
    assert len(first.images) == 2 and len(first.patches) == 1 and len(first.lines) == 1
    assert len(fig.axes[1].lines) == 0  # missing click: no marker
    # the overlay spans the whole image, whatever the grid
    assert fig.axes[0].images[1].get_extent() == [0, 28, 28, 0]


def test_attention_overlays_non_square_grid_and_grey_images():
    fig = plot_attention_overlays(np.zeros((2, 30, 40)), np.ones((2, 12)) / 12, grid=(3, 4))
    assert len(fig.axes) == 2
    assert fig.axes[0].images[1].get_array().shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attention": np.ones((2, 12))}, "pass grid"),
        ({"attention": np.ones((2, 12)), "grid": (3, 3)}, "grid"),
        ({"attention": np.ones((3, 16))}, "3 maps"),
        ({"boxes": np.zeros((2, 3))}, "boxes"),
        ({"points": np.zeros((2, 3))}, "points"),
        ({"titles": ["only one"]}, "titles"),
        ({"images": np.zeros((2, 4))}, "images"),
        ({"attention": {"bad": np.ones((2, 12))}}, "attention\\['bad'\\]"),
    ],
)
def test_attention_overlays_errors(kwargs, match):
    params = {"images": np.zeros((2, 8, 8, 3)), "attention": np.ones((2, 16)) / 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_attention_overlays(**params)


def test_weight_curve_from_cv_results_and_search():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    results = {
        "param_luabclassifier__byproduct_weight": [10.0, 0.0, 1.0, 0.1],
        "mean_test_accuracy": [0.7, 0.6, 0.8, 0.65],
        "std_test_accuracy": [0.01, 0.02, 0.01, 0.02],
        "mean_test_worst": [0.5, 0.3, 0.6, 0.4],
    }
    ax = plot_byproduct_weight_curve(results)
    assert ax.get_xscale() == "symlog" and ax.get_legend() is not None
    x, y = ax.lines[0].get_data()
    assert list(x) == [0.0, 0.1, 1.0, 10.0] and list(y) == [0.6, 0.65, 0.8, 0.7]  # sorted by weight
    ax = plot_byproduct_weight_curve(results, metrics=["worst"])
    assert len(ax.lines) == 1 and ax.get_legend() is None

    X = np.random.default_rng(0).normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    search = GridSearchCV(make_pipeline(LogisticRegression()), {"logisticregression__C": [0.1, 1.0]}, cv=2)
    ax = plot_byproduct_weight_curve(search.fit(X, y), param="C")
    assert ax.get_xlabel() == "C" and ax.get_xscale() == "linear"


@pytest.mark.parametrize(
    "search, kwargs, match",
    [
        ({"mean_test_score": [1.0]}, {}, "expected one"),
        ({"param_byproduct_weight": [0.0], "mean_test_score": [1.0]}, {"metrics": ["auc"]}, "available"),
        (object(), {}, "cv_results_"),
    ],
)
def test_weight_curve_errors(search, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_byproduct_weight_curve(search, **kwargs)


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"luab_sk\[plot\]"):
        plot_byproduct_weight_curve({"param_byproduct_weight": [0.0], "mean_test_score": [1.0]})
