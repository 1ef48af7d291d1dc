"""Tests for LUABClassifier(head="attention") on patch tokens with click byproducts."""

import warnings

import numpy as np
import pytest
import sklearn

from luab_sk.estimators.classifier import LUABClassifier

SIDE = 7


def make_tokens(n, *, channels=16, spurious=True, seed=0, means_seed=0):
    """Tokens on a 7x7 grid: one object token carries the class; every background token carries a
    class cue when ``spurious`` (a random, uninformative one otherwise, to break the shortcut at test
    time). Z is the object's centre (the click)."""
    means = np.random.default_rng(means_seed).normal(size=(3, channels))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, SIDE * SIDE, channels)).astype(np.float32)
    pos = rng.integers(0, SIDE * SIDE, n)
    cue = np.roll(means, 1, axis=0)[y] if spurious else means[rng.integers(0, 3, n)]
    X += (0.5 * cue)[:, None, :].astype(np.float32)
    X[np.arange(n), pos] = rng.normal(size=(n, channels)) + 3.0 * means[y]  # the object has no cue
    row, col = np.divmod(pos, SIDE)
    Z = np.stack([(col + 0.5) / SIDE, (row + 0.5) / SIDE], axis=1).astype(np.float32)
    return X, y, Z, pos


def _fit(X, y, Z=None, **params):
    kwargs = {"head": "attention", "hidden_size": 16, "max_iter": 100, "random_state": 0} | params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        return LUABClassifier(**kwargs).fit(X, y, Z=Z)


@pytest.fixture(scope="module")
def spatial():
    train = make_tokens(400, seed=0)
    test = make_tokens(400, spurious=False, seed=1)
    return train, test


@pytest.fixture(scope="module")
def plain(spatial):
    (X, y, _, _), _ = spatial
    return _fit(X, y)


def _pointing(clf, X, pos):
    maps = clf.attention_maps(X)
    assert maps.shape == (len(X), SIDE, SIDE)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    return (maps.reshape(len(X), -1).argmax(1) == pos).mean()


@pytest.mark.parametrize(("target", "weight", "min_pointing"), [("heatmap", 1.0, 0.8), ("point", 10.0, 0.5)])
def test_clicks_teach_where_to_look(spatial, plain, target, weight, min_pointing):
    (X, y, Z, _), (X_test, y_test, Z_test, pos_test) = spatial
    luab = _fit(X, y, Z, byproduct_target=target, byproduct_weight=weight)
    assert _pointing(luab, X_test, pos_test) > max(min_pointing, _pointing(plain, X_test, pos_test) + 0.15)
    # With the background shortcut gone at test time, looking at the object pays off.
    assert luab.score(X_test, y_test) > plain.score(X_test, y_test) + 0.1
    points = luab.predict_byproducts(X_test)
    assert points.shape == (len(X_test), 2) and ((points >= 0) & (points <= 1)).all()
    assert np.abs(points - Z_test).mean() < np.abs(plain.predict_byproducts(X_test) - Z_test).mean()


def test_glimpse_keeps_the_background_out(spatial):
    (X, y, Z, _), (X_test, y_test, _, pos_test) = spatial
    soft = _fit(X, y, Z, byproduct_target="heatmap")
    glimpse = _fit(X, y, Z, byproduct_target="heatmap", glimpse=0.07)
    assert _pointing(glimpse, X_test, pos_test) > 0.8
    assert glimpse.score(X_test, y_test) > soft.score(X_test, y_test) + 0.2
    with pytest.raises(ValueError, match="The 'glimpse' parameter of LUABClassifier must be"):
        _fit(X, y, glimpse=0.0, max_iter=2)


def test_missing_clicks_are_masked(spatial):
    (X, y, Z, _), _ = spatial
    Z_missing = Z.copy()
    Z_missing[::3] = np.nan
    clf = _fit(X, y, Z_missing, max_iter=20)
    assert np.isfinite(clf.loss_curve_).all()
    with pytest.warns(UserWarning, match="entirely missing"):
        _fit(X, y, np.full_like(Z, np.nan), max_iter=5)


def test_per_class_maps_for_multilabel():
    X, y, Z, _ = make_tokens(120, seed=2)
    Y = np.stack([y == k for k in range(3)], axis=1).astype(int)
    Z_per_class = np.full((len(y), 6), np.nan, dtype=np.float32)
    for k in range(3):
        Z_per_class[y == k, 2 * k : 2 * k + 2] = Z[y == k]
    clf = _fit(X, Y, Z_per_class, max_iter=20)
    assert clf.attention_maps(X[:5]).shape == (5, 3, SIDE, SIDE)
    assert clf.predict_byproducts(X[:5]).shape == (5, 6)
    assert clf.predict(X[:5]).shape == (5, 3)


def test_token_width_reduction_and_grids():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 12, 40)).astype(np.float32)
    y = rng.integers(0, 2, 60)
    clf = _fit(X, y, n_components=8, grid_shape=(3, 4), max_iter=5)
    assert clf.token_pca_.n_components_ == 8 and clf.grid_shape_ == (3, 4)
    assert clf.attention_maps(X[:2]).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="cannot infer a square grid from 12 tokens"):
        _fit(X, y, max_iter=5)
    with pytest.raises(ValueError, match=r"grid_shape=\(2, 5\) does not match the 12 tokens"):
        _fit(X, y, grid_shape=(2, 5), max_iter=5)
    with pytest.raises(ValueError, match=r"X has tokens of shape \(12, 39\)"):
        clf.predict(X[:, :, :-1])


def test_attention_input_errors(spatial):
    (X, y, Z, _), _ = spatial
    with pytest.raises(ValueError, match=r"needs X of tokens with shape \(n_samples, L, C\)"):
        LUABClassifier(head="attention").fit(X[:, 0], y)
    with pytest.raises(ValueError, match=r"one point per class \(n_samples, 6\); got 3 columns"):
        LUABClassifier(head="attention").fit(X, y, Z=np.zeros((len(y), 3)))
    with pytest.raises(ValueError, match=r"points \(x, y\) in \[0, 1\]"):
        LUABClassifier(head="attention").fit(X, y, Z=Z * 7)
    with pytest.raises(ValueError, match="byproduct_target='regression' does not fit head='attention'"):
        LUABClassifier(head="attention", byproduct_target="regression").fit(X, y, Z=Z)
