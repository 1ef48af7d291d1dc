"""Convex solvers for the linear multitask probe (pure torch).

The linear head computes ``W2 @ W1 @ x + b``: a shared bottleneck ``W1`` read by the label rows and the
byproduct rows of ``W2``. With ``alpha / 2 * (||W1||^2 + ||W2||^2)`` on the two factors and a free rank
(``rank >= min(n_outputs + k, d)``), the training problem is equivalent to a *convex* one in the product
``M = W2 @ W1`` (the label rows stacked over the byproduct rows)::

    minimise  label_loss(M x + b) + byproduct_weight * masked_loss_z(M x + b) + alpha * ||M||_*

(``||.||_*`` the nuclear norm: the least ``(||W1||^2 + ||W2||^2) / 2`` over factorisations of ``M`` is
``||M||_*``). It has no spurious stationary points and needs no balancing of factors. Solvers:

* :func:`fit_linear_probe` (``method="lbfgs"``, the default): L-BFGS on ``M`` in whitened coordinates
  (``M = V L^-1`` with ``L L^T = cov + ridge I``: the loss Hessian is close to the identity in ``V``;
  by default the byproduct rows always, the label rows when that pays, see ``whiten``)
  with the nuclear norm smoothed as ``sum_i sqrt(sigma_i^2 + eps^2)``, ``eps = tol / 10``, from a ridge
  start (without Z). It stops on an exact optimality measure of the *non-smooth* objective: the largest
  entry of the prox-gradient ``G = M - prox_{alpha ||.||_*}(M - grad f(M))`` (unit step) and of the bias
  gradient, at most ``tol`` (for a smooth objective ``G`` is the gradient: scikit-learn's ``gtol`` rule
  of ``LogisticRegression(solver="lbfgs")`` carried over to the non-smooth problem; ``G = 0`` exactly at
  the optimum), together with the quasi-Newton estimate of the remaining decrease
  ``g^T H^-1 g / 2 <= tol`` (on flat, high-dimensional probes a small gradient alone left objective gaps
  4x LogisticRegression's). When it stalls (the smoothed kinks of a low-rank optimum, or float32
  round-off), exact proximal steps (below, in float64) finish the job. A fit still running after 100
  iterations (or after 20, when the prox-gradient step is already rank deficient) tries L-BFGS on balanced
  factors ``M = A B^T`` (smooth where the nuclear norm has kinks; it finishes strongly penalised, low-rank
  probes in 50-80 iterations) for up to 100 iterations, and keeps its result when that reaches ``tol``;
  otherwise it goes on where it was.
  With Z and fewer samples than features (few-shot probes), every method solves the probe in the row
  space of ``x`` (``x = R^T Q^T``, ``M = M~ Q^T``; exact, the nuclear norm is unchanged), where the byproduct
  regression can be whitened: 200-1200 samples x 512-1280 features took 60-200 (max_iter) iterations
  with Z against 12-16 without, now 16-39.
* ``method="apg"``: accelerated proximal gradient (FISTA with backtracking and function-value restart),
  singular-value shrinkage as the prox. Also used, with a hard rank cap on the prox, when ``rank`` is
  smaller than ``min(n_outputs + k, d)`` (then the problem is rank constrained and no longer convex).
* :func:`fit_linear_probe_minibatch`: mini-batch Adam with a warm-up + cosine schedule that streams X
  in contiguous batches from any sliceable array (a ``numpy.memmap`` is read batch by batch, never copied
  whole), for probes too large for full-batch solvers.

:func:`probe_optimality` measures any ``(M, b)`` (for example a trained head's product of factors) on
the same scale, and :meth:`LinearProbeFit.load_into` splits ``M = U S V^T`` into the head's two factors
(``W1 = S^1/2 V^T``, ``W2 = U S^1/2``: the balanced factorisation whose L2 penalty equals
``alpha * ||M||_*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _LOG_FLOOR  # the probability floor of the label gradients, shared

__all__ = [
    "LinearProbeFit",
    "LinearProbeLoss",
    "fit_linear_probe",
    "fit_linear_head",
    "head_map",
    "fit_linear_probe_minibatch",
    "nuclear_prox",
    "probe_optimality",
]

TASKS = ("multiclass", "binary", "multilabel")
REGRESSION_LOSSES = ("smooth_l1", "l2", "l1")
_HISTORY = 20
_ARMIJO = 1e-4
_MAX_BACKTRACK = 40
_STALL_ITERATIONS = 5
_STALL_EPS_FACTOR = 16.0
# A crawl: the objective fell by less than _CRAWL_FACTOR * tol over the last _CRAWL_WINDOW iterations without
# meeting the stop rule (the smoothed kink of a zero singular value makes that direction ~alpha / eps stiff;
# float64 keeps L-BFGS inching along it for hundreds of iterations). Exact proximal steps take over.
_CRAWL_WINDOW = 10
_CRAWL_FACTOR = 1e-2
# A strong penalty (large alpha, a low-rank optimum) makes the smoothed nuclear norm stiff, and L-BFGS on M
# slow: hundreds of iterations (make_embedding_classification 4000 x 384, 20 classes: 422 at alpha=1e-2,
# no convergence in 1000 at alpha=0.1). L-BFGS on balanced factors M = A B^T, whose penalty
# alpha / 2 (||A||^2 + ||B||^2) is smooth, finishes those in 50-80 iterations from where M's L-BFGS got.
# So an unconverged fit tries the factored form after this many iterations, for at most this many; if the
# trial does not reach tol, M's L-BFGS goes on from where it was (and the trial's iterations are not counted
# against max_iter). The trial gives up after its first 10 iterations when they lowered the objective by less
# than this fraction of what M's last 10 did. Measured on 12 probes that reach iteration 100: 1000 -> 150-160
# iterations at alpha=0.1, 422 -> 180 at alpha=1e-2. The ratio of the two drops was 0.97-9.4 for 8 trials
# that converged, 0.05 and 0.47 for two that failed (now stopped after 10 iterations, not 100), 2.2 for one
# that failed close to tol, and 0.42 for one that would converge at 160 where M's L-BFGS alone takes 115.
_FACTORED_TRIAL_AT = 100
_FACTORED_TRIAL_ITER = 100
_FACTORED_TRIAL_PACE = 0.5
# The trial whitens its right factor B (as M's L-BFGS whitens M) when the loss's curvature along B is at least
# this many times the penalty's (see _loss_dominates). Measured over 480 random probes (60-2000 samples x
# 16-700 features, 2-30 classes, alpha 1e-5 to 0.1, byproduct weight 0, 1 or 10): whitening B halved the
# iterations of the strongly penalised probes with byproduct weight 10 (ratio 25-220), and took those with
# weight <= 1 (ratio 3-15, where the penalty's identity curvature is a large part of B's Hessian and whitening
# stretches it) from 5907 to 6225 iterations in all; at alpha=0.1 on make_embedding_classification
# 4000 x 384 x 20 classes, 70 -> 110 iterations (benchmarks/penalty_sweep.py). With this threshold: 27 -> 13
# fits that stopped at max_iter=200, and 30970 -> 29497 iterations in all (measured before the floor on the
# label probabilities, _LOG_FLOOR).
_FACTORED_WHITEN_DOMINANCE = 20.0
# The trial comes early, at this iteration, when the prox-gradient step already has a rank below
# min(rows, d): the nuclear norm's kinks are active (a low-rank optimum). Measured: at alpha=0.1 the
# step's rank was 8-11 of 20-28 at iteration 20, and 150-160 iterations fell to 80-90; none of the 20
# probes at alpha <= 1e-2 had a rank deficit there (so nothing else changed).
_FACTORED_RANK_CHECK_AT = 20
# That early trial's pace to beat is M's drop over its last this many iterations, scaled to 10: the window
# of 10 still holds the first iterations' large drops there. With the Kronecker-factored start of L-BFGS
# (see _lbfgs) the window made the alpha=0.1 trials give up at 20 and converge at 100 instead (40-80
# iterations against 60-150 on the four alpha=0.1 probes of benchmarks/penalty_sweep.py).
_PACE_RECENT = 3
# The Kronecker-factored start of L-BFGS (see _lbfgs) takes over from the scalar one at this iteration: from
# the first, it took make_classification 10k x 512 x 100 classes with Z from 18 iterations to 29 (the kink
# model over-damps steps while the small singular values are still transient); from 20 it stays at 18, and
# alpha=1e-2 still falls from 180-200 iterations to 74-77 (4000 x 384 x 20 classes).
_KRON_FROM = 20
# Whitening uses cov + ridge I with ridge >= this fraction of the mean variance: directions of (near) zero
# variance are then stretched at most ~18x. A smaller ridge (1e-6 measured) let the smoothed nuclear norm
# blow up along them on collinear features (make_classification: 5x the iterations), larger ones (1e-2)
# stopped early on separable real features (benchmarks/probe_speed.py).
_WHITEN_RIDGE = 3e-3
# whiten=None whitens the label rows when the covariance + Cholesky cost at most this many gradient
# evaluations (flops of n d^2 + d^3 / 3 against 2 n d rows) and the features' participation ratio is at
# most this fraction of d. Measured (benchmarks/probe_speed.py, benchmarks/whitening_rule.py): on
# concentrated spectra (ratio 0.05-0.2 d) whitening cut the iterations 1.4-3.8x and the time 1.2-7x, with
# the covariance costing up to 56 evaluations (2000 x 512, 5 classes: 72 -> 19 iterations), and it left
# smaller objective gaps; a budget of 8 evaluations had left 3000 x 256 x 10 classes (13 evaluations) at
# 232 iterations instead of 76. make_classification (0.55 d) does not need it (whitened: 15-17 iterations
# and a larger objective gap than unwhitened's 18). On the EfficientNet-Lite0 features (3 classes,
# d = 1280, ratio 0.03 d) the covariance costs 150-260 evaluations and unwhitened label rows took 14
# iterations against 38 whitened.
_WHITEN_EVALS = 64.0
_WHITEN_SPREAD = 0.25


# --------------------------------------------------------------------------------------------- loss
class LinearProbeLoss:
    """Value and gradient of the probe's smooth part at ``(M, b)``, computed by hand (no autograd).

    ``f(M, b) = label_loss(out[:, :K]) + byproduct_weight * masked_loss(out[:, K:], z)``,
    ``out = x M^T + b``, with the conventions of :func:`luab_sk.nn.multitask_loss` (weighted means; Z's
    loss averaged over its observed elements, NaN masked; smooth L1 is Huber with threshold ``beta``).

    Parameters
    ----------
    x : Tensor of shape (n, d)
    y : Tensor
        Class indices (n,) for ``"multiclass"``, 0/1 (n,) for ``"binary"``, 0/1 (n, K) for ``"multilabel"``.
    z : Tensor of shape (n, k), optional
        NaN for missing elements. Ignored when ``byproduct_weight == 0``.
    sample_weight : Tensor of shape (n,), optional
    task : {"multiclass", "binary", "multilabel"}
    n_outputs : int
        Label scores K (1 for binary).
    byproduct_weight : float
    byproduct_loss : {"smooth_l1", "l2", "l1"}
    beta : float
        Smooth-L1 threshold.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        z: Tensor | None = None,
        sample_weight: Tensor | None = None,
        *,
        task: str = "multiclass",
        n_outputs: int | None = None,
        byproduct_weight: float = 1.0,
        byproduct_loss: str = "smooth_l1",
        beta: float = 1.0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
        if byproduct_loss not in REGRESSION_LOSSES:
            raise ValueError(f"byproduct_loss must be one of {REGRESSION_LOSSES}, got {byproduct_loss!r}.")
        if x.ndim != 2:
            raise ValueError(f"x must have shape (n, d), got {tuple(x.shape)}.")
        n, dtype = x.shape[0], x.dtype
        self.x, self.task, self.beta, self.kind = x, task, float(beta), byproduct_loss
        w = x.new_ones(n) if sample_weight is None else sample_weight.to(device=x.device, dtype=dtype)
        self.sample_w = w / w.sum()  # per-sample weights summing to 1 (covariances, means, the start)
        if task == "multiclass":
            self.y = y.to(x.device).long()
            self.n_outputs = int(n_outputs if n_outputs is not None else int(self.y.max()) + 1)
            self.label_w = self.sample_w[:, None]
        else:
            target = y.to(device=x.device, dtype=dtype).reshape(n, -1)
            self.y = target
            self.n_outputs = target.shape[1]
            self.label_w = self.sample_w[:, None] / target.shape[1]
        self.use_z = z is not None and float(byproduct_weight) > 0 and z.shape[1] > 0
        self.n_byproducts = z.shape[1] if self.use_z else 0
        if self.use_z:
            z = z.to(device=x.device, dtype=dtype)
            mask = ~torch.isnan(z)
            self.z = torch.where(mask, z, torch.zeros((), dtype=dtype, device=x.device))
            omega = mask.to(dtype) * w[:, None]
            self.z_w = float(byproduct_weight) * omega / omega.sum().clamp_min(torch.finfo(dtype).tiny)
        self.n_rows = self.n_outputs + self.n_byproducts

    def __call__(self, M: Tensor, b: Tensor, grad: bool = True):
        """``f`` (a float), and when ``grad``: ``(f, grad_M, grad_b)``."""
        out = torch.addmm(b, self.x, M.T)
        K = self.n_outputs
        logits = out[:, :K]
        # Probabilities below exp(-_LOG_FLOOR) are computed as that value: exact ones underflow to subnormal
        # floats, whose arithmetic is many times slower on x86 (6000 x 128 x 200 classes: the fit takes 0.31x
        # the time with exact ones, benchmarks/subnormal_floor.py). The change, below 1e-26 per entry, is far
        # below any tol.
        if self.task == "multiclass":
            log_p = torch.log_softmax(logits, dim=1)
            picked = log_p.gather(1, self.y[:, None])
            value = -(self.label_w * picked).sum(dtype=torch.float64)
            if grad:
                g_label = log_p.clamp_(min=-_LOG_FLOOR).exp_()
                g_label.scatter_add_(1, self.y[:, None], -torch.ones_like(picked))
                g_label.mul_(self.label_w)
        else:
            low = logits.clamp(min=-_LOG_FLOOR)  # softplus and sigmoid of it are at least exp(-_LOG_FLOOR)
            value = (self.label_w * (F.softplus(low) - self.y * logits)).sum(dtype=torch.float64)
            if grad:
                g_label = (torch.sigmoid(low) - self.y).mul_(self.label_w)
        if self.use_z:
            r = out[:, K:] - self.z
            if self.kind == "smooth_l1":
                a = r.abs()
                values = torch.where(a < self.beta, 0.5 * r * r / self.beta, a - 0.5 * self.beta)
                deriv = (r / self.beta).clamp_(-1.0, 1.0) if grad else None
            elif self.kind == "l2":
                values, deriv = r * r, (2.0 * r if grad else None)
            else:
                values, deriv = r.abs(), (torch.sign(r) if grad else None)
            value = value + (self.z_w * values).sum(dtype=torch.float64)
            if grad:
                g = torch.cat([g_label, deriv.mul_(self.z_w)], dim=1)
        elif grad:
            g = g_label
        if not grad:
            return float(value)
        return float(value), g.T @ self.x, g.sum(0)


