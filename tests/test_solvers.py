"""Tests of the convex linear-probe solvers (luab_sk.nn.solvers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from luab_sk.nn import PooledHead, label_loss, masked_regression_loss
from luab_sk.nn.solvers import (
    LinearProbeLoss,
    fit_linear_probe,
    fit_linear_probe_minibatch,
    nuclear_prox,
    probe_optimality,
)


def _data(n=240, d=12, k=3, n_classes=4, seed=0, dtype=torch.float64, missing=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x[:, 0] *= 5.0  # some ill-conditioning
    w_true = torch.randn(n_classes, d, generator=g, dtype=dtype)
    y = (x @ w_true.T + torch.randn(n, n_classes, generator=g, dtype=dtype)).argmax(1)
    z = x[:, :k] * 0.5 + 0.3 * torch.randn(n, k, generator=g, dtype=dtype)
    drop = torch.rand(n, generator=g) < missing
    z[drop] = float("nan")
    z[torch.rand(n, k, generator=g) < 0.1] = float("nan")
    return x, y, z


def _objective_autograd(M, b, x, y, z, w, alpha, bw, kind, K):
    out = x @ M.T + b
    value = label_loss(out[:, :K], y, "multiclass", sample_weight=w)
    if z is not None and bw > 0:
        value = value + bw * masked_regression_loss(out[:, K:], z, kind, sample_weight=w)
    return value + alpha * torch.linalg.matrix_norm(M, ord="nuc")


@pytest.mark.parametrize("kind", ["smooth_l1", "l2", "l1"])
def test_loss_matches_library_losses_and_autograd(kind):
    x, y, z = _data()
    g = torch.Generator().manual_seed(1)
    w = torch.rand(x.shape[0], generator=g, dtype=x.dtype) + 0.1
    M = torch.randn(4 + 3, x.shape[1], generator=g, dtype=x.dtype, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=x.dtype, requires_grad=True)
    loss = LinearProbeLoss(x, y, z, w, n_outputs=4, byproduct_weight=0.7, byproduct_loss=kind)
    f, g_m, g_b = loss(M.detach(), b.detach())
    ref = _objective_autograd(M, b, x, y, z, w, 0.0, 0.7, kind, 4)
    ref.backward()
    assert f == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(g_m, M.grad)
    torch.testing.assert_close(g_b, b.grad)


def test_nuclear_prox_is_singular_value_shrinkage():
    M = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    P, s = nuclear_prox(M, 0.75)
    torch.testing.assert_close(P, torch.diag(torch.tensor([2.25, 0.25, 0.0], dtype=torch.float64)))
    P, s = nuclear_prox(M, 0.75, rank=1)
    assert int((s > 0).sum()) == 1


def _reference_by_factored_lbfgs(x, y, z, w, alpha, bw, K, rank):
    """Slow reference: many L-BFGS iterations on the factored form with L2 on both factors."""
    g = torch.Generator().manual_seed(3)
    m = K + (z.shape[1] if z is not None and bw > 0 else 0)
    W1 = (0.1 * torch.randn(rank, x.shape[1], generator=g, dtype=x.dtype)).requires_grad_(True)
    W2 = (0.1 * torch.randn(m, rank, generator=g, dtype=x.dtype)).requires_grad_(True)
    b = torch.zeros(m, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W1, W2, b],
        max_iter=4000,
        tolerance_grad=1e-12,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        out = x @ (W2 @ W1).T + b
        value = label_loss(out[:, :K], y, "multiclass", sample_weight=w)
        if m > K:
            value = value + bw * masked_regression_loss(out[:, K:], z, "smooth_l1", sample_weight=w)
        value = value + 0.5 * alpha * (W1.pow(2).sum() + W2.pow(2).sum())
        value.backward()
        return value

    opt.step(closure)
    return float(closure()), (W2 @ W1).detach(), b.detach()


def test_reaches_the_factored_optimum_and_the_optimality_conditions():
    x, y, z = _data()
    w = torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype)
    alpha, bw = 0.02, 1.0
    fit = fit_linear_probe(x, y, z, w, n_outputs=4, alpha=alpha, byproduct_weight=bw, tol=1e-7, max_iter=3000)
    assert fit.converged and fit.optimality <= 1e-7
    ref_value, ref_M, _ = _reference_by_factored_lbfgs(x, y, z, w, alpha, bw, 4, rank=7)
    assert fit.objective <= ref_value + 1e-7
    assert fit.objective == pytest.approx(ref_value, abs=1e-5)
    # subgradient check: -grad f = alpha (U V^T + E), U^T E = 0, E V = 0, ||E||_2 <= 1
    loss = LinearProbeLoss(x, y, z, w, n_outputs=4, byproduct_weight=bw)
    _, g_m, g_b = loss(fit.coef, fit.intercept)
    u, s, vh = torch.linalg.svd(fit.coef, full_matrices=False)
    r = int((s > 1e-5).sum())
    assert 0 < r < min(fit.coef.shape)  # the nuclear norm made it low rank here
    U, V = u[:, :r], vh[:r].T
    torch.testing.assert_close(U.T @ (-g_m) @ V, alpha * torch.eye(r, dtype=x.dtype), atol=1e-5, rtol=0)
    E = (-g_m - alpha * U @ V.T) / alpha
    assert float(torch.linalg.matrix_norm(E, ord=2)) <= 1 + 1e-4
    assert float(g_b.abs().max()) <= 1e-6
    # APG reaches the same optimum
    apg = fit_linear_probe(
        x, y, z, w, n_outputs=4, alpha=alpha, byproduct_weight=bw, tol=1e-7, max_iter=20000, method="apg"
    )
    assert apg.objective == pytest.approx(fit.objective, abs=1e-6)


def test_nan_rows_of_z_are_ignored_and_weight_zero_ignores_z():
    x, y, z = _data()
    kw = dict(n_outputs=4, alpha=0.01, tol=1e-8, max_iter=2000)
    fit = fit_linear_probe(x, y, z, byproduct_weight=1.0, **kw)
    # a Z whose every element is missing contributes nothing: the label rows are the plain fit's
    plain = fit_linear_probe(x, y, None, byproduct_weight=0.0, **kw)
    empty = fit_linear_probe(x, y, torch.full_like(z, float("nan")), byproduct_weight=1.0, **kw)
    torch.testing.assert_close(empty.coef[:4], plain.coef, atol=1e-5, rtol=0)
    # NaN rows are masked, not zero targets: zeros in their place change the fit
    zeros = torch.nan_to_num(z, nan=0.0)
    filled = fit_linear_probe(x, y, zeros, byproduct_weight=1.0, **kw)
    assert not torch.allclose(filled.coef, fit.coef, atol=1e-4)
    # weight 0 ignores Z entirely, even a Z full of other values
    other = fit_linear_probe(x, y, torch.randn_like(z), byproduct_weight=0.0, **kw)
    assert plain.coef.shape[0] == 4 and torch.equal(plain.coef, other.coef)
    # and Z does change the label rows when weighted
    assert not torch.allclose(plain.coef, fit.coef[:4], atol=1e-4)


def test_sample_weights_equal_repeated_rows():
    x, y, z = _data(n=120)
    kw = dict(n_outputs=4, alpha=0.01, tol=1e-8, max_iter=3000, byproduct_weight=0.5)
    w = torch.ones(x.shape[0], dtype=x.dtype)
    w[:30] = 2.0
    weighted = fit_linear_probe(x, y, z, w, **kw)
    rep = torch.cat([torch.arange(x.shape[0]), torch.arange(30)])
    repeated = fit_linear_probe(x[rep], y[rep], z[rep], **kw)
    torch.testing.assert_close(weighted.coef, repeated.coef, atol=1e-5, rtol=0)
    torch.testing.assert_close(weighted.intercept, repeated.intercept, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_deterministic(dtype):
    x, y, z = _data(dtype=dtype)
    kw = dict(n_outputs=4, alpha=0.01, byproduct_weight=1.0, tol=1e-4, max_iter=500)
    a = fit_linear_probe(x, y, z, **kw)
    b = fit_linear_probe(x, y, z, **kw)
    assert a.coef.dtype == dtype and a.converged
    assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, b.intercept)
    ref = fit_linear_probe(x.double(), y, z.double(), **{**kw, "tol": 1e-8, "max_iter": 3000})
    assert a.objective == pytest.approx(ref.objective, abs=1e-4)


def test_load_into_head_reproduces_the_map_and_balanced_penalty():
    x, y, z = _data()
    alpha = 0.02
    fit = fit_linear_probe(x, y, z, n_outputs=4, alpha=alpha, byproduct_weight=1.0, tol=1e-8, max_iter=2000)
    head = PooledHead(x.shape[1], 4, 3, kind="linear", hidden_size=7).double()
    fit.load_into(head)
    out = head(x)
    torch.testing.assert_close(out.logits, x @ fit.coef[:4].T + fit.intercept[:4])
    torch.testing.assert_close(out.byproducts, x @ fit.coef[4:].T + fit.intercept[4:])
    l2 = sum(float(p.pow(2).sum()) for n, p in head.named_parameters() if n.endswith("weight"))
    nuc = float(torch.linalg.matrix_norm(fit.coef, ord="nuc"))
    assert 0.5 * l2 == pytest.approx(nuc, rel=1e-8)


def test_rank_cap_gives_low_rank_solution():
    x, y, z = _data()
    fit = fit_linear_probe(
        x, y, z, n_outputs=4, alpha=1e-3, byproduct_weight=1.0, tol=1e-5, max_iter=2000, rank=2
    )
    assert int((torch.linalg.svdvals(fit.coef) > 1e-10).sum()) <= 2
    objective, _ = probe_optimality(
        LinearProbeLoss(x, y, z, n_outputs=4, byproduct_weight=1.0), fit.coef, fit.intercept, 1e-3, rank=2
    )
    assert objective == pytest.approx(fit.objective)


class _CountingMemmap:
    """Wraps a memmap; records every slice read and refuses whole-array conversion."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape = array.shape

    def __getitem__(self, index):
        assert isinstance(index, slice)
        self.reads.append((index.start, index.stop))
        return self.array[index]

    def __array__(self, *args, **kwargs):  # pragma: no cover - failing path
        raise AssertionError("X was converted whole")


