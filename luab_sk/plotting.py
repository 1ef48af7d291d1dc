"""Plots for byproduct studies: attention overlays and byproduct-weight curves.

matplotlib is an optional dependency (the ``plot`` extra); every function imports it on first use and raises
an :class:`ImportError` that says how to install it when it is missing.
"""

from __future__ import annotations

import numpy as np

from .metrics import attention_grid

__all__ = ["plot_attention_overlays", "plot_byproduct_weight_curve"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "luab_sk.plotting needs matplotlib, which is not installed; install the 'plot' extra: "
            "pip install 'luab_sk[plot]'"
        ) from err
    return plt


def _as_maps(attention, n_images, grid, name):
    att = attention_grid(attention, grid, name=name)
    if len(att) != n_images:
        raise ValueError(f"{name} has {len(att)} maps but there are {n_images} images.")
    return att


def plot_attention_overlays(
    images,
    attention,
    *,
    grid=None,
    boxes=None,
    points=None,
    titles=None,
    alpha=0.5,
    cmap="jet",
    panel_size=2.0,
):
    """Draw attention maps over their images, one row per set of maps.

    Parameters
    ----------
    images : array-like of shape (n, H, W, 3) or (n, H, W)
        Images (uint8, or floats in [0, 1]).
    attention : array-like of shape (n, L), (n, 1, L) or (n, h, w), or dict of str to such arrays
        Attention maps over an h x w grid of image cells (row-major). A dict draws one row per entry (for
        example ``{"without Z": a0, "with Z": a1}``), its key as the row label.
    grid : (int, int), optional
        (h, w) of flat maps; inferred when the maps are square.
    boxes : array-like of shape (n, 4), optional
        Object boxes (x0, y0, x1, y1) in [0, 1], drawn as rectangles.
    points : array-like of shape (n, 2), optional
        Click points (x, y) in [0, 1] (NaN = missing), drawn as crosses.
    titles : sequence of str, optional
        One title per image (column).
    alpha : float, default=0.5
        Opacity of the attention overlay.
    cmap : str, default="jet"
        Colormap of the attention overlay.
    panel_size : float, default=2.0
        Size of one panel in inches.

    Returns
    -------
    fig : matplotlib.figure.Figure

    Raises
    ------
    ImportError
        If matplotlib is not installed (install the ``plot`` extra).

    Examples
    --------
    >>> import numpy as np
    >>> images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    >>> maps = {"without Z": np.full((2, 16), 1 / 16), "with Z": np.eye(16)[[0, 5]]}
    >>> fig = plot_attention_overlays(images, maps, boxes=[[0, 0, 0.3, 0.3], [0.2, 0.2, 0.5, 0.5]])
    >>> len(fig.axes)
    4
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    images = np.asarray(images)
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"images must have shape (n, H, W, 3) or (n, H, W) with n >= 1, got {images.shape}.")
    n = len(images)
    rows = attention if isinstance(attention, dict) else {"": attention}
    rows = {
        label: _as_maps(maps, n, grid, f"attention[{label!r}]" if label else "attention")
        for label, maps in rows.items()
    }
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=float)
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must have shape ({n}, 4), got {boxes.shape}.")
    if points is not None:
        points = np.asarray(points, dtype=float)
        if points.shape != (n, 2):
            raise ValueError(f"points must have shape ({n}, 2), got {points.shape}.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles must have {n} entries, one per image, got {len(titles)}.")

    fig, axes = plt.subplots(len(rows), n, figsize=(panel_size * n, panel_size * len(rows)), squeeze=False)
    for r, (label, maps) in enumerate(rows.items()):
        for i in range(n):
            ax = axes[r, i]
            height, width = images[i].shape[:2]
            ax.imshow(images[i], cmap="gray" if images.ndim == 3 else None)
            ax.imshow(maps[i], cmap=cmap, alpha=alpha, extent=(0, width, height, 0), interpolation="bilinear")
            if boxes is not None:
                x0, y0, x1, y1 = boxes[i] * [width, height, width, height]
                ax.add_patch(
                    Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5)
                )
            if points is not None and np.isfinite(points[i]).all():
                ax.plot(points[i, 0] * width, points[i, 1] * height, "w+", markersize=10, markeredgewidth=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and titles is not None:
                ax.set_title(str(titles[i]), fontsize=9)
            if i == 0 and label:
                ax.set_ylabel(label)
    fig.tight_layout()
    return fig


def plot_byproduct_weight_curve(search, *, param="byproduct_weight", metrics=None, ax=None):
    """Cross-validated score against the byproduct weight, from a grid search.

    Parameters
    ----------
    search : fitted GridSearchCV or dict
        A fitted search, or its ``cv_results_``.
    param : str, default="byproduct_weight"
        Name of the swept parameter; a nested name such as ``"luabclassifier__byproduct_weight"`` is found
        from its suffix.
    metrics : sequence of str, optional
        Scorer names of a multi-metric search (the ``<name>`` in ``mean_test_<name>``); default: every one.
    ax : matplotlib Axes, optional
        Where to draw; a new figure otherwise.

    Returns
    -------
    ax : matplotlib.axes.Axes
        Mean test score with a band of one standard deviation over splits; a symmetric-log x-axis when the
        weights span more than a decade, so that a weight of 0 stays visible.

    Raises
    ------
    ImportError
        If matplotlib is not installed (install the ``plot`` extra).

    Examples
    --------
    >>> results = {"param_byproduct_weight": [0.0, 0.1, 1.0, 10.0],
    ...            "mean_test_score": [0.6, 0.7, 0.8, 0.75], "std_test_score": [0.02, 0.02, 0.01, 0.03]}
    >>> ax = plot_byproduct_weight_curve(results)
    >>> ax.get_xlabel()
    'byproduct_weight'
    """
    plt = _pyplot()
    results = search if isinstance(search, dict) else getattr(search, "cv_results_", None)
    if results is None:
        raise ValueError("search must be a fitted GridSearchCV (with cv_results_) or its cv_results_ dict.")
    keys = [
        k for k in results if k.startswith("param_") and (k == f"param_{param}" or k.endswith(f"__{param}"))
    ]
    if len(keys) != 1:
        raise ValueError(
            f"cv_results_ has {len(keys)} columns for parameter {param!r}, expected one: {keys}."
        )
    x = np.asarray(results[keys[0]], dtype=float)
    available = sorted(k[len("mean_test_") :] for k in results if k.startswith("mean_test_"))
    metrics = available if metrics is None else list(metrics)
    missing = [m for m in metrics if m not in available]
    if missing or not metrics:
        raise ValueError(f"metrics {missing or metrics} not in cv_results_; available: {available}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    order = np.argsort(x)
    for metric in metrics:
        mean = np.asarray(results[f"mean_test_{metric}"], dtype=float)[order]
        std = np.asarray(results.get(f"std_test_{metric}", np.zeros_like(mean)), dtype=float)[order]
        ax.plot(x[order], mean, marker="o", label=metric)
        ax.fill_between(x[order], mean - std, mean + std, alpha=0.2)
    positive = x[x > 0]
    if len(positive) and x.max() / positive.min() > 10:
        ax.set_xscale("symlog", linthresh=positive.min())
    ax.set_xlabel(param)
    ax.set_ylabel("cross-validated score")
    if len(metrics) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return ax