# ----------------------------------------------------------------------------------- nuclear norm
def nuclear_prox(M: Tensor, threshold: float, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Singular-value shrinkage ``prox_{threshold ||.||_*}(M)`` (then the top ``rank`` values kept).

    Computed in float64 and returned in ``M``'s dtype, with the shrunk singular values (float64).

    Examples
    --------
    >>> import torch
    >>> P, s = nuclear_prox(torch.diag(torch.tensor([3.0, 1.0, 0.5])), 0.75)
    >>> [round(v, 2) for v in s.tolist()]
    [2.25, 0.25, 0.0]
    """
    u, s, vh = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    s = (s - threshold).clamp_min(0.0)
    if rank is not None:
        s[rank:] = 0.0
    return ((u * s) @ vh).to(M.dtype), s


def _smoothed_nuclear(M: Tensor, eps: float) -> tuple[float, Tensor, Tensor]:
    """``sum_i sqrt(sigma_i^2 + eps^2) - eps * min(m, d)``, its gradient, and ``(M M^T + eps^2 I)^-1/2``
    (float64 eigen-solve; the last for wide ``M`` only, else None).

    For wide ``M`` the gradient is ``(M M^T + eps^2 I)^-1/2 M``; along directions orthogonal to ``M``'s
    rows its curvature is that matrix acting on the left, which preconditions L-BFGS (:func:`_lbfgs`).
    """
    m64 = M.to(torch.float64)
    wide = M.shape[0] <= M.shape[1]
    gram = m64 @ m64.T if wide else m64.T @ m64
    evals, vecs = torch.linalg.eigh(gram)
    s = (evals.clamp_min(0.0) + eps * eps).sqrt()
    inv = (vecs / s) @ vecs.T
    grad = inv @ m64 if wide else m64 @ inv
    return float(s.sum() - eps * s.numel()), grad.to(M.dtype), ((vecs, s) if wide else None)


def probe_optimality(
    loss: LinearProbeLoss, M: Tensor, b: Tensor, alpha: float, rank: int | None = None
) -> tuple[float, float]:
    """Objective ``f + alpha ||M||_*`` and the largest entry of the prox-gradient (unit step).

    The prox-gradient is ``G = M - prox_{alpha ||.||_*}(M - grad_M f)`` together with ``grad_b f``
    (biases are not penalised): zero exactly at a minimiser; for a smooth objective it is the gradient,
    so ``max |G| <= tol`` is scikit-learn's ``gtol`` rule for the non-smooth problem.
    """
    f, g_m, g_b = loss(M, b)
    P, _ = nuclear_prox(M - g_m, alpha, rank)
    nuclear = float(torch.linalg.matrix_norm(M.to(torch.float64), ord="nuc"))
    G = float((M - P).abs().max()) if M.numel() else 0.0
    return f + alpha * nuclear, max(G, float(g_b.abs().max()))


# -------------------------------------------------------------------------------------- result
@dataclass
class LinearProbeFit:
    """A trained linear probe ``out = M x + b`` (label rows first), and how the solver ended.

    Attributes
    ----------
    coef : Tensor of shape (K + k, d)
        ``M``: the product ``W2 @ W1`` of the head.
    intercept : Tensor of shape (K + k,)
    n_outputs : int
        Label rows K.
    n_iter : int
    converged : bool
        The optimality measure (:func:`probe_optimality`) reached ``tol``.
    objective : float
        ``f + alpha ||M||_*`` at the solution.
    optimality : float
        Largest prox-gradient entry at the solution.
    loss_curve : list of float
        Objective per iteration (smoothed objective for ``"lbfgs"``; after it, for a factored trial, the
        factored objective per function evaluation).
    method : str
    """

    coef: Tensor
    intercept: Tensor
    n_outputs: int
    n_iter: int
    converged: bool
    objective: float
    optimality: float
    loss_curve: list = field(default_factory=list)
    method: str = "lbfgs"

    def factors(self, rank: int | None = None) -> dict[str, Tensor]:
        """Balanced factors ``W1 = S^1/2 V^T`` (rank x d), ``W2 = U S^1/2`` (rows x rank) of ``coef``.

        ``rank`` defaults to ``min(rows, d)``; directions beyond the rank of ``coef`` are zero, and when
        ``rank`` is smaller than the rank of ``coef`` the smallest singular values are dropped.
        """
        M = self.coef
        rank = min(M.shape) if rank is None else int(rank)
        u, s, vh = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
        keep = min(rank, s.numel())
        root = s[:keep].sqrt()
        w1 = M.new_zeros(rank, M.shape[1])
        w2 = M.new_zeros(M.shape[0], rank)
        w1[:keep] = (root[:, None] * vh[:keep]).to(M.dtype)
        w2[:, :keep] = (u[:, :keep] * root).to(M.dtype)
        K = self.n_outputs
        out = {
            "trunk.weight": w1,
            "label_head.weight": w2[:K],
            "label_head.bias": self.intercept[:K].clone(),
        }
        if M.shape[0] > K:
            out["byproduct_head.weight"] = w2[K:]
            out["byproduct_head.bias"] = self.intercept[K:].clone()
        return out

    def load_into(self, head) -> None:
        """Copy the balanced factors into a linear :class:`~luab_sk.nn.PooledHead` (in place).

        The head's byproduct head, if any, is zeroed when the probe was fitted without byproducts.
        """
        if getattr(head, "kind", None) != "linear":
            raise ValueError("load_into needs a PooledHead of kind='linear'.")
        params = self.factors(head.trunk.out_features)
        with torch.no_grad():
            for name, value in params.items():
                if name.startswith("byproduct_head") and head.byproduct_head is None:
                    continue
                target = head.get_parameter(name)
                target.copy_(value.to(device=target.device, dtype=target.dtype))
            if head.byproduct_head is not None and "byproduct_head.weight" not in params:
                head.byproduct_head.weight.zero_()
                head.byproduct_head.bias.zero_()


# ---------------------------------------------------------------------------------- full batch
def _label_rates(loss: LinearProbeLoss) -> Tensor:
    """Weighted class frequencies (multi-class) or positive rates per label column (binary, multi-label)."""
    if loss.task == "multiclass":
        return loss.sample_w @ F.one_hot(loss.y, loss.n_outputs).to(loss.x.dtype)
    return loss.sample_w @ loss.y


def _start(loss: LinearProbeLoss) -> tuple[Tensor, Tensor]:
    """``M = 0`` and the biases of the best constant model (class log-frequencies, Z's means)."""
    x = loss.x
    M = x.new_zeros(loss.n_rows, x.shape[1])
    p = _label_rates(loss)
    if loss.task == "multiclass":
        b_label = (p + 1.0 / x.shape[0]).log()
        b_label = b_label - b_label.mean()
    else:
        p = p.clamp(1e-6, 1 - 1e-6)
        b_label = (p / (1 - p)).log()
    parts = [b_label]
    if loss.use_z:
        counts = (loss.z_w > 0).to(x.dtype) * loss.z_w
        parts.append((counts * loss.z).sum(0) / counts.sum(0).clamp_min(torch.finfo(x.dtype).tiny))
    return M, torch.cat(parts)


def fit_linear_probe(
    x: Tensor,
    y: Tensor,
    z: Tensor | None = None,
    sample_weight: Tensor | None = None,
    *,
    task: str = "multiclass",
    n_outputs: int | None = None,
    alpha: float = 1e-4,
    byproduct_weight: float = 1.0,
    byproduct_loss: str = "smooth_l1",
    tol: float = 1e-4,
    max_iter: int = 200,
    rank: int | None = None,
    method: str = "lbfgs",
    whiten: bool | str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    init: tuple[Tensor, Tensor] | None = None,
    verbose: int = 0,
) -> LinearProbeFit:
    """Fit the linear multitask probe by its convex nuclear-norm form (see the module docstring).

    Parameters
    ----------
    x : Tensor of shape (n, d)
        Features (the estimator passes them standardised).
    y, z, sample_weight, task, n_outputs, byproduct_weight, byproduct_loss
        As for :class:`LinearProbeLoss`. ``byproduct_weight=0`` (or ``z=None``) ignores Z entirely.
    alpha : float, default=1e-4
        Nuclear-norm strength (the factored head's ``alpha / 2`` on both factors).
    tol : float, default=1e-4
        Stop when the largest prox-gradient entry (:func:`probe_optimality`) is at most ``tol`` (and, for
        L-BFGS, the quasi-Newton estimate of the remaining decrease is at most ``tol``).
    max_iter : int, default=200
        Iterations (each one gradient evaluation plus line-search trials, usually none). The iterations
        of a factored trial that does not reach ``tol`` (see the module docstring) are not counted.
    rank : int, optional
        Rank cap of the head's bottleneck; a cap below ``min(rows, d)`` switches to rank-capped APG.
    method : {"lbfgs", "apg"}, default="lbfgs"
    whiten : bool or "byproducts", optional
        True: L-BFGS on every row in whitened coordinates; False: on none; ``"byproducts"``: on the
        byproduct rows only. None (the default): the byproduct rows when ``n >= d``, and the label rows
        too when the covariance is cheap next to a gradient evaluation and the feature variance is
        concentrated (see :func:`_whitened_rows`; ``benchmarks/whitening_rule.py`` measures the choice).
        With Z and fewer samples than features, the probe is solved in the row space of ``x`` (an exact
        change of variables, ``n`` features), with the byproduct rows whitened there by default.
    device, dtype : optional
        Where and in which precision to solve (default: x's).
    init : (M, b), optional
        Starting point (default: ``M = 0`` and the best constant biases).
    verbose : int, default=0

    Returns
    -------
    LinearProbeFit

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(300, 5, generator=g, dtype=torch.float64); y = (x[:, 0] > 0).long()
    >>> fit = fit_linear_probe(x, y, task="multiclass", n_outputs=2, alpha=1e-3, tol=1e-8, max_iter=500)
    >>> fit.converged, fit.optimality <= 1e-8
    (True, True)
    """
    if method not in ("lbfgs", "apg"):
        raise ValueError(f"method must be 'lbfgs' or 'apg', got {method!r}.")
    if not (whiten is None or isinstance(whiten, bool) or whiten == "byproducts"):
        raise ValueError(f"whiten must be None, True, False or 'byproducts', got {whiten!r}.")
    if alpha < 0 or tol <= 0 or max_iter < 1:
        raise ValueError("need alpha >= 0, tol > 0 and max_iter >= 1.")
    device = x.device if device is None else torch.device(device)
    dtype = x.dtype if dtype is None else dtype

    def move(t):
        return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    x = move(x)
    loss = LinearProbeLoss(
        x,
        y.to(device),
        move(z),
        move(sample_weight),
        task=task,
        n_outputs=n_outputs,
        byproduct_weight=byproduct_weight,
        byproduct_loss=byproduct_loss,
    )
    full_rank = min(loss.n_rows, x.shape[1])
    capped = rank is not None and rank < full_rank
    if loss.use_z and x.shape[0] < x.shape[1]:
        # Fewer samples than features: the optimum's rows lie in the row space of x (components outside it
        # change no output and only add to the nuclear norm). Solve there, x = R^T Q^T (thin QR of x^T),
        # with n x n features R^T, where the byproduct rows can be whitened; ||M~ Q^T||_* = ||M~||_*.
        basis, triangle = torch.linalg.qr(x.T)
        features = triangle.T.contiguous()
        start = None if init is None else (move(init[0]) @ basis, move(init[1]))
        sub_tol, n_iter, curve = tol, 0, []
        while True:
            sub = fit_linear_probe(
                features,
                y,
                z,
                sample_weight,
                task=task,
                n_outputs=n_outputs,
                alpha=alpha,
                byproduct_weight=byproduct_weight,
                byproduct_loss=byproduct_loss,
                tol=sub_tol,
                max_iter=max_iter - n_iter,
                rank=rank,
                method=method,
                whiten="byproducts" if whiten is None else whiten,
                device=device,
                dtype=dtype,
                init=start,
                verbose=verbose,
            )
            n_iter, curve = n_iter + sub.n_iter, curve + sub.loss_curve
            M = sub.coef @ basis.T
            objective, optimality = probe_optimality(loss, M, sub.intercept, alpha, rank if capped else None)
            # The two problems are equal in exact arithmetic; the QR's round-off can leave the full-space
            # certificate a little above the row-space one: resume there with a tighter tolerance.
            if optimality <= tol or not sub.converged or n_iter >= max_iter or sub_tol < tol / 64:
                break
            sub_tol, start = sub_tol * 0.5 * tol / optimality, (sub.coef, sub.intercept)
        converged = optimality <= tol
        return LinearProbeFit(
            M, sub.intercept, loss.n_outputs, n_iter, converged, objective, optimality, curve, sub.method
        )
    M, b = _start(loss) if init is None else (move(init[0]).clone(), move(init[1]).clone())
    if init is not None:  # a warm start that is already optimal is returned as it is
        objective, optimality = probe_optimality(loss, M, b, alpha, rank if capped else None)
        if optimality <= tol:
            return LinearProbeFit(M, b, loss.n_outputs, 0, True, objective, optimality, [objective], method)
    if method == "apg" or capped:
        if method == "lbfgs" and capped:  # convex solve first, then the rank-capped polish
            first = _lbfgs(loss, M, b, alpha, tol, max_iter, whiten, verbose)
            M, b = nuclear_prox(first.coef, 0.0, rank)[0], first.intercept
            fit = _apg(loss, M, b, alpha, tol, max(1, max_iter - first.n_iter), rank, verbose)
            fit.n_iter += first.n_iter
            fit.loss_curve = first.loss_curve + fit.loss_curve
            fit.method = "lbfgs+apg(rank cap)"
            return fit
        return _apg(loss, M, b, alpha, tol, max_iter, rank if capped else None, verbose)
    fit = _lbfgs(loss, M, b, alpha, tol, max_iter, whiten, verbose)
    if not fit.converged and fit.n_iter < max_iter:
        # L-BFGS stalled or crawled on the smoothed kinks of a low-rank optimum (or on float32 round-off):
        # polish with exact prox steps, in float64 (float32 round-off stalls the backtracking near optimum)
        if x.dtype != torch.float64:
            loss = LinearProbeLoss(
                x.double(),
                y.to(device),
                None if z is None else z.to(device=device, dtype=torch.float64),
                None if sample_weight is None else sample_weight.to(device=device, dtype=torch.float64),
                task=task,
                n_outputs=n_outputs,
                byproduct_weight=byproduct_weight,
                byproduct_loss=byproduct_loss,
            )
        polish = _apg(
            loss, fit.coef.double(), fit.intercept.double(), alpha, tol, max_iter - fit.n_iter, None, verbose
        )
        polish.coef, polish.intercept = polish.coef.to(dtype), polish.intercept.to(dtype)
        polish.n_iter += fit.n_iter
        polish.loss_curve = fit.loss_curve + polish.loss_curve
        polish.method = "lbfgs+apg"
        fit = polish
    if task == "multiclass":  # softmax ignores a common shift of the label biases: report them centred
        fit.intercept[: fit.n_outputs] -= fit.intercept[: fit.n_outputs].mean()
    return fit


def _lbfgs(loss, M0, b0, alpha, tol, max_iter, whiten, verbose) -> LinearProbeFit:
    x = loss.x
    d = x.shape[1]
    m = loss.n_rows
    eps = 0.1 * tol
    start = _whitened_rows(loss, whiten)
    pre = None if start is None else _Whitening(loss, alpha, start)

    # Row preconditioning: in whitened coordinates each output row's Hessian is close to its loss
    # curvature times the identity; the byproduct rows' curvature differs from the label rows' (by 10x on
    # standardised clicks), which a single L-BFGS scale cannot absorb. theta holds the rows times the
    # square root of their curvature relative to the label rows' (label rows: 1, so no Z is unchanged).
    scale = _row_scale(loss)[:, None]
    # Kronecker-factored start of the inverse Hessian (wide M): near M = U S V^T the smoothed nuclear
    # norm's curvature across M's rows is alpha (M M^T + eps^2)^-1/2 on the left, up to alpha / eps on
    # small singular values, which one scalar (the usual s^T y / y^T y) cannot absorb. In theta's
    # coordinates it is alpha D P D on the left, D = diag(sqrt(rho) / scale), with rho 1 for rows in M's
    # coordinates and the mean inverse eigenvalue of the whitened covariance (cov + ridge) for whitened
    # rows (a scalar stand-in for their right factor). H0 = (c I + alpha D P D)^-1 on the row side, c the
    # loss's curvature measured from its own gradient changes (1 / c on the biases). Measured on
    # make_embedding_classification 4000 x 384, 20 classes: 180-200 -> 74-77 iterations at alpha=1e-2
    # (from iteration _KRON_FROM on).
    kron = alpha > 0 and m <= d
    if kron:
        rho = x.new_ones(m, dtype=torch.float64)
        if pre is not None:
            rho[pre.start :] = pre.inverse_mean()
        side = rho.sqrt() / scale[:, 0].double()
        curvature = None

    def unpack(theta):
        v = theta[: m * d].view(m, d) / scale
        return (v if pre is None else pre.to_m(v)), theta[m * d :] / scale[:, 0]

    def pack(mm, b):
        v = mm if pre is None else pre.to_v(mm)
        return torch.cat([(v * scale).reshape(-1), b * scale[:, 0]])

    last = {}

    def fun(theta):
        M, b = unpack(theta)
        f, g_m, g_b = loss(M, b)
        h, g_h, spectrum = _smoothed_nuclear(M, eps) if alpha > 0 else (0.0, None, None)
        g_total = g_m if g_h is None else g_m + alpha * g_h
        g_v = g_total if pre is None else pre.grad_v(g_total)
        last.update(M=M, b=b, g_m=g_m, g_b=g_b, g_total=g_total, g_v=g_v, spectrum=spectrum)
        return f + alpha * h, theta_grad(g_v, g_b)

    def theta_grad(g_v, g_b):  # a gradient in V's coordinates (and the biases') in theta's
        return torch.cat([(g_v / scale).reshape(-1), g_b / scale[:, 0]])

    def optimal():
        # Screen first: the smoothed gradient, in M's coordinates and (when whitening) in the whitened
        # ones. On embeddings whose variance sits in a few directions, a unit-step gradient in M's
        # coordinates is tiny along the weak directions long before the objective has converged there;
        # the whitened gradient (scale-free, like a Newton decrement) is not.
        screen = [last["g_total"], last["g_b"]] + ([last["g_v"]] if pre is not None else [])
        if max(float(t.abs().max()) for t in screen) > tol:
            return None
        P, _ = prox_step()
        value = max(float((last["M"] - P).abs().max()), float(last["g_b"].abs().max()))
        return value

    def prox_step():  # the unit prox-gradient step at the last point: (prox, its singular values)
        return nuclear_prox(last["M"] - last["g_m"], alpha)

    def factored_trial(deficit):
        M, b = (t.clone() for t in unpack(theta))
        budget = min(_FACTORED_TRIAL_ITER, max_iter - n_iter)
        # the pace to beat: M's last 10 iterations, or, early (a rank deficit at iteration 20, where the
        # first iterations' large drops still fill the window), its last 3 scaled to 10
        recent = min(_PACE_RECENT if deficit else _CRAWL_WINDOW, len(curve) - 1)
        pace = _FACTORED_TRIAL_PACE * (curve[-recent - 1] - curve[-1]) * _CRAWL_WINDOW / recent
        whiten_b = pre is not None and _loss_dominates(loss, M, scale[:, 0], alpha)  # an SVD: only if needed
        kw = {"pre": pre if whiten_b else None, "scale": scale[:, 0]}
        trial = _factored_lbfgs(loss, M, b, alpha, tol, budget, verbose, min_drop=pace, **kw)
        rest = max_iter - n_iter - trial.n_iter
        # It kept the pace to its budget's end and got below M's objective: the better solver here, so it
        # finishes (10k x 512 x 100 classes with Z at alpha=1e-2: M's L-BFGS took 220 more iterations to
        # reach what the trial had, and the fit ended at max_iter=500), in runs of `budget` iterations
        # while each lowers the objective faster than the crawl rule's pace (a factored stationary point
        # that is not optimal stalls it; the caller's exact prox steps follow).
        keep = trial.converged or (trial.n_iter == budget and trial.objective < curve[-1] and rest > 0)
        while keep and not trial.converged and rest > 0:
            more = _factored_lbfgs(
                loss, trial.coef, trial.intercept, alpha, tol, min(budget, rest), verbose, **kw
            )
            crawled = trial.objective - more.objective <= _CRAWL_FACTOR * tol * more.n_iter / _CRAWL_WINDOW
            more.n_iter += trial.n_iter
            more.loss_curve = trial.loss_curve + more.loss_curve
            trial, rest = more, max_iter - n_iter - more.n_iter
            if crawled:
                break
        trial.n_iter += n_iter
        trial.loss_curve = curve + trial.loss_curve
        trial.method = "lbfgs+factored"
        return trial, keep

    # A ridge start (labels and byproduct rows) saves a quarter of the iterations or more.
    if pre is not None and not bool(M0.any()):
        M0, b0 = _ridge_start(loss, b0, pre, alpha)
    theta = pack(M0, b0)
    f, g = fun(theta)
    curve, s_hist, y_hist, rho_hist = [f], [], [], []
    stalled, n_iter = 0, 0
    stall_tol = _STALL_EPS_FACTOR * torch.finfo(x.dtype).eps

    def two_loop(g):
        q = -g
        alphas = []
        for s, yv, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a = rho * float(s @ q)
            alphas.append(a)
            q = q - a * yv
        if y_hist and kron and curvature is not None and n_iter >= _KRON_FROM:
            vecs, sv = last["spectrum"]
            penalty = alpha * side[:, None] * ((vecs / sv) @ vecs.T) * side  # alpha D P D
            rows = penalty + curvature * torch.eye(m, dtype=torch.float64, device=x.device)
            block = torch.linalg.solve(rows, q[: m * d].view(m, d).double()).to(q.dtype)
            q = torch.cat([block.reshape(-1), q[m * d :] / curvature])
        elif y_hist:
            q = q * (float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1]))
        for (s, yv, rho), a in zip(zip(s_hist, y_hist, rho_hist), reversed(alphas)):
            q = q + (a - rho * float(yv @ q)) * s
        return q

    direction = two_loop(g)
    while n_iter < max_iter:
        # Stop rule: the prox-gradient test (tol) and, once L-BFGS has curvature pairs, the quasi-Newton
        # estimate of the remaining decrease, g^T H^-1 g / 2 <= tol: on flat, high-dimensional problems
        # a small gradient alone still leaves a large objective gap.
        decrement = -0.5 * float(g @ direction) if y_hist else math.inf
        if decrement <= tol:
            value = optimal()
            if value is not None and value <= tol:
                break
        n_iter += 1
        gtd = float(g @ direction)
        if not gtd < 0:
            s_hist.clear(), y_hist.clear(), rho_hist.clear()
            direction, gtd = -g, -float(g @ g)
        # unit steps once the memory scales the direction; a cautious first step (as torch's LBFGS)
        step = 1.0 if y_hist else min(1.0, 1.0 / max(float(g.abs().sum()), 1e-12))
        g_m, g_b = last["g_m"], last["g_b"]  # the smooth loss's gradient, whose changes measure c
        for _ in range(_MAX_BACKTRACK):
            candidate = theta + step * direction
            f_new, g_new = fun(candidate)
            if math.isfinite(f_new) and f_new <= f + _ARMIJO * step * gtd:
                break
            # quadratic interpolation of the step, kept within [0.1, 0.5] of the last one
            shrink = 0.5 if not math.isfinite(f_new) else -0.5 * gtd * step / (f_new - f - gtd * step)
            step *= max(0.1, min(0.5, shrink))
        else:
            break  # no decrease possible at this precision
        s_vec, y_vec = candidate - theta, g_new - g
        sy = float(s_vec @ y_vec)
        if sy > 1e-10 * float(y_vec @ y_vec):
            if len(s_hist) == _HISTORY:
                s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
            s_hist.append(s_vec), y_hist.append(y_vec), rho_hist.append(1.0 / sy)
        if kron and n_iter >= _KRON_FROM - 1:  # c, from the pair that precedes the first use
            dg_m = last["g_m"] - g_m
            y_f = theta_grad(dg_m if pre is None else pre.grad_v(dg_m), last["g_b"] - g_b)
            sy_f = float(s_vec @ y_f)
            if sy_f > 0:
                curvature = float(y_f @ y_f) / sy_f
        stalled = stalled + 1 if f - f_new <= stall_tol * max(abs(f_new), 1.0) else 0
        theta, f, g = candidate, f_new, g_new
        curve.append(f)
        if verbose:
            print(f"lbfgs iter {n_iter}: objective {f:.8g}")
        direction = two_loop(g)
        if stalled >= _STALL_ITERATIONS:
            break
        if len(curve) > _CRAWL_WINDOW and curve[-_CRAWL_WINDOW - 1] - curve[-1] <= _CRAWL_FACTOR * tol:
            break
        deficit = (
            alpha > 0 and n_iter == _FACTORED_RANK_CHECK_AT and int((prox_step()[1] > 0).sum()) < min(m, d)
        )
        if n_iter < max_iter and ((alpha > 0 and n_iter == _FACTORED_TRIAL_AT) or deficit):
            trial, keep = factored_trial(deficit)
            if keep:
                return trial
    M, b = (t.clone() for t in unpack(theta))
    objective, optimality = probe_optimality(loss, M, b, alpha)
    return LinearProbeFit(
        M, b, loss.n_outputs, n_iter, optimality <= tol, objective, optimality, curve, "lbfgs"
    )