def test_minibatch_reads_memmap_in_batches_without_copy(tmp_path):
    x, y, _ = _data(n=600, dtype=torch.float32)
    path = tmp_path / "X.npy"
    np.save(path, x.numpy())
    X = _CountingMemmap(np.load(path, mmap_mode="r"))
    assert isinstance(X.array, np.memmap)
    seen = []
    fit = fit_linear_probe_minibatch(
        X,
        y.numpy(),
        n_outputs=4,
        alpha=1e-4,
        batch_size=100,
        max_epochs=30,
        learning_rate=0.05,
        callback=lambda epoch, M, b: seen.append(epoch) or False,
    )
    assert len(X.reads) == 6 * 30 and all(hi - lo <= 100 for lo, hi in X.reads)
    assert seen == list(range(1, 31)) and fit.n_iter == 30
    acc = float(((x @ fit.coef.T + fit.intercept).argmax(1) == y).float().mean())
    full = fit_linear_probe(x, y, n_outputs=4, alpha=1e-4, byproduct_weight=0.0, tol=1e-5, max_iter=500)
    acc_full = float(((x @ full.coef.T + full.intercept).argmax(1) == y).float().mean())
    assert acc >= acc_full - 0.03
    again = fit_linear_probe_minibatch(
        _CountingMemmap(np.load(path, mmap_mode="r")),
        y.numpy(),
        n_outputs=4,
        alpha=1e-4,
        batch_size=100,
        max_epochs=30,
        learning_rate=0.05,
    )
    assert torch.equal(again.coef, fit.coef)


