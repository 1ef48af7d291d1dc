"""Tests for LUABClassifier on pooled features (scikit-learn compliance, byproducts, errors)."""

import contextlib
import pickle
import warnings

import joblib
import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from luab_sk.datasets.synthetic import make_embedding_classification
from luab_sk.estimators import classifier
from luab_sk.estimators.classifier import LUABClassifier


@pytest.fixture(scope="module")
def data():
    """The demo setting: byproducts know the label subspace that X reveals weakly."""
    X, y, Z = make_embedding_classification(2500, 128, n_classes=10, signal_strength=0.2, random_state=0)
    return X[:500], y[:500], Z[:500], X[500:], y[500:]


def _fit(X, y, Z=None, **params):
    kwargs = {"head": "linear", "hidden_size": 8, "max_iter": 150, "random_state": 0} | params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        return LUABClassifier(**kwargs).fit(X, y, Z=Z)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_byproduct_weight_changes_predictions(data, head):
    X, y, Z, X_test, _ = data
    plain = _fit(X, y, Z, head=head, byproduct_weight=0.0)
    luab = _fit(X, y, Z, head=head, byproduct_weight=1.0)
    assert (plain.predict(X_test) != luab.predict(X_test)).mean() > 0.05
    np.testing.assert_array_equal(plain.predict(X_test), _fit(X, y, None, head=head).predict(X_test))


def test_real_byproducts_beat_shuffled_ones(data):
    X, y, Z, X_test, y_test = data
    shuffled = Z[np.random.default_rng(0).permutation(len(Z))]
    acc = {
        name: _fit(X, y, z, byproduct_weight=w).score(X_test, y_test)
        for name, w, z in [("plain", 0.0, None), ("luab", 1.0, Z), ("shuffled", 1.0, shuffled)]
    }
    assert acc["luab"] > acc["plain"] + 0.02
    assert acc["luab"] > acc["shuffled"] + 0.03


def test_predict_byproducts_in_z_units(data):
    X, y, Z, _, _ = data
    Z_scaled = Z * 10.0 + 3.0
    clf = _fit(X, y, Z_scaled, byproduct_weight=1.0)
    pred = clf.predict_byproducts(X)
    observed = ~np.isnan(Z_scaled)
    assert pred.shape == Z.shape and np.isfinite(pred).all()
    residual = ((pred - Z_scaled)[observed] ** 2).mean()
    assert residual < 0.7 * np.nanvar(Z_scaled)  # explains Z far better than its mean, in Z's units
    with pytest.raises(ValueError, match="fitted without byproducts"):
        _fit(X, y).predict_byproducts(X)


def test_missing_elements_are_masked(data):
    X, y, Z, X_test, _ = data
    partial = Z.copy()
    partial[:200, 0] = np.nan  # element-wise missing: these rows still train the other columns
    clf = _fit(X, y, partial)
    assert np.isfinite(clf.decision_function(X_test)).all() and np.isfinite(clf.loss_curve_).all()
    assert (clf.decision_function(X_test) != _fit(X, y, Z).decision_function(X_test)).any()
    # Missing rows contribute no byproduct loss: masking all but one row is not the same as no Z at all.
    one_row = np.full_like(Z, np.nan)
    one_row[1] = Z[1]
    assert (_fit(X, y, one_row).decision_function(X_test) != _fit(X, y).decision_function(X_test)).any()


def test_all_missing_z_warns_and_trains_without(data):
    X, y, Z, X_test, _ = data
    with pytest.warns(UserWarning, match="entirely missing"):
        clf = _fit(X, y, np.full_like(Z, np.nan), byproduct_weight=1.0)
    np.testing.assert_array_equal(clf.predict(X_test), _fit(X, y).predict(X_test))
    assert clf.n_byproducts_ == 0


def test_same_random_state_same_predictions(data):
    X, y, Z, X_test, _ = data
    a = _fit(X, y, Z, head="mlp", random_state=3).predict_proba(X_test)
    b = _fit(X, y, Z, head="mlp", random_state=3).predict_proba(X_test)
    np.testing.assert_array_equal(a, b)


