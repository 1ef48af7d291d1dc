"""Metrics for learning from annotation byproducts: group robustness, localisation, byproduct regression.

- :func:`group_accuracies` and :func:`worst_group_accuracy`: accuracy inside each (label, spurious attribute)
  group and its minimum, the robustness measure of Waterbirds-style benchmarks.
- :func:`pointing_game`: share of attention maps whose argmax falls inside the ground-truth object box.
- :func:`byproduct_error`: regression error between true and predicted byproducts Z, ignoring missing (NaN)
  entries.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._grid import infer_grid

__all__ = ["attention_grid", "group_accuracies", "worst_group_accuracy", "pointing_game", "byproduct_error"]


def group_accuracies(y_true, y_pred, groups):
    """Accuracy inside each group.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels.
    groups : array-like of shape (n_samples,)
        Group of every sample (for example ``label * n_backgrounds + background``).

    Returns
    -------
    accuracies : dict
        Group value -> accuracy of the samples in that group, in sorted group order.

    Raises
    ------
    ValueError
        If the arrays are not 1-d, differ in length, are empty, or hold missing values (NaN or None):
        a missing label or group has no defined accuracy, so it is refused rather than guessed.

    Examples
    --------
    >>> group_accuracies([0, 0, 1, 1], [0, 1, 1, 1], groups=["a", "a", "b", "b"])
    {'a': 0.5, 'b': 1.0}
    """
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    if y_true.ndim != 1 or y_pred.ndim != 1 or groups.ndim != 1:
        raise ValueError(
            "y_true, y_pred and groups must be 1-d, got shapes "
            f"{y_true.shape}, {y_pred.shape}, {groups.shape}."
        )
    _check_lengths(y_true=y_true, y_pred=y_pred, groups=groups)
    if len(y_true) == 0:
        raise ValueError("y_true is empty: accuracy is undefined.")
    for name, values in (("y_true", y_true), ("y_pred", y_pred), ("groups", groups)):
        _check_not_missing(name, values)
    correct = y_true == y_pred
    return {g: float(correct[groups == g].mean()) for g in np.unique(groups).tolist()}


def worst_group_accuracy(y_true, y_pred, groups):
    """Lowest accuracy over groups (worst-group accuracy).

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        True and predicted labels.
    groups : array-like of shape (n_samples,)
        Group of every sample.

    Returns
    -------
    float

    Examples
    --------
    >>> worst_group_accuracy([0, 0, 1, 1], [0, 1, 1, 1], groups=[0, 0, 1, 1])
    0.5
    """
    return min(group_accuracies(y_true, y_pred, groups).values())


def _check_lengths(**arrays) -> None:
    """Raise a ValueError naming the arguments when the arrays have different numbers of samples."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"inconsistent numbers of samples: {listed}.")


def _check_not_missing(name, values) -> None:
    """Raise a ValueError naming ``name`` when a label or group array holds NaN or None."""
    if values.dtype.kind in "fc":
        missing = np.isnan(values)
    elif values.dtype == object:
        missing = np.array([v is None or (isinstance(v, numbers.Number) and v != v) for v in values], bool)
    else:
        return
    if missing.any():
        raise ValueError(
            f"{name} holds {int(missing.sum())} missing value(s) (NaN or None), first at index "
            f"{int(np.flatnonzero(missing)[0])}; drop those samples before computing the metric."
        )


