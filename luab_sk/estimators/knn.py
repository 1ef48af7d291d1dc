"""k-nearest-neighbour estimators on faiss: a kNN classifier baseline and a byproduct imputer.

:class:`FaissKNNClassifier` is the weighted kNN classifier of DINO's evaluation protocol (cosine similarity,
``k = 20``, votes weighted by ``exp(sim / T)`` with ``T = 0.07``) as a scikit-learn classifier.
:class:`KNNByproductImputer` fills the missing rows of a byproduct matrix Z from the Z of the nearest
annotated samples in feature space.

Both search with faiss: an exact flat index by default, an IVF index for large databases, on the CPU
(faiss-cpu) unless faiss sees a GPU (the ``gpu`` extra); a GPU that fails falls back to the CPU with one
:class:`FaissGPUFallbackWarning`.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._param_validation import Device, Integral, Interval, Real, StrOptions, _fit_context
from ._base import check_byproducts
from ._faiss import INDEX_TYPES, METRICS, FaissGPUFallbackWarning, NeighborIndex, faiss_threads, gpu_id_for

__all__ = ["FaissGPUFallbackWarning", "FaissKNNClassifier", "KNNByproductImputer"]

WEIGHTS = ("temperature", "uniform", "distance")
STRATEGIES = ("mean", "nearest")
# Floor of the distance in 1 / distance weights (an exact duplicate would otherwise get an infinite weight).
_MIN_DISTANCE = 1e-12


# Parameters shared by both estimators; each class extends this dict with its own.
_KNN_PARAMETER_CONSTRAINTS: dict = {
    "n_neighbors": [Interval(Integral, 1, None, closed="left")],
    "metric": [StrOptions(set(METRICS))],
    "weights": [StrOptions(set(WEIGHTS))],
    "temperature": [Interval(Real, 0, None, closed="neither")],
    "index": [StrOptions(set(INDEX_TYPES))],
    "nlist": [Interval(Integral, 1, None, closed="left"), None],
    "nprobe": [Interval(Integral, 1, None, closed="left"), None],
    "device": [Device(("cpu", "cuda")), None],
    "n_jobs": [
        Interval(Integral, None, -1, closed="right"),
        Interval(Integral, 1, None, closed="left"),
        None,
    ],
    "random_state": ["random_state"],
}


def _build_index(est, X):
    seed = check_random_state(est.random_state).randint(np.iinfo(np.int32).max)
    with faiss_threads(est.n_jobs):
        return NeighborIndex(
            X,
            metric=est.metric,
            index=est.index,
            nlist=est.nlist,
            nprobe=est.nprobe,
            gpu_id=gpu_id_for(est.device),
            seed=seed,
        )


def neighbor_weights(distances, weights="temperature", temperature=0.07):
    """Vote weights of sorted neighbour distances.

    Parameters
    ----------
    distances : ndarray of shape (m, k)
        Distances of each query's neighbours, ascending along each row.
    weights : {"temperature", "uniform", "distance"}
        ``"temperature"``: ``exp(-(d - d_min) / temperature)``; for the cosine distance ``d = 1 - sim``
        this is DINO's ``exp(sim / T)`` up to a per-query factor, which cancels in the normalised vote.
        ``"uniform"``: 1. ``"distance"``: ``1 / d`` (an exact duplicate dominates).
    temperature : float
        In units of the distance. 0.07 suits the cosine distance; rescale it for Euclidean distances.

    Returns
    -------
    ndarray of shape (m, k), float64
        Positive weights; the nearest neighbour of each row always has a positive weight.

    Examples
    --------
    >>> import numpy as np
    >>> neighbor_weights(np.array([[0.1, 0.2]]), "temperature", temperature=0.1).round(3)
    array([[1.   , 0.368]])
    """
    distances = np.asarray(distances, dtype=np.float64)
    if weights == "uniform":
        return np.ones_like(distances)
    if weights == "distance":
        return 1.0 / np.maximum(distances, _MIN_DISTANCE)
    return np.exp(-(distances - distances[:, :1]) / temperature)


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """Weighted k-nearest-neighbour classifier on faiss (the DINO kNN protocol by default).

    Each query's ``n_neighbors`` nearest training rows vote for their labels with weights from
    :func:`neighbor_weights`; ``predict_proba`` is the normalised vote. With the defaults (cosine,
    ``k = 20``, ``T = 0.07``) this is the weighted kNN evaluation of DINO (Caron et al., 2021) used for
    frozen features.

    Parameters
    ----------
    n_neighbors : int, default=20
        Neighbours per query; fitting raises when it exceeds the number of training rows.
    metric : {"cosine", "l2"}, default="cosine"
        Cosine distance ``1 - cos`` (exact inner product on L2-normalised rows) or Euclidean distance.
    weights : {"temperature", "uniform", "distance"}, default="temperature"
        Vote weights, see :func:`neighbor_weights`.
    temperature : float, default=0.07
        Temperature of ``weights="temperature"``, in units of the distance.
    index : {"auto", "flat", "ivf"}, default="auto"
        ``"flat"``: exact search. ``"ivf"``: faiss ``IndexIVFFlat`` (approximate; faster searches on large
        databases, but ``fit`` trains k-means: about 30 s for 100k x 512 on one core).
        ``"auto"``: flat below 200,000 training rows, else IVF.
    nlist : int, default=None
        IVF lists; None picks ``min(4 * sqrt(n), n // 39)``.
    nprobe : int, default=None
        IVF lists visited per query; None picks ``round(sqrt(nlist))``. More is slower and more exact.
        IVF search reads its lists row by row while exact search runs as matrix products, so for
        batches of queries IVF only pays off when it visits well under 1/16 of the rows (see
        ``benchmarks/results/knn_speed.md``).
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        ``"auto"`` searches on GPU 0 when ``faiss.get_num_gpus() > 0`` (the ``gpu`` extra), else on the CPU.
        A GPU copy that fails to build or search falls back to the CPU with one
        :class:`FaissGPUFallbackWarning`. A fitted model that is pickled comes back on the CPU.
    n_jobs : int, default=None
        OpenMP threads for faiss during ``fit`` and searches (-1: all cores); None keeps faiss's setting.
    random_state : int, RandomState instance or None, default=None
        Seeds the k-means that trains an IVF index; unused by the flat index.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    index_ : NeighborIndex
        The faiss index over the training rows (``index_.kind`` is ``"flat"`` or ``"ivf"``,
        ``index_.on_gpu`` tells where searches run).
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit, when X has string column names.

    See Also
    --------
    sklearn.neighbors.KNeighborsClassifier : Exact kNN with scikit-learn's own search.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from luab_sk.estimators.knn import FaissKNNClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = FaissKNNClassifier(n_neighbors=10).fit(X[:1500], y[:1500])
    >>> clf.score(X[1500:], y[1500:]) > 0.9
    True
    >>> clf.predict_proba(X[1500:1502]).shape
    (2, 10)
    """

    def __init__(
        self,
        n_neighbors=20,
        *,
        metric="cosine",
        weights="temperature",
        temperature=0.07,
        index="auto",
        nlist=None,
        nprobe=None,
        device="auto",
        n_jobs=None,
        random_state=None,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.temperature = temperature
        self.index = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state

    _parameter_constraints: dict = dict(_KNN_PARAMETER_CONSTRAINTS)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Index the training rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features (finite; NaN rows are rejected).
        y : array-like of shape (n_samples,)
            Class labels (any hashable, sortable type).

        Returns
        -------
        self : FaissKNNClassifier
        """
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        if self.n_neighbors > X.shape[0]:
            raise ValueError(
                f"n_neighbors={self.n_neighbors} is larger than the number of training samples "
                f"(n_samples={X.shape[0]})."
            )
        self.classes_, self._y_encoded = np.unique(y, return_inverse=True)
        self.index_ = _build_index(self, X)
        return self

    def kneighbors(self, X, n_neighbors=None, return_distance=True):
        """Find the nearest training rows of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            Query features.
        n_neighbors : int, default=None
            Neighbours to return; None uses the constructor's ``n_neighbors``.
        return_distance : bool, default=True
            Also return the distances.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float64
            Cosine (``1 - cos``) or Euclidean distances, ascending. Only when `return_distance`.
        indices : ndarray of shape (n_queries, n_neighbors), int64
            Row numbers in the training set.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= self.index_.n_samples:
            raise ValueError(
                f"n_neighbors must be an integer in [1, {self.index_.n_samples}] (the training size), "
                f"got {k!r}."
            )
        with faiss_threads(self.n_jobs):
            distances, indices = self.index_.search(X, int(k))
        return (distances, indices) if return_distance else indices

    def predict_proba(self, X):
        """Normalised weighted votes of the nearest training rows.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        ndarray of shape (n_queries, n_classes)
            Rows sum to 1; columns follow ``classes_``.
        """
        check_is_fitted(self)
        distances, indices = self.kneighbors(X)
        votes = neighbor_weights(distances, self.weights, self.temperature)
        proba = np.zeros((indices.shape[0], len(self.classes_)))
        rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
        np.add.at(proba, (rows, self._y_encoded[indices].ravel()), votes.ravel())
        proba /= proba.sum(axis=1, keepdims=True)
        return proba

    def predict(self, X):
        """Class with the largest weighted vote (ties go to the first class in ``classes_``).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        ndarray of shape (n_queries,)
        """
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class KNNByproductImputer(BaseEstimator):
    """Fill missing annotation-byproduct rows from the nearest annotated samples in feature space.

    ``fit(X, Z)`` indexes the pooled features ``X`` of the *annotated* samples: the rows of ``Z`` that are
    not all-NaN. ``transform(X, Z)`` returns a copy of ``Z`` whose all-NaN rows are filled from the Z rows
    of each sample's ``n_neighbors`` nearest annotated samples. Observed values are never changed.

    Partially missing rows (some NaN, some values) count as annotated: they are neither filled nor
    changed, and they serve as neighbours for the columns they observe. (In per-class points, NaN for a
    class usually means "class absent", which must not be imputed.)

    How a missing row is filled (``strategy``):

    * ``"mean"``: per column, the weighted mean over the neighbours that observe that column (NaN when
      none of them does). Every filled row is a convex combination of real annotations, so convex
      constraints carry over: points stay in ``[0, 1]``, and a heatmap row (non-negative, summing to 1)
      stays a heatmap, because heatmap rows are fully observed. Fixed-length trace summaries become the
      weighted mean of the neighbours' summaries. The mean of a multi-modal set of points (neighbours
      that clicked different objects) can fall between the objects; use ``"nearest"`` then.
    * ``"nearest"``: the row of the nearest annotated neighbour, copied whole (a mode-like choice: a real
      click, a real trace summary, a real heatmap; ``weights`` is unused).

    Parameters
    ----------
    n_neighbors : int, default=5
        Annotated neighbours per missing row; fitting raises when it exceeds the number of annotated rows.
    metric : {"cosine", "l2"}, default="cosine"
        Distance between pooled features.
    weights : {"uniform", "distance", "temperature"}, default="uniform"
        Neighbour weights of ``strategy="mean"``, see :func:`neighbor_weights`.
    strategy : {"mean", "nearest"}, default="mean"
        How a missing row is filled, see above.
    temperature : float, default=0.07
        Temperature of ``weights="temperature"``, in units of the distance.
    index, nlist, nprobe, device, n_jobs, random_state
        faiss search settings, as in :class:`FaissKNNClassifier`.

    Attributes
    ----------
    index_ : NeighborIndex
        faiss index over the features of the annotated training rows.
    annotated_Z_ : ndarray of shape (n_annotated_, n_byproducts_), float64
        Z rows of the annotated training samples, in index order.
    imputed_mask_ : ndarray of shape (n_samples,), bool
        Training rows that were missing (all-NaN): the rows ``transform(X, Z)`` fills on the training data.
    n_annotated_ : int
        Number of annotated training rows.
    n_byproducts_ : int
        Number of columns of Z.
    n_features_in_ : int
        Number of features of X.

    Examples
    --------
    Clicks (points in [0, 1]) for 3 of 4 samples; the unannotated sample is filled from its 2 neighbours:

    >>> import numpy as np
    >>> from luab_sk.estimators.knn import KNNByproductImputer
    >>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, 0.05]])
    >>> Z = np.array([[0.2, 0.4], [0.4, 0.6], [0.9, 0.9], [np.nan, np.nan]])
    >>> imputer = KNNByproductImputer(n_neighbors=2)
    >>> Z_filled, mask = imputer.fit(X, Z).transform(X, Z, return_mask=True)
    >>> Z_filled[3], mask
    (array([0.3, 0.5]), array([False, False, False,  True]))

    In a study, compare a LUAB model trained on the observed Z with one trained on the filled Z
    (``LUABClassifier`` also runs this imputer itself with ``impute_byproducts="knn"``)::

        Z_train_filled = KNNByproductImputer(n_neighbors=5).fit(X_train, Z_train).transform(X_train, Z_train)
        model.fit(X_train, y_train, Z=Z_train_filled)
    """

    def __init__(
        self,
        n_neighbors=5,
        *,
        metric="cosine",
        weights="uniform",
        strategy="mean",
        temperature=0.07,
        index="auto",
        nlist=None,
        nprobe=None,
        device="auto",
        n_jobs=None,
        random_state=None,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.strategy = strategy
        self.temperature = temperature
        self.index = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _check_Z(self, Z, n_samples, n_columns=None):
        if Z is None:
            raise ValueError("KNNByproductImputer needs Z, the byproducts to impute (NaN rows are filled).")
        return check_byproducts(Z, n_samples, n_columns=n_columns, dtype=np.float64)

    _parameter_constraints: dict = {
        **_KNN_PARAMETER_CONSTRAINTS,
        "strategy": [StrOptions(set(STRATEGIES))],
    }

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, Z):
        """Index the features of the annotated rows of Z.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Pooled features (finite).
        Z : array-like of shape (n_samples, n_byproducts)
            Byproducts with NaN for missing elements; a row is annotated unless it is all-NaN.

        Returns
        -------
        self : KNNByproductImputer
        """
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        Z = self._check_Z(Z, X.shape[0])
        annotated = ~np.isnan(Z).all(axis=1)
        n_annotated = int(annotated.sum())
        if self.n_neighbors > n_annotated:
            raise ValueError(
                f"n_neighbors={self.n_neighbors} is larger than the number of annotated rows of Z "
                f"({n_annotated} of {Z.shape[0]})."
            )
        self.index_ = _build_index(self, X[annotated])
        self.annotated_Z_ = Z[annotated]
        self.imputed_mask_ = ~annotated
        self.n_annotated_ = n_annotated
        self.n_byproducts_ = Z.shape[1]
        return self

    def transform(self, X, Z, return_mask=False):
        """Return a copy of Z with its all-NaN rows filled from the nearest annotated neighbours.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Pooled features of the samples of Z.
        Z : array-like of shape (n_samples, n_byproducts_)
            Byproducts with NaN for missing elements.
        return_mask : bool, default=False
            Also return which rows were filled.

        Returns
        -------
        Z_filled : ndarray of shape (n_samples, n_byproducts_), float64
            Observed values unchanged; all-NaN rows filled (see the class docstring).
        mask : ndarray of shape (n_samples,), bool
            True for the rows that were filled. Only when `return_mask`.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        Z_filled = self._check_Z(Z, X.shape[0], self.n_byproducts_).copy()
        missing = np.isnan(Z_filled).all(axis=1)
        if missing.any():
            with faiss_threads(self.n_jobs):
                distances, indices = self.index_.search(X[missing], self.n_neighbors)
            Z_filled[missing] = self._fill(distances, indices)
        return (Z_filled, missing) if return_mask else Z_filled

    def fit_transform(self, X, Z, return_mask=False):
        """Fit on (X, Z), then fill the missing rows of the same Z.

        Parameters
        ----------
        X, Z, return_mask
            As in :meth:`fit` and :meth:`transform`.

        Returns
        -------
        Z_filled : ndarray of shape (n_samples, n_byproducts)
        mask : ndarray of shape (n_samples,), bool
            Equal to ``imputed_mask_``. Only when `return_mask`.
        """
        return self.fit(X, Z).transform(X, Z, return_mask=return_mask)

    def _fill(self, distances, indices):
        neighbour_Z = self.annotated_Z_[indices]  # (m, k, n_byproducts)
        if self.strategy == "nearest":
            return neighbour_Z[:, 0, :]
        weights = neighbor_weights(distances, self.weights, self.temperature)[:, :, None]
        observed = ~np.isnan(neighbour_Z)
        total = np.where(observed, weights, 0.0).sum(axis=1)
        weighted = np.where(observed, neighbour_Z * weights, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, weighted / total, np.nan)
