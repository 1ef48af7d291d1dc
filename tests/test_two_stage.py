"""Tests for TwoStageLUABClassifier: locate with clicks, classify crops around the located point."""

import pickle
import warnings

import numpy as np
import pytest
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import check_param_validation

from luab_sk.estimators import LUABClassifier, TwoStageLUABClassifier
from luab_sk.features import FeatureExtractor, cache_info

SIZE, OBJ, GRID = 64, 16, 8
COLOURS = np.array([[230, 40, 40], [40, 40, 230]], dtype=np.uint8)  # class 0 red, class 1 blue


class MeanColourExtractor(BaseEstimator):
    """An identity-like extractor: tokens are the mean colours of a ``grid`` x ``grid`` partition of the whole
    image (``crop_fraction = 1``: no centre crop), the pooled feature is the image's mean colour."""

    crop_fraction = 1.0

    def __init__(self, output="pooled", grid=GRID):
        self.output = output
        self.grid = grid

    def transform(self, images):
        out = []
        for img in images:
            a = np.asarray(img, dtype=np.float64) / 255.0
            if self.output == "pooled":
                out.append(a.mean(axis=(0, 1)))
            else:
                g = self.grid
                h, w = a.shape[:2]
                rows = np.array_split(np.arange(h), g)
                cols = np.array_split(np.arange(w), g)
                out.append([a[r][:, c].mean(axis=(0, 1)) for r in rows for c in cols])
        return np.asarray(out, dtype=np.float32)


class RecordingClassifier(ClassifierMixin, BaseEstimator):
    """Remembers the features it was fitted on; predicts the class whose colour channel is larger."""

    def fit(self, X, y):
        self.X_, self.classes_ = np.asarray(X), np.unique(y)
        return self

    def predict(self, X):
        X = np.asarray(X)
        return self.classes_[(X[:, 2] > X[:, 0]).astype(int)]