def test_linear_head_rank_is_capped_and_fit_is_deterministic(data):
    X, y, Z, X_test, _ = data
    clf = _fit(X, y, Z, hidden_size=128, byproduct_weight=1.0)
    assert clf.module_.trunk.weight.shape == (10 + 8, 128)  # the rank of any 18 x 128 map
    assert _fit(X, y, hidden_size=128).module_.trunk.weight.shape == (10, 128)
    # The closed-form start draws no random numbers: the seed does not matter.
    other = _fit(X, y, Z, hidden_size=128, byproduct_weight=1.0, random_state=7)
    np.testing.assert_array_equal(clf.predict_proba(X_test), other.predict_proba(X_test))


def test_linear_head_start_and_preconditioner_speed_up_lbfgs(data, monkeypatch):
    """Same objective, same iteration budget: the reduced-rank start and whitening reach a lower value.

    (The factored L-BFGS path: taken with early stopping, which monitors every iteration.)
    """
    X, y, Z, _, _ = data
    factored = {"hidden_size": 18, "max_iter": 15, "early_stopping": True, "n_iter_no_change": 100}
    fast = _fit(X, y, Z, **factored)
    monkeypatch.setattr(classifier, "reduced_rank_init_", lambda *args, **kwargs: None)
    monkeypatch.setattr(classifier, "whitened", lambda *args, **kwargs: contextlib.nullcontext())
    plain = _fit(X, y, Z, **factored)
    assert plain.n_iter_ == 15 and fast.loss_curve_[-1] < 0.9 * plain.loss_curve_[-1]


def _convex_objective(clf, X, Z, y, sample_weight=None):
    """``f + alpha ||W2 W1||_*`` of a fitted linear head and its prox-gradient optimality measure."""
    import torch

    from luab_sk.nn.solvers import LinearProbeLoss, probe_optimality

    head = clf.module_
    x = torch.as_tensor(clf._transform_input(X.astype(np.float32))).double()
    z = torch.as_tensor(((Z - clf.z_mean_) / clf.z_scale_).astype(np.float32)).double()
    w = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float64)
    with torch.no_grad():
        M = (torch.cat([head.label_head.weight, head.byproduct_head.weight]) @ head.trunk.weight).double()
        b = torch.cat([head.label_head.bias, head.byproduct_head.bias]).double()
    loss = LinearProbeLoss(x, torch.as_tensor(np.searchsorted(clf.classes_, y)), z, w, n_outputs=10)
    return probe_optimality(loss, M, b, clf.alpha)


def test_linear_head_lbfgs_runs_the_convex_solver(data, monkeypatch):
    """Full-batch L-BFGS on the linear head solves the convex form: optimal, deterministic, warm-startable."""
    X, y, Z, X_test, _ = data
    calls = []
    solver = classifier.fit_linear_head
    monkeypatch.setattr(classifier, "fit_linear_head", lambda *a, **k: calls.append(k) or solver(*a, **k))
    clf = _fit(X, y, Z, hidden_size=18, max_iter=500, tol=1e-5)
    assert len(calls) == 1 and calls[0]["warm_start"] is False and calls[0]["tol"] == 1e-5
    assert 1 <= clf.n_iter_ < 500 and len(clf.epoch_times_) == 1 and np.isfinite(clf.loss_curve_).all()
    objective, optimality = _convex_objective(clf, X, Z, y)
    assert optimality <= 1e-4  # tol=1e-5, measured in float64 on float32 weights
    # Deterministic: the seed is irrelevant and a warm start from the optimum stays there.
    other = _fit(X, y, Z, hidden_size=18, max_iter=500, tol=1e-5, random_state=5)
    np.testing.assert_array_equal(clf.predict_proba(X_test), other.predict_proba(X_test))
    other.set_params(warm_start=True).fit(X, y, Z=Z)
    assert calls[-1]["warm_start"] is True and other.n_iter_ < clf.n_iter_ / 2, (other.n_iter_, clf.n_iter_)
    assert _convex_objective(other, X, Z, y)[0] == pytest.approx(objective, rel=1e-4)
    # Early stopping and AdamW keep the factored path.
    _fit(X, y, Z, hidden_size=18, max_iter=3, early_stopping=True)
    _fit(X, y, Z, hidden_size=18, max_iter=2, solver="adamw")
    assert len(calls) == 3
    # Same objective as the factored L-BFGS path (alpha / 2 on both factors == alpha ||M||_* at the
    # optimum): with the capability switched off, that path ends close to the convex optimum, not below.
    spec = classifier.HEADS["linear"]._replace(convex_solver=False)
    monkeypatch.setattr(classifier, "head_spec", lambda kind: spec)
    factored = _fit(X, y, Z, hidden_size=18, max_iter=500, tol=1e-5)
    assert len(calls) == 3
    f_factored = _convex_objective(factored, X, Z, y)[0]
    assert objective <= f_factored * (1 + 1e-5) and f_factored == pytest.approx(objective, rel=1e-2)
    # (the factored fit stalls about 1e-3 above the optimum here: close, not equal, predictions)
    assert (factored.predict(X_test) == clf.predict(X_test)).mean() > 0.9


