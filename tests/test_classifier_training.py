"""The shared training loop (scikit-learn's ``gtol`` stopping rule, the non-finite guard) and fit safety."""

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from luab_sk.datasets.synthetic import make_embedding_classification
from luab_sk.estimators import classifier
from luab_sk.estimators.classifier import LUABClassifier
from luab_sk.nn.engine import NonFiniteObjectiveError, train_module


def _logistic_problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    logits = x @ torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=logits).sample()
    return x, y


def _objective(module, x, y):
    return torch.nn.functional.cross_entropy(module(x), y)


def _max_abs_grad(module, x, y, alpha):
    module.zero_grad()
    loss = _objective(module, x, y) + 0.5 * alpha * module.weight.pow(2).sum()
    loss.backward()
    return max(float(p.grad.abs().max()) for p in module.parameters())


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
def test_lbfgs_stops_on_the_largest_gradient_entry(alpha):
    x, y = _logistic_problem()
    gradients, iterations = [], []
    for tol in (1e-2, 1e-4, 1e-7):
        module = torch.nn.Linear(6, 3).double()
        torch.nn.init.zeros_(module.weight), torch.nn.init.zeros_(module.bias)
        result = train_module(module, _objective, (x, y), tol=tol, alpha=alpha, max_iter=500)
        assert result.converged and result.n_iter < 500
        gradients.append(_max_abs_grad(module, x, y, alpha))
        iterations.append(result.n_iter)
        # The stopping point is optimal to ``tol`` in scikit-learn's sense ...
        assert gradients[-1] <= tol
    # ... and not more than needed: a looser tol stops earlier, further from the optimum.
    assert gradients[0] > gradients[1] > gradients[2]
    assert iterations[0] < iterations[1] < iterations[2]


def test_lbfgs_stall_guard_ends_an_unreachable_tolerance():
    # tol=0 cannot be met in floating point; the fit still ends once the objective stops decreasing.
    x, y = _logistic_problem()
    module = torch.nn.Linear(6, 3)
    result = train_module(module, _objective, (x.float(), y), tol=0.0, alpha=1e-2, max_iter=1000)
    assert result.converged and result.n_iter < 1000
    tail = result.loss_curve[-3:]
    assert max(tail) - min(tail) <= 1e-5 * abs(tail[-1])


def test_a_non_finite_objective_stops_the_fit_with_its_likely_causes():
    x, y = _logistic_problem()
    module = torch.nn.Linear(6, 3).double()
    with pytest.raises(NonFiniteObjectiveError, match=r"learning rate that is too high \(learning_rate=inf"):
        train_module(module, _objective, (x, y), solver="adamw", learning_rate=float("inf"), max_iter=5)
    with pytest.raises(FloatingPointError, match="starting point .* not standardized"):
        train_module(module, lambda m, x, y: _objective(m, x, y) * float("inf"), (x, y))


@pytest.fixture(scope="module")
def blobs():
    X, y, Z = make_embedding_classification(300, 16, n_classes=3, random_state=0)
    return X, y, Z


def test_unscaled_features_without_standardize_warn(blobs):
    X, y, _ = blobs
    match = "worse than predicting the class frequencies.*standardize=True"
    with pytest.warns(ConvergenceWarning, match=match):
        LUABClassifier(hidden_size=8, standardize=False, max_iter=10, random_state=0).fit(X * 1e6 + 1e6, y)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_a_failed_fit_keeps_no_model(blobs, monkeypatch, head):
    X, y, Z = blobs
    clf = LUABClassifier(head=head, max_iter=5, random_state=0)
    monkeypatch.setattr(clf, "_objective", lambda *args: torch.tensor(float("nan"), requires_grad=True))
    if head == "linear":  # the convex solver does not call _objective: break its solution instead
        solver = classifier.fit_linear_head

        def broken(module, *args, **kwargs):
            fit = solver(module, *args, **kwargs)
            with torch.no_grad():
                module.trunk.weight[0, 0] = float("nan")
            return fit

        monkeypatch.setattr(classifier, "fit_linear_head", broken)
    match = "parameter became nan" if head == "linear" else "objective became nan"
    with pytest.raises(NonFiniteObjectiveError, match=match):
        clf.fit(X, y, Z=Z)
    with pytest.raises(NotFittedError):
        clf.predict(X)


def test_a_non_finite_convex_objective_stops_the_fit(blobs, monkeypatch):
    X, y, Z = blobs
    solver = classifier.fit_linear_head

    def diverging(*args, **kwargs):
        fit = solver(*args, **kwargs)
        fit.objective = float("inf")
        return fit

    monkeypatch.setattr(classifier, "fit_linear_head", diverging)
    with pytest.raises(NonFiniteObjectiveError, match=r"objective became inf .*lbfgs, convex"):
        LUABClassifier(head="linear", max_iter=5, random_state=0).fit(X, y, Z=Z)


def test_warm_start_refuses_another_head_and_explains_missing_z(blobs):
    X, y, Z = blobs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LUABClassifier(head="linear", warm_start=True, max_iter=5, random_state=0).fit(X, y, Z=Z)
        with pytest.raises(ValueError, match="continues the fitted 'linear' head, but head='mlp'"):
            clf.set_params(head="mlp").fit(X, y, Z=Z)
        with pytest.raises(ValueError, match="learned 8 byproduct columns, but this fit has no usable Z"):
            clf.set_params(head="linear").fit(X, y)
    assert hasattr(clf, "module_")  # the refused continuations left the fitted model in place


def test_binary_per_class_clicks_and_impute_neighbors_get_precise_messages(blobs):
    X, y, _ = blobs
    tokens = np.repeat(X[:, None, :], 4, axis=1)
    clicks = np.full((len(X), 4), 0.5)
    with pytest.raises(ValueError, match="one click point per sample, \\(n_samples, 2\\), for a binary task"):
        LUABClassifier(head="attention").fit(tokens, y > 0, Z=clicks)
    Z = np.full((len(X), 2), np.nan)
    Z[:3] = 0.5
    with pytest.raises(ValueError, match="n_impute_neighbors=5 with 3 annotated rows"):
        LUABClassifier(impute_byproducts="knn").fit(X, y, Z=Z)


@pytest.mark.parametrize("head", ["linear", "mlp", "attention"])
def test_fits_in_concurrent_threads_equal_serial_fits(blobs, head):
    X, y, Z = blobs
    if head == "attention":
        X, Z = np.repeat(X[:, None, :], 4, axis=1) * np.linspace(0.5, 1.5, 4)[:, None], None
    params = {"head": head, "hidden_size": 8, "max_iter": 20, "random_state": 0}

    def fit_predict(_):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LUABClassifier(**params).fit(X, y, Z=Z)
        return clf.predict(X), clf.predict_proba(X)

    serial = fit_predict(None)
    with ThreadPoolExecutor(3) as pool:
        concurrent = list(pool.map(fit_predict, range(3)))
    for labels, proba in concurrent:
        np.testing.assert_array_equal(labels, serial[0])
        np.testing.assert_allclose(proba, serial[1], rtol=0, atol=1e-6)
