"""Fast training of the linear multitask head: a closed-form start and a whitening preconditioner.

The linear head computes ``W2 @ W1 @ x``: a rank-``r`` bottleneck ``W1`` shared by the label head and
the byproduct head. Its objective is non-convex in the two factors and, on embeddings whose variance
sits in a few directions, badly conditioned; from a random start L-BFGS spends most of its iterations
on both. :func:`reduced_rank_init_` starts near the optimum instead (one ridge solve from x to the
stacked targets, the best rank-``r`` shared subspace, the logit scale, a balanced split into the two
factors), and :func:`whitened` lets the optimiser work on ``W1`` in whitened coordinates (same
objective). :func:`feature_moments` computes the covariance both need once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .heads import PooledHead
from .losses import LABEL_TASKS, label_loss

__all__ = ["FeatureMoments", "feature_moments", "reduced_rank_init_", "whitened"]

# Ridge jitter relative to the mean feature variance, so that alpha=0 still gives a solvable system.
_JITTER = 1e-6
_SCALE_ITER = 50
# The logit scale and biases (1 + n_outputs numbers) are fitted on an evenly strided subsample of at
# most about this many rows: plenty for so few parameters, and it keeps the start cheap on large n.
_SCALE_ROWS = 8192


def reduced_rank_init_(
    head: PooledHead,
    x: Tensor,
    y: Tensor,
    z: Tensor | None = None,
    *,
    task: str = "multiclass",
    byproduct_weight: float = 1.0,
    alpha: float = 0.0,
    sample_weight: Tensor | None = None,
    moments: FeatureMoments | None = None,
) -> PooledHead:
    """Initialise a linear :class:`PooledHead` in place by reduced-rank ridge regression.

    1. Targets: the centred label indicators (one column per label score) and, when the head has a
       byproduct head, ``sqrt(byproduct_weight / k)`` times Z's k columns (missing elements set to the
       column mean), so that labels and byproducts weigh ``1 : byproduct_weight`` as in the loss.
    2. Ridge regression of the targets on the centred x with penalty ``alpha`` (one ``d x d`` solve,
       float64), and the top-``r`` eigenvectors of the fitted targets' covariance: the best rank-``r``
       shared subspace (reduced-rank regression). Byproducts thus shape the initial subspace.
    3. The label part is rescaled from indicator units to logits: the scale and the label biases minimise
       the label loss plus the ``alpha`` penalty of the scaled map (a small L-BFGS problem, on an evenly
       strided subsample of about 8k rows when there are more).
    4. The map ``M`` (outputs x d) is split as ``W2 = U S^1/2``, ``W1 = S^1/2 V^T`` from its SVD: the
       factorisation with the smallest ``||W1||^2 + ||W2||^2`` (the penalty the training adds).
       Bottleneck directions beyond the rank of ``M`` start at zero.

    Deterministic: no random numbers are drawn.

    Parameters
    ----------
    head : PooledHead
        A head of ``kind="linear"``.
    x : Tensor of shape (n, d)
        Training features.
    y : Tensor
        Labels as for :func:`~luab_sk.nn.label_loss`.
    z : Tensor of shape (n, k), optional
        Byproducts (NaN for missing); used when the head has a byproduct head.
    task : {"multiclass", "binary", "multilabel"}, default="multiclass"
    byproduct_weight : float, default=1.0
        Relative weight of the byproduct targets.
    alpha : float, default=0.0
        Ridge penalty (on the mean loss), the training's L2 strength.
    sample_weight : Tensor of shape (n,), optional
    moments : FeatureMoments, optional
        ``feature_moments(x, sample_weight)``, when already computed (its Cholesky factor is cached).

    Returns
    -------
    PooledHead
        ``head``, initialised.

    Examples
    --------
    >>> import torch
    >>> from luab_sk.nn import PooledHead, label_loss
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 6, generator=g); y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    >>> head = PooledHead(6, 3, kind="linear", hidden_size=2)
    >>> _ = reduced_rank_init_(head, x, y, task="multiclass")
    >>> with torch.no_grad():
    ...     bool(label_loss(head(x).logits, y, "multiclass") < 0.6)
    True
    """
    if not isinstance(head, PooledHead) or head.kind != "linear":
        raise ValueError("reduced_rank_init_ needs a PooledHead of kind='linear'.")
    if task not in LABEL_TASKS:
        raise ValueError(f"task must be one of {LABEL_TASKS}, got {task!r}.")
    if x.ndim != 2 or x.shape[1] != head.trunk.in_features:
        raise ValueError(f"x must have shape (n, {head.trunk.in_features}), got {tuple(x.shape)}.")
    n_outputs = head.label_head.out_features
    rank = head.trunk.out_features
    x = x.detach()
    moments = feature_moments(x, sample_weight) if moments is None else moments
    x_mean, cov = moments
    w = _normalized_weights(x, sample_weight)

    # Targets and their weighted centred cross-products with x: n-sized work in x's dtype.
    targets = [_label_indicators(y, task, n_outputs).to(x.dtype)]
    z_factor = 0.0
    if head.byproduct_head is not None and z is not None and byproduct_weight > 0:
        z_factor = (float(byproduct_weight) / z.shape[1]) ** 0.5
        observed = ~torch.isnan(z)
        counts = (observed * w[:, None]).sum(0).clamp_min(torch.finfo(x.dtype).tiny)
        z_mean = (torch.where(observed, z, 0.0) * w[:, None]).sum(0) / counts
        targets.append(torch.where(observed, z, z_mean) * z_factor)
    t = torch.cat(targets, dim=1)
    t_mean = w @ t
    xc = x - x_mean.to(x.dtype)
    cross = (xc.T @ ((t - t_mean) * w[:, None])).to(torch.float64)  # (d, m)

    coef = torch.cholesky_solve(cross, moments.cholesky(alpha))  # (d, m)

    # Reduced-rank regression: project onto the top eigenvectors of the fitted targets' covariance.
    _, vectors = torch.linalg.eigh(coef.T @ cov @ coef)
    top = vectors[:, -min(rank, vectors.shape[1]) :]
    coef = coef @ top @ top.T

    # Back to the heads' units (logits; Z's units). Scaling columns keeps the rank at most ``rank``.
    label_coef = coef[:, :n_outputs]
    penalty = float(alpha) * float(torch.linalg.matrix_norm(label_coef, ord="nuc"))
    rows = slice(None, None, max(1, x.shape[0] // _SCALE_ROWS))
    scale, label_bias = _fit_logit_scale(
        xc[rows] @ label_coef.to(x.dtype),
        y[rows],
        task,
        penalty,
        None if sample_weight is None else sample_weight[rows],
    )
    parts, biases = [label_coef * scale], [label_bias.to(coef.dtype)]
    if z_factor:
        parts.append(coef[:, n_outputs:] / z_factor)
        biases.append(t_mean[n_outputs:].to(coef.dtype) / z_factor)
    coef = torch.cat(parts, dim=1)
    # The trunk has no bias: the centring offset goes into the heads' biases.
    bias = torch.cat(biases) - coef.T @ x_mean

    # Balanced factors: the split of coef.T (outputs x d) with the least ||W1||^2 + ||W2||^2.
    u, s, vh = torch.linalg.svd(coef.T, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    w1 = coef.new_zeros(rank, coef.shape[0])
    w2 = coef.new_zeros(coef.shape[1], rank)
    w1[:keep] = root[:, None] * vh[:keep]
    w2[:, :keep] = u[:, :keep] * root
    with torch.no_grad():
        head.trunk.weight.copy_(w1)
        head.label_head.weight.copy_(w2[:n_outputs])
        head.label_head.bias.copy_(bias[:n_outputs])
        if head.byproduct_head is not None and z_factor:
            head.byproduct_head.weight.copy_(w2[n_outputs:])
            head.byproduct_head.bias.copy_(bias[n_outputs:])
        elif head.byproduct_head is not None:  # no z, or weight 0: nothing to regress yet
            head.byproduct_head.weight.zero_()
            head.byproduct_head.bias.zero_()
    return head


class FeatureMoments:
    """Weighted mean and covariance of a feature matrix (float64), see :func:`feature_moments`.

    Unpacks as ``mean, cov = moments``; :meth:`cholesky` factors are computed once per ``alpha``.

    Parameters
    ----------
    mean : Tensor of shape (d,)
    cov : Tensor of shape (d, d)
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        self.mean, self.cov = mean, cov
        self._factors: dict[float, Tensor] = {}

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.mean, self.cov))

    def cholesky(self, alpha: float = 0.0) -> Tensor:
        """Lower Cholesky factor of ``cov + ridge I``, ``ridge = alpha`` (at least a small jitter)."""
        alpha = float(alpha)
        if alpha not in self._factors:
            ridge = max(alpha, _JITTER * float(self.cov.diagonal().mean()), torch.finfo(torch.float64).tiny)
            eye = torch.eye(self.cov.shape[0], dtype=self.cov.dtype, device=self.cov.device)
            self._factors[alpha] = torch.linalg.cholesky(self.cov + ridge * eye)
        return self._factors[alpha]


