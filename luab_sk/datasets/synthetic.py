"""Synthetic CLIP-like embeddings whose annotation byproducts carry label-relevant signal."""

from __future__ import annotations

import numpy as np
from scipy.stats import ortho_group
from sklearn.utils import check_random_state

__all__ = ["make_embedding_classification"]


def make_embedding_classification(
    n_samples=1000,
    n_features=512,
    n_classes=10,
    *,
    n_informative=8,
    n_byproducts=8,
    z_informativeness=0.9,
    signal_strength=0.35,
    class_sep=1.5,
    effective_rank=None,
    noise=0.05,
    missing_fraction=0.14,
    dtype=np.float32,
    random_state=None,
):
    """Unit-norm, ill-conditioned embeddings, labels, and byproducts that know where the signal is.

    Every sample has ``n_informative`` latent object factors ``s`` (class means plus noise) and
    ``effective_rank`` nuisance factors with a decaying spectrum (think background and style). The
    embedding mixes both into ``n_features`` dimensions through a random rotation, the object factors at
    ``signal_strength`` times the scale of the strongest nuisance factor, adds a large shared offset and
    isotropic noise, and is L2-normalised: like CLIP features, a few directions dominate the variance
    and the label lives in weaker ones. The byproducts Z are a random linear read-out of ``s`` plus
    noise: they say which directions matter, which a classifier trained on few labels finds only
    noisily from X. About ``missing_fraction`` of the Z rows are missing (all NaN), as in ImageNet-AB.

    Parameters
    ----------
    n_samples : int, default=1000
    n_features : int, default=512
        Embedding width; more than ``n_informative + effective_rank``.
    n_classes : int, default=10
    n_informative : int, default=8
        Latent object factors carrying the label.
    n_byproducts : int, default=8
        Columns of Z.
    z_informativeness : float in [0, 1], default=0.9
        Fraction of Z's variance that comes from the object factors (the rest is independent noise);
        0 makes Z useless.
    signal_strength : float, default=0.35
        Scale of the object factors in X relative to the largest nuisance factor.
    class_sep : float, default=1.5
        Spread of the class means in the latent space (units of the within-class noise).
    effective_rank : int, optional
        Nuisance factors; their scales decay as ``1 / sqrt(i)``. None uses
        ``min(64, n_features - n_informative - 1)``.
    noise : float, default=0.05
        Isotropic noise in X, relative to the largest nuisance factor.
    missing_fraction : float in [0, 1), default=0.14
        Fraction of samples whose Z row is entirely NaN.
    dtype : numpy dtype, default=np.float32
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        Unit-norm embeddings.
    y : ndarray of shape (n_samples,)
        Integer labels in ``range(n_classes)``.
    Z : ndarray of shape (n_samples, n_byproducts)
        Byproducts, standardised per column, NaN rows for missing.

    Examples
    --------
    >>> X, y, Z = make_embedding_classification(200, 64, n_classes=4, random_state=0)
    >>> X.shape, Z.shape, sorted(set(y.tolist()))
    ((200, 64), (200, 8), [0, 1, 2, 3])
    >>> bool(abs(float((X ** 2).sum(axis=1).mean()) - 1.0) < 1e-5)
    True
    """
    if effective_rank is None:
        effective_rank = min(64, n_features - n_informative - 1)
    for name, value in (
        ("n_samples", n_samples),
        ("n_features", n_features),
        ("n_informative", n_informative),
        ("n_byproducts", n_byproducts),
        ("effective_rank", effective_rank),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if int(n_classes) != n_classes or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
    if n_features <= n_informative + effective_rank:
        raise ValueError(
            f"n_features={n_features} must exceed n_informative + effective_rank "
            f"= {n_informative + effective_rank}."
        )
    if not 0.0 <= z_informativeness <= 1.0:
        raise ValueError(f"z_informativeness must be in [0, 1], got {z_informativeness!r}.")
    if not 0.0 <= missing_fraction < 1.0:
        raise ValueError(f"missing_fraction must be in [0, 1), got {missing_fraction!r}.")
    rng = check_random_state(random_state)

    means = rng.standard_normal((n_classes, n_informative)) * class_sep / np.sqrt(n_informative) * 2.0
    y = rng.randint(n_classes, size=n_samples)
    y[:n_classes] = np.arange(n_classes)  # every class is present
    rng.shuffle(y)
    s = means[y] + rng.standard_normal((n_samples, n_informative))

    nuisance_scale = 1.0 / np.sqrt(np.arange(1, effective_rank + 1))
    nuisance = rng.standard_normal((n_samples, effective_rank)) * nuisance_scale
    rotation = ortho_group.rvs(n_features, random_state=rng)
    signal_dirs = rotation[:n_informative]
    nuisance_dirs = rotation[n_informative : n_informative + effective_rank]
    offset = rotation[-1] * 3.0  # the shared direction that dominates CLIP-like embeddings
    X = (
        signal_strength * s / np.sqrt(1.0 + class_sep**2) @ signal_dirs
        + nuisance @ nuisance_dirs
        + noise * rng.standard_normal((n_samples, n_features))
        + offset
    )
    X /= np.linalg.norm(X, axis=1, keepdims=True)

    readout = rng.standard_normal((n_informative, n_byproducts))
    clean = s @ readout
    clean = (clean - clean.mean(axis=0)) / clean.std(axis=0)
    Z = np.sqrt(z_informativeness) * clean + np.sqrt(1.0 - z_informativeness) * rng.standard_normal(
        clean.shape
    )
    Z = (Z - Z.mean(axis=0)) / Z.std(axis=0)
    Z[rng.random_sample(n_samples) < missing_fraction] = np.nan
    return X.astype(dtype), y, Z.astype(dtype)
