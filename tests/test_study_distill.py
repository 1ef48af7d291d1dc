"""GeneralizedDistillationClassifier: the distillation baseline of the LUAB study."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from luab_sk.estimators.distill import GeneralizedDistillationClassifier


def _noisy_labels(n=400, d=10, flip=0.35, seed=0):
    """Clean labels from a linear rule on X; hard labels flipped at random; privileged Z = the clean label."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    clean = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    noisy = np.where(rng.random(n) < flip, 1 - clean, clean)
    Z = clean[:, None] + 0.1 * rng.normal(size=(n, 1))
    return X, clean, noisy, Z


def test_student_matches_tempered_teacher_and_hard_labels_give_logistic_regression():
    X, clean, noisy, _ = _noisy_labels()
    Z = X[:, :3] @ np.array([[1.0, -0.5], [0.3, 0.2], [-0.4, 1.0]])  # privileged, a linear view of X
    T = 2.0
    clf = GeneralizedDistillationClassifier(teacher_input="z", imitation=1.0, temperature=T, alpha=0.0)
    clf.fit(X, noisy, Z=Z)
    proba = clf.teacher_.predict_proba(Z)
    teacher_log_odds = np.log(proba[:, 1] / proba[:, 0])
    # the tempered teacher is linear in X, so the student can match its log-odds / T exactly
    np.testing.assert_allclose(clf.decision_function(X), teacher_log_odds / T, atol=2e-3)

    hard = GeneralizedDistillationClassifier(imitation=0.0, alpha=0.0, tol=1e-10).fit(X, noisy, Z=Z)
    reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=5000).fit(X, noisy)
    np.testing.assert_allclose(hard.decision_function(X), reference.decision_function(X), atol=2e-3)


def test_missing_privileged_rows_only_see_hard_labels():
    X, clean, noisy, Z = _noisy_labels()
    Z_missing = Z.copy()
    Z_missing[:] = np.nan
    Z_missing[:5] = Z[:5]  # the teacher still fits, but almost every sample falls back to its hard label
    Z_missing[:5, 0] = [0, 1, 0, 1, 0]
    X5 = X.copy()
    few = GeneralizedDistillationClassifier(imitation=1.0, teacher_input="z").fit(X5, noisy, Z=Z_missing)
    hard = GeneralizedDistillationClassifier(imitation=0.0, teacher_input="z").fit(X5, noisy, Z=Z_missing)
    assert np.mean(few.predict(X) == hard.predict(X)) > 0.95


def test_high_temperature_softens_the_student():
    X, clean, noisy, Z = _noisy_labels(flip=0.0)
    sharp = GeneralizedDistillationClassifier(imitation=1.0, temperature=1.0).fit(X, clean, Z=Z)
    soft = GeneralizedDistillationClassifier(imitation=1.0, temperature=50.0).fit(X, clean, Z=Z)
    assert np.abs(soft.coef_).sum() < np.abs(sharp.coef_).sum()
    assert soft.predict_proba(X).max(axis=1).mean() < 0.6


def test_api_string_labels_multiclass_and_coefficients():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 4))
    codes = X[:, :3].argmax(axis=1)
    y = np.array(["a", "b", "c"])[codes]
    Z = np.eye(3)[codes] + 0.1 * rng.normal(size=(150, 3))
    Z[::10] = np.nan
    clf = GeneralizedDistillationClassifier(teacher_input="xz").fit(X, y, Z=Z)
    assert clf.classes_.tolist() == ["a", "b", "c"] and clf.n_features_in_ == 4
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert clf.decision_function(X).shape == (150, 3)
    np.testing.assert_allclose(clf.decision_function(X), X @ clf.coef_.T + clf.intercept_)
    assert clf.score(X, y) > 0.8 and clf.n_iter_ >= 1
    assert set(clf.predict(X)) <= {"a", "b", "c"}


def test_binary_decision_function_is_log_odds():
    X, clean, _, Z = _noisy_labels(flip=0.0)
    clf = GeneralizedDistillationClassifier().fit(X, clean, Z=Z)
    scores = clf.decision_function(X)
    proba = clf.predict_proba(X)
    assert scores.shape == (len(X),)
    np.testing.assert_allclose(scores, np.log(proba[:, 1] / proba[:, 0]), rtol=1e-6, atol=1e-8)


def test_grid_search_slices_Z_and_clone():
    X, clean, noisy, Z = _noisy_labels(n=200)
    search = GridSearchCV(GeneralizedDistillationClassifier(), {"imitation": [0.0, 1.0]}, cv=3)
    search.fit(X, noisy, Z=Z)
    assert set(search.cv_results_["param_imitation"]) == {0.0, 1.0}
    assert clone(GeneralizedDistillationClassifier(temperature=3.0)).get_params()["temperature"] == 3.0


def test_predict_before_fit_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        GeneralizedDistillationClassifier().predict(np.zeros((2, 3)))


@pytest.mark.parametrize(
    "params, Z, match",
    [
        ({}, None, "Z=Z"),
        ({}, {"a": 1}, "dict"),
        ({}, np.zeros((5, 1)), "5 rows"),
        ({}, np.full((20, 1), np.inf), "Z contains infinity"),
        ({}, np.full((20, 1), np.nan), "no fully observed"),
        ({"temperature": 0.0}, np.zeros((20, 1)), "temperature"),
        ({"imitation": 1.5}, np.zeros((20, 1)), "imitation"),
        ({"teacher_input": "x"}, np.zeros((20, 1)), "teacher_input"),
        ({"alpha": -1.0}, np.zeros((20, 1)), "alpha"),
        ({"max_iter": 0}, np.zeros((20, 1)), "max_iter"),
        ({"teacher": object()}, np.zeros((20, 1)), "predict_proba"),
    ],
)
def test_bad_input_is_named(params, Z, match):
    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match=match):
        GeneralizedDistillationClassifier(**params).fit(X, y, Z=Z)


def test_teacher_needs_two_classes_among_observed_rows():
    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    Z = np.where((y == 0)[:, None], 1.0, np.nan)
    with pytest.raises(ValueError, match="single class"):
        GeneralizedDistillationClassifier().fit(X, y, Z=Z)