def _factored_lbfgs(
    loss, M, b, alpha, tol, max_iter, verbose, min_drop=-math.inf, pre=None, scale=None
) -> LinearProbeFit:
    """L-BFGS (:class:`torch.optim.LBFGS`, strong Wolfe) on balanced factors of ``M = A B^T``.

    Minimises ``f(A B^T, b) + alpha / 2 * (||A||^2 + ||B||^2)``, which equals the nuclear-norm objective at
    balanced factors and is smooth (no kinks at zero singular values), from ``A = U S^1/2``,
    ``B = V S^1/2`` of the SVD of ``M``. It optimises ``D A`` and ``L^T B`` (the same problem): ``D`` the
    rows' curvature scale (``scale``, :func:`_row_scale`) and ``L`` the whitening factor of ``pre`` (a
    :class:`_Whitening`, when given), the preconditioning of M's own L-BFGS. Every 10 iterations it checks
    the convex problem's optimality (:func:`probe_optimality` of ``A B^T``, the certificate: factored
    stationary points need not be optimal) and stops when it is at most ``tol``, or, unconverged, when
    its first 10 iterations lowered the objective by less than ``min_drop``.
    """
    u, s, vh = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    root = s.sqrt()
    row = M.new_ones(M.shape[0], 1) if scale is None else scale.reshape(-1, 1).to(M.dtype)
    L = None if pre is None else pre.factor.to(M.dtype)

    def to_b(c):  # B = L^-T C
        return c if L is None else torch.linalg.solve_triangular(L.T, c, upper=True)

    def grad_c(g):  # dC = L^-1 dB
        return g if L is None else torch.linalg.solve_triangular(L, g, upper=False)

    B0 = (vh.T * root).to(M.dtype)
    A = ((u * root).to(M.dtype) * row).contiguous().requires_grad_()  # A' = D A
    C = (B0 if L is None else L.T @ B0).contiguous().requires_grad_()
    bias = b.clone().requires_grad_()
    optimizer = torch.optim.LBFGS(
        [A, C, bias],
        lr=1.0,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=_HISTORY,
        line_search_fn="strong_wolfe",
    )
    curve = []

    def product():
        return (A / row) @ to_b(C).T

    def closure():
        with torch.no_grad():
            a, B = A / row, to_b(C)
            f, g_m, g_b = loss(a @ B.T, bias)
            A.grad = (g_m @ B + alpha * a) / row
            C.grad, bias.grad = grad_c(g_m.T @ a + alpha * B).contiguous(), g_b
            value = f + 0.5 * alpha * float(a.pow(2).sum() + B.pow(2).sum())
        curve.append(value)
        return torch.tensor(value, dtype=torch.float64)

    n_iter = 0
    while True:
        optimizer.param_groups[0]["max_iter"] = min(10, max_iter - n_iter)
        optimizer.step(closure)
        done = optimizer.state[A].get("n_iter", n_iter)
        stuck, n_iter = done == n_iter, done
        with torch.no_grad():
            objective, optimality = probe_optimality(loss, product(), bias, alpha)
        if verbose:
            print(f"factored lbfgs iter {n_iter}: objective {objective:.8g}, optimality {optimality:.3g}")
        if optimality <= tol or stuck or n_iter >= max_iter or not math.isfinite(objective):
            break
        if curve[0] - objective < min_drop:  # slower than the caller's own pace: give up
            break
    return LinearProbeFit(
        product().detach(),
        bias.detach(),
        loss.n_outputs,
        n_iter,
        optimality <= tol,
        objective,
        optimality,
        curve,
        "factored",
    )