def attention_grid(attention, grid=None, *, name="attention"):
    """Attention maps as an (n, H, W) array, from (n, H, W), (n, H * W) or single-map (n, 1, H * W) input.

    Parameters
    ----------
    attention : array-like
        Maps over a grid of image cells, row-major.
    grid : (int, int), optional
        (H, W) of flat maps; needed unless the maps are square.
    name : str, default="attention"
        Argument name used in error messages.

    Returns
    -------
    ndarray of shape (n, H, W)

    Examples
    --------
    >>> attention_grid([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], grid=(2, 3)).shape
    (1, 2, 3)
    """
    att = np.asarray(attention, dtype=float)
    if att.ndim == 3 and att.shape[1] == 1 and (grid is None or tuple(grid) != att.shape[1:]):
        att = att[:, 0]  # (n, 1, L) as returned by single-map attention heads
    if att.ndim == 2:
        n_cells = att.shape[1]
        try:
            h, w = infer_grid(n_cells, grid, what=name)  # the one grid inference (luab_sk._grid)
        except ValueError:  # reworded for this function's ``grid`` argument
            if grid is None:
                raise ValueError(
                    f"{name} has {n_cells} cells per map, not a square grid: pass grid=(H, W)."
                ) from None
            raise ValueError(
                f"grid={grid!r} does not fit {name}: its maps have {n_cells} cells; pass grid=(H, W) with "
                f"H * W = {n_cells}."
            ) from None
        return att.reshape(len(att), h, w)
    if att.ndim != 3:
        raise ValueError(f"{name} must be (n, H, W), (n, H*W) or (n, 1, H*W), got shape {att.shape}.")
    if grid is not None and tuple(grid) != att.shape[1:]:
        raise ValueError(f"grid={tuple(grid)} disagrees with {name} maps of shape {att.shape[1:]}.")
    return att


def pointing_game(attention, boxes, *, grid=None, tolerance=0.0, return_hits=False):
    """Share of attention maps whose argmax lies inside the ground-truth box.

    The argmax cell of each map is represented by its centre in [0, 1] image coordinates (x right, y down);
    it is a hit when it lies inside the box grown by ``tolerance`` on every side.

    Parameters
    ----------
    attention : array-like of shape (n_samples, H, W) or (n_samples, H * W)
        Attention maps (or any saliency scores) over a grid of image cells, row-major.
    boxes : array-like of shape (n_samples, 4)
        Object boxes (x0, y0, x1, y1) in normalised [0, 1] image coordinates (pixel boxes, such as ILSVRC
        ``bndbox``, must be divided by the image width and height first), with ``x0 <= x1`` and
        ``y0 <= y1``. Every sample needs a box: there is no "missing box" value, so NaN is an error.
    grid : (int, int), optional
        (H, W) of flat maps; required when ``attention`` is 2-d unless the maps are square.
    tolerance : float, default=0.0
        Margin added around each box, in image fractions (Zhang et al. use 15 px, about 0.07 at 224 px).
    return_hits : bool, default=False
        Also return the per-sample boolean hits.

    Returns
    -------
    score : float
        Share of hits.
    hits : ndarray of shape (n_samples,), dtype bool
        Only with ``return_hits=True``.

    Raises
    ------
    ValueError
        For misshaped or misaligned inputs, non-finite attention, a negative or non-finite
        ``tolerance``, or boxes that are not finite, not in [0, 1], or inverted.

    Examples
    --------
    >>> att = [[0.0, 0.0, 0.0, 1.0]]  # 2 x 2 grid, argmax in the bottom-right cell (centre 0.75, 0.75)
    >>> pointing_game(att, [[0.5, 0.5, 1.0, 1.0]])
    1.0
    >>> pointing_game(att, [[0.0, 0.0, 0.5, 0.5]])
    0.0
    """
    att = attention_grid(attention, grid)
    boxes = np.asarray(boxes, dtype=float)
    n, h, w = att.shape
    att = att.reshape(n, h * w)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n_samples, 4), got {boxes.shape}.")
    _check_lengths(attention=att, boxes=boxes)
    if not np.isfinite(att).all():
        raise ValueError("attention contains NaN or infinite values.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < np.inf:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}.")
    _check_boxes(boxes)
    row, col = np.divmod(att.argmax(axis=1), w)
    x, y = (col + 0.5) / w, (row + 0.5) / h
    hits = (
        (x >= boxes[:, 0] - tolerance)
        & (x <= boxes[:, 2] + tolerance)
        & (y >= boxes[:, 1] - tolerance)
        & (y <= boxes[:, 3] + tolerance)
    )
    score = float(hits.mean())
    return (score, hits) if return_hits else score


