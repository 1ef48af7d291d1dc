"""Losses for learning from labels and annotation byproducts.

Conventions: byproduct targets are float tensors with NaN marking missing elements; missing elements
contribute nothing, and a batch where nothing is observed gives a loss of exactly zero (still attached
to the graph, so ``backward`` works). Optional ``sample_weight`` weights rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _grid
from .heads import HeadOutput

__all__ = [
    "MultitaskLoss",
    "masked_regression_loss",
    "gaussian_heatmap",
    "heatmap_loss",
    "soft_argmax",
    "point_loss",
    "label_loss",
    "multitask_loss",
    "prior_label_loss",
]

REGRESSION_LOSSES = ("smooth_l1", "l2", "l1")
LABEL_TASKS = ("multiclass", "binary", "multilabel")
BYPRODUCT_TARGETS = ("regression", "heatmap", "point")


class MultitaskLoss(NamedTuple):
    """``total = label + byproduct_weight * byproduct``, with both parts kept for logging."""

    total: Tensor
    label: Tensor
    byproduct: Tensor


def _weighted_mean(values: Tensor, mask: Tensor, sample_weight: Tensor | None) -> Tensor:
    """Mean of ``values`` over the elements where ``mask`` holds, rows weighted; 0 when none hold."""
    weights = mask.to(values.dtype)
    if sample_weight is not None:
        weights = weights * sample_weight.reshape((-1,) + (1,) * (values.ndim - 1)).to(values.dtype)
    total = weights.sum()
    # where() rather than multiplication: masked elements may hold NaN/inf from NaN targets.
    summed = torch.where(mask, values * weights, torch.zeros_like(values)).sum()
    return summed / total.clamp_min(torch.finfo(values.dtype).tiny)


def masked_regression_loss(
    pred: Tensor,
    target: Tensor,
    kind: str = "smooth_l1",
    *,
    sample_weight: Tensor | None = None,
    beta: float = 1.0,
) -> Tensor:
    """Elementwise regression loss averaged over the observed (non-NaN) target elements.

    Parameters
    ----------
    pred : Tensor of shape (B, k)
    target : Tensor of shape (B, k)
        NaN marks a missing element; it is masked out of the loss and of its gradient.
    kind : {"smooth_l1", "l2", "l1"}, default="smooth_l1"
        ``"l2"`` is the squared error; ``"smooth_l1"`` is Huber with threshold ``beta``.
    sample_weight : Tensor of shape (B,), optional
        Row weights.
    beta : float, default=1.0
        Threshold of the smooth L1 loss.

    Returns
    -------
    Tensor
        Scalar; exactly 0 when no element is observed.

    Examples
    --------
    >>> import torch
    >>> pred = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    >>> target = torch.tensor([[1.0, float("nan")], [2.0, 0.0]])
    >>> masked_regression_loss(pred, target, "l1")  # mean of |0-1|, |2-2|, |0-0|
    tensor(0.3333)
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}."
        )
    mask = ~torch.isnan(target)
    safe_target = torch.where(mask, target, pred.detach())
    if kind == "smooth_l1":
        values = F.smooth_l1_loss(pred, safe_target, reduction="none", beta=beta)
    elif kind == "l2":
        values = F.mse_loss(pred, safe_target, reduction="none")
    elif kind == "l1":
        values = F.l1_loss(pred, safe_target, reduction="none")
    else:
        raise ValueError(f"byproduct_loss must be one of {REGRESSION_LOSSES}, got {kind!r}.")
    return _weighted_mean(values, mask, sample_weight)