def _loss_dominates(loss: LinearProbeLoss, M: Tensor, scale: Tensor, alpha: float) -> bool:
    """Whether the loss's curvature along the right factor ``B`` of balanced factors ``M = A B^T`` is at
    least :data:`_FACTORED_WHITEN_DOMINANCE` times the penalty's (``alpha``, per unit of standardised
    feature variance): ``sum_r c_r ||a_r||^2 >= ratio * alpha``, ``c_r`` the rows' loss curvature (the
    label rows' mean ``p (1 - p)`` times ``scale ** 2``, :func:`_row_scale`), ``||a_r||^2 = (U S U^T)_rr``.
    Then B's Hessian is close to that curvature times the feature covariance, which whitening makes
    well conditioned."""
    if alpha <= 0:
        return True
    p = _label_rates(loss)
    u, s, _ = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    rows = (u * u * s).sum(1)
    curvature = float((p * (1 - p)).mean()) * scale.to(torch.float64) ** 2
    return float(curvature @ rows) >= _FACTORED_WHITEN_DOMINANCE * alpha


def _participation_ratio(loss: LinearProbeLoss, probes: int = 8) -> float:
    """``trace(cov)^2 / ||cov||_F^2`` of the (weighted) features, ``||cov||_F^2`` sketched as
    ``E ||cov g||^2`` over ``probes`` seeded Gaussian vectors ``g`` (one pass over x): about ``d`` for a
    flat spectrum, small when the variance sits in a few directions."""
    x = loss.x
    w = loss.sample_w
    mean = w @ x
    generator = torch.Generator(device=x.device).manual_seed(0)
    g = torch.randn(x.shape[1], probes, generator=generator, device=x.device, dtype=x.dtype)
    proj = (x @ g - mean @ g) * w[:, None]
    cov_g = x.T @ proj - mean[:, None] * proj.sum(0)
    trace = float(w @ torch.linalg.vector_norm(x, dim=1).square()) - float(mean @ mean)  # 10x einsum's speed
    return trace * trace / max(float((cov_g * cov_g).sum()) / probes, 1e-300)