def feature_moments(x: Tensor, sample_weight: Tensor | None = None) -> FeatureMoments:
    """Weighted mean and covariance of the rows of ``x``, in float64.

    The ``n x d x d`` product runs in ``x``'s dtype (float32 is accurate enough for a preconditioner
    and an initialisation, and twice as fast); the result is float64.

    Parameters
    ----------
    x : Tensor of shape (n, d)
    sample_weight : Tensor of shape (n,), optional

    Returns
    -------
    FeatureMoments
        ``(mean, cov)``.

    Examples
    --------
    >>> import torch
    >>> mean, cov = feature_moments(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
    >>> mean.tolist(), cov.tolist()
    ([1.0, 1.0], [[1.0, 0.0], [0.0, 0.0]])
    """
    x = x.detach()
    w = _normalized_weights(x, sample_weight)
    mean = w @ x
    xc = x - mean
    cov = xc.T @ (xc * w[:, None])
    return FeatureMoments(mean.to(torch.float64), cov.to(torch.float64))


class _LowerTriangularSolve(nn.Module):
    """Parametrisation ``W = V @ L^-1`` for a fixed lower-triangular ``L`` (and ``V = W @ L`` to set it)."""

    def __init__(self, factor: Tensor) -> None:
        super().__init__()
        self.register_buffer("factor", factor)

    def forward(self, v: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self.factor, v, upper=False, left=False)

    def right_inverse(self, w: Tensor) -> Tensor:
        return w @ self.factor


