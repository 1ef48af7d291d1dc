"""faiss neighbour search for the kNN estimators: index building, GPU placement with CPU fallback.

Private module. :class:`NeighborIndex` is the one object the estimators hold: it builds an exact
(``IndexFlatIP`` / ``IndexFlatL2``) or inverted-file (``IndexIVFFlat``) faiss index on the CPU, optionally
places a copy on a GPU through :func:`index_to_gpu` (which verifies the copy and falls back to the CPU
index with one :class:`FaissGPUFallbackWarning`), and returns neighbours whose distances are recomputed in
float64, so that results do not depend on how queries are batched.

faiss computes in float32. Rows are therefore scaled by powers of two before they reach it (exactly: no
rounding changes, so neighbours are those of the unscaled rows): each row to a largest magnitude in
[0.5, 1) before cosine normalisation, and all rows by one common factor for the Euclidean metric, so that
features of any finite magnitude (1e20, 1e-30) neither overflow nor underflow. A Euclidean query whose
distances would still overflow (far larger than the indexed rows) is refused, and a search result with a
missing neighbour (id -1) or a non-finite distance raises instead of becoming a prediction.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import faiss
import numpy as np
from joblib import effective_n_jobs

from .._utils import resolve_device

METRICS = ("cosine", "l2")
INDEX_TYPES = ("auto", "flat", "ivf")
#: ``index="auto"`` switches from the exact flat index to IVF at this many indexed rows.
IVF_AUTO_MIN_SAMPLES = 200_000
# Rows re-scored at once: bounds the (rows * k * d) float32 block gathered from the index.
_RESCORE_BLOCK_ELEMENTS = 1 << 23
# faiss computes exact distances row by row (no BLAS) for batches with fewer than
# ``distance_compute_blas_threshold`` (default 128000) / d queries; against 100k x 512 on the 2-core
# development machine that path measured 5-16x slower than BLAS for 4-250 queries, faster for 1-2.
_BLAS_MIN_QUERIES = 3
# Database rows used by the self-search that validates a GPU copy.
_GPU_PROBE_ROWS = 8
# Rows converted to float32 at once (bounds the float64 temporary of the power-of-two scaling).
_PREPARE_BLOCK_ROWS = 1 << 14
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class FaissGPUFallbackWarning(RuntimeWarning):
    """A faiss GPU index could not be built or used; the CPU index is used instead."""


def magnitude_exponent(X):
    """The binary exponent ``e`` with ``max |X|`` in ``[2**(e - 1), 2**e)`` (0 when `X` is all zero).

    Examples
    --------
    >>> magnitude_exponent([[3.0, -0.1]]), magnitude_exponent([[1e20]]), magnitude_exponent([[0.0]])
    (2, 67, 0)
    """
    X = np.asarray(X)
    largest = max(float(X.max()), -float(X.min())) if X.size else 0.0
    return int(np.frexp(largest)[1])


def prepare_rows(X, metric, exponent=0):
    """Return `X` as a C-contiguous float32 array ready for faiss.

    ``metric="cosine"``: every row is scaled by a power of two to a largest magnitude in [0.5, 1), then
    L2-normalised (all-zero rows stay zero). ``metric="l2"``: every row is multiplied by
    ``2 ** -exponent``. Scaling by powers of two is exact, and happens in float64 before the conversion,
    so finite rows of any magnitude convert without overflow. The input is never modified.

    Parameters
    ----------
    X : array-like of shape (n, d)
        Finite rows.
    metric : {"cosine", "l2"}
    exponent : int, default=0
        The common scale of the Euclidean metric, from :func:`magnitude_exponent` of the indexed rows.

    Returns
    -------
    ndarray of shape (n, d), float32
    """
    X = np.asarray(X)
    rows = np.empty(X.shape, dtype=np.float32)
    for start in range(0, len(X), _PREPARE_BLOCK_ROWS):
        block = np.asarray(X[start : start + _PREPARE_BLOCK_ROWS], dtype=np.float64)
        if metric == "cosine":
            scale = -np.frexp(np.abs(block).max(axis=1, keepdims=True))[1]
        else:
            scale = -exponent
        rows[start : start + len(block)] = np.ldexp(block, scale)
    if metric == "cosine":
        faiss.normalize_L2(rows)
    return rows


@contextmanager
def _blas_distances(n_queries):
    """Make faiss use its BLAS path for a batch of `n_queries` (>= ``_BLAS_MIN_QUERIES``) queries."""
    if n_queries < _BLAS_MIN_QUERIES:
        yield
        return
    previous = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = previous


@contextmanager
def faiss_threads(n_jobs):
    """Run the enclosed faiss calls with ``n_jobs`` OpenMP threads (None: leave faiss's setting)."""
    if n_jobs is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(effective_n_jobs(n_jobs))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def gpu_id_for(device):
    """GPU ordinal that faiss should use for `device`, or None for the CPU.

    ``"auto"`` (or None) asks for GPU 0 only when ``faiss.get_num_gpus() > 0``; ``"cpu"`` never asks;
    ``"cuda"``/``"cuda:N"`` are checked by :func:`luab_sk._utils.resolve_device` and always ask (the
    GPU placement then warns and falls back when faiss has no GPU support).
    """
    if device is None or device == "auto":
        return 0 if faiss.get_num_gpus() > 0 else None
    dev = resolve_device(device)
    return None if dev.type == "cpu" else (dev.index or 0)


def index_to_gpu(index, gpu_id, probe):
    """Copy a filled CPU faiss index to GPU `gpu_id` and verify it, else keep the CPU index.

    The copy is made only when ``faiss.get_num_gpus() > 0``. It is accepted when its ``ntotal`` equals the
    CPU index's and a self-search of the `probe` rows (database rows) returns valid ids with the same
    top-1 distances as the CPU index. Any failure (no GPU support in the installed faiss, no kernels
    for the GPU's architecture, an empty copy, wrong results) emits one
    :class:`FaissGPUFallbackWarning` and returns the CPU index.

    Parameters
    ----------
    index : faiss.Index
        Trained CPU index holding the database.
    gpu_id : int
        GPU ordinal.
    probe : ndarray of shape (m, d), float32
        A few database rows, prepared like the database.

    Returns
    -------
    search_index : faiss.Index
        The verified GPU index, or `index` itself.
    resources : faiss.StandardGpuResources or None
        The GPU resources that must outlive `search_index` (None on fallback).
    """
    n_gpus = faiss.get_num_gpus()
    if n_gpus <= 0 or not hasattr(faiss, "StandardGpuResources"):
        _warn_gpu_fallback("the installed faiss sees no GPU (install the 'gpu' extra, faiss-gpu-cu12)")
        return index, None
    if gpu_id >= n_gpus:
        _warn_gpu_fallback(f"GPU {gpu_id} was requested but faiss sees {n_gpus} GPU(s)")
        return index, None
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, gpu_id, index)
        if gpu_index.ntotal != index.ntotal:
            raise RuntimeError(f"the GPU copy holds {gpu_index.ntotal} vectors instead of {index.ntotal}")
        dist_gpu, ids_gpu = gpu_index.search(probe, 1)
        dist_cpu, _ = index.search(probe, 1)
        if np.any(ids_gpu < 0) or np.any(ids_gpu >= index.ntotal):
            raise RuntimeError("the GPU self-search returned invalid ids")
        if not np.allclose(dist_gpu, dist_cpu, rtol=1e-3, atol=1e-3):
            raise RuntimeError("the GPU self-search disagrees with the CPU index")
    except Exception as exc:  # any GPU failure means: use the CPU
        _warn_gpu_fallback(f"{type(exc).__name__}: {exc}")
        return index, None
    return gpu_index, resources


