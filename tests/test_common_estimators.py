"""scikit-learn's estimator checks and parameter validation, for every public estimator in one place.

``parametrize_with_checks`` runs on the estimators that take ordinary (X, y) arrays. The others cannot
pass it, by design rather than by defect, and get ``check_param_validation`` only (which sets every
parameter to a wrong type and to generated out-of-range values and expects scikit-learn's
``InvalidParameterError`` from ``fit`` before any data is looked at):

- ``GeneralizedDistillationClassifier`` and ``KNNByproductImputer`` need Z in ``fit``;
- ``LUABFineTuner`` trains on images, ``FeatureExtractor`` encodes images and ``ByproductEncoder``
  encodes annotation records, and every check feeds numeric matrices.
"""

import warnings

import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import check_param_validation, parametrize_with_checks

from luab_sk.byproducts.encoder import ByproductEncoder
from luab_sk.estimators import LUABFineTuner
from luab_sk.estimators.classifier import LUABClassifier
from luab_sk.estimators.distill import GeneralizedDistillationClassifier
from luab_sk.estimators.knn import FaissKNNClassifier, KNNByproductImputer
from luab_sk.features.extractor import FeatureExtractor

# alpha=1e-2 keeps the logits on the separable check data below about 15. Beyond about 36 every float64
# sigmoid is exactly 1 (and beyond about 17 adjacent float32 logits may share one), so the rank checks
# comparing predict_proba with decision_function would depend on the CPU's rounding of the fit.
FAST = {"hidden_size": 8, "max_iter": 30, "alpha": 1e-2, "random_state": 0}


def _expected_failed_checks(estimator):
    if not isinstance(estimator, LUABClassifier):
        return {}
    return {
        "check_sample_weight_equivalence_on_dense_data": (
            "weights and repeated rows give the same objective, but the float32 solvers stop at tol "
            "(the mlp trunk is also non-convex), not at the same optimum to rtol=1e-7"
        ),
    }


@parametrize_with_checks(
    [
        LUABClassifier(**FAST),
        LUABClassifier(head="linear", **FAST),
        FaissKNNClassifier(n_neighbors=3),
        FaissKNNClassifier(n_neighbors=3, metric="l2", weights="distance"),
        FaissKNNClassifier(n_neighbors=3, weights="uniform", index="ivf", random_state=0),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


@pytest.mark.parametrize(
    "estimator",
    [
        LUABClassifier(),
        LUABFineTuner(pretrained=None),
        GeneralizedDistillationClassifier(),
        FaissKNNClassifier(),
        KNNByproductImputer(),
        FeatureExtractor(pretrained=None),
        ByproductEncoder(),
    ],
    ids=lambda est: type(est).__name__,
)
def test_param_validation(estimator):
    check_param_validation(type(estimator).__name__, estimator)
