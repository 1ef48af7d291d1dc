"""The one implementation of token grids, click heatmaps and soft-argmax points.

Both :mod:`luab_sk.byproducts` (NumPy encoders of Z) and :mod:`luab_sk.nn` (torch heads and losses) need
the same geometry: the centre of every cell of a row-major ``(H, W)`` grid, a normalised Gaussian around a
click evaluated at those centres, and the point an attention map or heatmap designates (its soft-argmax, or
the centre of its highest cell). They must agree to the last digit, or a map trained against a target would
not peak where the encoder put the click. This module sits below both layers (it imports neither, nor
scikit-learn): NumPy always, torch only when it is handed tensors. Every function takes NumPy arrays or
torch tensors and returns the same kind (dtype and device preserved), so no caller converts.

Conventions
-----------
- Points are ``(x, y)`` in [0, 1] image coordinates, x to the right, y down; NaN marks a missing point.
- Cell ``(i, j)`` of an ``(H, W)`` grid (row i, column j) is token ``i * W + j`` and has its centre at
  ``((j + 0.5) / W, (i + 0.5) / H)``.
- A heatmap is a softmax over the cells of ``-d^2 / (2 sigma^2)`` (it sums to 1); a missing point gives an
  all-NaN map.

Functions
---------
:func:`cell_centers`, :func:`gaussian_heatmap`, :func:`soft_argmax`, :func:`argmax_points`,
:func:`infer_grid`.
"""

from __future__ import annotations

import math
import sys

import numpy as np

__all__ = ["argmax_points", "cell_centers", "gaussian_heatmap", "infer_grid", "soft_argmax"]


def _torch_of(value):
    """The torch module when ``value`` is a tensor (torch already imported), else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(value, torch.Tensor) else None


def check_grid_shape(grid_shape) -> tuple[int, int]:
    """``(H, W)`` as two positive ints, or a ValueError."""
    try:
        gh, gw = (int(v) for v in grid_shape)
    except (TypeError, ValueError):
        raise ValueError(f"grid_shape must be (H, W) with positive entries; got {grid_shape!r}.") from None
    if gh <= 0 or gw <= 0:
        raise ValueError(f"grid_shape must be (H, W) with positive entries; got {grid_shape!r}.")
    return gh, gw


def cell_centers(grid_shape, *, like=None, dtype=None, device=None):
    """The ``(x, y)`` centre of every cell of a row-major grid.

    Parameters
    ----------
    grid_shape : (int, int)
        ``(H, W)``.
    like : ndarray or Tensor, optional
        Return the kind (NumPy or torch), dtype and device of ``like``.
    dtype, device : optional
        Override ``like``'s dtype (and device, for torch). Without ``like``: a float64 ndarray, or a torch
        float32 tensor when ``dtype`` is a torch dtype.

    Returns
    -------
    ndarray or Tensor of shape (H * W, 2)

    Examples
    --------
    >>> cell_centers((1, 2))
    array([[0.25, 0.5 ],
           [0.75, 0.5 ]])
    """
    gh, gw = check_grid_shape(grid_shape)
    torch = _torch_of(like) or (sys.modules.get("torch") if _is_torch_dtype(dtype) else None)
    if torch is not None:
        if like is not None:
            dtype = like.dtype if dtype is None else dtype
            device = like.device if device is None else device
        # Computed in float64 for float64 output, else in float32 and cast: the exact values both the
        # heads (float32 buffers) and the encoders (float64 arrays) have always used.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        ys = (torch.arange(gh, dtype=work, device=device) + 0.5) / gh
        xs = (torch.arange(gw, dtype=work, device=device) + 0.5) / gw
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
        return out if dtype is None else out.to(dtype)
    dtype = (like.dtype if like is not None else np.float64) if dtype is None else dtype
    work = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    ys = (np.arange(gh, dtype=work) + 0.5) / gh
    xs = (np.arange(gw, dtype=work) + 0.5) / gw
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.reshape(-1), yy.reshape(-1)], axis=1).astype(dtype, copy=False)


def _is_torch_dtype(dtype) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(dtype, torch.dtype)


def gaussian_heatmap(points, grid_shape, sigma: float = 0.1):
    """Normalised Gaussian around every point, evaluated at the cell centres.

    Parameters
    ----------
    points : ndarray or Tensor of shape (..., P, 2)
        ``(x, y)`` points; a point with a NaN coordinate gives an all-NaN map.
    grid_shape : (int, int)
    sigma : float, default=0.1
        Standard deviation, as a fraction of the image side.

    Returns
    -------
    ndarray or Tensor of shape (..., P, H * W)
        Every observed map sums to 1.

    Examples
    --------
    >>> hm = gaussian_heatmap(np.array([[0.9, 0.1]]), (2, 2))
    >>> hm.shape, int(hm[0].argmax())
    ((1, 4), 1)
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma!r}.")
    torch = _torch_of(points)
    centers = cell_centers(grid_shape, like=points)
    d2 = ((points[..., None, :] - centers) ** 2).sum(-1)  # (..., P, L)
    logits = -d2 / (2.0 * sigma**2)
    if torch is not None:
        return logits.softmax(dim=-1)  # NaN points stay NaN
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def soft_argmax(maps, grid_shape, *, normalize: bool = False):
    """Expected cell centre under every map (differentiable for tensors).

    Parameters
    ----------
    maps : ndarray or Tensor of shape (..., H * W)
        Non-negative maps; rows sum to 1 unless ``normalize``.
    grid_shape : (int, int)
    normalize : bool, default=False
        Divide by each map's sum (for heatmaps that are not normalised).

    Returns
    -------
    ndarray or Tensor of shape (..., 2)
        ``(x, y)`` points; NaN where a map holds NaN.

    Examples
    --------
    >>> soft_argmax(np.array([[0.5, 0.5, 0.0, 0.0]]), (2, 2))
    array([[0.5 , 0.25]])
    """
    centers = cell_centers(grid_shape, like=maps)
    _check_cells(maps, centers.shape[0], grid_shape)
    out = maps @ centers
    if normalize:
        out = out / maps.sum(-1)[..., None]
    return out