def test_linear_head_convex_solver_honours_sample_weight(data):
    """Integer weights and repeated rows are one objective (standardised beforehand: the estimator's
    standardisation would see the repeated rows)."""
    X, y, Z, X_test, _ = data
    mean, scale = X[:200].mean(0), X[:200].std(0)
    X, y, Z, X_test = (X[:200] - mean) / scale, y[:200], Z[:200], (X_test - mean) / scale
    weights = np.r_[np.full(100, 2.0), np.ones(100)]
    # tol well below the default: on 200 samples in 128 dimensions the objective is flat, and two fits
    # that stop at tol=1e-5 on the two (equal) objectives can sit 1e-2 apart in their coefficients
    params = {"hidden_size": 18, "alpha": 1e-3, "max_iter": 5000, "tol": 1e-8, "standardize": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", sklearn.exceptions.ConvergenceWarning)
        weighted = LUABClassifier(head="linear", **params).fit(X, y, Z=Z, sample_weight=weights)
        repeated = LUABClassifier(head="linear", **params)
        repeated.fit(np.r_[X, X[:100]], np.r_[y, y[:100]], Z=np.r_[Z, Z[:100]])
        plain = LUABClassifier(head="linear", **params).fit(X, y, Z=Z)
    np.testing.assert_allclose(weighted.predict_proba(X_test), repeated.predict_proba(X_test), atol=1e-2)
    assert np.abs(weighted.predict_proba(X_test) - plain.predict_proba(X_test)).max() > 0.05


def test_string_binary_and_multilabel_targets(data):
    X, y, Z, X_test, _ = data
    names = np.array(["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"])
    clf = _fit(X, names[y], Z)
    assert set(clf.predict(X_test)) <= set(names) and clf.classes_.tolist() == sorted(names)

    binary = _fit(X, np.where(y < 5, "low", "high"), Z)
    assert binary.decision_function(X_test).shape == (len(X_test),)
    proba = binary.predict_proba(X_test)
    assert proba.shape == (len(X_test), 2)
    np.testing.assert_array_equal(binary.classes_[proba.argmax(1)], binary.predict(X_test))

    Y = np.stack([y < 5, y % 2 == 0, y == 3], axis=1).astype(int)
    multi = _fit(X, Y, Z)
    pred = multi.predict(X_test)
    assert pred.shape == (len(X_test), 3) and set(np.unique(pred)) <= {0, 1}
    assert multi.predict_proba(X_test).shape == (len(X_test), 3) and multi.task_ == "multilabel"
    assert multi.score(X[:100], Y[:100]) > 0.5


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_solvers_and_early_stopping(data, solver):
    X, y, Z, X_test, y_test = data
    clf = _fit(X, y, Z, solver=solver, early_stopping=True, max_iter=40, n_iter_no_change=3, batch_size=64)
    assert 1 <= clf.n_iter_ <= 40 and len(clf.validation_scores_) == clf.n_iter_
    assert len(clf.loss_curve_) == clf.n_iter_
    assert clf.score(X_test, y_test) > 0.3  # chance is 0.1


def test_lbfgs_reports_non_convergence(data):
    X, y, Z, _, _ = data
    with pytest.warns(sklearn.exceptions.ConvergenceWarning, match="did not converge in max_iter=2"):
        LUABClassifier(head="linear", max_iter=2, random_state=0).fit(X, y, Z=Z)


def test_a_solver_that_stops_short_of_tol_says_so(data, monkeypatch):
    """A convex fit that ends before max_iter without reaching tol (no decrease left at float precision) is
    reported as such, not as a max_iter stop."""
    import luab_sk.nn.solvers as solvers

    real = solvers.fit_linear_probe

    def short(*args, **kwargs):
        fit = real(*args, **{**kwargs, "max_iter": 3})
        fit.converged = False
        return fit

    monkeypatch.setattr(solvers, "fit_linear_probe", short)
    X, y, Z, _, _ = data
    with pytest.warns(sklearn.exceptions.ConvergenceWarning, match="stopped after 3 of max_iter=200"):
        clf = LUABClassifier(head="linear", random_state=0).fit(X, y, Z=Z)
    assert clf.n_iter_ == 3


def test_knn_imputation_fills_missing_rows(data):
    X, y, Z, X_test, _ = data
    clf = _fit(X, y, Z, impute_byproducts="knn", n_impute_neighbors=3)
    assert (clf.predict(X_test) != _fit(X, y, Z).predict(X_test)).any()


def test_grid_search_routing_off_and_on(data):
    X, y, Z, _, _ = data
    X, y, Z = X[:200], y[:200], Z[:200]
    grid = {"byproduct_weight": [0.0, 1.0]}
    est = LUABClassifier(head="linear", hidden_size=8, max_iter=30, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        off = GridSearchCV(est, grid, cv=3).fit(X, y, Z=Z)
        with sklearn.config_context(enable_metadata_routing=True):
            on = GridSearchCV(est, grid, cv=3).fit(X, y, Z=Z)
            pipe = make_pipeline(StandardScaler(), clone(est))
            routed = cross_validate(pipe, X, y, params={"Z": Z}, cv=3)
            piped = GridSearchCV(pipe, {"luabclassifier__byproduct_weight": [0.0, 1.0]}, cv=3).fit(X, y, Z=Z)
            routed_fit = clone(pipe).fit(X, y, Z=Z)
        step = make_pipeline(StandardScaler(), clone(est)).fit(X, y, luabclassifier__Z=Z)
    np.testing.assert_allclose(off.cv_results_["mean_test_score"], on.cv_results_["mean_test_score"])
    assert routed["test_score"].shape == (3,)
    assert step[-1].n_byproducts_ == Z.shape[1]
    assert piped.cv_results_["mean_test_score"].shape == (2,)
    assert routed_fit[-1].n_byproducts_ == Z.shape[1]  # Z=Z reached the last step through the pipeline


def test_clone_pickle_joblib_round_trip(data, tmp_path):
    X, y, Z, X_test, _ = data
    clf = _fit(X, y, Z, head="mlp")
    assert clone(clf).get_params() == clf.get_params() and not hasattr(clone(clf), "module_")
    expected = clf.predict_proba(X_test)
    module = clf.module_
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).predict_proba(X_test), expected)
    assert clf.module_ is module  # pickling leaves the live estimator (and its device) alone
    joblib.dump(clf, tmp_path / "clf.joblib")
    restored = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_array_equal(restored.predict_proba(X_test), expected)
    assert all(p.device.type == "cpu" for p in pickle.loads(pickle.dumps(clf)).module_.parameters())


