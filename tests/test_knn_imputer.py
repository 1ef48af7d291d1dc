"""KNNByproductImputer: filling missing byproduct rows from annotated neighbours in feature space."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from luab_sk.estimators.knn import KNNByproductImputer


def _clustered(n_per_cluster=40, n_clusters=3, d=16, seed=0):
    """Features in well-separated clusters; each cluster has its own click point."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d)) * 5
    labels = np.repeat(np.arange(n_clusters), n_per_cluster)
    X = centers[labels] + rng.normal(scale=0.3, size=(labels.size, d))
    cluster_points = rng.uniform(0.1, 0.9, size=(n_clusters, 2))
    Z = np.clip(cluster_points[labels] + rng.normal(scale=0.02, size=(labels.size, 2)), 0, 1)
    return X, Z, labels, cluster_points


def test_docstring_example_values():
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, 0.05]])
    Z = np.array([[0.2, 0.4], [0.4, 0.6], [0.9, 0.9], [np.nan, np.nan]])
    Z_filled, mask = KNNByproductImputer(n_neighbors=2).fit(X, Z).transform(X, Z, return_mask=True)
    np.testing.assert_allclose(Z_filled[3], [0.3, 0.5])
    np.testing.assert_array_equal(mask, [False, False, False, True])


def test_fills_missing_rows_from_same_cluster_and_keeps_observed_values():
    X, Z, labels, cluster_points = _clustered()
    rng = np.random.default_rng(1)
    Z_obs = Z.copy()
    missing = rng.random(len(Z)) < 0.4
    Z_obs[missing] = np.nan
    imputer = KNNByproductImputer(n_neighbors=5)
    Z_filled, mask = imputer.fit_transform(X, Z_obs, return_mask=True)
    np.testing.assert_array_equal(mask, missing)
    np.testing.assert_array_equal(imputer.imputed_mask_, missing)
    assert imputer.n_annotated_ == int((~missing).sum())
    # Observed rows are returned bit for bit; the input is not modified.
    np.testing.assert_array_equal(Z_filled[~missing], Z[~missing])
    assert np.isnan(Z_obs[missing]).all()
    # A filled row is close to its own cluster's click point, far from the others.
    err = np.linalg.norm(Z_filled[missing] - cluster_points[labels[missing]], axis=1)
    assert err.max() < 0.05
    assert not np.isnan(Z_filled).any()


@pytest.mark.parametrize("weights", ["uniform", "distance", "temperature"])
def test_heatmap_rows_stay_heatmaps(weights):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 8))
    heat = rng.random((60, 4 * 4))
    heat /= heat.sum(axis=1, keepdims=True)
    heat[::3] = np.nan
    filled = KNNByproductImputer(n_neighbors=4, weights=weights).fit_transform(X, heat)
    np.testing.assert_allclose(filled.sum(axis=1), 1.0)
    assert (filled >= 0).all()


def test_points_stay_in_unit_square_and_weighted_mean_matches_manual():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 5))
    Z = rng.random((30, 2))
    Z[:10] = np.nan
    imputer = KNNByproductImputer(n_neighbors=3, weights="distance", metric="l2").fit(X, Z)
    filled = imputer.transform(X, Z)
    assert ((filled >= 0) & (filled <= 1)).all()
    # Manual 1/d weighted mean of the 3 nearest annotated rows.
    annotated = np.flatnonzero(~np.isnan(Z).all(axis=1))
    d = np.linalg.norm(X[0] - X[annotated], axis=1)
    nearest = np.argsort(d)[:3]
    w = 1 / d[nearest]
    np.testing.assert_allclose(filled[0], (w[:, None] * Z[annotated[nearest]]).sum(0) / w.sum())


def test_nearest_strategy_copies_a_real_row():
    X = np.array([[0.0, 1.0], [0.0, 1.1], [1.0, 0.0], [0.05, 1.0]])
    # Two neighbours with clicks on different objects: the mean would fall between them.
    Z = np.array([[0.1, 0.5], [0.9, 0.5], [0.5, 0.5], [np.nan, np.nan]])
    mean = KNNByproductImputer(n_neighbors=2, metric="l2").fit_transform(X, Z)
    nearest = KNNByproductImputer(n_neighbors=2, metric="l2", strategy="nearest").fit_transform(X, Z)
    np.testing.assert_allclose(mean[3], [0.5, 0.5])
    np.testing.assert_array_equal(nearest[3], Z[0])


def test_partially_missing_rows_are_annotated_and_untouched():
    # Per-class points for K=2 classes: NaN for an absent class is not "missing".
    X = np.array([[0.0, 1.0], [0.1, 1.0], [0.2, 1.0], [0.05, 1.0]])
    Z = np.array(
        [
            [0.2, 0.2, np.nan, np.nan],  # only class 0
            [0.4, 0.4, 0.6, 0.6],  # both classes
            [np.nan, np.nan, 0.8, 0.8],  # only class 1
            [np.nan, np.nan, np.nan, np.nan],  # missing row
        ]
    )
    imputer = KNNByproductImputer(n_neighbors=3, metric="l2")
    filled, mask = imputer.fit_transform(X, Z, return_mask=True)
    np.testing.assert_array_equal(mask, [False, False, False, True])
    np.testing.assert_array_equal(filled[:3], Z[:3])  # NaN stay NaN in annotated rows
    # Each column is the mean over the neighbours that observe it.
    np.testing.assert_allclose(filled[3], [0.3, 0.3, 0.7, 0.7])