def test_fit_linear_head_hook_matches_the_estimator_objective():
    from luab_sk.nn import multitask_loss
    from luab_sk.nn.solvers import fit_linear_head

    x, y, z = _data(dtype=torch.float32)
    head = PooledHead(x.shape[1], 4, 3, kind="linear", hidden_size=7)
    fit = fit_linear_head(
        head, x, y, z, task="multiclass", alpha=0.01, byproduct_weight=1.0, tol=1e-4, max_iter=500
    )
    assert fit.converged
    with torch.no_grad():
        total = multitask_loss(head(x), y, z, task="multiclass", byproduct_weight=1.0).total
        l2 = sum(p.pow(2).sum() for n, p in head.named_parameters() if n.endswith("weight"))
    assert float(total + 0.005 * l2) == pytest.approx(fit.objective, rel=1e-4)
    again = fit_linear_head(
        head,
        x,
        y,
        z,
        task="multiclass",
        alpha=0.01,
        byproduct_weight=1.0,
        tol=1e-4,
        max_iter=500,
        warm_start=True,
    )
    assert again.n_iter <= 2 and again.objective == pytest.approx(fit.objective, rel=1e-4)


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_binary_and_multilabel_tasks_converge(task):
    x, y, z = _data()
    if task == "binary":
        target, K = (y % 2).to(torch.float64), 1
    else:
        target, K = torch.stack([y % 2, (y > 1).long()], 1).to(torch.float64), 2
    fit = fit_linear_probe(x, target, z, task=task, alpha=1e-3, byproduct_weight=0.5, tol=1e-6, max_iter=2000)
    assert fit.converged and fit.n_outputs == K and fit.coef.shape == (K + 3, x.shape[1])
    plain = fit_linear_probe(x, target, task=task, alpha=1e-3, byproduct_weight=0.0, tol=1e-6, max_iter=2000)
    assert plain.converged and plain.coef.shape == (K, x.shape[1])


