"""Map annotation points through image geometry: resize, (random-resized) crop, horizontal flip.

Conventions
-----------
* A point is ``(x, y)`` in normalised image coordinates: ``x`` runs from 0 (left edge) to 1 (right edge),
  ``y`` from 0 (top edge) to 1 (bottom edge); NaN marks a missing point.
* Every point function accepts an array whose **last axis holds interleaved (x, y) pairs**:
  shape ``(..., 2)`` for one point per row, or ``(..., 2 * K)`` for per-class points laid out as
  ``[x_0, y_0, x_1, y_1, ...]``. The pairs are transformed independently.
* Inputs may be NumPy arrays or torch tensors; the result has the same type (and, for tensors, device and
  dtype). Inputs are never modified in place.
* A crop box is ``(left, top, width, height)`` in pixels of the image it is cut from, an image of size
  ``(W, H)`` (PIL's ``(width, height)`` order).
* Boxes and image sizes may also be arrays of shape ``(..., 4)`` and ``(..., 2)``, one per row: they
  broadcast against the leading axes of the points. ``crop_points(Z, boxes, sizes)`` with ``Z`` of shape
  ``(n, 2K)``, ``boxes`` ``(n, 4)`` and ``sizes`` ``(n, 2)`` maps a batch in one call; one point set
  ``(2K,)`` through ``boxes`` of shape ``(V, 4)`` gives its ``(V, 2K)`` coordinates in V views.

Resizing an image does not move a point in normalised coordinates, so there is no resize function for them;
:func:`pixel_to_normalized` and :func:`normalized_to_pixel` convert to and from pixel coordinates when needed.

The crop rule follows the reference ImageNet-AB loader: a point that falls outside the crop (either coordinate
outside ``[0, 1]`` once expressed in crop coordinates) becomes missing, both coordinates NaN.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from .._grid import argmax_points, gaussian_heatmap, soft_argmax

__all__ = [
    "center_crop_box",
    "crop_points",
    "heatmap_to_points",
    "hflip_points",
    "normalized_to_pixel",
    "pixel_to_normalized",
    "points_to_heatmap",
    "sample_resized_crop_box",
    "uncrop_points",
]


def _torch_of(x):
    """The torch module if ``x`` is a tensor, else None (without importing torch: readers stay light)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.is_tensor(x) else None