def make_scenes(n, seed=0):
    """Grey noisy scenes with a red (class 0) or blue (class 1) square; Z is the square's centre."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    images = rng.integers(100, 156, (n, SIZE, SIZE, 3)).astype(np.uint8)
    corner = rng.integers(0, SIZE - OBJ + 1, (n, 2))
    for i, (x0, y0) in enumerate(corner):
        images[i, y0 : y0 + OBJ, x0 : x0 + OBJ] = COLOURS[y[i]]
    Z = (corner + OBJ / 2) / SIZE
    boxes = np.hstack([corner, corner + OBJ]) / SIZE
    return images, y, Z, boxes


def locator(**params):
    return LUABClassifier(
        head="attention", hidden_size=8, n_components=None, max_iter=15, random_state=0, **params
    )


def two_stage(**params):
    kwargs = {"locator": locator(), "crop_size": 0.2, "random_state": 0} | params
    return TwoStageLUABClassifier(MeanColourExtractor(), **kwargs)


def _fit(clf, X, y, **fit_params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(X, y, **fit_params)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(48, seed=0), make_scenes(24, seed=1)


@pytest.fixture(scope="module")
def fitted(scenes):
    (X, y, Z, _), _ = scenes
    Z = Z.copy()
    Z[[3, 10]] = np.nan
    return _fit(two_stage(classifier=RecordingClassifier()), X, y, Z=Z), Z


def test_crops_are_centred_on_the_clicks(fitted, scenes):
    clf, _ = fitted
    (X, _, Z, _), _ = scenes
    crops, boxes = clf.crop_images(X, Z)
    side = 0.2 * SIZE  # crop_fraction 1: the window is the seen region
    assert all(c.shape == (round(side), round(side), 3) for c in crops)
    centre = (boxes[:, :2] + boxes[:, 2:] / 2) / SIZE
    inside = ((Z * SIZE >= side / 2) & (Z * SIZE <= SIZE - side / 2)).all(axis=1)
    assert inside.sum() > 20
    np.testing.assert_allclose(centre[inside], Z[inside], atol=1 / SIZE)
    # near the border the window is shifted into the image, never cut
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= SIZE).all()
    # deterministic: the same pixels (so the same cache ids) every time
    again, _ = clf.crop_images(X, Z)
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))


def test_what_stage_reads_the_crop_features_exactly(fitted, scenes):
    clf, Z = fitted
    (X, y, _, _), _ = scenes
    seen = ~np.isnan(Z).any(axis=1)
    # a 13-px crop centred on the click of a 16-px square holds the square only: its mean colour exactly
    np.testing.assert_allclose(clf.classifier_.X_[seen], COLOURS[y[seen]] / 255.0, atol=1e-6)
    crops, _ = clf.crop_images(X, clf.train_points_)
    expected = np.array([c.reshape(-1, 3).mean(axis=0) / 255.0 for c in crops])
    np.testing.assert_allclose(clf.classifier_.X_, expected, atol=1e-6)
    np.testing.assert_allclose(clf.crop_features(X[seen], Z[seen]), COLOURS[y[seen]] / 255.0, atol=1e-6)


def test_missing_clicks_use_predicted_points(fitted, scenes):
    clf, Z = fitted
    (X, _, _, boxes), _ = scenes
    assert clf.n_imputed_points_ == 2
    predicted = clf.predict_points(X)
    np.testing.assert_allclose(clf.train_points_[[3, 10]], predicted[[3, 10]])
    seen = ~np.isnan(Z).any(axis=1)
    np.testing.assert_allclose(clf.train_points_[seen], Z[seen])


def test_clicks_teach_the_locator(scenes):
    (X, y, Z, _), (X_test, y_test, _, boxes) = scenes
    clf = _fit(two_stage(), X, y, Z=Z)
    assert clf.score(X_test, y_test) >= 0.9
    proba = clf.predict_proba(X_test)
    assert proba.shape == (len(X_test), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert clf.decision_function(X_test).shape == (len(X_test),)
    # the point read-out only matters where points are read: switch it on the fitted model
    for method in ["peak", "local", "soft_argmax", "topk"]:
        points = clf.set_params(point_method=method).predict_points(X_test)
        assert points.shape == (len(X_test), 2) and ((points >= 0) & (points <= 1)).all()
        inside = ((boxes[:, :2] <= points) & (points <= boxes[:, 2:])).all(axis=1)
        assert inside.mean() >= (0.8 if method != "soft_argmax" else 0.4), method
    assert clf.crop_features(X_test).shape == (len(X_test), 3)  # top-k crops averaged


def test_no_z_control_and_second_look(scenes):
    (X, y, Z, _), (X_test, _, _, _) = scenes
    X, y, Z = X[:24], y[:24], Z[:24]
    no_z = _fit(two_stage(), X, y)
    assert no_z.n_imputed_points_ == len(X)
    zoom = _fit(two_stage(zoom=0.5, point_method="local"), X, y, Z=Z)
    assert zoom.zoom_locator_ is not None
    points = zoom.predict_points(X_test)
    assert ((points >= 0) & (points <= 1)).all()
    np.testing.assert_array_equal(points, _fit(clone(zoom), X, y, Z=Z).predict_points(X_test))


def test_multi_scale_crops_concatenate(scenes):
    (X, y, Z, _), _ = scenes
    clf = _fit(two_stage(crop_size=(0.2, 0.4)), X, y, Z=Z)
    assert clf.crop_features(X[:5]).shape == (5, 6)


def test_sklearn_compatibility(scenes):
    (X, y, Z, _), (X_test, y_test, _, _) = scenes
    clf = two_stage()
    params = clf.get_params()
    assert "locator__byproduct_weight" in params and params["crop_size"] == 0.2
    assert clone(clf).get_params()["crop_size"] == 0.2
    grid = {"crop_size": [0.2, 0.5]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search = GridSearchCV(clf, grid, cv=KFold(2)).fit(X, y, Z=Z)  # routing off: Z sliced per fold
        with sklearn.config_context(enable_metadata_routing=True):
            routed = GridSearchCV(clf, {"crop_size": [0.2]}, cv=KFold(2), refit=False).fit(X, y, Z=Z)
        pipe = Pipeline([("two", two_stage())]).fit(X, y, two__Z=Z)
    # routing on: Z reaches every fold as with routing off (same folds, same scores)
    assert search.cv_results_["mean_test_score"][0] == routed.cv_results_["mean_test_score"][0]
    assert search.best_estimator_.score(X_test, y_test) >= 0.9
    np.testing.assert_array_equal(pipe.predict(X_test), pipe[-1].predict(X_test))
    restored = pickle.loads(pickle.dumps(search.best_estimator_))
    np.testing.assert_array_equal(
        restored.predict_proba(X_test), search.best_estimator_.predict_proba(X_test)
    )


def test_real_extractor_and_cache(tmp_path, scenes):
    (X, y, Z, _), _ = scenes
    X, y, Z = X[:12], y[:12], Z[:12]
    fe = FeatureExtractor("timm:test_vit", pretrained=None, token_dim=8, cache_dir=str(tmp_path))
    clf = TwoStageLUABClassifier(fe, locator=locator(), crop_size=0.3, random_state=0)
    _fit(clf, X, y, Z=Z)
    assert clf.grid_shape_ == (10, 10) and clf.crop_fraction_ == pytest.approx(0.95)
    assert fe.get_params()["output"] == "pooled"  # the given extractor is cloned, not changed
    rows = {s["config"]["outputs"][0]: s["n_rows"] for s in cache_info(tmp_path)}
    assert rows == {"tokens": 12, "pooled": 12}
    first = clf.predict(X)
    _fit(clone(clf), X, y, Z=Z)  # a refit and predictions read everything back: no new rows
    np.testing.assert_array_equal(clf.predict(X), first)
    rows_after = {s["config"]["outputs"][0]: s["n_rows"] for s in cache_info(tmp_path)}
    assert rows_after["tokens"] == 12 and rows_after["pooled"] <= 24  # test crops at predicted points


def test_input_errors(scenes):
    (X, y, Z, _), _ = scenes
    clf = two_stage()
    with pytest.raises(ValueError, match="one click point"):
        clf.fit(X, y, Z=np.hstack([Z, Z]))
    with pytest.raises(ValueError, match="rows|length|samples"):
        clf.fit(X, y, Z=Z[:-1])
    with pytest.raises(TypeError):
        clf.fit(X, y, Z={"a": Z})
    with pytest.raises(ValueError, match="labels"):
        clf.fit(X, y[:-1], Z=Z)
    with pytest.raises(TypeError, match="single"):
        clf.fit("image.jpg", y)
    with pytest.raises(ValueError, match="uint8"):
        clf.fit(X.astype(np.float32), y)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        clf.predict(X)


def test_param_validation():
    check_param_validation("TwoStageLUABClassifier", TwoStageLUABClassifier())


# ---------------------------------------------------------------------- jittered crops (issue 11)
def test_jittered_training_crops_are_used(scenes):
    (X, y, Z, _), _ = scenes
    n = len(X)
    one = _fit(two_stage(classifier=RecordingClassifier()), X, y, Z=Z)
    clf = _fit(two_stage(classifier=RecordingClassifier(), n_train_crops=3, crop_jitter=0.3), X, y, Z=Z)
    assert clf.classifier_.X_.shape == (3 * n, 3) and clf.n_train_rows_ == 3 * n
    assert one.n_train_rows_ == n
    # crop-major rows: crop 0 of every image is the crop at the click, as with one crop
    np.testing.assert_allclose(clf.classifier_.X_[:n], one.classifier_.X_)
    # the extra crops are shifted: up to 0.3 x 12.8 px off a 16-px square, some catch the background
    extra = clf.classifier_.X_[n:]
    assert not np.allclose(extra, np.tile(one.classifier_.X_, (2, 1)), atol=1e-3)
    # ... but stay near the object: the object's colour still dominates every crop
    colour = np.tile(COLOURS[y] / 255.0, (2, 1))
    assert (np.abs(extra - colour).max(axis=1) < 0.35).all()
    # deterministic for an int seed (so cached crops repeat); another seed shifts other crops
    again = _fit(clone(clf), X, y, Z=Z)
    np.testing.assert_array_equal(again.classifier_.X_, clf.classifier_.X_)
    other = _fit(clone(clf).set_params(random_state=1), X, y, Z=Z)
    assert not np.array_equal(other.classifier_.X_[n:], clf.classifier_.X_[n:])
    # crop j does not depend on n_train_crops (shared cache entries)
    two = _fit(clone(clf).set_params(n_train_crops=2), X, y, Z=Z)
    np.testing.assert_array_equal(two.classifier_.X_, clf.classifier_.X_[: 2 * n])
    # the shifts have their own random stream: a second look does not move them
    zoomed = _fit(clone(clf).set_params(zoom=0.5), X, y, Z=Z)
    np.testing.assert_array_equal(zoomed.classifier_.X_, clf.classifier_.X_)
    assert clf.__sklearn_tags__().non_deterministic is False
    assert clone(clf).set_params(random_state=None).__sklearn_tags__().non_deterministic is True


def test_scale_jitter_rescales_extra_training_crops(scenes):
    (X, y, Z, _), _ = scenes
    base = two_stage(classifier=RecordingClassifier(), n_train_crops=2, crop_jitter=0.0)
    plain = _fit(clone(base), X, y, Z=Z)
    np.testing.assert_allclose(plain.classifier_.X_[len(X) :], plain.classifier_.X_[: len(X)])
    scaled = _fit(clone(base).set_params(scale_jitter=0.5), X, y, Z=Z)
    np.testing.assert_array_equal(scaled.classifier_.X_[: len(X)], plain.classifier_.X_[: len(X)])
    # larger crops (up to 19 px) around a 16-px square take in background: other mean colours
    assert not np.allclose(scaled.classifier_.X_[len(X) :], plain.classifier_.X_[len(X) :], atol=1e-3)


def test_test_time_crops_average_shifted_and_rescaled_crops(fitted, scenes):
    clf = _with(fitted[0])  # prediction-time parameters change on a copy, not the shared fixture
    (X, _, Z, _), _ = scenes
    P = Z[:10]
    centre = clf.crop_features(X[:10], P)
    layouts = {
        5: [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)],
        9: [(dx, dy) for dy in (0, -1, 1) for dx in (0, -1, 1)],
    }
    shift = 0.25 * 0.2  # test_jitter x crop_size, in image coordinates of a square image
    for k, layout in layouts.items():
        clf.set_params(test_crops=k, test_jitter=0.25)
        one = _with(clf, test_crops=1)
        expected = np.mean(
            [one.crop_features(X[:10], np.clip(P + np.array(d) * shift, 0, 1)) for d in layout], axis=0
        )
        np.testing.assert_allclose(clf.crop_features(X[:10], P), expected, atol=1e-6)
        assert not np.allclose(clf.crop_features(X[:10], P), centre, atol=1e-4)
    clf.set_params(test_crops=1, test_scales=(0.5, 1.0))
    expected = (_with(clf, crop_size=0.1, test_scales=None).crop_features(X[:10], P) + centre) / 2
    np.testing.assert_allclose(clf.crop_features(X[:10], P), expected, atol=1e-6)
    # predictions read the averaged features
    clf.set_params(test_crops=5, test_scales=None)
    np.testing.assert_array_equal(clf.predict(X[:10]), clf.classifier_.predict(clf.crop_features(X[:10])))


def _with(fitted_model, **params):
    """A copy of a fitted model with some prediction-time parameters changed."""
    other = clone(fitted_model, safe=False).set_params(**params)
    other.__dict__.update({k: v for k, v in fitted_model.__dict__.items() if k.endswith("_")})
    return other


def test_crop_parameters_validation_and_clone(scenes):
    (X, y, Z, _), _ = scenes
    bad = [
        ({"n_train_crops": 0}, "n_train_crops"),
        ({"n_train_crops": 2.5}, "n_train_crops"),
        ({"crop_jitter": 0.6}, "crop_jitter"),
        ({"crop_jitter": -0.1}, "crop_jitter"),
        ({"scale_jitter": 0.7}, "scale_jitter"),
        ({"test_crops": 3}, "test_crops"),
        ({"test_jitter": 1.0}, "test_jitter"),
        ({"test_scales": "big"}, "test_scales"),
        ({"test_scales": (0.0, 1.0)}, "test_scales must be"),
        ({"test_scales": ()}, "test_scales must be"),
    ]
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            two_stage(**params).fit(X[:8], y[:8], Z=Z[:8])
    clf = two_stage(
        n_train_crops=4,
        crop_jitter=0.2,
        scale_jitter=0.1,
        test_crops=9,
        test_jitter=0.05,
        test_scales=(0.9, 1.1),
    )
    expected = {
        "n_train_crops": 4,
        "crop_jitter": 0.2,
        "scale_jitter": 0.1,
        "test_crops": 9,
        "test_jitter": 0.05,
        "test_scales": (0.9, 1.1),
    }
    assert expected.items() <= clf.get_params().items()
    assert expected.items() <= clone(clf).get_params().items()
    defaults = TwoStageLUABClassifier().get_params()
    assert defaults["n_train_crops"] == 1 and defaults["test_crops"] == 1  # today's behaviour by default


def test_jittered_crops_share_the_cache(tmp_path, scenes):
    (X, y, Z, _), _ = scenes
    X, y, Z = X[:12], y[:12], Z[:12]
    fe = FeatureExtractor("timm:test_vit", pretrained=None, token_dim=8, cache_dir=str(tmp_path))
    clf = TwoStageLUABClassifier(fe, locator=locator(), crop_size=0.3, n_train_crops=3, random_state=0)
    _fit(clf, X, y, Z=Z)
    rows = {s["config"]["outputs"][0]: s["n_rows"] for s in cache_info(tmp_path)}
    # 3 crops per image (the cache keys crops by content: windows pushed inside the image may repeat)
    assert rows["tokens"] == 12 and 30 <= rows["pooled"] <= 36
    _fit(clone(clf), X, y, Z=Z)  # the same seed cuts the same crops: nothing new is encoded
    after = {s["config"]["outputs"][0]: s["n_rows"] for s in cache_info(tmp_path)}
    assert after["pooled"] == rows["pooled"]