@pytest.mark.parametrize(
    ("Z", "error", "match"),
    [
        (lambda Z: Z[:-1], ValueError, "Z has 499 rows but X has 500 samples"),
        (lambda Z: Z.T, ValueError, "Z has 8 rows but X has 500 samples"),
        (lambda Z: {"points": Z}, TypeError, "got a dict; scikit-learn .* only splits"),
        (lambda Z: Z[:, 0], ValueError, r"Z must be 2-D .* use Z.reshape\(-1, 1\)"),
        (lambda Z: np.where(np.isnan(Z), np.inf, Z), ValueError, "Z contains infinity"),
        (lambda Z: np.full(Z.shape, "a"), ValueError, "Z must hold numbers"),
    ],
)
def test_bad_z_is_rejected(data, Z, error, match):
    X, y, Z0, _, _ = data
    with pytest.raises(error, match=match):
        LUABClassifier().fit(X, y, Z=Z(Z0))


def test_bad_x_y_and_params_are_rejected(data):
    X, y, Z, _, _ = data
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        LUABClassifier().fit(bad, y)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="Input X contains infinity"):
        LUABClassifier().fit(bad, y)
    with pytest.raises(ValueError, match="y has only one class"):
        LUABClassifier().fit(X, np.zeros(len(X)))
    with pytest.raises(NotFittedError):
        LUABClassifier().predict(X)
    clf = _fit(X, y, max_iter=5)
    with pytest.raises(ValueError, match="X has 127 features"):
        clf.predict(X[:, :-1])
    with pytest.raises(ValueError, match="byproduct_target='heatmap' does not fit head='mlp'"):
        LUABClassifier(byproduct_target="heatmap").fit(X, y, Z=Z)
    with pytest.raises(ValueError, match="attention_maps needs head='attention'"):
        clf.attention_maps(X)