def test_minibatch_tol_stop_warm_start_and_init_checks(tmp_path):
    x, y, _ = _data(n=600, dtype=torch.float32)
    kw = dict(n_outputs=4, alpha=1e-4, batch_size=100, learning_rate=0.05)
    stopped = fit_linear_probe_minibatch(
        x.numpy(), y.numpy(), max_epochs=200, tol=1e-2, n_iter_no_change=3, **kw
    )
    assert stopped.converged and 4 <= stopped.n_iter < 200
    # the rule: none of the last n_iter_no_change epochs improved on the best before it by tol
    best = min(stopped.loss_curve[:-3])
    for value in stopped.loss_curve[-3:]:
        assert value >= best - 1e-2 * max(abs(best), 1.0)
        best = min(best, value)
    warm = fit_linear_probe_minibatch(
        x.numpy(), y.numpy(), max_epochs=1, init=(stopped.coef, stopped.intercept), **kw
    )
    cold = fit_linear_probe_minibatch(x.numpy(), y.numpy(), max_epochs=1, **kw)
    assert warm.loss_curve[0] < cold.loss_curve[0]
    with pytest.raises(ValueError, match=r"init must be \(M, b\) of shapes \(4, 12\) and \(4,\)"):
        fit_linear_probe_minibatch(x.numpy(), y.numpy(), init=(stopped.coef[:3], stopped.intercept), **kw)


def test_byproduct_rows_are_rescaled_to_the_label_rows_curvature():
    from luab_sk.nn.solvers import _row_scale

    x, y, z = _data(n=400)
    loss = LinearProbeLoss(x, y, z, task="multiclass", n_outputs=4, byproduct_weight=2.0, beta=0.5)
    p = torch.bincount(y, minlength=4).double() / 400
    label = float((p * (1 - p)).mean())
    observed = (~torch.isnan(z)).double()
    z_curv = 2.0 * observed.sum(0) / observed.sum() / 0.5  # weight * share of observed entries / beta
    expected = torch.cat([torch.ones(4, dtype=torch.float64), (z_curv / label).sqrt()])
    torch.testing.assert_close(_row_scale(loss), expected)
    no_z = LinearProbeLoss(x, y, None, task="multiclass", n_outputs=4)
    torch.testing.assert_close(_row_scale(no_z), torch.ones(4, dtype=torch.float64))


def test_multiclass_intercepts_are_centred_and_an_optimal_warm_start_returns_at_once():
    x, y, z = _data()
    kw = dict(n_outputs=4, alpha=0.01, byproduct_weight=1.0, tol=1e-4, max_iter=500)
    fit = fit_linear_probe(x, y, z, **kw)
    assert fit.converged and abs(float(fit.intercept[:4].sum())) < 1e-10
    again = fit_linear_probe(x, y, z, init=(fit.coef, fit.intercept), **kw)
    assert again.n_iter == 0 and again.converged and torch.equal(again.coef, fit.coef)
    assert again.objective == pytest.approx(fit.objective, rel=1e-12)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_default_tol_reaches_the_reference_objective_with_and_without_z(weight):
    """The row preconditioning and the ridge start of the byproduct rows leave a small objective gap."""
    x, y, z = _data(n=2000, d=40, k=6, n_classes=8)
    kw = dict(n_outputs=8, alpha=1e-3, byproduct_weight=weight)
    fit = fit_linear_probe(x.float(), y, z.float(), **kw)
    ref = fit_linear_probe(x, y, z, tol=1e-8, max_iter=2000, **kw)
    assert fit.converged
    assert fit.objective - ref.objective < 1e-4 * max(1.0, abs(ref.objective))