def test_column_observed_by_no_neighbour_stays_nan():
    X = np.array([[0.0], [0.1], [5.0], [0.05]])
    Z = np.array([[0.2, np.nan], [0.4, np.nan], [np.nan, 0.9], [np.nan, np.nan]])
    filled = KNNByproductImputer(n_neighbors=2, metric="l2").fit_transform(X, Z)
    np.testing.assert_allclose(filled[3, 0], 0.3)
    assert np.isnan(filled[3, 1])


def test_transform_on_new_samples_and_no_missing_rows():
    X, Z, _, _ = _clustered(seed=4)
    imputer = KNNByproductImputer().fit(X, Z)
    assert not imputer.imputed_mask_.any()
    X_new = X[:5] + 0.01
    filled, mask = imputer.transform(X_new, np.full((5, 2), np.nan), return_mask=True)
    assert mask.all() and not np.isnan(filled).any()
    same, mask = imputer.transform(X, Z, return_mask=True)
    np.testing.assert_array_equal(same, Z)
    assert not mask.any()


def test_clone_keeps_params():
    imp = KNNByproductImputer(n_neighbors=7, metric="l2", weights="distance", strategy="nearest")
    assert clone(imp).get_params() == imp.get_params()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"metric": "manhattan"}, "metric"),
        ({"weights": "gaussian"}, "weights"),
        ({"strategy": "median"}, "strategy"),
        ({"temperature": -1.0}, "temperature"),
        ({"index": "hnsw"}, "index"),
        ({"nlist": 0}, "nlist"),
        ({"nprobe": 1.5}, "nprobe"),
    ],
)
def test_bad_params_name_the_argument(kwargs, match):
    X = np.random.default_rng(0).normal(size=(20, 3))
    Z = np.random.default_rng(1).random((20, 2))
    with pytest.raises(ValueError, match=match):
        KNNByproductImputer(**kwargs).fit(X, Z)


def test_bad_inputs_raise_precise_errors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    Z = rng.random((20, 2))
    Z[3:] = np.nan  # only 3 annotated rows
    msg = r"n_neighbors=5 is larger than the number of annotated rows of Z \(3 of 20\)"
    with pytest.raises(ValueError, match=msg):
        KNNByproductImputer().fit(X, Z)
    with pytest.raises(ValueError, match="annotated rows of Z \\(0 of 20\\)"):
        KNNByproductImputer(n_neighbors=1).fit(X, np.full((20, 2), np.nan))
    with pytest.raises(ValueError, match="Z has 19 rows but X has 20"):
        KNNByproductImputer(n_neighbors=1).fit(X, Z[:19])
    with pytest.raises(TypeError, match="Z must be an array"):
        KNNByproductImputer(n_neighbors=1).fit(X, {"points": Z})
    with pytest.raises(ValueError, match="Z contains infinity"):
        KNNByproductImputer(n_neighbors=1).fit(X, np.where(np.isnan(Z), np.inf, Z))
    X_nan = X.copy()
    X_nan[4, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        KNNByproductImputer(n_neighbors=1).fit(X_nan, Z)
    imputer = KNNByproductImputer(n_neighbors=2).fit(X, Z)
    with pytest.raises(ValueError, match="X has 4 features, but KNNByproductImputer is expecting 3"):
        imputer.transform(rng.normal(size=(5, 4)), np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="Z has 3 columns, expected 2"):
        imputer.transform(X, np.full((20, 3), np.nan))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_neighbors=st.integers(1, 4),
    weights=st.sampled_from(["uniform", "distance", "temperature"]),
    metric=st.sampled_from(["cosine", "l2"]),
)
def test_property_observed_kept_and_fills_are_convex(seed, n_neighbors, weights, metric):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(25, 4))
    Z = rng.random((25, 3))
    Z[rng.random(25) < 0.4] = np.nan
    Z[rng.random((25, 3)) < 0.1] = np.nan  # some partially missing rows
    Z[:n_neighbors] = rng.random((n_neighbors, 3))  # enough annotated rows
    imputer = KNNByproductImputer(n_neighbors=n_neighbors, weights=weights, metric=metric)
    filled, mask = imputer.fit_transform(X, Z, return_mask=True)
    np.testing.assert_array_equal(mask, np.isnan(Z).all(axis=1))
    np.testing.assert_array_equal(filled[~mask], Z[~mask])
    low, high = np.nanmin(Z, axis=0), np.nanmax(Z, axis=0)
    rows = filled[mask]
    ok = np.isnan(rows) | ((rows >= low - 1e-12) & (rows <= high + 1e-12))
    assert ok.all()
