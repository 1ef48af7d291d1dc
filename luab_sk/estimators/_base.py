"""scikit-learn side helpers shared by the LUAB estimators, and their shared base.

Byproduct (Z) validation, label encoding, NaN-aware standardisation, seeding, and
:class:`LUABClassifierMixin`, the base of :class:`~luab_sk.estimators.LUABClassifier` and
:class:`~luab_sk.estimators.LUABFineTuner`: the fit preamble (labels, Z, warm-start checks), the resolution
of ``byproduct_target`` from the head's :class:`~luab_sk.nn.HeadSpec`, ``predict`` / ``predict_proba`` /
``decision_function`` for the three label tasks, ``predict_byproducts``, ``attention_maps``, and pickling
(fitted modules travel on the CPU). Both estimators train through :mod:`luab_sk.nn.engine`, where
``alpha``, ``tol`` and ``max_iter`` are defined once.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import expit, softmax
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted

from .._param_validation import Device, Integral, Interval, Real, StrOptions
from .._utils import resolve_device
from ..nn import HEADS, head_spec

__all__ = [
    "FitInputs",
    "LabelEncoding",
    "LUABClassifierMixin",
    "check_byproducts",
    "check_click_points",
    "check_warm_head",
    "check_warm_start",
    "drop_unusable_byproducts",
    "encode_labels",
    "nan_standardization",
    "seed_from",
    "torch_seeded",
    "validation_split",
]

_SLICING_NOTE = (
    "scikit-learn (GridSearchCV, cross_validate, Pipeline) only splits fit parameters that are arrays "
    "with one row per sample, so anything else would reach every fold whole"
)


def check_byproducts(
    Z,
    n_samples: int,
    *,
    n_columns: int | None = None,
    dtype=np.float32,
    name: str = "Z",
) -> np.ndarray | None:
    """Validate annotation byproducts: a 2-D float array with one row per sample, NaN for missing.

    Parameters
    ----------
    Z : array-like of shape (n_samples, n_byproducts) or None
        Byproducts; NaN marks a missing element. None passes through.
    n_samples : int
        Number of samples in X; Z must have exactly as many rows.
    n_columns : int, optional
        Required number of columns (for example the width seen at a previous fit).
    dtype : numpy dtype, default=np.float32
        Output dtype.
    name : str, default="Z"
        Argument name used in error messages.

    Returns
    -------
    ndarray of shape (n_samples, n_byproducts) or None

    Raises
    ------
    TypeError
        If Z is a dict, a sparse matrix, or not array-like.
    ValueError
        If Z is not 2-D, has a different length from X, the wrong width, non-numeric values or infinity.

    Examples
    --------
    >>> import numpy as np
    >>> check_byproducts([[0.1, np.nan], [0.3, 0.4]], n_samples=2).dtype
    dtype('float32')
    >>> check_byproducts(np.zeros((3, 2)), n_samples=4)
    Traceback (most recent call last):
    ...
    ValueError: Z has 3 rows but X has 4 samples; ...
    """
    if Z is None:
        return None
    if isinstance(Z, Mapping):
        raise TypeError(
            f"{name} must be an array of shape (n_samples, n_byproducts), got a {type(Z).__name__}; "
            f"{_SLICING_NOTE}. Encode the byproducts into one float array first."
        )
    if sp.issparse(Z):
        raise TypeError(f"{name} must be a dense array with NaN for missing entries, got a sparse matrix.")
    if (
        isinstance(Z, (str, bytes))
        or np.isscalar(Z)
        or not hasattr(Z, "__len__")
        and not hasattr(Z, "__array__")
    ):
        raise TypeError(
            f"{name} must be an array of shape (n_samples, n_byproducts), got {type(Z).__name__}."
        )
    try:
        arr = np.asarray(Z, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold numbers (NaN for missing entries): {exc}") from exc
    if arr.ndim != 2:
        hint = f"; use {name}.reshape(-1, 1) for a single byproduct" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D (n_samples, n_byproducts), got shape {arr.shape}{hint}.")
    if arr.shape[0] != n_samples:
        raise ValueError(
            f"{name} has {arr.shape[0]} rows but X has {n_samples} samples; {name} needs one row per sample "
            f"({_SLICING_NOTE}; a transposed {name} would be split wrongly)."
        )
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no columns; pass {name}=None to train without byproducts.")
    if n_columns is not None and arr.shape[1] != n_columns:
        raise ValueError(f"{name} has {arr.shape[1]} columns, expected {n_columns}.")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains infinity; mark missing byproducts with NaN.")
    return arr


def drop_unusable_byproducts(Z: np.ndarray | None, byproduct_weight: float, *, name: str = "Z"):
    """Return None when Z cannot contribute to training, warning when it was meant to.

    Parameters
    ----------
    Z : ndarray or None
        Validated byproducts.
    byproduct_weight : float
        Weight of the byproduct loss; 0 means Z is not used.
    name : str, default="Z"

    Returns
    -------
    ndarray or None

    Examples
    --------
    >>> import numpy as np, warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     out = drop_unusable_byproducts(np.full((2, 1), np.nan), 1.0)
    >>> out is None, "entirely missing" in str(caught[0].message)
    (True, True)
    """
    if Z is None or byproduct_weight == 0:
        return None
    if np.isnan(Z).all():
        warnings.warn(
            f"{name} is entirely missing (all NaN) while byproduct_weight={byproduct_weight}; "
            "training without byproducts.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return Z


def check_click_points(Z: np.ndarray, n_outputs: int, *, name: str = "Z") -> None:
    """Check click-point byproducts (attention heads, or images that are cropped with their clicks).

    Parameters
    ----------
    Z : ndarray of shape (n_samples, 2) or (n_samples, 2 * n_outputs)
        One point per sample, or one per class; NaN = missing.
    n_outputs : int
        Label outputs of the model (1 for a binary task).
    name : str, default="Z"

    Raises
    ------
    ValueError
        On another width, or an observed coordinate outside [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> check_click_points(np.array([[0.2, 0.9], [np.nan, np.nan]]), n_outputs=3)
    >>> check_click_points(np.zeros((2, 3)), n_outputs=3)
    Traceback (most recent call last):
    ...
    ValueError: Z must hold click points, (n_samples, 2) or one point per class ...
    """
    width = Z.shape[1]
    if n_outputs == 1 and width != 2:
        raise ValueError(
            f"{name} must hold one click point per sample, (n_samples, 2), for a binary task (one label "
            f"output, one attention map); got {width} columns. One point per class needs a multi-class "
            "or multi-label task."
        )
    if width != 2 and width != 2 * n_outputs:
        raise ValueError(
            f"{name} must hold click points, (n_samples, 2) or one point per class "
            f"(n_samples, {2 * n_outputs}); got {width} columns."
        )
    observed = Z[~np.isnan(Z)]
    if observed.size and (observed.min() < 0 or observed.max() > 1):
        raise ValueError(f"{name} must hold click points (x, y) in [0, 1] image coordinates (NaN = missing).")


def check_warm_head(estimator, fitted_head: str) -> None:
    """Refuse to warm-start a fit whose ``head`` differs from the kind of head fitted before.

    Parameters
    ----------
    estimator : fitted estimator
        With a ``head`` parameter.
    fitted_head : {"linear", "mlp", "attention"}
        The kind of head the previous fit built.

    Raises
    ------
    ValueError
    """
    if estimator.head != fitted_head:
        raise ValueError(
            f"warm_start=True continues the fitted {fitted_head!r} head, but head={estimator.head!r} now; "
            "set warm_start=False to train a new head."
        )


def check_warm_start(
    estimator, labels: LabelEncoding, Z: np.ndarray | None, fitted_head: str | None = None, *, name: str = "Z"
) -> None:
    """Check that a warm-started fit sees the head, classes and byproduct layout of the previous fit.

    Parameters
    ----------
    estimator : fitted estimator
        With ``classes_``, ``task_``, ``n_byproducts_`` and ``head``.
    labels : LabelEncoding
        The new targets.
    Z : ndarray or None
        The new (usable) byproducts.
    fitted_head : {"linear", "mlp", "attention"}, optional
        The kind of head the previous fit built; None takes ``estimator.head`` (no head check).
    name : str, default="Z"

    Raises
    ------
    ValueError
        When ``head`` changed, the classes differ, or Z's width does not fit the byproduct head built by the
        first fit (pooled heads: the same number of columns; attention: a single map or the same per-class
        maps).
    """
    fitted_head = estimator.head if fitted_head is None else fitted_head
    check_warm_head(estimator, fitted_head)
    if not np.array_equal(labels.classes, estimator.classes_) or labels.task != estimator.task_:
        raise ValueError(
            f"warm_start=True needs the classes of the previous fit {estimator.classes_.tolist()}, "
            f"got {labels.classes.tolist()}."
        )
    width = 0 if Z is None else Z.shape[1]
    fitted = estimator.n_byproducts_
    spatial = head_spec(fitted_head).spatial  # maps: Z is optional, and one map or one per class
    if spatial:
        allowed = (0, fitted) if fitted > 2 else (0, 2)
    else:
        allowed = (fitted,)
    if width in allowed:
        return
    if width == 0:
        raise ValueError(
            f"warm_start=True: the model fitted before learned {fitted} byproduct columns, but this fit "
            f"has no usable {name} ({name}=None, entirely missing, or byproduct_weight=0)."
        )
    if fitted == 0 and not spatial:
        raise ValueError(
            f"warm_start=True: the model fitted before was trained without byproducts and has no byproduct "
            f"head, but {name} has {width} columns; set warm_start=False to train one."
        )
    raise ValueError(
        f"warm_start=True: {name} has {width} columns, but the model fitted before takes "
        f"{' or '.join(map(str, sorted(set(allowed) - {0})))}."
    )


class LabelEncoding(NamedTuple):
    """Encoded targets: ``y`` (int64 indices, or a float 0/1 indicator for multilabel), ``classes``,
    and ``task`` ("binary", "multiclass" or "multilabel")."""

    y: np.ndarray
    classes: np.ndarray
    task: str


def encode_labels(y) -> LabelEncoding:
    """Encode classification targets of any label type.

    Parameters
    ----------
    y : array-like of shape (n_samples,) or (n_samples, n_labels)
        Class labels (numbers or strings), or a 0/1 label indicator matrix for multi-label problems.

    Returns
    -------
    LabelEncoding

    Raises
    ------
    ValueError
        If y is continuous, multi-output multi-class, or has a single class.

    Examples
    --------
    >>> enc = encode_labels(["cat", "dog", "cat"])
    >>> enc.y.tolist(), enc.classes.tolist(), enc.task
    ([0, 1, 0], ['cat', 'dog'], 'binary')
    >>> encode_labels([[1, 0], [1, 1]]).task
    'multilabel'
    """
    kind = type_of_target(y, input_name="y")
    if kind == "multilabel-indicator":
        indicator = y.toarray() if sp.issparse(y) else np.asarray(y)
        return LabelEncoding(indicator.astype(np.float32), np.arange(indicator.shape[1]), "multilabel")
    if kind not in ("binary", "multiclass"):
        raise ValueError(
            f"y must hold class labels (binary or multiclass) or a 0/1 multi-label indicator matrix; "
            f"got target type {kind!r}."
        )
    y = np.asarray(y)
    if y.ndim == 2:
        y = y.ravel()
    classes, encoded = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"y has only one class ({classes[0]!r}); a classifier needs at least 2 classes.")
    return LabelEncoding(encoded.astype(np.int64), classes, "binary" if classes.size == 2 else "multiclass")


def nan_standardization(A: np.ndarray, axis: int | tuple[int, ...] = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale for standardising ``A`` along ``axis``, ignoring NaN.

    Constant or entirely missing columns get scale 1 (and mean 0 when entirely missing), so the
    transform ``(A - mean) / scale`` is always finite where A is.

    Parameters
    ----------
    A : ndarray
    axis : int or tuple of int, default=0

    Returns
    -------
    mean, scale : ndarray
        Broadcastable against A with ``axis`` removed.

    Examples
    --------
    >>> import numpy as np
    >>> nan_standardization(np.array([[1.0, np.nan], [3.0, np.nan]]))
    (array([2., 0.]), array([1., 1.]))
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are handled below
        mean = np.nanmean(A, axis=axis, dtype=np.float64)
        std = np.nanstd(A, axis=axis, dtype=np.float64)
    mean = np.nan_to_num(mean, nan=0.0)
    std = np.nan_to_num(std, nan=1.0)
    std[std < 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, std


def streaming_standardization(X, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and scale of a 2-D array read ``chunk_rows`` rows at a time (float64 sums).

    For any finite X, in memory or too large to copy (a ``numpy.memmap`` is read, never copied whole:
    memory is one float64 block of ``chunk_rows`` rows, by default about 2 MB, which also keeps the block
    in cache: 2-3x faster than :func:`nan_standardization`).
    Deviations from the first block's mean are summed, so columns with a large offset keep their
    precision. Constant columns get scale 1 as in :func:`nan_standardization`.

    Examples
    --------
    >>> import numpy as np
    >>> mean, scale = streaming_standardization(np.array([[1.0, 5.0], [3.0, 5.0]]), chunk_rows=1)
    >>> mean.tolist(), scale.tolist()
    ([2.0, 5.0], [1.0, 1.0])
    """
    n, d = X.shape
    chunk_rows = max(1, (1 << 18) // max(d, 1)) if chunk_rows is None else chunk_rows
    total, squares, shift = np.zeros(d), np.zeros(d), None
    for lo in range(0, n, chunk_rows):
        block = np.asarray(X[lo : lo + chunk_rows], dtype=np.float64)  # may be a view of X: never written
        if shift is None:  # sums of deviations from the first block's mean: no cancellation for large offsets
            shift = block.mean(0)
        block = block - shift
        total += block.sum(0)
        squares += np.einsum("ij,ij->j", block, block)
    offset = total / n
    mean = shift + offset
    std = np.sqrt(np.maximum(squares / n - offset * offset, 0.0))
    std[std < 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, std


def seed_from(random_state) -> int:
    """Draw a torch seed from a scikit-learn ``random_state`` (None, int or RandomState).

    Examples
    --------
    >>> seed_from(0) == seed_from(0)
    True
    """
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


# torch's default generators are process-wide: seeded blocks of concurrent fits must not interleave.
_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def torch_seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch's global generators inside the block and restore them afterwards.

    For code that cannot take a :class:`torch.Generator` (dropout inside a backbone, a library's random
    initialisation). The generators are process-wide, so blocks in concurrent threads are run one at a
    time (a re-entrant lock): an int seed then gives the same result in any thread. Code that can take a
    generator should use a local one instead and run concurrently.

    Parameters
    ----------
    seed : int
    device : torch.device, optional
        A CUDA device whose generator is forked and seeded too.

    Examples
    --------
    >>> with torch_seeded(3):
    ...     a = torch.rand(2)
    >>> with torch_seeded(3):
    ...     b = torch.rand(2)
    >>> bool((a == b).all())
    True
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


class FitInputs(NamedTuple):
    """What :meth:`LUABClassifierMixin._fit_preamble` returns: the encoded ``labels``, ``n_outputs`` (label
    scores of the model: 1 for a binary task), the usable ``Z`` (None when it cannot contribute), the
    training ``device`` and whether the fit continues a fitted model (``warm``)."""

    labels: LabelEncoding
    n_outputs: int
    Z: np.ndarray | None
    device: torch.device
    warm: bool


class LUABClassifierMixin:
    """The shared base of the LUAB estimators (a multitask head, possibly under a backbone).

    It owns what both estimators do alike: the fit preamble (:meth:`_fit_preamble`), the resolution of
    ``byproduct_target`` from the head's :class:`~luab_sk.nn.HeadSpec` (heads are asked what they can do,
    never compared by name), ``predict`` / ``predict_proba`` / ``decision_function`` for binary,
    multi-class and multi-label tasks, :meth:`predict_byproducts`, :meth:`attention_maps` and pickling.

    Subclasses set ``classes_``, ``task_``, ``n_byproducts_`` (and ``grid_shape_`` for spatial heads) in
    ``fit``, store the trained module in the attribute named by ``_module_attr``, and implement
    ``_outputs(X)`` (yields one :class:`~luab_sk.nn.HeadOutput` per chunk of X) and
    ``_label_scores(X) -> ndarray of shape (n_samples, n_outputs)``. ``_parameter_constraints`` holds the
    constraints of the parameters both LUAB estimators share; each extends it with its own. Training goes
    through :mod:`luab_sk.nn.engine`, whose docstring defines ``alpha``, ``tol`` and ``max_iter``.
    """

    #: Attribute holding the fitted torch module.
    _module_attr = "module_"
    #: Pickle the module's weights only (rebuilt by ``_rebuild_module(state_dict)``), not the module object.
    _pickle_weights_only = False
    #: Names the pooled heads' byproduct target goes by in ``byproduct_target`` (all mean "regression").
    _pooled_target_names: tuple[str, ...] = ("regression",)

    __metadata_request__fit = {"Z": True}
    _parameter_constraints: dict = {
        "head": [StrOptions(set(HEADS))],
        "hidden_size": [Interval(Integral, 1, None, closed="left")],
        "n_heads": [Interval(Integral, 1, None, closed="left")],
        "byproduct_weight": [Interval(Real, 0, None, closed="left")],
        "byproduct_loss": [StrOptions({"smooth_l1", "l2", "l1"})],
        "sigma": [Interval(Real, 0, None, closed="neither")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "warm_start": ["boolean"],
        "device": [Device()],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def decision_function(self, X):
        """Label scores (logits).

        Parameters
        ----------
        X : array-like
            Samples, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,) for a binary task, else (n_samples, n_outputs)
        """
        check_is_fitted(self)
        scores = self._label_scores(X)
        return scores[:, 0] if self.task_ == "binary" else scores

    def predict_proba(self, X):
        """Class probabilities (softmax), or per-label probabilities (sigmoid) for multi-label y.

        Parameters
        ----------
        X : array-like

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        # float64, and expit(-s) rather than 1 - expit(s): both columns stay strictly monotone in the
        # scores wherever float64 can resolve them (|s| below about 30), on every CPU.
        scores = self._label_scores(X).astype(np.float64)
        if self.task_ == "multiclass":
            return softmax(scores, axis=1)
        p = expit(scores)
        return np.hstack([expit(-scores), p]) if self.task_ == "binary" else p

    def predict(self, X):
        """Predicted class labels (a 0/1 indicator matrix for multi-label y).

        Parameters
        ----------
        X : array-like

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_labels)
        """
        check_is_fitted(self)
        scores = self._label_scores(X)
        if self.task_ == "multilabel":
            return (scores > 0).astype(np.int64)
        if self.task_ == "binary":
            return self.classes_[(scores[:, 0] > 0).astype(np.int64)]
        return self.classes_[scores.argmax(axis=1)]

    # ----------------------------------------------------------------- shared fit
    def _head_spec(self):
        """The :class:`~luab_sk.nn.HeadSpec` of the fitted head (of ``head`` before any fit)."""
        module = getattr(self, self._module_attr, None)
        kind = getattr(getattr(module, "head", module), "kind", None) if module is not None else None
        return head_spec(kind if kind is not None else self.head)

    def _resolve_byproduct_target(self) -> str:
        """The loss target of :func:`~luab_sk.nn.multitask_loss` for ``byproduct_target`` and ``head``.

        Spatial heads take their spec's targets (the first is ``"auto"``); pooled heads take the estimator's
        names for regression (``_pooled_target_names``). Raises ValueError on a target the head lacks.
        """
        spec = head_spec(self.head)
        allowed = spec.targets if spec.spatial else self._pooled_target_names
        target = allowed[0] if self.byproduct_target == "auto" else self.byproduct_target
        if target not in allowed:
            raise ValueError(
                f"byproduct_target={self.byproduct_target!r} does not fit head={self.head!r}; "
                f"use one of {('auto',) + tuple(allowed)}."
            )
        return target if spec.spatial else "regression"

    def _fit_preamble(
        self, y, Z, n_samples: int, *, click_points: bool, warm: bool, before_drop=None
    ) -> FitInputs:
        """Encode y, validate Z (and drop it when unusable), check a warm start, pick the device.

        Parameters
        ----------
        y : array-like
            The targets.
        Z : array-like or None
            The byproducts.
        n_samples : int
            Samples of X.
        click_points : bool
            Z must hold click points in [0, 1] (:func:`check_click_points`).
        warm : bool
            The fit continues the fitted module (:func:`check_warm_start`).
        before_drop : callable, optional
            ``before_drop(labels, Z) -> Z``, called on the validated Z (None when not given) before an
            unusable Z is dropped; a subclass's rule that needs Z even when it trains nothing (the
            fine-tuner's ``drop_label_outside_crop``) goes here.
        """
        check_classification_targets(y)
        labels = encode_labels(y)
        n_outputs = 1 if labels.task == "binary" else labels.classes.size
        Z = check_byproducts(Z, n_samples)
        if Z is not None and click_points:
            check_click_points(Z, n_outputs)
        if before_drop is not None:
            Z = before_drop(labels, Z)
        Z = drop_unusable_byproducts(Z, self.byproduct_weight)
        if warm:
            check_warm_start(self, labels, Z, self._head_spec().name)
        return FitInputs(labels, n_outputs, Z, resolve_device(self.device), warm)

    # ------------------------------------------------------------- shared predict
    def _byproducts_in_z_units(self, Z: np.ndarray) -> np.ndarray:
        """Undo any scaling of Z applied in ``fit`` (identity unless a subclass standardises Z)."""
        return Z

    def predict_byproducts(self, X):
        """Predict the byproducts from X alone, in Z's units.

        Parameters
        ----------
        X : array-like
            Samples, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_byproducts)
            Pooled heads: the byproduct head's regression. Spatial heads (attention): the soft-argmax
            ``[x_0, y_0, ...]`` of every attention map, in [0, 1] image coordinates.
        """
        check_is_fitted(self)
        if not self._head_spec().spatial and self.n_byproducts_ == 0:
            raise ValueError(
                f"this {type(self).__name__} was fitted without byproducts (Z=None, all missing, or "
                "byproduct_weight=0), so it has no byproduct head."
            )
        Z = np.concatenate([out.byproducts.float().cpu().numpy() for out in self._outputs(X)])
        return self._byproducts_in_z_units(Z)

    def attention_maps(self, X):
        """Attention maps of a spatial head over its token grid.

        Parameters
        ----------
        X : array-like
            Samples, as in ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, grid_h, grid_w), or (n_samples, n_classes, grid_h, grid_w) with
        per-class maps. Every map sums to 1.
        """
        check_is_fitted(self)
        if not self._head_spec().spatial:
            raise ValueError(f"attention_maps needs head='attention'; this model has head={self.head!r}.")
        maps = np.concatenate([out.attention.float().cpu().numpy() for out in self._outputs(X)])
        maps = maps.reshape(maps.shape[0], maps.shape[1], *self.grid_shape_)
        return maps[:, 0] if maps.shape[1] == 1 else maps

    # ------------------------------------------------------------------- pickling
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: Python 3.11 hands out the live __dict__
        module = state.pop(self._module_attr, None)
        if module is not None:  # pickles load on machines without the training device
            if self._pickle_weights_only:
                state["_model_state"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            else:
                state[self._module_attr] = copy.deepcopy(module).cpu()
        return state

    def __setstate__(self, state):
        model_state = state.pop("_model_state", None)
        super().__setstate__(state)
        if model_state is not None:
            module = self._rebuild_module(model_state)
            module.load_state_dict(model_state)
            setattr(self, self._module_attr, module.eval())

    def _rebuild_module(self, model_state):
        """The fitted module's architecture, for weights pickled with ``_pickle_weights_only``."""
        raise NotImplementedError

    def __sklearn_is_fitted__(self):
        return hasattr(self, self._module_attr)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        tags.target_tags.multi_output = True
        return tags


def validation_split(labels: LabelEncoding, validation_fraction: float, seed: int):
    """Sorted training and early-stopping validation indices, stratified when every class allows.

    Parameters
    ----------
    labels : LabelEncoding
        The encoded targets (see :func:`encode_labels`); multi-label targets are split without stratifying.
    validation_fraction : float
        Share of the samples held out.
    seed : int

    Returns
    -------
    train, val : ndarray of int

    Examples
    --------
    >>> train, val = validation_split(encode_labels(["a", "b"] * 10), 0.2, seed=0)
    >>> len(train), len(val)
    (16, 4)
    """
    indices = np.arange(labels.y.shape[0])
    stratify = None if labels.task == "multilabel" else labels.y
    try:
        train, val = train_test_split(
            indices, test_size=validation_fraction, random_state=seed, stratify=stratify
        )
    except ValueError:  # a class too small to stratify
        train, val = train_test_split(indices, test_size=validation_fraction, random_state=seed)
    return np.sort(train), np.sort(val)