def argmax_points(maps, grid_shape):
    """Centre of the highest cell of every map; NaN where a map holds NaN.

    Parameters
    ----------
    maps : ndarray or Tensor of shape (..., H * W)
    grid_shape : (int, int)

    Returns
    -------
    ndarray or Tensor of shape (..., 2)

    Examples
    --------
    >>> argmax_points(np.array([[0.0, 1.0, 0.0, 0.0]]), (2, 2))
    array([[0.75, 0.25]])
    """
    torch = _torch_of(maps)
    centers = cell_centers(grid_shape, like=maps)
    _check_cells(maps, centers.shape[0], grid_shape)
    if torch is not None:
        missing = maps.isnan().any(-1)
        out = centers[maps.nan_to_num(float("-inf")).argmax(-1)]
        return torch.where(missing[..., None], torch.full_like(out, float("nan")), out)
    missing = np.isnan(maps).any(-1)
    out = centers[np.nan_to_num(maps, nan=-np.inf).argmax(-1)]
    return np.where(missing[..., None], np.nan, out)


def infer_grid(n_tokens: int, grid_shape=None, *, what: str = "X") -> tuple[int, int]:
    """The ``(H, W)`` grid of ``n_tokens`` tokens: ``grid_shape`` checked, or a square grid inferred.

    Parameters
    ----------
    n_tokens : int
    grid_shape : (int, int), optional
        The declared grid; its cells must number ``n_tokens``.
    what : str, default="X"
        What holds the tokens, for the error messages.

    Returns
    -------
    (int, int)

    Raises
    ------
    ValueError
        When ``grid_shape`` does not match, or (without it) ``n_tokens`` is not a square.

    Examples
    --------
    >>> infer_grid(49), infer_grid(6, (2, 3))
    ((7, 7), (2, 3))
    """
    if grid_shape is None:
        side = math.isqrt(int(n_tokens))
        if side * side != n_tokens:
            raise ValueError(
                f"cannot infer a square grid from {n_tokens} tokens of {what}; pass grid_shape=(h, w)."
            )
        return side, side
    grid = tuple(int(s) for s in grid_shape)
    if len(grid) != 2 or grid[0] * grid[1] != n_tokens:
        raise ValueError(f"grid_shape={grid_shape!r} does not match the {n_tokens} tokens of {what}.")
    return grid


def _check_cells(maps, n_cells: int, grid_shape) -> None:
    if maps.ndim < 1 or maps.shape[-1] != n_cells:
        raise ValueError(
            f"heatmaps must have a last axis of length H*W = {n_cells} for grid_shape={tuple(grid_shape)}; "
            f"got shape {tuple(maps.shape)}."
        )