def _whitened_rows(loss: LinearProbeLoss, whiten: bool | str | None) -> int | None:
    """The first row L-BFGS whitens (0: all, K: the byproduct rows), or None (no whitening).

    ``whiten=None`` decides from costs and the spectrum (:data:`_WHITEN_EVALS`, :data:`_WHITEN_SPREAD`):
    the label rows are whitened when the covariance and its Cholesky factor cost at most
    ``_WHITEN_EVALS`` gradient evaluations and the variance is concentrated (participation ratio at most
    ``_WHITEN_SPREAD * d``); the byproduct rows (a regression, as ill-conditioned as the features) are
    whitened whenever ``n >= d``.
    """
    n, d = loss.x.shape
    if whiten == "byproducts":
        return loss.n_outputs if loss.use_z else None
    if whiten is not None:
        return 0 if whiten else None
    if n < d:
        return None
    cheap = n * d * d + d**3 / 3 <= _WHITEN_EVALS * 2.0 * n * d * loss.n_rows  # covariance vs evaluations
    if cheap and _participation_ratio(loss) <= _WHITEN_SPREAD * d:
        return 0
    return loss.n_outputs if loss.use_z else None


class _Whitening:
    """The change of variables ``M[start:] = V[start:] L^-1`` of L-BFGS, ``L L^T = cov + ridge I``.

    ``cov`` is the (weighted) feature covariance, ``ridge`` at least ``_WHITEN_RIDGE`` times its mean
    variance. ``solve(c)`` is ``(L L^T)^-1 c``, the ridge solve of the start.

    ``L`` is factored in x's dtype (float32: 2.5x faster than float64 at d = 1280; the ridge bounds the
    condition number by about ``1 + d / _WHITEN_RIDGE``, and any ``L`` serves as a change of variables),
    in float64 when that fails.
    """

    def __init__(self, loss: LinearProbeLoss, alpha: float, start: int) -> None:
        x = loss.x
        w = loss.sample_w
        self.start, self.mean = start, w @ x
        xc = x - self.mean
        cov = xc.T @ (xc * w[:, None])
        ridge = max(alpha, _WHITEN_RIDGE * float(cov.diagonal().double().mean()), 1e-12)
        cov.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(cov)
        if int(info):
            factor = torch.linalg.cholesky(cov.double()).to(x.dtype)
        self.factor = factor

    def _rows(self, v, fn):
        return fn(v) if self.start == 0 else torch.cat([v[: self.start], fn(v[self.start :])])

    def to_m(self, v):  # M = V L^-1
        return self._rows(v, lambda t: torch.linalg.solve_triangular(self.factor, t, upper=False, left=False))

    def to_v(self, mm):  # V = M L
        return self._rows(mm, lambda t: t @ self.factor)

    def grad_v(self, g):  # dV = dM L^-T
        return self._rows(g, lambda t: torch.linalg.solve_triangular(self.factor, t.T, upper=False).T)

    def inverse_mean(self, probes: int = 16) -> float:
        """``trace((L L^T)^-1) / d``, the mean inverse eigenvalue, as ``E ||L^-1 g||^2 / d`` over
        ``probes`` seeded Gaussian vectors."""
        generator = torch.Generator(device=self.factor.device).manual_seed(0)
        g = torch.randn(self.factor.shape[0], probes, generator=generator, device=self.factor.device)
        u = torch.linalg.solve_triangular(self.factor.double(), g.double(), upper=False)
        return float((u * u).sum()) / (probes * self.factor.shape[0])

    def solve(self, c):  # (L L^T)^-1 c, c of shape (d, k), float64
        return torch.cholesky_solve(c, self.factor.to(torch.float64))