def _spectrum_data(n, d, spread, n_classes=5, k=2, seed=0):
    """Features with a flat (``spread=False``) or power-law (``True``) covariance spectrum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if spread:
        x = x * torch.arange(1, d + 1, dtype=torch.float64) ** -1.0
        x = x @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    x = (x - x.mean(0)) / x.std(0)
    y = (x @ torch.randn(d, n_classes, generator=g, dtype=torch.float64)).argmax(1)
    z = x[:, :k] + 0.1 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return x, y, z


def test_participation_ratio_sketch_tracks_the_exact_value():
    from luab_sk.nn.solvers import _participation_ratio

    for spread in (False, True):
        x, y, _ = _spectrum_data(3000, 64, spread)
        cov = torch.cov(x.T, correction=0)
        exact = float(torch.trace(cov) ** 2 / (cov * cov).sum())
        sketched = _participation_ratio(LinearProbeLoss(x, y, n_outputs=5))
        assert 0.5 * exact < sketched < 2.0 * exact
    flat = _participation_ratio(LinearProbeLoss(*_spectrum_data(3000, 64, False)[:2], n_outputs=5))
    concentrated = _participation_ratio(LinearProbeLoss(*_spectrum_data(3000, 64, True)[:2], n_outputs=5))
    assert concentrated < 0.25 * 64 < flat


@pytest.mark.parametrize(
    ("n", "d", "spread", "n_classes", "use_z", "expected"),
    [
        (3000, 64, True, 40, True, "all"),  # cheap covariance, concentrated variance: every row
        (3000, 256, True, 10, False, "all"),  # the covariance costs ~13 evaluations: within the budget
        (3000, 64, False, 40, True, "byproducts"),  # flat spectrum: the regression rows only
        (3000, 64, False, 40, False, "none"),
        (3000, 1024, True, 3, True, "byproducts"),  # few rows: the covariance costs ~114 evaluations
        (100, 200, True, 40, True, "none"),  # n < d
    ],
)
def test_whitening_decision_follows_costs_and_spectrum(n, d, spread, n_classes, use_z, expected):
    from luab_sk.nn.solvers import _whitened_rows

    x, y, z = _spectrum_data(n, d, spread, n_classes=n_classes)
    loss = LinearProbeLoss(x, y, z if use_z else None, n_outputs=n_classes)
    start = _whitened_rows(loss, None)
    assert {0: "all", n_classes: "byproducts", None: "none"}[start] == expected
    assert _whitened_rows(loss, True) == 0 and _whitened_rows(loss, False) is None
    assert _whitened_rows(loss, "byproducts") == (n_classes if use_z else None)


@pytest.mark.parametrize("whiten", ["all", 1, "none"])
def test_an_unknown_whitening_choice_is_refused(whiten):
    x, y, _ = _data(n=50, d=4)
    with pytest.raises(ValueError, match=r"whiten must be None, True, False or 'byproducts'"):
        fit_linear_probe(x, y, n_outputs=4, whiten=whiten)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_every_whitening_choice_reaches_the_same_optimum(weight):
    """Whitening is a change of variables: the objective and its minimiser do not depend on it."""
    x, y, z = _spectrum_data(1500, 30, True, n_classes=6, k=3)
    kw = dict(n_outputs=6, alpha=1e-3, byproduct_weight=weight, tol=1e-6, max_iter=3000)
    ref = fit_linear_probe(x, y, z, **{**kw, "tol": 1e-9})
    for whiten in (None, True, False, "byproducts"):
        fit = fit_linear_probe(x, y, z, whiten=whiten, **kw)
        assert fit.converged, whiten
        assert fit.objective - ref.objective < 1e-6 * max(1.0, abs(ref.objective)), whiten


def test_whitening_falls_back_to_a_float64_factor_when_float32_fails(monkeypatch):
    """The covariance is factored in x's dtype; a failed float32 Cholesky is redone in float64."""
    from luab_sk.nn import solvers

    x, y, z = _spectrum_data(1500, 30, True, n_classes=6, k=3)
    x = x.float()
    kw = dict(n_outputs=6, alpha=1e-3, byproduct_weight=1.0, tol=1e-4, whiten=True)
    ref = fit_linear_probe(x, y, z.float(), **kw)
    dtypes = []
    real = torch.linalg.cholesky_ex

    def failing(a):  # what LAPACK reports for a matrix that is not positive definite in float32
        dtypes.append(a.dtype)
        factor, _ = real(a)
        return factor, torch.ones((), dtype=torch.int32)

    real_float64 = torch.linalg.cholesky

    def recorded(a):
        dtypes.append(a.dtype)
        return real_float64(a)

    monkeypatch.setattr(solvers.torch.linalg, "cholesky_ex", failing)
    monkeypatch.setattr(solvers.torch.linalg, "cholesky", recorded)
    fit = fit_linear_probe(x, y, z.float(), **kw)
    assert dtypes == [torch.float32, torch.float64]
    assert fit.converged and ref.converged
    assert abs(fit.objective - ref.objective) < 1e-4 * abs(ref.objective)


