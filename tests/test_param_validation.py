"""Declarative parameter validation: the cases hand-written checks missed, and the shared device check."""

from numbers import Integral, Real

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from luab_sk._param_validation import Device, Interval, InvalidParameterError
from luab_sk.datasets.synthetic import make_embedding_classification
from luab_sk.estimators import LUABFineTuner
from luab_sk.estimators.classifier import LUABClassifier
from luab_sk.estimators.distill import GeneralizedDistillationClassifier
from luab_sk.estimators.knn import FaissKNNClassifier, KNNByproductImputer
from luab_sk.features.extractor import FeatureExtractor


@pytest.fixture(scope="module")
def data():
    X, y, Z = make_embedding_classification(60, 16, n_classes=3, random_state=0)
    return X, y, Z


def test_interval_rejects_bools_and_open_ends_reject_infinity():
    assert not Interval(Integral, 1, None, closed="left").is_satisfied_by(True)
    assert Interval(Integral, 1, None, closed="left").is_satisfied_by(np.int64(3))
    assert not Interval(Real, 0, None, closed="left").is_satisfied_by(np.inf)
    assert not Interval(Real, 0, None, closed="left").is_satisfied_by(np.nan)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps", "xpu:0"])
def test_device_accepts_torch_device_strings(device):
    assert Device().is_satisfied_by(device)


@pytest.mark.parametrize("device", ["gpu0", "gpu", "cuda:", "CPU", "cuda:x", 0, None])
def test_device_rejects_anything_else(device):
    assert not Device().is_satisfied_by(device)


@pytest.mark.parametrize(
    "params",
    [
        {"hidden_size": True},
        {"sigma": -1},
        {"tol": -1},
        {"learning_rate": -5},
        {"early_stopping": "yes"},
        {"byproduct_loss": "huber"},
        {"validation_fraction": "a"},
        {"byproduct_weight": np.inf},
        {"alpha": np.inf},
        {"alpha": np.nan},
        {"learning_rate": np.inf},
        {"device": "gpu0"},
    ],
)
def test_classifier_rejects_bad_params_and_stays_unfitted(data, params):
    X, y, Z = data
    clf = LUABClassifier(head="linear", max_iter=5, **params)
    (name,) = params
    with pytest.raises(InvalidParameterError, match=f"The '{name}' parameter of LUABClassifier must be"):
        clf.fit(X, y, Z=Z)
    with pytest.raises(NotFittedError):
        clf.predict(X)


def test_cross_parameter_error_sets_no_fitted_attribute(data):
    X, y, Z = data
    clf = LUABClassifier(byproduct_target="heatmap")
    with pytest.raises(ValueError, match="byproduct_target='heatmap' does not fit head='mlp'"):
        clf.fit(X, y, Z=Z)
    assert not [k for k in vars(clf) if k.endswith("_") and not k.startswith("_")]
    with pytest.raises(NotFittedError):
        clf.predict(X)


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (-1.0, "Negative values in data passed to `sample_weight`"),
        (np.inf, "sample_weight contains infinity"),
        (np.nan, "sample_weight contains NaN"),
        (0.0, "at least one non-zero"),
    ],
)
def test_classifier_rejects_bad_sample_weight(data, weight, match):
    X, y, Z = data
    sample_weight = np.full(len(y), weight) if weight == 0.0 else np.r_[weight, np.ones(len(y) - 1)]
    with pytest.raises(ValueError, match=match):
        LUABClassifier(head="linear", max_iter=5).fit(X, y, Z=Z, sample_weight=sample_weight)


@pytest.mark.parametrize(
    "params", [{"learning_rate": np.inf}, {"byproduct_weight": np.inf}, {"device": "gpu0"}]
)
def test_fine_tuner_rejects_non_finite_params_before_reading_images(params):
    (name,) = params
    with pytest.raises(InvalidParameterError, match=f"The '{name}' parameter of LUABFineTuner must be"):
        LUABFineTuner(pretrained=None, **params).fit(["never/read.jpg"] * 2, [0, 1])


def test_distillation_rejects_infinite_alpha(data):
    X, y, Z = data
    with pytest.raises(InvalidParameterError, match="'alpha' parameter of GeneralizedDistillationClassifier"):
        GeneralizedDistillationClassifier(alpha=np.inf).fit(X, y, Z=Z)


@pytest.mark.parametrize(
    "estimator",
    [FaissKNNClassifier(device="gpu0"), KNNByproductImputer(device="mps")],
    ids=lambda est: type(est).__name__,
)
def test_faiss_estimators_accept_only_faiss_devices(data, estimator):
    X, y, Z = data
    match = "'device' parameter .* 'auto', 'cpu', 'cuda' or 'cuda:N'"
    with pytest.raises(InvalidParameterError, match=match):
        estimator.fit(X, y if isinstance(estimator, FaissKNNClassifier) else Z)


def test_feature_extractor_validates_in_transform_too():
    with pytest.raises(InvalidParameterError, match="The 'device' parameter of FeatureExtractor must be"):
        FeatureExtractor(pretrained=None, device="gpu0").transform(np.zeros((1, 8, 8, 3), np.uint8))