def _warn_gpu_fallback(reason):
    warnings.warn(
        f"faiss GPU search is unavailable ({reason}); using the CPU index instead.",
        FaissGPUFallbackWarning,
        stacklevel=3,
    )


class NeighborIndex:
    """Nearest-neighbour search over the rows of a matrix with faiss.

    Parameters
    ----------
    X : array-like of shape (n, d)
        Database rows (finite; validated by the caller).
    metric : {"cosine", "l2"}
        Cosine distance ``1 - cos`` (inner product on L2-normalised rows) or Euclidean distance.
    index : {"auto", "flat", "ivf"}
        Exact flat index, inverted-file index, or flat below :data:`IVF_AUTO_MIN_SAMPLES` rows.
    nlist : int or None
        IVF lists; None picks ``min(4 * sqrt(n), n // 39)`` (faiss wants 39 training rows per list).
    nprobe : int or None
        IVF lists visited per query; None picks ``round(sqrt(nlist))`` (about 3% of 100k rows in 1264
        lists, 1.6% of 1M rows in 4000 lists).
    gpu_id : int or None
        GPU to place a search copy on (see :func:`index_to_gpu`), or None for the CPU.
    seed : int
        Seed of faiss's k-means (IVF training).

    Attributes
    ----------
    kind : {"flat", "ivf"}
    on_gpu : bool
        Whether searches run on a verified GPU copy. A pickled index comes back on the CPU.

    Examples
    --------
    >>> import numpy as np
    >>> index = NeighborIndex(np.eye(3), metric="l2")
    >>> distances, ids = index.search(np.array([[0.9, 0.1, 0.0]]), k=2)
    >>> ids, distances.round(3)
    (array([[0, 1]]), array([[0.141, 1.273]]))
    """

    def __init__(self, X, *, metric="cosine", index="auto", nlist=None, nprobe=None, gpu_id=None, seed=1234):
        # The Euclidean scale brings the largest indexed magnitude into [0.5, 1): rows norms <= sqrt(d).
        self.exponent = magnitude_exponent(X) if metric == "l2" else 0
        rows = prepare_rows(X, metric, self.exponent)
        n, d = rows.shape
        self.max_norm = float(np.linalg.norm(rows, axis=1).max()) if n else 0.0
        self.metric = metric
        self.n_features = d
        self.kind = "ivf" if index == "ivf" or (index == "auto" and n >= IVF_AUTO_MIN_SAMPLES) else "flat"
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        if self.kind == "flat":
            self.index = faiss.IndexFlat(d, faiss_metric)
        else:
            nlist = nlist if nlist is not None else max(1, min(int(4 * math.sqrt(n)), n // 39))
            if nlist > n:
                raise ValueError(f"nlist={nlist} IVF lists need at least as many indexed rows, got {n}.")
            quantizer = faiss.IndexFlat(d, faiss_metric)
            self.index = faiss.IndexIVFFlat(quantizer, d, int(nlist), faiss_metric)
            self.index.cp.seed = int(seed)
            self.index.train(rows)
            self.index.nprobe = int(nprobe) if nprobe is not None else max(1, round(math.sqrt(nlist)))
            # Re-scoring gathers neighbour vectors by id.
            self.index.make_direct_map()
        self.index.add(rows)
        self._search_index, self._gpu_resources = self.index, None
        if gpu_id is not None:
            probe = rows[: min(_GPU_PROBE_ROWS, n)]
            self._search_index, self._gpu_resources = index_to_gpu(self.index, gpu_id, probe)

    @property
    def n_samples(self):
        return self.index.ntotal

    @property
    def on_gpu(self):
        return self._search_index is not self.index

    def search(self, X, k):
        """Return the `k` nearest database rows of each row of `X`.

        Parameters
        ----------
        X : array-like of shape (m, d)
            Query rows (finite).
        k : int
            Neighbours per query, at most ``n_samples``.

        Returns
        -------
        distances : ndarray of shape (m, k), float64
            Cosine or Euclidean distances, recomputed in float64 and sorted ascending (ties by id).
        indices : ndarray of shape (m, k), int64
            Database row numbers.

        Raises
        ------
        ValueError
            If Euclidean distances from these queries would overflow faiss's float32 arithmetic (queries
            about 1e18 times larger than the indexed rows).
        RuntimeError
            If faiss returns a missing neighbour (id -1) or a non-finite distance.
        """
        queries = prepare_rows(X, self.metric, self.exponent)
        if self.metric == "l2":
            self._check_query_magnitude(queries)
        with _blas_distances(len(queries)):
            raw_distances, ids = self._raw_search(queries, k)
        if self.kind == "ivf" and np.any(ids < 0):
            # Probed lists held fewer than k rows: search those queries exhaustively.
            short = np.flatnonzero((ids < 0).any(axis=1))
            params = faiss.SearchParametersIVF(nprobe=self.index.nlist)
            raw_distances[short], ids[short] = self.index.search(queries[short], k, params=params)
        bad = (ids < 0).any(axis=1) | ~np.isfinite(raw_distances).all(axis=1)
        if bad.any():
            raise RuntimeError(
                "faiss returned a missing neighbour (id -1) or a non-finite distance for "
                f"{int(bad.sum())} of {len(ids)} queries (first: row {int(np.flatnonzero(bad)[0])}); "
                "refusing to use that result."
            )
        return self._rescore(queries, ids)

    def _check_query_magnitude(self, queries):
        """Refuse Euclidean queries whose float32 squared distances to indexed rows could overflow.

        faiss computes ``|q|^2 + |x|^2 - 2 q.x``; every term is at most ``(|q| + |x|)^2`` and
        ``|q| <= sqrt(d) * max |q|``.
        """
        largest = float(np.abs(queries).max()) if queries.size else 0.0
        bound = math.sqrt(self.n_features) * largest + self.max_norm
        if not bound**2 < _FLOAT32_MAX:
            scale = math.ldexp(1.0, self.exponent)
            raise ValueError(
                f"query features reach magnitude {largest * scale:.3g}, against at most {scale:.3g} in the "
                "indexed rows: faiss computes squared Euclidean distances in float32, which would overflow. "
                "Standardise the features (for example with sklearn.preprocessing.StandardScaler fitted on "
                "the training rows), or use metric='cosine'."
            )

    def _raw_search(self, queries, k):
        if self.on_gpu:
            try:
                return self._search_index.search(queries, k)
            except Exception as exc:  # any GPU failure means: use the CPU
                _warn_gpu_fallback(f"{type(exc).__name__}: {exc}")
                self._search_index, self._gpu_resources = self.index, None
        return self.index.search(queries, k)

    def _rescore(self, queries, ids):
        m, k = ids.shape
        distances = np.empty((m, k), dtype=np.float64)
        block = max(1, _RESCORE_BLOCK_ELEMENTS // max(1, k * self.n_features))
        for start in range(0, m, block):
            stop = min(m, start + block)
            neighbours = self.index.reconstruct_batch(ids[start:stop].ravel()).reshape(stop - start, k, -1)
            q = queries[start:stop, None, :].astype(np.float64)
            if self.metric == "cosine":
                distances[start:stop] = 1.0 - np.einsum("mkd,mkd->mk", q, neighbours.astype(np.float64))
            else:  # in the units of the unscaled rows
                distances[start:stop] = np.ldexp(np.linalg.norm(neighbours - q, axis=2), self.exponent)
        order = np.lexsort((ids, distances), axis=-1)
        return np.take_along_axis(distances, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_search_index"], state["_gpu_resources"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._search_index = self.index