def test_minibatch_skips_blocks_whose_rows_all_have_zero_weight():
    x, y, _ = _data(n=200, d=6)
    weight = np.ones(200, np.float32)
    weight[:50] = 0.0  # the first 5 blocks of 10 rows carry no weight (held-out rows, say)
    fit = fit_linear_probe_minibatch(
        x.float().numpy(), y.numpy(), None, weight, n_outputs=4, batch_size=10, max_epochs=3
    )
    assert torch.isfinite(fit.coef).all() and np.isfinite(fit.loss_curve).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_low_rank_optimum_does_not_crawl_in_float64(threads):
    """At alpha=0.01 the optimum has a zero singular value, whose smoothed kink is ~alpha / eps stiff: float64
    L-BFGS with a scalar start of its inverse Hessian inched along it for 370-500 iterations (depending on the
    BLAS thread count). The Kronecker-factored start, (c I + alpha (M M^T + eps^2)^-1/2)^-1 on the rows,
    takes that curvature into account from iteration 20 on: 40-60 iterations (the bound leaves room for other
    BLAS orders), with that singular value down to the certificate's precision."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y, z = _data()
        kw = dict(n_outputs=4, alpha=0.01, byproduct_weight=1.0, tol=1e-4, max_iter=1000)
        fit = fit_linear_probe(x, y, z, **kw)
    finally:
        torch.set_num_threads(before)
    assert fit.converged and fit.n_iter < 100
    singular = torch.linalg.svdvals(fit.coef)
    assert singular[-1] < 1e-3 * singular[0]


def test_an_unconverged_lbfgs_hands_over_to_exact_proximal_steps(monkeypatch):
    """When L-BFGS stops short of tol (here: a crawl rule made to fire at once), the fit is finished by
    accelerated proximal gradient steps in float64 and still reaches the optimum."""
    import luab_sk.nn.solvers as solvers

    monkeypatch.setattr(solvers, "_CRAWL_FACTOR", 1e9)
    x, y, z = _data()
    kw = dict(n_outputs=4, alpha=0.01, byproduct_weight=1.0, tol=1e-4, max_iter=1000)
    fit = fit_linear_probe(x.float(), y, z.float(), **kw)
    assert fit.method == "lbfgs+apg" and fit.converged and fit.coef.dtype == torch.float32
    ref = fit_linear_probe(x, y, z, **{**kw, "tol": 1e-8})
    assert fit.objective - ref.objective < 1e-4


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_a_strong_penalty_converges_within_the_default_max_iter(weight):
    """At alpha=0.1 L-BFGS on M with a scalar start crept along the stiff smoothed nuclear norm and stopped at
    max_iter=200 (with and without Z). With the Kronecker-factored start and the factored trial (L-BFGS on
    balanced factors, started at iteration 20 when the prox-gradient step is rank deficient) it reaches tol
    in 60-95 iterations, at the optimum of a float64 reference."""
    from luab_sk.datasets import make_embedding_classification

    X, y, Z = make_embedding_classification(1500, 128, n_classes=10, random_state=0)
    x = torch.from_numpy((X - X.mean(0)) / X.std(0))
    z = torch.from_numpy((Z - np.nanmean(Z, 0)) / np.nanstd(Z, 0))
    kw = dict(n_outputs=10, alpha=0.1, byproduct_weight=weight)
    fit = fit_linear_probe(x.float(), torch.from_numpy(y), z.float(), **kw)
    assert fit.converged and fit.n_iter < 150
    ref = fit_linear_probe(x, torch.from_numpy(y), z, tol=1e-6, max_iter=1000, **kw)
    assert ref.converged
    assert fit.objective - ref.objective < 1e-3 * abs(ref.objective)


def test_the_factored_trial_finishes_at_the_convex_optimum(monkeypatch):
    """The factored trial (L-BFGS on balanced factors M = A B^T) is certified by the convex problem's
    optimality: started early and never abandoned, it returns a fit at the float64 reference's optimum."""
    import luab_sk.nn.solvers as solvers

    monkeypatch.setattr(solvers, "_FACTORED_TRIAL_AT", 5)
    monkeypatch.setattr(solvers, "_FACTORED_TRIAL_PACE", -math.inf)
    x, y, z = _data()
    kw = dict(n_outputs=4, alpha=0.05, byproduct_weight=1.0, tol=1e-5, max_iter=1000)
    fit = fit_linear_probe(x, y, z, **kw)
    assert fit.method == "lbfgs+factored" and fit.converged and fit.optimality <= 1e-5
    ref = fit_linear_probe(x, y, z, **{**kw, "tol": 1e-9, "method": "apg", "max_iter": 20000})
    assert abs(fit.objective - ref.objective) < 1e-6