def gaussian_heatmap(points: Tensor, grid_shape: tuple[int, int], sigma: float = 0.1) -> Tensor:
    """Normalised Gaussian around each point, evaluated at the token centres of a grid.

    Parameters
    ----------
    points : Tensor of shape (B, 2) or (B, 2 * P)
        (x, y) in [0, 1] image coordinates, columns ``[x_0, y_0, x_1, y_1, ...]``; NaN = missing.
    grid_shape : tuple of int
        ``(grid_h, grid_w)`` of the row-major token grid.
    sigma : float, default=0.1
        Standard deviation as a fraction of the image side.

    Returns
    -------
    Tensor of shape (B, P, grid_h * grid_w)
        Each observed map sums to 1; a map whose point has a NaN coordinate is all NaN.

    Examples
    --------
    >>> import torch
    >>> maps = gaussian_heatmap(torch.tensor([[0.1, 0.1], [float("nan"), 0.5]]), (2, 2), sigma=0.2)
    >>> maps.shape, bool(maps[0].sum().isclose(torch.tensor(1.0))), bool(maps[1].isnan().all())
    (torch.Size([2, 1, 4]), True, True)
    >>> int(maps[0, 0].argmax())  # the top-left token
    0
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}.")
    return _grid.gaussian_heatmap(_as_points(points), grid_shape, sigma)  # NaN points stay NaN


def heatmap_loss(
    attention: Tensor,
    points: Tensor,
    grid_shape: tuple[int, int],
    *,
    sigma: float = 0.1,
    kind: str = "kl",
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Divergence between attention maps and Gaussians around the clicks.

    Parameters
    ----------
    attention : Tensor of shape (B, P, L)
        Attention maps (rows sum to 1).
    points : Tensor of shape (B, 2 * P)
        Click points, NaN = missing; a map with a missing point contributes nothing.
    grid_shape : tuple of int
        ``(grid_h, grid_w)`` with grid_h * grid_w = L.
    sigma : float, default=0.1
        Width of the target Gaussian (fraction of the image side).
    kind : {"kl", "ce"}, default="kl"
        ``"ce"``: cross-entropy ``-sum(t * log a)``; ``"kl"``: KL(t || a), the same gradient with the
        target's entropy removed so a perfect map scores 0.
    sample_weight : Tensor of shape (B,), optional

    Returns
    -------
    Tensor
        Scalar mean over the observed maps; 0 when none is observed.

    Examples
    --------
    >>> import torch
    >>> target = gaussian_heatmap(torch.tensor([[0.3, 0.6]]), (3, 3))
    >>> float(heatmap_loss(target, torch.tensor([[0.3, 0.6]]), (3, 3))) < 1e-6
    True
    """
    if kind not in ("kl", "ce"):
        raise ValueError(f"heatmap loss kind must be 'kl' or 'ce', got {kind!r}.")
    target = gaussian_heatmap(points, grid_shape, sigma).to(attention.dtype)
    if target.shape != attention.shape:
        raise ValueError(
            f"attention of shape {tuple(attention.shape)} does not match points for "
            f"{target.shape[1]} map(s) on a grid of {target.shape[2]} tokens."
        )
    observed = ~torch.isnan(target[..., 0])  # (B, P)
    target = torch.nan_to_num(target, nan=0.0)
    log_a = attention.clamp_min(torch.finfo(attention.dtype).tiny).log()
    values = -(target * log_a).sum(-1)
    if kind == "kl":
        values = values + (target * target.clamp_min(torch.finfo(target.dtype).tiny).log()).sum(-1)
    return _weighted_mean(values, observed, sample_weight)


def soft_argmax(attention: Tensor, grid_shape: tuple[int, int]) -> Tensor:
    """Expected token centre under each attention map.

    Parameters
    ----------
    attention : Tensor of shape (B, P, L)
    grid_shape : tuple of int

    Returns
    -------
    Tensor of shape (B, 2 * P)
        Columns ``[x_0, y_0, x_1, y_1, ...]`` in [0, 1].

    Examples
    --------
    >>> import torch
    >>> soft_argmax(torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]), (2, 2))
    tensor([[0.5000, 0.2500]])
    """
    return _grid.soft_argmax(attention, grid_shape).flatten(1)