def test_warm_start_continues_and_checks_the_refit(data):
    X, y, Z, _, _ = data
    clf = _fit(X, y, Z, warm_start=True, max_iter=10)
    first_curve = clf.loss_curve_
    module = clf.module_
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        clf.fit(X, y, Z=Z)
    # A copy is trained and kept on success, so a failed continuation could not break the fitted model;
    # it starts where the first fit stopped (the L-BFGS curve is the smoothed objective: at most the exact)
    assert clf.module_ is not module and clf.loss_curve_[0] <= first_curve[-1] + 1e-6
    module = clf.module_
    assert clf.loss_curve_[-1] <= first_curve[-1]
    with pytest.raises(
        ValueError, match="warm_start=True: Z has 3 columns, but the model fitted before takes 8"
    ):
        clf.fit(X, y, Z=Z[:, :3])
    with pytest.raises(ValueError, match="warm_start=True needs the classes of the previous fit"):
        clf.fit(X, y % 3, Z=Z)
    with pytest.raises(ValueError, match="X has 127 features"):
        clf.fit(X[:, :-1], y, Z=Z)
    # Without warm_start every fit starts afresh, whatever Z's width was before.
    clf.set_params(warm_start=False, max_iter=200).fit(X, y, Z=Z[:, :3])
    assert clf.n_byproducts_ == 3 and clf.module_ is not module