def test_a_factored_trial_that_keeps_its_pace_finishes_the_fit(monkeypatch):
    """A trial that runs out of its budget while still lowering the objective below M's continues in
    further runs of the factored solver (it used to hand back to L-BFGS on M, which had crawled to
    max_iter on 10k x 512 x 100 classes with Z at alpha=1e-2); one that stalls hands over to exact prox
    steps. Both end at the float64 reference's optimum."""
    import luab_sk.nn.solvers as solvers

    monkeypatch.setattr(solvers, "_FACTORED_TRIAL_AT", 5)
    monkeypatch.setattr(solvers, "_FACTORED_TRIAL_PACE", -math.inf)
    monkeypatch.setattr(solvers, "_FACTORED_TRIAL_ITER", 3)
    calls = []
    real = solvers._factored_lbfgs

    def counted(*args, **kwargs):
        fit = real(*args, **kwargs)
        calls.append(fit.n_iter)
        return fit

    monkeypatch.setattr(solvers, "_factored_lbfgs", counted)
    x, y, z = _data()
    kw = dict(n_outputs=4, alpha=0.05, byproduct_weight=1.0, tol=1e-5, max_iter=1000)
    fit = fit_linear_probe(x, y, z, **kw)
    assert len(calls) > 1 and calls[0] == 3  # the trial ran out of its budget and went on
    assert fit.method in ("lbfgs+factored", "lbfgs+apg") and fit.converged and fit.optimality <= 1e-5
    ref = fit_linear_probe(x, y, z, **{**kw, "tol": 1e-9, "method": "apg", "max_iter": 20000})
    assert abs(fit.objective - ref.objective) < 1e-6


def test_few_shot_probes_with_z_are_solved_in_the_row_space_of_x():
    """With fewer samples than features the byproduct regression could not be whitened: 300 x 512 took 83
    iterations with Z (14 without). In the row space of x it takes about 26, and the result is optimal for the
    original problem: its rows lie in that space and its prox-gradient on the full features is within tol."""
    from luab_sk.datasets import make_embedding_classification

    X, y, Z = make_embedding_classification(300, 512, n_classes=10, random_state=0)
    x = torch.from_numpy(((X - X.mean(0)) / X.std(0)).astype(np.float32))
    z = torch.from_numpy(((Z - np.nanmean(Z, 0)) / np.nanstd(Z, 0)).astype(np.float32))
    kw = dict(n_outputs=10, alpha=1e-4, byproduct_weight=1.0)
    fit = fit_linear_probe(x, torch.from_numpy(y), z, **kw)
    assert fit.converged and fit.n_iter < 50
    full = LinearProbeLoss(x, torch.from_numpy(y), z, n_outputs=10, byproduct_weight=1.0)
    assert probe_optimality(full, fit.coef, fit.intercept, 1e-4)[1] <= 1e-4
    projector = torch.linalg.pinv(x.double()) @ x.double()  # onto the row space of x
    coef = fit.coef.double()
    assert torch.linalg.norm(coef - coef @ projector) < 1e-4 * torch.linalg.norm(coef)
    warm = fit_linear_probe(x, torch.from_numpy(y), z, init=(fit.coef, fit.intercept), **kw)
    assert warm.converged and warm.n_iter <= 2


def test_a_few_shot_fit_is_certified_on_the_full_features():
    """The row-space problem equals the full one only up to the QR's round-off: on wide, badly scaled float32
    features (make_classification, columns scaled by 1-100, 300 x 1024) its certificate met tol while the
    full-space one was 1.04e-4 > 1e-4, and the estimator warned after 18 iterations. The solve now resumes in
    the row space with a tighter tolerance until the full-space certificate is within tol."""
    from sklearn.datasets import make_classification

    X, y = make_classification(300, 1024, n_informative=256, n_redundant=256, n_classes=10,
                               n_clusters_per_class=1, random_state=0)  # fmt: skip
    X = X * np.random.default_rng(0).uniform(1, 100, 1024)
    rng = np.random.default_rng(1)
    Z = X[:, :256] @ rng.normal(size=(256, 2)) / 100 + rng.normal(size=(300, 2))
    Z[rng.random(300) < 0.1] = np.nan
    X, Z = X.astype(np.float32), Z.astype(np.float32)
    x = torch.from_numpy((X - X.mean(0)) / X.std(0))
    z = torch.from_numpy((Z - np.nanmean(Z, 0)) / np.nanstd(Z, 0))
    fit = fit_linear_probe(x, torch.from_numpy(y), z, n_outputs=10, alpha=1e-4)
    full = LinearProbeLoss(x.double(), torch.from_numpy(y), z.double(), n_outputs=10)
    assert fit.converged and fit.optimality <= 1e-4
    assert probe_optimality(full, fit.coef.double(), fit.intercept.double(), 1e-4)[1] <= 1e-4 * 1.001