def _as_pairs(points, name="points"):
    """Return ``points`` (NumPy float array or floating tensor) viewed as ``(..., K, 2)``."""
    torch = _torch_of(points)
    if torch is not None:
        arr = points if points.is_floating_point() else points.to(torch.get_default_dtype())
    else:
        arr = np.asarray(points)
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
    if arr.ndim < 1 or arr.shape[-1] % 2 != 0 or arr.shape[-1] == 0:
        raise ValueError(
            f"{name} must have a last axis of interleaved (x, y) pairs, i.e. length 2*K with K >= 1; "
            f"got shape {tuple(arr.shape)}."
        )
    return arr.reshape(*arr.shape[:-1], arr.shape[-1] // 2, 2)


def _check_size(image_size, name="image_size", batched=False):
    """``(width, height)`` as floats, or (``batched``) as arrays of shape ``(...)`` from ``(..., 2)``."""
    message = f"{name} must be a (width, height) pair of positive numbers; got {image_size!r}."
    try:
        arr = np.asarray(image_size, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    shape_ok = arr.ndim >= 1 and arr.shape[-1] == 2 if batched else arr.shape == (2,)
    if not shape_ok or not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(message)
    return (arr[..., 0], arr[..., 1]) if batched else (float(arr[0]), float(arr[1]))


def _check_box(box):
    """``left, top, width, height`` as arrays of shape ``(...)`` from ``(..., 4)``."""
    try:
        arr = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim < 1 or arr.shape[-1] != 4:
        raise ValueError(f"box must be (left, top, width, height) px, shape (4,) or (..., 4); got {box!r}.")
    left, top, width, height = np.moveaxis(arr, -1, 0)
    if not (np.all(np.isfinite(arr)) and np.all(width > 0) and np.all(height > 0)):
        raise ValueError(f"box must have a finite origin and positive width and height; got {box!r}.")
    return left, top, width, height


def _scale_shift(pairs, scale, shift):
    """``pairs * scale + shift`` with (x, y) factors that broadcast over the leading axes of ``pairs``.

    ``scale`` and ``shift`` are ``(x, y)`` pairs of scalars or of arrays of shape ``(...)``; they become
    ``(..., 1, 2)`` so that one box (or image size) per row applies to all K points of that row.
    """
    scale = np.stack(np.broadcast_arrays(*scale), axis=-1)[..., None, :]
    shift = np.stack(np.broadcast_arrays(*shift), axis=-1)[..., None, :]
    torch = _torch_of(pairs)
    if torch is not None:
        scale = torch.as_tensor(scale, dtype=pairs.dtype, device=pairs.device)
        shift = torch.as_tensor(shift, dtype=pairs.dtype, device=pairs.device)
    else:
        scale = scale.astype(pairs.dtype, copy=False)
        shift = shift.astype(pairs.dtype, copy=False)
    return pairs * scale + shift


def _mask_outside(pairs):
    """Set both coordinates of every pair that lies outside the unit square to NaN."""
    outside = (pairs < 0) | (pairs > 1)
    torch = _torch_of(pairs)
    if torch is not None:
        outside = outside.any(dim=-1, keepdim=True)
        return torch.where(outside, torch.full_like(pairs, float("nan")), pairs)
    return np.where(outside.any(axis=-1, keepdims=True), np.nan, pairs)


def _flat(pairs):
    """Undo :func:`_as_pairs`: ``(..., K, 2) -> (..., 2*K)``."""
    return pairs.reshape(*pairs.shape[:-2], pairs.shape[-2] * 2)


def pixel_to_normalized(points, image_size):
    """Convert pixel coordinates to normalised ``[0, 1]`` coordinates.

    Parameters
    ----------
    points : array-like or torch.Tensor of shape (..., 2*K)
        Interleaved ``(x, y)`` pixel coordinates; NaN marks missing points.
    image_size : tuple of (width, height) or array-like of shape (..., 2)
        Size of the image in pixels (one per row when batched).

    Returns
    -------
    ndarray or torch.Tensor of the same shape
        ``(x / width, y / height)``.

    Examples
    --------
    >>> pixel_to_normalized([[320.0, 120.0]], image_size=(640, 480))
    array([[0.5 , 0.25]])
    """
    w, h = _check_size(image_size, batched=True)
    pairs = _as_pairs(points)
    return _flat(_scale_shift(pairs, (1.0 / w, 1.0 / h), (0.0, 0.0)))


def normalized_to_pixel(points, image_size):
    """Convert normalised ``[0, 1]`` coordinates to pixels (the inverse of :func:`pixel_to_normalized`).

    Parameters
    ----------
    points : array-like or torch.Tensor of shape (..., 2*K)
        Interleaved normalised ``(x, y)`` coordinates; NaN marks missing points.
    image_size : tuple of (width, height) or array-like of shape (..., 2)
        Size of the image in pixels (one per row when batched).

    Returns
    -------
    ndarray or torch.Tensor of the same shape

    Examples
    --------
    >>> normalized_to_pixel([[0.5, 0.25]], image_size=(640, 480))
    array([[320., 120.]])
    """
    w, h = _check_size(image_size, batched=True)
    pairs = _as_pairs(points)
    return _flat(_scale_shift(pairs, (w, h), (0.0, 0.0)))


def hflip_points(points):
    """Mirror points as a horizontal flip of the image does: ``x -> 1 - x``.

    Parameters
    ----------
    points : array-like or torch.Tensor of shape (..., 2*K)
        Interleaved normalised ``(x, y)`` coordinates; NaN stays NaN.

    Returns
    -------
    ndarray or torch.Tensor of the same shape

    Examples
    --------
    >>> hflip_points([[0.2, 0.7, 0.9, 0.1]])
    array([[0.8, 0.7, 0.1, 0.1]])
    """
    pairs = _as_pairs(points)
    return _flat(_scale_shift(pairs, (-1.0, 1.0), (1.0, 0.0)))


def crop_points(points, box, image_size):
    """Express points in the coordinates of a crop and mask those that fall outside it.

    Resizing the crop afterwards (as random-resized-crop does) does not change normalised coordinates, so the
    result is also the point's position in the resized crop.

    Parameters
    ----------
    points : array-like or torch.Tensor of shape (..., 2*K)
        Interleaved normalised ``(x, y)`` coordinates in the full image; NaN marks missing points.
    box : tuple of (left, top, width, height) or array-like of shape (..., 4)
        The crop in pixels of the full image (see :func:`sample_resized_crop_box`); one per row when batched.
    image_size : tuple of (width, height) or array-like of shape (..., 2)
        Size of the full image in pixels (one per row when batched).

    Returns
    -------
    ndarray or torch.Tensor
        Of the same shape, or of the broadcast shape when ``box`` / ``image_size`` have more rows.
        Normalised coordinates in the crop. A point outside the crop (a coordinate outside ``[0, 1]``, edges
        included as inside) gets both coordinates set to NaN, as in the reference ImageNet-AB loader.

    Examples
    --------
    >>> crop_points([[0.5, 0.5], [0.1, 0.5]], box=(100, 0, 200, 100), image_size=(400, 100))
    array([[0.5, 0.5],
           [nan, nan]])
    """
    w, h = _check_size(image_size, batched=True)
    left, top, bw, bh = _check_box(box)
    pairs = _as_pairs(points)
    moved = _scale_shift(pairs, (w / bw, h / bh), (-left / bw, -top / bh))
    return _flat(_mask_outside(moved))


def uncrop_points(points, box, image_size):
    """Map points from crop coordinates back to the full image (the inverse of :func:`crop_points`).

    Useful to express a point predicted on a crop (for example a centre crop at test time) in the
    coordinates of the original image.

    Parameters
    ----------
    points : array-like or torch.Tensor of shape (..., 2*K)
        Interleaved normalised ``(x, y)`` coordinates in the crop; NaN stays NaN. Points are not masked.
    box : tuple of (left, top, width, height) or array-like of shape (..., 4)
        The crop in pixels of the full image; one per row when batched.
    image_size : tuple of (width, height) or array-like of shape (..., 2)
        Size of the full image in pixels (one per row when batched).

    Returns
    -------
    ndarray or torch.Tensor
        Of the same shape, or of the broadcast shape when ``box`` / ``image_size`` have more rows.

    Examples
    --------
    >>> uncrop_points([[0.5, 0.5]], box=(100, 0, 200, 100), image_size=(400, 100))
    array([[0.5, 0.5]])
    """
    w, h = _check_size(image_size, batched=True)
    left, top, bw, bh = _check_box(box)
    pairs = _as_pairs(points)
    return _flat(_scale_shift(pairs, (bw / w, bh / h), (left / w, top / h)))


def _as_generator(random_state):
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(np.iinfo(np.int32).max))
    if random_state is None or isinstance(random_state, numbers.Integral):
        return np.random.default_rng(random_state)
    raise ValueError(
        "random_state must be None, an int, a numpy Generator or RandomState; "
        f"got {type(random_state).__name__}."
    )


def sample_resized_crop_box(image_size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), random_state=None):
    """Draw random-resized-crop parameters with the semantics of torchvision's ``RandomResizedCrop``.

    The same box can then cut the image (``image.crop((left, top, left + width, top + height))`` with PIL, or
    ``torchvision.transforms.functional.resized_crop(img, top, left, height, width, size)``) and map its
    byproducts (:func:`crop_points`).

    Parameters
    ----------
    image_size : tuple of (width, height)
        Size of the image in pixels.
    scale : tuple of (float, float), default=(0.08, 1.0)
        Range of the crop area as a fraction of the image area.
    ratio : tuple of (float, float), default=(3/4, 4/3)
        Range of the crop aspect ratio (width / height), sampled log-uniformly.
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState, default=None
        Source of randomness.

    Returns
    -------
    box : tuple of int (left, top, width, height)
        The crop in pixels. As in torchvision, after 10 failed draws it falls back to the largest centred crop
        whose aspect ratio lies in ``ratio``.

    Examples
    --------
    >>> left, top, width, height = sample_resized_crop_box((640, 480), random_state=0)
    >>> 0 <= left and left + width <= 640 and 0 <= top and top + height <= 480
    True
    """
    w, h = _check_size(image_size)
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must be (min, max) with 0 < min <= max; got {scale!r}.")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must be (min, max) with 0 < min <= max; got {ratio!r}.")
    width, height = int(w), int(h)
    rng = _as_generator(random_state)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return left, top, cw, ch
    in_ratio = width / height
    if in_ratio < min(ratio):
        cw, ch = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(height * max(ratio))), height
    else:
        cw, ch = width, height
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def center_crop_box(image_size, crop_fraction=0.875):
    """The square centre crop that "resize the short side to ``S / crop_fraction``, centre-crop ``S``" takes.

    Parameters
    ----------
    image_size : tuple of (width, height)
        Size of the image in pixels.
    crop_fraction : float in (0, 1], default=0.875
        Side of the crop as a fraction of the short side (timm's ``crop_pct``; 224/256 = 0.875).

    Returns
    -------
    box : tuple of float (left, top, width, height)
        In pixels of the image; fractional, since the equivalent resize-then-crop is exact up to rounding.

    Examples
    --------
    >>> center_crop_box((400, 200), crop_fraction=0.5)
    (150.0, 50.0, 100.0, 100.0)
    """
    w, h = _check_size(image_size)
    if not (0 < crop_fraction <= 1):
        raise ValueError(f"crop_fraction must lie in (0, 1]; got {crop_fraction!r}.")
    side = min(w, h) * crop_fraction
    return (w - side) / 2, (h - side) / 2, side, side