@contextlib.contextmanager
def whitened(linear: nn.Linear, moments: FeatureMoments, alpha: float = 0.0) -> Iterator[nn.Linear]:
    """Optimise ``linear.weight`` in whitened coordinates while the context is open.

    Inside the context the weight is ``W = V @ P`` with ``P = L^-1``, ``L L^T = cov + alpha I`` (a
    Cholesky factor; ``P`` is applied by a triangular solve) and the trainable parameter is ``V`` (a
    :mod:`torch.nn.utils.parametrize` parametrisation): the same function and the same objective (an
    L2 penalty computed on ``linear.weight`` still sees ``W``), but for a quadratic loss the Hessian in
    ``V`` is the identity, so quasi-Newton methods no longer pay for the ill-conditioning of the
    features (embeddings whose variance sits in a few directions). Any ``P`` with
    ``P (cov + alpha I) P^T = I`` differs from ``(cov + alpha I)^-1/2`` by a rotation, to which L-BFGS
    is nearly invariant (all but its first step's length); the Cholesky factor is the cheapest. On exit
    ``linear.weight`` is a plain parameter again, holding the trained ``W``.

    Parameters
    ----------
    linear : torch.nn.Linear
        The layer reading the features.
    moments : FeatureMoments
        Of the layer's input (see :func:`feature_moments`).
    alpha : float, default=0.0
        Ridge added to the covariance (at least a small jitter, so ``P`` is finite).

    Yields
    ------
    torch.nn.Linear
        ``linear``, parametrised; optimisers must be built inside the context, on its parameters.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2, bias=False)
    >>> before = lin.weight.detach().clone()
    >>> moments = FeatureMoments(torch.zeros(3), torch.diag(torch.tensor([1.0, 4.0, 9.0])))
    >>> with whitened(lin, moments) as layer:
    ...     names = [name for name, _ in layer.named_parameters()]
    >>> names, bool(torch.allclose(lin.weight, before, atol=1e-5))
    (['parametrizations.weight.original'], True)
    """
    factor = moments.cholesky(alpha).to(linear.weight.dtype)
    parametrize.register_parametrization(linear, "weight", _LowerTriangularSolve(factor))
    try:
        yield linear
    finally:
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)


def _normalized_weights(x: Tensor, sample_weight: Tensor | None) -> Tensor:
    if sample_weight is None:
        return x.new_full((x.shape[0],), 1.0 / x.shape[0])
    w = sample_weight.detach().to(x.dtype)
    return w / w.sum()


def _label_indicators(y: Tensor, task: str, n_outputs: int) -> Tensor:
    if task == "multiclass":
        return F.one_hot(y.long(), n_outputs)
    return y.reshape(y.shape[0], -1)


def _fit_logit_scale(
    scores: Tensor, y: Tensor, task: str, penalty: float, sample_weight: Tensor | None
) -> tuple[float, Tensor]:
    """Scale and biases of ``scale * scores + bias`` minimising the label loss + ``penalty * scale``."""
    with torch.no_grad():
        if task == "multiclass":
            prior = torch.bincount(y.long(), minlength=scores.shape[1]).to(scores.dtype) + 1.0
            bias0 = prior.log() - prior.log().mean()
        else:
            p = y.reshape(y.shape[0], -1).to(scores.dtype).mean(0).clamp(1e-3, 1 - 1e-3)
            bias0 = (p / (1 - p)).log()
    scale = torch.ones((), dtype=scores.dtype, device=scores.device, requires_grad=True)
    bias = bias0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [scale, bias], max_iter=_SCALE_ITER, line_search_fn="strong_wolfe", tolerance_grad=1e-5
    )

    def closure():
        optimizer.zero_grad()
        loss = label_loss(scale * scores + bias, y, task, sample_weight=sample_weight) + penalty * scale
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return max(float(scale.detach()), 0.0), bias.detach()