def test_the_ridge_start_pays_the_penalty_on_its_logit_scale():
    """The label rows of the whitened start are ridge directions times a fitted logit scale. On separable
    labels the unpenalised scale grows until the logit fit's iteration cap (the same row norm at every
    alpha; a norm-212 row took 766 iterations to shrink back on 2000 x 700 with Z); the scale now minimises
    the label loss plus alpha times the rows' nuclear norm, so halving or doubling it costs more."""
    import luab_sk.nn.solvers as solvers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 40, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(40, generator=g, dtype=torch.float64) > 0).long()  # separable
    z = x[:, :2] + 0.1 * torch.randn(400, 2, generator=g, dtype=torch.float64)
    norms = []
    for alpha in (1e-3, 1e-2):
        loss = LinearProbeLoss(x, y, z, task="binary", n_outputs=1)
        b0 = solvers._start(loss)[1]
        M, b = solvers._ridge_start(loss, b0, solvers._Whitening(loss, alpha, 0), alpha)
        labels = LinearProbeLoss(x, y, task="binary", n_outputs=1)
        penalised = [
            labels(M[:1] * factor, b[:1], grad=False) + alpha * float(M[0].norm()) * factor
            for factor in (0.5, 1.0, 2.0)
        ]
        assert penalised[1] < min(penalised[0], penalised[2])
        norms.append(float(M[0].norm()))
    assert norms[1] < 0.8 * norms[0]  # a stronger penalty, a smaller start


def test_the_factored_solver_preconditioning_keeps_the_problem():
    """Rows scaled by their curvature and the right factor whitened (B = L^-T C) change the variables of
    the factored solver, not its problem: both reach the same optimum."""
    import luab_sk.nn.solvers as solvers

    x, y, z = _data()
    alpha = 0.05
    loss = LinearProbeLoss(x, y, z, n_outputs=4, byproduct_weight=1.0)
    b = solvers._start(loss)[1]
    # a full-rank start (the factors of a rank-deficient one stay in its rank: a stationary point)
    M = 0.1 * torch.randn(loss.n_rows, x.shape[1], generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    kw = dict(alpha=alpha, tol=1e-7, max_iter=3000, verbose=0)
    plain = solvers._factored_lbfgs(loss, M, b, **kw)
    pre = solvers._Whitening(loss, alpha, 0)
    conditioned = solvers._factored_lbfgs(loss, M, b, **kw, pre=pre, scale=solvers._row_scale(loss))
    assert plain.converged and conditioned.converged
    assert abs(plain.objective - conditioned.objective) < 1e-8
    assert torch.allclose(plain.coef, conditioned.coef, atol=1e-4)
    # the whitened right factor is for a loss-dominated B: small penalties yes, huge ones no
    assert solvers._loss_dominates(loss, plain.coef, solvers._row_scale(loss), 1e-4)
    assert not solvers._loss_dominates(loss, plain.coef, solvers._row_scale(loss), 1e3)


def test_a_strong_penalty_with_a_heavy_byproduct_weight_converges_by_default():
    """alpha=0.1 with byproduct_weight=10 (L2): the factored trial crawled on raw features and the fit
    stopped at max_iter=200; with the trial's right factor whitened it converges in about 70 iterations
    (benchmarks/convergence_sweep.py: 28 of 480 random probes stopped at max_iter, now 10)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from luab_sk import LUABClassifier
    from luab_sk.datasets import make_embedding_classification

    X, y, Z = make_embedding_classification(300, 128, n_classes=5, random_state=704954)
    clf = LUABClassifier(head="linear", alpha=0.1, byproduct_weight=10.0, byproduct_loss="l2", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf.fit(X, y, Z=Z)
    assert clf.n_iter_ < 150


def test_probe_loss_gradients_have_no_subnormal_floats():
    """A fitted probe's wrong-class probabilities underflow to subnormal floats (6000 x 128 x 200 classes:
    the fit takes 3.2x the time, benchmarks/subnormal_floor.py); the gradient uses at least exp(-60)
    instead; the value is exact."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    for task, y, M in (
        ("multiclass", torch.tensor([0, 1, 2]), torch.tensor([[100.0, -100.0], [-100.0, 100.0], [0.0, 0.0]])),
        ("binary", torch.tensor([0, 1, 1]), torch.tensor([[-100.0, 100.0]])),
    ):
        loss = LinearProbeLoss(x, y, task=task, n_outputs=M.shape[0] if task == "multiclass" else 1)
        value, g_m, g_b = loss(M, torch.zeros(M.shape[0]))
        for g in (g_m, g_b):
            assert not bool(((g != 0) & (g.abs() < torch.finfo(torch.float32).tiny)).any())
        logits = (x @ M.T).double()
        if task == "multiclass":
            exact = torch.nn.functional.cross_entropy(logits, y)
        else:
            exact = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.double())
        assert abs(value - float(exact)) < 1e-6 * max(1.0, float(exact))