def points_to_heatmap(points, grid_shape, sigma=0.1):
    """Turn points into Gaussian heatmap targets on an ``H x W`` grid, each summing to 1.

    Parameters
    ----------
    points : array-like or torch.Tensor of shape (..., 2)
        One normalised ``(x, y)`` point per row; a row with a NaN coordinate is missing. For per-class points
        of shape ``(n, 2*K)``, pass ``points.reshape(n, K, 2)``.
    grid_shape : tuple of (H, W)
        Heatmap grid; cell ``(i, j)`` has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``.
    sigma : float, default=0.1
        Standard deviation of the Gaussian in normalised image units (a fraction of the image side).

    Returns
    -------
    ndarray or torch.Tensor of shape (..., H*W)
        Row-major heatmaps; every observed row sums to 1 and a missing row is all NaN.

    Examples
    --------
    >>> hm = points_to_heatmap([[0.9, 0.1], [np.nan, np.nan]], grid_shape=(2, 2), sigma=0.1)
    >>> hm.shape, int(hm[0].argmax()), bool(np.isnan(hm[1]).all())
    ((2, 4), 1, True)
    """
    gh, gw = (int(v) for v in grid_shape)
    if gh <= 0 or gw <= 0:
        raise ValueError(f"grid_shape must be (H, W) with positive entries; got {grid_shape!r}.")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma!r}.")
    pairs = _as_pairs(points)
    if pairs.shape[-2] != 1:
        raise ValueError(
            f"points must have shape (..., 2) (one point per heatmap); got {tuple(pairs.shape[:-2])} + "
            f"({2 * pairs.shape[-2]},). Reshape per-class points to (n, K, 2)."
        )
    return gaussian_heatmap(pairs, (gh, gw), sigma)[..., 0, :]  # the one implementation: luab_sk._grid