def point_loss(
    attention: Tensor,
    points: Tensor,
    grid_shape: tuple[int, int],
    *,
    kind: str = "smooth_l1",
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Regress the soft-argmax of each attention map to its click (NaN coordinates masked).

    Parameters
    ----------
    attention : Tensor of shape (B, P, L)
    points : Tensor of shape (B, 2 * P)
    grid_shape : tuple of int
    kind : {"smooth_l1", "l2", "l1"}, default="smooth_l1"
    sample_weight : Tensor of shape (B,), optional

    Returns
    -------
    Tensor
        Scalar.

    Examples
    --------
    >>> import torch
    >>> attn = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    >>> point_loss(attn, torch.tensor([[0.75, 0.25]]), (2, 2), kind="l1")
    tensor(0.)
    """
    pred = soft_argmax(attention, grid_shape)
    return masked_regression_loss(pred, points, kind, sample_weight=sample_weight)


# Probabilities below exp(-_LOG_FLOOR) enter the label losses' gradients as that value: exact ones
# underflow to subnormal floats, whose arithmetic is many times slower on x86 CPUs (confident multi-class
# heads late in training). benchmarks/subnormal_floor.py, against the same work with exact probabilities:
# forward and backward of 6000 x 200 logits (6% subnormal probabilities) 0.20x the time; the MLP head's fit
# on make_embedding_classification 6000 x 128, 200 classes 0.84x.
_LOG_FLOOR = 60.0


class _CrossEntropy(torch.autograd.Function):
    """Per-sample softmax cross-entropy whose backward pass uses ``max(p, exp(-_LOG_FLOOR))`` (a change of
    less than 1e-26 per entry of the gradient; the loss value is exact)."""

    @staticmethod
    def forward(ctx, logits, target):
        half = logits.dtype in (torch.float16, torch.bfloat16)  # as autocast would: half logits in float32
        log_p = torch.log_softmax(logits.float() if half else logits, dim=1)
        ctx.save_for_backward(log_p, target)
        ctx.logits_dtype = logits.dtype
        return -log_p.gather(1, target[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad_values):
        log_p, target = ctx.saved_tensors
        grad = log_p.clamp(min=-_LOG_FLOOR).exp_()
        grad.scatter_add_(1, target[:, None], grad.new_full((grad.shape[0], 1), -1.0))
        return (grad * grad_values[:, None]).to(ctx.logits_dtype), None


class _BinaryCrossEntropy(torch.autograd.Function):
    """Element-wise sigmoid cross-entropy whose backward pass uses ``sigmoid(max(logit, -_LOG_FLOOR))``
    (the same floor as :class:`_CrossEntropy`; the loss value is exact)."""

    @staticmethod
    def forward(ctx, logits, target):
        half = logits.dtype in (torch.float16, torch.bfloat16)
        x = logits.float() if half else logits
        target = target.to(x.dtype)
        ctx.save_for_backward(x, target)
        ctx.logits_dtype = logits.dtype
        return F.binary_cross_entropy_with_logits(x, target, reduction="none")

    @staticmethod
    def backward(ctx, grad_values):
        x, target = ctx.saved_tensors
        grad = torch.sigmoid(x.clamp(min=-_LOG_FLOOR)).sub_(target)
        return (grad * grad_values).to(ctx.logits_dtype), None


def label_loss(logits: Tensor, target: Tensor, task: str, *, sample_weight: Tensor | None = None) -> Tensor:
    """Weighted mean label loss.

    Parameters
    ----------
    logits : Tensor of shape (B, n_outputs)
        For ``task="binary"``, shape (B, 1) or (B,).
    target : Tensor
        ``"multiclass"``: class indices (B,) (int64). ``"binary"``: 0/1 of shape (B,).
        ``"multilabel"``: 0/1 indicator (B, K).
    task : {"multiclass", "binary", "multilabel"}
        Softmax cross-entropy, or sigmoid binary cross-entropy (averaged over labels for multilabel).
    sample_weight : Tensor of shape (B,), optional

    Returns
    -------
    Tensor
        Scalar.

    Examples
    --------
    >>> import torch
    >>> label_loss(torch.zeros(2, 4), torch.tensor([0, 3]), "multiclass")  # log(4)
    tensor(1.3863)
    """
    if task == "multiclass":
        values = _CrossEntropy.apply(logits, target)
    elif task == "binary":
        values = _BinaryCrossEntropy.apply(logits.reshape(-1), target.reshape(-1))
    elif task == "multilabel":
        values = _BinaryCrossEntropy.apply(logits, target).mean(-1)
    else:
        raise ValueError(f"task must be one of {LABEL_TASKS}, got {task!r}.")
    if sample_weight is None:
        return values.mean()
    sample_weight = sample_weight.to(values.dtype)
    return (values * sample_weight).sum() / sample_weight.sum().clamp_min(torch.finfo(values.dtype).tiny)


def prior_label_loss(
    target: Tensor, task: str, n_outputs: int, *, sample_weight: Tensor | None = None
) -> Tensor:
    """Label loss of the best constant predictor: logits of the (weighted) class or label frequencies.

    Every head has label biases, so a trained model whose :func:`label_loss` on its training data is above
    this value has failed to fit (it is worse than ignoring its input).

    Parameters
    ----------
    target, task, sample_weight
        As in :func:`label_loss`.
    n_outputs : int
        Label outputs of the model (1 for a binary task).

    Returns
    -------
    Tensor
        Scalar, float32.

    Examples
    --------
    >>> import torch
    >>> prior_label_loss(torch.tensor([0, 0, 1, 2]), "multiclass", 3)  # entropy of (1/2, 1/4, 1/4)
    tensor(1.0397)
    """
    w = torch.ones(target.shape[0]) if sample_weight is None else sample_weight.detach().float().cpu()
    w = w / w.sum()
    target = target.detach().cpu()
    tiny = torch.finfo(torch.float32).tiny
    if task == "multiclass":
        freq = torch.zeros(n_outputs).index_add_(0, target.long(), w)
        logits = freq.clamp_min(tiny).log()
    else:
        freq = (w[:, None] * target.reshape(target.shape[0], -1).float()).sum(0).clamp(tiny, 1 - 1e-7)
        logits = (freq / (1 - freq)).log()
    logits = logits.expand(target.shape[0], -1)
    return label_loss(logits, target, task, sample_weight=None if sample_weight is None else w)


def multitask_loss(
    output: HeadOutput,
    y: Tensor,
    z: Tensor | None,
    *,
    task: str = "multiclass",
    byproduct_weight: float = 1.0,
    byproduct_target: str = "regression",
    byproduct_loss: str = "smooth_l1",
    grid_shape: tuple[int, int] | None = None,
    sigma: float = 0.1,
    sample_weight: Tensor | None = None,
) -> MultitaskLoss:
    """Label loss plus ``byproduct_weight`` times the byproduct loss.

    Parameters
    ----------
    output : HeadOutput
        A head's output.
    y : Tensor
        Labels, see :func:`label_loss`.
    z : Tensor of shape (B, k) or None
        Byproduct targets with NaN for missing elements; None (or a zero weight) skips the byproduct term.
    task : {"multiclass", "binary", "multilabel"}, default="multiclass"
    byproduct_weight : float, default=1.0
    byproduct_target : {"regression", "heatmap", "point"}, default="regression"
        ``"regression"``: :func:`masked_regression_loss` on ``output.byproducts``. ``"heatmap"`` and
        ``"point"`` supervise ``output.attention`` with click points (:func:`heatmap_loss` with KL,
        :func:`point_loss`) and need ``grid_shape``.
    byproduct_loss : {"smooth_l1", "l2", "l1"}, default="smooth_l1"
        Elementwise loss for ``"regression"`` and ``"point"``.
    grid_shape : tuple of int, optional
    sigma : float, default=0.1
        Gaussian width for ``"heatmap"``.
    sample_weight : Tensor of shape (B,), optional

    Returns
    -------
    MultitaskLoss

    Examples
    --------
    >>> import torch
    >>> from luab_sk.nn import build_head
    >>> head = build_head("mlp", 6, 3, n_byproducts=2, hidden_size=5)
    >>> z = torch.tensor([[0.1, 0.2], [float("nan"), float("nan")]])
    >>> parts = multitask_loss(head(torch.randn(2, 6)), torch.tensor([0, 2]), z, byproduct_weight=0.5)
    >>> bool(parts.total.isclose(parts.label + 0.5 * parts.byproduct))
    True
    """
    lbl = label_loss(output.logits, y, task, sample_weight=sample_weight)
    if z is None or byproduct_weight == 0:
        zero = lbl * 0.0  # attached to the graph, without a pass over the logits
        return MultitaskLoss(lbl, lbl, zero)
    if byproduct_target == "regression":
        if output.byproducts is None:
            raise ValueError("this head has no byproduct outputs; build it with n_byproducts > 0.")
        bp = masked_regression_loss(output.byproducts, z, byproduct_loss, sample_weight=sample_weight)
    elif byproduct_target in ("heatmap", "point"):
        if output.attention is None or grid_shape is None:
            raise ValueError(f"byproduct_target={byproduct_target!r} needs an attention head and grid_shape.")
        if byproduct_target == "heatmap":
            bp = heatmap_loss(output.attention, z, grid_shape, sigma=sigma, sample_weight=sample_weight)
        else:
            bp = point_loss(output.attention, z, grid_shape, kind=byproduct_loss, sample_weight=sample_weight)
    else:
        raise ValueError(f"byproduct_target must be one of {BYPRODUCT_TARGETS}, got {byproduct_target!r}.")
    return MultitaskLoss(lbl + byproduct_weight * bp, lbl, bp)


def _as_points(points: Tensor) -> Tensor:
    if points.ndim != 2 or points.shape[1] % 2:
        raise ValueError(
            f"points must have shape (B, 2 * P) with columns x0, y0, x1, y1, ...; got {tuple(points.shape)}."
        )
    return points.reshape(points.shape[0], -1, 2)
