"""Tests for luab_sk.nn.init: reduced-rank initialisation of the linear head, whitened optimisation."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from luab_sk.nn import PooledHead, build_head, feature_moments, label_loss, reduced_rank_init_, whitened
from luab_sk.nn.engine import l2_penalty

NAN = float("nan")


def _problem(n=400, d=6, seed=0):
    """y is read from x[:, 0], z from x[:, 1]; the other features are noise with a wide spectrum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    x[:, :2] = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0.3).long() + (x[:, 0] > -0.3).long()
    z = torch.stack([2.0 * x[:, 1] + 1.0, -x[:, 1]], dim=1)
    return x, y, z


def test_feature_moments_match_numpy():
    x, _, _ = _problem()
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moments = feature_moments(x, w)
    mean, cov = moments
    factor = moments.cholesky(1e-3)
    assert moments.cholesky(1e-3) is factor  # computed once, shared by the start and the preconditioner
    torch.testing.assert_close(factor @ factor.T, cov + 1e-3 * torch.eye(6, dtype=torch.float64))
    np.testing.assert_allclose(mean.numpy(), np.average(x.numpy(), axis=0, weights=w.numpy()), atol=1e-10)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy().T, aweights=w.numpy(), bias=True), atol=1e-10)
    assert mean.dtype == cov.dtype == torch.float64


def test_init_is_deterministic_and_fits_the_labels():
    x, y, z = _problem()
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        heads.append(reduced_rank_init_(PooledHead(6, 3, 2, hidden_size=4).double(), x, y, z, alpha=1e-3))
    for a, b in zip(heads[0].parameters(), heads[1].parameters()):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        loss = float(label_loss(heads[0](x).logits, y, "multiclass"))
    prior = torch.bincount(y) / len(y)
    assert loss < 0.5 * float(-(prior * prior.log()).sum())  # well below the best constant predictor


def test_full_rank_byproduct_head_is_ridge_regression():
    x, y, z = _problem()
    z[::7, 0] = NAN  # missing elements are set to the column mean
    alpha = 1e-2
    head = reduced_rank_init_(
        PooledHead(6, 3, 2, hidden_size=8).double(), x, y, z, alpha=alpha, byproduct_weight=0.5
    )
    filled = np.where(np.isnan(z.numpy()), np.nanmean(z.numpy(), axis=0), z.numpy())
    # Our ridge is on the mean loss; sklearn's on the summed loss.
    expected = Ridge(alpha=alpha * x.shape[0]).fit(x.numpy(), filled).predict(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(head(x).byproducts.numpy(), expected, atol=1e-8)
    # Bottleneck directions beyond the rank of the map (3 + 2 outputs) start at zero.
    assert torch.count_nonzero(head.trunk.weight.abs().sum(1)) == 5


def test_byproducts_shape_the_shared_subspace():
    """With a rank-1 bottleneck, the weight decides whether the label or the byproduct direction wins."""
    x, y, z = _problem()

    def trunk_reads(weight, column):
        head = PooledHead(6, 3, 2, hidden_size=1).double()
        reduced_rank_init_(head, x, y, z, byproduct_weight=weight, alpha=1e-3)
        with torch.no_grad():
            h = head.trunk(x)[:, 0]
        return abs(float(torch.corrcoef(torch.stack([h, x[:, column]]))[0, 1]))

    assert trunk_reads(0.0, column=0) > 0.99 and trunk_reads(0.0, column=1) < 0.1
    assert trunk_reads(100.0, column=1) > 0.99 and trunk_reads(100.0, column=0) < 0.1


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_init_sigmoid_tasks(task):
    x, y, _ = _problem()
    target = (y > 0).double() if task == "binary" else torch.stack([y > 0, y > 1], 1).double()
    head = reduced_rank_init_(PooledHead(6, 1 if task == "binary" else 2).double(), x, target, task=task)
    with torch.no_grad():
        assert float(label_loss(head(x).logits, target, task)) < 0.4


@pytest.mark.parametrize(
    ("head", "x", "task", "match"),
    [
        (build_head("mlp", 6, 3), torch.zeros(4, 6), "multiclass", "kind='linear'"),
        (build_head("linear", 6, 3), torch.zeros(4, 5), "multiclass", r"x must have shape \(n, 6\)"),
        (build_head("linear", 6, 3), torch.zeros(4, 6), "ranking", "task must be one of"),
    ],
)
def test_init_rejects_bad_arguments(head, x, task, match):
    with pytest.raises(ValueError, match=match):
        reduced_rank_init_(head, x, torch.zeros(4, dtype=torch.long), task=task)


def test_whitened_gradient_step_solves_ridge_in_one_step():
    """For a quadratic loss the whitened Hessian is the identity: one unit gradient step is exact."""
    x, _, z = _problem()
    x = x - x.mean(0)
    alpha = 1e-3
    lin = torch.nn.Linear(6, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.zero_()
    with whitened(lin, feature_moments(x), alpha) as layer:
        (original,) = layer.parameters()
        loss = 0.5 * (layer(x) - (z - z.mean(0))).pow(2).sum(1).mean() + 0.5 * alpha * l2_penalty(layer)
        loss.backward()
        with torch.no_grad():
            original -= original.grad
    expected = Ridge(alpha=alpha * x.shape[0], fit_intercept=False).fit(x.numpy(), z - z.mean(0)).coef_
    np.testing.assert_allclose(lin.weight.detach().numpy(), expected, rtol=1e-6, atol=1e-9)
    assert [name for name, _ in lin.named_parameters()] == ["weight"]


def test_whitened_keeps_the_function_and_the_penalty():
    x, _, _ = _problem()
    lin = torch.nn.Linear(6, 3).double()
    before = lin(x).detach()
    penalty = l2_penalty(lin).detach()
    with pytest.raises(RuntimeError, match="inside"), whitened(lin, feature_moments(x), 1e-4) as layer:
        torch.testing.assert_close(layer(x), before)
        torch.testing.assert_close(l2_penalty(layer), penalty)  # computed on W, not on the stored V
        raise RuntimeError("inside")
    # The parametrisation is removed even when training fails.
    assert not torch.nn.utils.parametrize.is_parametrized(lin)
    torch.testing.assert_close(lin(x).detach(), before)