def heatmap_to_points(heatmaps, grid_shape, method="argmax"):
    """Read a point off each heatmap: the centre of its highest cell, or its mean position.

    Parameters
    ----------
    heatmaps : array-like or torch.Tensor of shape (..., H*W)
        Row-major non-negative heatmaps (they need not be normalised); a row containing NaN gives a missing
        point.
    grid_shape : tuple of (H, W)
        Heatmap grid.
    method : {"argmax", "mean"}, default="argmax"
        ``"argmax"`` returns the centre of the highest cell; ``"mean"`` the heatmap-weighted mean of the cell
        centres (a soft-argmax that is differentiable for tensors).

    Returns
    -------
    ndarray or torch.Tensor of shape (..., 2)
        Normalised ``(x, y)`` points.

    Examples
    --------
    >>> heatmap_to_points([[0.0, 1.0, 0.0, 0.0]], grid_shape=(2, 2))
    array([[0.75, 0.25]])
    """
    gh, gw = (int(v) for v in grid_shape)
    if method not in ("argmax", "mean"):
        raise ValueError(f"method must be 'argmax' or 'mean'; got {method!r}.")
    torch = _torch_of(heatmaps)
    is_tensor = torch is not None
    hm = heatmaps if is_tensor else np.asarray(heatmaps, dtype=np.float64)
    if hm.ndim < 1 or hm.shape[-1] != gh * gw:
        raise ValueError(
            f"heatmaps must have a last axis of length H*W = {gh * gw} for grid_shape={tuple(grid_shape)}; "
            f"got shape {tuple(hm.shape)}."
        )
    # The one implementation of both readings: luab_sk._grid.
    if method == "argmax":
        return argmax_points(hm, (gh, gw))
    return soft_argmax(hm, (gh, gw), normalize=True)