def _row_scale(loss: LinearProbeLoss) -> Tensor:
    """Per-row ``sqrt(curvature / label curvature)`` (m,): 1 for label rows, byproduct rows rescaled.

    The curvature of a row is its loss's second derivative summed over the samples' weights: for the label
    rows ``p (1 - p)`` at the class frequencies ``p`` (their mean is the reference), for a byproduct column
    its weight total times ``1 / beta`` (smooth L1 inside its quadratic zone), 2 (L2) or ``1 / beta`` (L1,
    a surrogate: its curvature is zero almost everywhere).
    """
    x = loss.x
    scale = x.new_ones(loss.n_rows)
    if not loss.use_z:
        return scale
    K = loss.n_outputs
    p = _label_rates(loss)
    label = float((p * (1 - p)).mean()) * float(loss.label_w.sum())
    per_unit = 2.0 if loss.kind == "l2" else 1.0 / loss.beta
    byproduct = loss.z_w.sum(0) * per_unit
    ratio = (byproduct / max(label, torch.finfo(x.dtype).tiny)).clamp(1e-4, 1e4)
    scale[K:] = ratio.sqrt()
    return scale


def _ridge_start(loss: LinearProbeLoss, b0: Tensor, pre: _Whitening, alpha: float) -> tuple[Tensor, Tensor]:
    """Ridge regression, with ``pre``'s covariance, of the rows ``pre`` whitens: the centred label
    indicators (rescaled to logits) and each byproduct column on its observed rows; other rows stay 0.

    One pass over x per block of rows (``x^T T``) and ``pre.solve``; the logit scale and label biases are
    fitted on an evenly strided subsample of at most 4096 rows (:func:`_fit_logit_scale`).
    """
    from .init import _fit_logit_scale  # a sibling helper (no cycle: init does not import solvers)

    x, mean = loss.x, pre.mean
    K = loss.n_outputs
    M = x.new_zeros(loss.n_rows, x.shape[1])
    b = b0.clone()
    if pre.start == 0:
        w = loss.sample_w
        t = F.one_hot(loss.y, K).to(x.dtype) if loss.task == "multiclass" else loss.y
        t = (t - w @ t) * w[:, None]
        cross = (x.T @ t - mean[:, None] * t.sum(0)).to(torch.float64)
        coef = pre.solve(cross).T.to(x.dtype)  # (K, d)
        rows = slice(None, None, max(1, -(-x.shape[0] // 4096)))
        scores = (x[rows] - mean) @ coef.T
        y_rows = loss.y[rows].reshape(-1) if loss.task == "binary" else loss.y[rows]
        # the scale's penalty is the objective's on these rows (alpha ||scale coef||_*): without it, labels
        # the ridge direction separates drove the scale up to the logit fit's iteration cap (a label row of
        # norm 212 at alpha=1e-3, 2000 x 700 with Z: 766 iterations to shrink it back, against 41 from 0)
        penalty = alpha * float(torch.linalg.matrix_norm(coef.double(), ord="nuc"))
        scale, bias = _fit_logit_scale(scores, y_rows, loss.task, penalty, loss.sample_w[rows])
        M[:K] = coef * scale
        b[:K] = bias.to(x.dtype) - M[:K] @ mean
    if loss.use_z:  # ridge regression of each byproduct column on its observed rows' x
        seen = (loss.z_w > 0).to(x.dtype)
        count = seen.sum(0).clamp_min(1.0)
        z_mean = (seen * loss.z).sum(0) / count
        r = seen * (loss.z - z_mean)
        cross = (x.T @ r - mean[:, None] * r.sum(0)).to(torch.float64) / count
        M[K:] = pre.solve(cross).T.to(x.dtype)
        b[K:] = z_mean - M[K:] @ mean
    return M, b


def _apg(loss, M, b, alpha, tol, max_iter, rank, verbose) -> LinearProbeFit:
    """FISTA with backtracking (Beck & Teboulle 2009) and function-value restart (O'Donoghue & Candes)."""
    lipschitz = 1.0
    f, g_m, g_b = loss(M, b)
    F_cur = f + alpha * float(torch.linalg.matrix_norm(M.to(torch.float64), ord="nuc"))
    yM, yb, fy, gy_m, gy_b = M, b, f, g_m, g_b
    t = 1.0
    curve, converged, n_iter = [F_cur], False, 0
    while n_iter < max_iter:
        n_iter += 1
        for _ in range(60):
            newM, s = nuclear_prox(yM - gy_m / lipschitz, alpha / lipschitz, rank)
            newb = yb - gy_b / lipschitz
            dM, db = newM - yM, newb - yb
            f_new, gn_m, gn_b = loss(newM, newb)
            quad = fy + float((gy_m * dM).sum() + (gy_b * db).sum())
            quad += 0.5 * lipschitz * float((dM * dM).sum() + (db * db).sum())
            if f_new <= quad + 1e-12 * abs(quad):
                break
            lipschitz *= 2.0
        F_new = f_new + alpha * float(s.sum())
        curve.append(F_new)
        if verbose:
            print(f"apg iter {n_iter}: objective {F_new:.8g}, L {lipschitz:.3g}")
        # optimality at the new point (unit-step prox-gradient)
        P, _ = nuclear_prox(newM - gn_m, alpha, rank)
        if max(float((newM - P).abs().max()), float(gn_b.abs().max())) <= tol:
            M, b, converged = newM, newb, True
            break
        if F_new > F_cur:  # restart momentum
            t = 1.0
            yM, yb, fy, gy_m, gy_b = newM, newb, f_new, gn_m, gn_b
        else:
            t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
            mom = (t - 1) / t_next
            yM, yb = newM + mom * (newM - M), newb + mom * (newb - b)
            t = t_next
            fy, gy_m, gy_b = loss(yM, yb) if mom else (f_new, gn_m, gn_b)
        M, b, F_cur = newM, newb, F_new
        lipschitz *= 0.9
    objective, optimality = probe_optimality(loss, M, b, alpha, rank)
    return LinearProbeFit(M, b, loss.n_outputs, n_iter, converged, objective, optimality, curve, "apg")


def head_map(head, byproducts: bool = True) -> tuple[Tensor, Tensor]:
    """The map ``(M, b)`` of a linear :class:`~luab_sk.nn.PooledHead`: ``M = W2 @ W1``, label rows first,
    then (``byproducts`` and the head has them) the byproduct rows; detached copies."""
    with torch.no_grad():
        heads = [head.label_head]
        if byproducts and head.byproduct_head is not None:
            heads.append(head.byproduct_head)
        return (
            (torch.cat([h.weight for h in heads]) @ head.trunk.weight).detach(),
            torch.cat([h.bias for h in heads]).detach(),
        )


def fit_linear_head(
    head,
    x: Tensor,
    y: Tensor,
    z: Tensor | None = None,
    sample_weight: Tensor | None = None,
    *,
    task: str,
    alpha: float,
    byproduct_weight: float = 1.0,
    byproduct_loss: str = "smooth_l1",
    tol: float = 1e-4,
    max_iter: int = 200,
    device: str | torch.device | None = None,
    warm_start: bool = False,
    verbose: int = 0,
) -> LinearProbeFit:
    """Train a linear :class:`~luab_sk.nn.PooledHead` in place by its convex form; the estimator's hook.

    ``x`` standardised features, ``y`` encoded labels (class indices, or 0/1), ``z`` standardised
    byproducts with NaN for missing (ignored when the head has no byproduct head or the weight is 0).
    The objective equals the head's ``label + byproduct_weight * byproduct loss + alpha / 2 * (squared
    norms of its weight matrices)`` at the balanced factorisation that :meth:`LinearProbeFit.load_into`
    writes; the head's bottleneck width is the rank cap. ``warm_start`` starts from the head's current
    product of factors instead of the ridge start. Returns the fit (``n_iter``, ``converged``,
    ``loss_curve``, ``objective``, ``optimality``).
    """
    device = x.device if device is None else torch.device(device)
    use_z = z is not None and head.byproduct_head is not None and byproduct_weight > 0
    init = None
    if warm_start:  # continue from the head's current map (its product of factors)
        init = tuple(t.to(device=device, dtype=x.dtype) for t in head_map(head, use_z))
    fit = fit_linear_probe(
        x,
        y,
        z if use_z else None,
        sample_weight,
        task=task,
        n_outputs=head.label_head.out_features,
        alpha=float(alpha),
        byproduct_weight=float(byproduct_weight) if use_z else 0.0,
        byproduct_loss=byproduct_loss,
        tol=float(tol),
        max_iter=int(max_iter),
        rank=head.trunk.out_features,
        device=device,
        init=init,
        verbose=verbose,
    )
    fit.load_into(head)
    return fit


# ---------------------------------------------------------------------------------- mini-batch
def fit_linear_probe_minibatch(
    X,
    y: np.ndarray,
    z: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    *,
    mean: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    task: str = "multiclass",
    n_outputs: int | None = None,
    alpha: float = 1e-4,
    byproduct_weight: float = 1.0,
    byproduct_loss: str = "smooth_l1",
    penalty: str = "auto",
    batch_size: int = 4096,
    max_epochs: int = 10,
    learning_rate: float = 1e-2,
    warmup: float = 0.05,
    prox_every: int = 50,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tol: float | None = None,
    n_iter_no_change: int = 10,
    init: tuple[Tensor, Tensor] | None = None,
    callback: Callable[[int, Tensor, Tensor], bool] | None = None,
) -> LinearProbeFit:
    """Mini-batch Adam on ``(M, b)``, streaming X from a sliceable array (e.g. a ``numpy.memmap``).

    Each step reads one contiguous block ``X[start:start + batch_size]`` (blocks visited in a seeded
    random order every epoch), converts only that block to a tensor on ``device`` and standardises it
    there with ``mean`` / ``scale``: memory is one batch plus the parameters and Adam's two moments;
    X itself is never copied. The step size follows a linear warm-up (``warmup`` of the steps) and a
    cosine decay to zero over ``max_epochs``.

    Penalty: ``"l2"`` adds ``alpha / 2 ||M||_F^2`` to the gradient (LogisticRegression's objective);
    ``"nuclear"`` applies singular-value shrinkage of ``alpha`` times the steps' learning rates every
    ``prox_every`` steps (a stochastic proximal heuristic; it is what ties the byproduct rows to the label
    rows). ``"auto"``: nuclear when Z is used, L2 otherwise.

    ``callback(epoch, M, b)`` runs after every epoch; returning True stops training (used to time the
    epochs until a target accuracy is reached). With ``tol``, training also stops when the epoch's mean
    objective has not fallen by ``tol`` (relative to its best so far) for ``n_iter_no_change`` epochs
    (the estimators' AdamW rule). ``init=(M, b)`` starts from a given map (a warm start). Rows of Z that
    are all NaN contribute no Z loss.

    Returns
    -------
    LinearProbeFit
        ``converged`` is True when the callback or the ``tol`` rule stopped training; ``objective`` and
        ``optimality`` are NaN (not computed on the full data); ``loss_curve`` holds the mean batch
        objective per epoch.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(2000, 8)).astype(np.float32); y = (X[:, 0] > 0).astype(int)
    >>> fit = fit_linear_probe_minibatch(X, y, n_outputs=2, batch_size=256, max_epochs=20, learning_rate=0.1)
    >>> pred = (X @ fit.coef.numpy().T + fit.intercept.numpy()).argmax(1)
    >>> bool((pred == y).mean() > 0.9)
    True
    """
    if penalty not in ("auto", "l2", "nuclear"):
        raise ValueError(f"penalty must be 'auto', 'l2' or 'nuclear', got {penalty!r}.")
    device = torch.device(device)
    n, d = X.shape
    y = np.asarray(y)
    use_z = z is not None and byproduct_weight > 0
    if penalty == "auto":
        penalty = "nuclear" if use_z else "l2"
    if task == "multiclass":
        K = int(n_outputs if n_outputs is not None else y.max() + 1)
    else:
        K = 1 if y.ndim == 1 else y.shape[1]
    rows = K + (z.shape[1] if use_z else 0)
    mean_t = torch.zeros(d, dtype=dtype, device=device)
    scale_t = torch.ones(d, dtype=dtype, device=device)
    if mean is not None:
        mean_t = torch.as_tensor(mean).to(device, dtype)
    if scale is not None:
        scale_t = torch.as_tensor(scale).to(device, dtype)
    M = torch.zeros(rows, d, dtype=dtype, device=device, requires_grad=False)
    b = torch.zeros(rows, dtype=dtype, device=device)
    # Prior biases from the labels (cheap, labels are small).
    if task == "multiclass":
        counts = np.bincount(y.astype(np.int64), minlength=K).astype(np.float64) + 1.0
        b[:K] = torch.as_tensor(np.log(counts) - np.log(counts).mean(), dtype=dtype)
    if use_z:
        b[K:] = torch.as_tensor(np.nan_to_num(np.nanmean(z, axis=0)), dtype=dtype)
    if init is not None:
        if tuple(init[0].shape) != (rows, d) or tuple(init[1].shape) != (rows,):
            raise ValueError(
                f"init must be (M, b) of shapes {(rows, d)} and {(rows,)}, got {tuple(init[0].shape)} and "
                f"{tuple(init[1].shape)}."
            )
        M.copy_(init[0].to(device, dtype))
        b.copy_(init[1].to(device, dtype))
    params = [M, b]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    n_blocks = math.ceil(n / batch_size)
    total = n_blocks * max_epochs
    n_warm = max(1, int(warmup * total))

    def rate(step):
        if step < n_warm:
            return (step + 1) / n_warm
        progress = (step - n_warm) / max(1, total - n_warm)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(seed)
    curve, step, stopped, epoch = [], 0, False, 0
    best, stale = math.inf, 0
    pending_shrink = 0.0
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(n_blocks, generator=generator).tolist()
        total_loss = 0.0
        for block in order:
            lo, hi = block * batch_size, min(n, (block + 1) * batch_size)
            xb = torch.from_numpy(np.array(X[lo:hi], dtype=np.float32, order="C")).to(device, dtype)
            xb = (xb - mean_t) / scale_t
            yb = torch.as_tensor(y[lo:hi], device=device)
            zb = None if not use_z else torch.as_tensor(z[lo:hi]).to(device, dtype)
            wb = None if sample_weight is None else torch.as_tensor(sample_weight[lo:hi]).to(device, dtype)
            if wb is not None and not bool(wb.sum() > 0):
                continue  # a block of zero-weight rows (held-out validation rows, say) has no loss
            loss = LinearProbeLoss(
                xb,
                yb,
                zb,
                wb,
                task=task,
                n_outputs=K,
                byproduct_weight=byproduct_weight,
                byproduct_loss=byproduct_loss,
            )
            with torch.no_grad():
                f, g_m, g_b = loss(M.detach(), b.detach())
                if penalty == "l2" and alpha:
                    g_m = g_m + alpha * M
                    f += 0.5 * alpha * float((M * M).sum())
            M.grad, b.grad = g_m, g_b
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            total_loss += f * (hi - lo)
            if penalty == "nuclear" and alpha:
                pending_shrink += alpha * lr_now
                if step % prox_every == 0:
                    with torch.no_grad():
                        M.copy_(nuclear_prox(M.detach(), pending_shrink)[0])
                    pending_shrink = 0.0
        curve.append(total_loss / n)
        if not math.isfinite(curve[-1]):
            break  # the caller checks the curve (the estimators raise NonFiniteObjectiveError)
        if callback is not None and callback(epoch, M.detach(), b.detach()):
            stopped = True
            break
        if tol is not None:
            improved = not math.isfinite(best) or curve[-1] < best - tol * max(abs(best), 1.0)
            stale = 0 if improved else stale + 1
            best = min(best, curve[-1])
            if stale >= n_iter_no_change:
                stopped = True
                break
    return LinearProbeFit(
        M.detach(), b.detach(), K, epoch, stopped, float("nan"), float("nan"), curve, "minibatch-adam"
    )