def _check_boxes(boxes) -> None:
    """Raise a ValueError unless every box is finite, in [0, 1] and not inverted; name the first bad row."""
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"boxes must be finite; row {i} is {boxes[i].tolist()} ({int((~finite).sum())} such rows). "
            "pointing_game has no missing-box value: drop samples without a box."
        )
    outside = ((boxes < 0) | (boxes > 1)).any(axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        hint = (
            " They look like pixel coordinates: divide x0, x1 by the image width and y0, y1 by its height."
            if boxes.max() > 1
            else ""
        )
        raise ValueError(
            f"boxes must be in normalised [0, 1] image coordinates; row {i} is {boxes[i].tolist()} "
            f"({int(outside.sum())} such rows).{hint}"
        )
    inverted = (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        raise ValueError(
            f"boxes must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1; row {i} is {boxes[i].tolist()} "
            f"({int(inverted.sum())} such rows)."
        )


def byproduct_error(Z_true, Z_pred, *, metric="euclidean"):
    """Regression error between true and predicted byproducts, ignoring missing (NaN) entries of ``Z_true``.

    Parameters
    ----------
    Z_true : array-like of shape (n_samples, k)
        True byproducts, NaN where missing (for example click points (x, y), or per-class points).
    Z_pred : array-like of shape (n_samples, k)
        Predicted byproducts; must be finite where ``Z_true`` is observed.
    metric : {"euclidean", "mae", "rmse"}, default="euclidean"
        ``"euclidean"``: mean distance between predicted and true points, taking consecutive column pairs
        (x, y) as points and skipping pairs with a missing coordinate (needs an even ``k``).
        ``"mae"`` / ``"rmse"``: mean absolute / root mean squared error over the observed entries.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        For an unknown ``metric``, mismatched shapes, infinite ``Z_true`` values, ``Z_pred`` not finite
        where ``Z_true`` is observed, or nothing observed.

    Examples
    --------
    >>> byproduct_error([[0.0, 0.0], [float("nan"), float("nan")]], [[0.3, 0.4], [0.9, 0.9]])
    0.5
    >>> byproduct_error([[0.0, 0.0]], [[0.3, 0.4]], metric="mae")
    0.35
    """
    if metric not in ("euclidean", "mae", "rmse"):
        raise ValueError(f"metric must be 'euclidean', 'mae' or 'rmse', got {metric!r}.")
    Z_true = np.asarray(Z_true, dtype=float)
    Z_pred = np.asarray(Z_pred, dtype=float)
    if Z_true.ndim == 1:
        Z_true = Z_true[:, None]
    if Z_pred.ndim == 1:
        Z_pred = Z_pred[:, None]
    if Z_true.shape != Z_pred.shape:
        raise ValueError(f"Z_true and Z_pred must have the same shape, got {Z_true.shape}, {Z_pred.shape}.")
    if np.isinf(Z_true).any():
        raise ValueError("Z_true holds infinite values; only NaN marks a missing entry.")
    observed = ~np.isnan(Z_true)
    if not observed.any():
        raise ValueError("Z_true has no observed (non-NaN) entries: the error is undefined.")
    if not np.isfinite(Z_pred[observed]).all():
        raise ValueError("Z_pred must be finite wherever Z_true is observed.")
    if metric == "euclidean":
        if Z_true.shape[1] % 2:
            raise ValueError(
                f"metric='euclidean' pairs columns as (x, y) points, but Z has {Z_true.shape[1]} columns."
            )
        diff = (Z_true - Z_pred).reshape(len(Z_true), -1, 2)
        dist = np.sqrt((diff**2).sum(axis=2))
        keep = observed.reshape(len(Z_true), -1, 2).all(axis=2)
        if not keep.any():
            raise ValueError("Z_true has no fully observed (x, y) point: the error is undefined.")
        return float(dist[keep].mean())
    err = (Z_true - Z_pred)[observed]
    if metric == "mae":
        return float(np.abs(err).mean())
    return float(np.sqrt((err**2).mean()))
