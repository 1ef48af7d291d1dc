"""The shared training loop's L-BFGS stopping rule (scikit-learn's ``gtol`` criterion)."""

import pytest
import torch

from luab_sk.estimators._training import train_module


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