def test_minibatch_solver_streams_a_memmap_and_matches_the_full_batch_fit(data, tmp_path, monkeypatch):
    X, y, Z, X_test, y_test = data
    np.save(tmp_path / "X.npy", X)
    X_map = np.load(tmp_path / "X.npy", mmap_mode="r")
    calls = []
    real = classifier.fit_linear_probe_minibatch

    def spy(X_arg, *args, **kwargs):
        calls.append(X_arg)
        return real(X_arg, *args, **kwargs)

    monkeypatch.setattr(classifier, "fit_linear_probe_minibatch", spy)
    params = {"head": "linear", "hidden_size": 18, "batch_size": 64, "learning_rate": 1e-2, "random_state": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        mini = LUABClassifier(solver="minibatch", max_iter=40, **params).fit(X_map, y, Z=Z)
    full = LUABClassifier(solver="lbfgs", **params).fit(X, y, Z=Z)
    # the memmap itself reached the solver (not a standardised copy), and the scaling is the full fit's
    assert len(calls) == 1 and np.shares_memory(calls[0], X_map)
    np.testing.assert_allclose(mini.x_mean_, full.x_mean_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mini.x_scale_, full.x_scale_, rtol=1e-4)
    assert mini.n_iter_ <= 40 and len(mini.loss_curve_) == mini.n_iter_
    assert mini.score(X_test, y_test) >= full.score(X_test, y_test) - 0.05
    assert mini.predict_byproducts(X_test).shape == (X_test.shape[0], Z.shape[1])
    # warm start continues from the fitted map
    mini.set_params(warm_start=True, max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        before = mini.loss_curve_[-1]
        mini.fit(X_map, y, Z=Z)
    assert mini.loss_curve_[0] < 1.5 * before


def test_auto_solver_routes_large_linear_probes_to_minibatch(data, monkeypatch):
    X, y, Z, _, _ = data
    monkeypatch.setattr(classifier, "_LBFGS_MAX_ELEMENTS", X.size - 1)
    assert LUABClassifier(head="linear")._resolve_solver(X) == "minibatch"
    assert LUABClassifier(head="linear", early_stopping=True)._resolve_solver(X) == "minibatch"
    assert LUABClassifier(head="linear", impute_byproducts="knn")._resolve_solver(X) == "adamw"
    assert LUABClassifier(head="mlp")._resolve_solver(X) == "adamw"
    monkeypatch.setattr(classifier, "_LBFGS_MAX_ELEMENTS", X.size)
    assert LUABClassifier(head="linear")._resolve_solver(X) == "lbfgs"


def test_minibatch_early_stopping_holds_out_rows_and_restores_the_best_epoch(data, tmp_path, monkeypatch):
    """The validation rows get weight 0 in the stream (X is still the memmap); the best epoch is kept."""
    X, y, Z, X_test, y_test = data
    np.save(tmp_path / "X.npy", X)
    X_map = np.load(tmp_path / "X.npy", mmap_mode="r")
    seen = {}
    real = classifier.fit_linear_probe_minibatch

    def spy(X_arg, y_arg, z_arg, weight_arg, **kwargs):
        seen.update(X=X_arg, weight=weight_arg, tol=kwargs["tol"])
        return real(X_arg, y_arg, z_arg, weight_arg, **kwargs)

    monkeypatch.setattr(classifier, "fit_linear_probe_minibatch", spy)
    params = dict(head="linear", hidden_size=18, batch_size=64, learning_rate=0.05, random_state=0)
    clf = LUABClassifier(
        solver="minibatch",
        max_iter=30,
        early_stopping=True,
        validation_fraction=0.2,
        n_iter_no_change=3,
        **params,
    ).fit(X_map, y, Z=Z)
    assert np.shares_memory(seen["X"], X_map) and seen["tol"] is None  # the validation score stops it
    held_out = seen["weight"] == 0
    assert held_out.sum() == round(0.2 * len(y)) and np.all(seen["weight"][~held_out] == 1)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ < 30 and len(clf.loss_curve_) == clf.n_iter_
    best = int(np.argmax(scores))
    assert best == clf.n_iter_ - 1 - 3  # stopped after 3 epochs without improvement
    # the restored head is the best epoch's: its validation score is the best one
    x_val = clf._transform_input(X[held_out])
    with torch.no_grad():
        restored = clf._validation_score(
            clf.module_,
            torch.as_tensor(x_val),
            torch.as_tensor(np.searchsorted(clf.classes_, y[held_out])),
            None,
        )
    assert restored == pytest.approx(scores[best], rel=1e-5, abs=1e-6)
    assert clf.score(X_test, y_test) > 0.5


@pytest.mark.parametrize(
    "params, match",
    [
        ({"head": "mlp"}, "solver='minibatch' trains the linear head only, got head='mlp'"),
        ({"impute_byproducts": "knn"}, "impute_byproducts='knn' needs all of X in memory"),
    ],
)
def test_minibatch_solver_refuses_what_it_cannot_do(data, params, match):
    X, y, Z, _, _ = data
    with pytest.raises(ValueError, match=match):
        LUABClassifier(**{"head": "linear", "solver": "minibatch", **params}).fit(X, y, Z=Z)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_standardization_matches_two_pass_and_never_writes_x(dtype):
    """The estimator standardises X in blocks: large offsets keep their precision, X is only read."""
    from luab_sk.estimators._base import nan_standardization, streaming_standardization

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(5000, 4)) * [1.0, 1e-3, 1e3, 1.0] + [1e4, 0.0, -5.0, 0.0]).astype(dtype)
    X[:, 3] = 7.0  # constant column: scale 1
    before = X.copy()
    for rows in (512, 4096, 10_000):
        mean, scale = streaming_standardization(X, chunk_rows=rows)
        ref_mean, ref_scale = nan_standardization(X)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(scale, ref_scale, rtol=1e-9)
        assert scale[3] == 1.0
    np.testing.assert_array_equal(X, before)
