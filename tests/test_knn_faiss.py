"""GPU placement of faiss indexes and its CPU fallback, exercised without a GPU by faking faiss's GPU API."""

import pickle
import warnings

import faiss
import numpy as np
import pytest
import torch

from luab_sk.estimators import _faiss
from luab_sk.estimators.knn import FaissGPUFallbackWarning, FaissKNNClassifier, KNNByproductImputer


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    y = rng.integers(0, 3, size=300)
    return X, y, rng.normal(size=(40, 16)).astype(np.float32)


class _FakeGpuIndex:
    """Stands in for a GPU index: wraps a CPU index, optionally misbehaving."""

    def __init__(self, cpu_index, *, ntotal=None, ids_offset=0, dist_offset=0.0, fail_after=None):
        self._cpu = faiss.clone_index(cpu_index)
        self.ntotal = cpu_index.ntotal if ntotal is None else ntotal
        self.ids_offset, self.dist_offset, self.fail_after = ids_offset, dist_offset, fail_after
        self.calls = 0

    def search(self, x, k):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        dist, ids = self._cpu.search(x, k)
        return dist + self.dist_offset, ids + self.ids_offset


def _fake_gpu(monkeypatch, n_gpus=1, to_gpu=None):
    """Make faiss report `n_gpus` GPUs; `to_gpu(index)` plays index_cpu_to_gpu. Returns the call log."""
    calls = []

    def index_cpu_to_gpu(resources, gpu_id, index):
        calls.append(gpu_id)
        return to_gpu(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: n_gpus)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    return calls


def _fit_quietly(est, X, y_or_Z):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return est.fit(X, y_or_Z)


def test_no_gpu_means_cpu_without_warning(data):
    X, y, Xq = data
    assert faiss.get_num_gpus() == 0  # this machine: faiss-cpu
    clf = _fit_quietly(FaissKNNClassifier(device="auto"), X, y)
    assert not clf.index_.on_gpu
    clf.predict(Xq)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_verified_gpu_copy_is_used(data, monkeypatch, index):
    X, y, Xq = data
    reference = FaissKNNClassifier(index=index, random_state=0, device="cpu").fit(X, y)
    calls = _fake_gpu(monkeypatch, to_gpu=_FakeGpuIndex)
    clf = _fit_quietly(FaissKNNClassifier(index=index, random_state=0), X, y)
    assert calls == [0] and clf.index_.on_gpu
    np.testing.assert_array_equal(clf.predict_proba(Xq), reference.predict_proba(Xq))
    assert clf.index_._search_index.calls == 2  # the self-search, then the query


def test_device_cpu_never_touches_the_gpu(data, monkeypatch):
    X, y, _ = data
    calls = _fake_gpu(monkeypatch, to_gpu=_FakeGpuIndex)
    assert not _fit_quietly(FaissKNNClassifier(device="cpu"), X, y).index_.on_gpu
    assert calls == []


@pytest.mark.parametrize(
    ("to_gpu", "reason"),
    [
        # What index_cpu_to_all_gpus does without a usable GPU: an empty index.
        (lambda index: _FakeGpuIndex(index, ntotal=0), "holds 0 vectors instead of 300"),
        (lambda index: _FakeGpuIndex(index, ids_offset=-10_000), "invalid ids"),
        (lambda index: _FakeGpuIndex(index, dist_offset=0.5), "disagrees with the CPU index"),
    ],
)
def test_bad_gpu_copy_falls_back_with_one_warning(data, monkeypatch, to_gpu, reason):
    X, y, Xq = data
    reference = FaissKNNClassifier(device="cpu").fit(X, y)
    _fake_gpu(monkeypatch, to_gpu=to_gpu)
    with pytest.warns(FaissGPUFallbackWarning, match=reason) as record:
        clf = FaissKNNClassifier().fit(X, y)
    assert len(record) == 1 and not clf.index_.on_gpu
    np.testing.assert_array_equal(clf.predict_proba(Xq), reference.predict_proba(Xq))


def test_missing_kernels_fall_back(data, monkeypatch):
    X, y, _ = data

    def no_kernels(index):
        raise RuntimeError("CUDA error 209: no kernel image is available for execution on the device")

    _fake_gpu(monkeypatch, to_gpu=no_kernels)
    with pytest.warns(FaissGPUFallbackWarning, match="no kernel image") as record:
        imputer = KNNByproductImputer().fit(X, np.random.default_rng(1).random((300, 2)))
    assert len(record) == 1 and not imputer.index_.on_gpu


def test_gpu_failure_at_search_time_falls_back_once(data, monkeypatch):
    X, y, Xq = data
    reference = FaissKNNClassifier(device="cpu").fit(X, y)
    _fake_gpu(monkeypatch, to_gpu=lambda index: _FakeGpuIndex(index, fail_after=1))
    clf = _fit_quietly(FaissKNNClassifier(), X, y)
    assert clf.index_.on_gpu
    with pytest.warns(FaissGPUFallbackWarning, match="illegal memory access") as record:
        proba = clf.predict_proba(Xq)
    assert len(record) == 1 and not clf.index_.on_gpu
    np.testing.assert_array_equal(proba, reference.predict_proba(Xq))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf.predict(Xq)


def test_explicit_cuda_without_faiss_gpu_support_warns(data, monkeypatch):
    X, y, _ = data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.warns(FaissGPUFallbackWarning, match="sees no GPU") as record:
        clf = FaissKNNClassifier(device="cuda").fit(X, y)
    assert len(record) == 1 and not clf.index_.on_gpu


def test_explicit_gpu_ordinal_beyond_the_gpus_warns(data, monkeypatch):
    X, y, _ = data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = _fake_gpu(monkeypatch, n_gpus=1, to_gpu=_FakeGpuIndex)
    with pytest.warns(FaissGPUFallbackWarning, match="GPU 1 was requested but faiss sees 1 GPU"):
        FaissKNNClassifier(device="cuda:1").fit(X, y)
    assert calls == []
    assert _fit_quietly(FaissKNNClassifier(device="cuda:0"), X, y).index_.on_gpu


def test_explicit_cuda_without_cuda_is_an_error(data):
    X, y, _ = data
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device='cuda' was requested but CUDA is not available"):
        FaissKNNClassifier(device="cuda").fit(X, y)


def test_pickled_gpu_model_comes_back_on_cpu(data, monkeypatch):
    X, y, Xq = data
    _fake_gpu(monkeypatch, to_gpu=_FakeGpuIndex)
    clf = _fit_quietly(FaissKNNClassifier(), X, y)
    restored = pickle.loads(pickle.dumps(clf))
    assert clf.index_.on_gpu and not restored.index_.on_gpu
    np.testing.assert_array_equal(restored.predict_proba(Xq), clf.predict_proba(Xq))


def test_prepare_rows_copies_and_normalises():
    X = np.array([[3.0, 4.0], [0.0, 0.0]])
    rows = _faiss.prepare_rows(X, "cosine")
    assert rows.dtype == np.float32 and rows.flags.c_contiguous
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_array_equal(X, [[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_array_equal(_faiss.prepare_rows(X, "l2"), X.astype(np.float32))


def test_batches_use_faiss_blas_path_and_restore_the_threshold(data, monkeypatch):
    X, y, Xq = data
    clf = FaissKNNClassifier(device="cpu").fit(X, y)
    seen = []
    real = _faiss.NeighborIndex._raw_search

    def spy(self, queries, k):
        seen.append(faiss.cvar.distance_compute_blas_threshold)
        return real(self, queries, k)

    monkeypatch.setattr(_faiss.NeighborIndex, "_raw_search", spy)
    before = faiss.cvar.distance_compute_blas_threshold
    clf.kneighbors(Xq)  # 40 queries: BLAS
    clf.kneighbors(Xq[:1])  # 1 query: faiss's own choice
    assert seen == [0, before]
    assert faiss.cvar.distance_compute_blas_threshold == before


# ------------------------------------------------------------------------------------ magnitudes
@pytest.mark.parametrize("index", ["flat", "ivf"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("scale", [2.0**70, 2.0**-100])
def test_huge_and_tiny_features_find_the_same_neighbours(data, index, metric, scale):
    # Before: l2 at 1e20 returned id -1 everywhere (every row got the last row's class), cosine rows
    # normalised to zero, and IVF training aborted the process. Powers of two scale exactly.
    X, y, Xq = data
    # Uniform votes: the temperature is in units of the distance, so scaled l2 votes differ by design.
    params = dict(n_neighbors=5, metric=metric, weights="uniform", index=index, nlist=4, random_state=0)
    params["device"] = "cpu"
    reference = FaissKNNClassifier(**params).fit(X, y)
    scaled = FaissKNNClassifier(**params).fit(X.astype(np.float64) * scale, y)
    dist, ids = scaled.kneighbors(Xq.astype(np.float64) * scale)
    ref_dist, ref_ids = reference.kneighbors(Xq)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(dist, ref_dist * (scale if metric == "l2" else 1.0))
    np.testing.assert_array_equal(scaled.predict(Xq.astype(np.float64) * scale), reference.predict(Xq))


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_features_around_1e20_predict_their_own_class(index):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 8)) * 1e20
    y = np.arange(60) % 3
    clf = FaissKNNClassifier(n_neighbors=1, metric="l2", index=index, nlist=2, device="cpu").fit(X, y)
    dist, ids = clf.kneighbors(X)
    np.testing.assert_array_equal(ids[:, 0], np.arange(60))
    np.testing.assert_array_equal(dist[:, 0], 0.0)
    np.testing.assert_array_equal(clf.predict(X), y)


def test_euclidean_queries_that_would_overflow_float32_are_refused(data):
    X, y, Xq = data
    clf = FaissKNNClassifier(metric="l2", device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="overflow.*Standardise the features"):
        clf.predict(Xq.astype(np.float64) * 1e20)
    with pytest.raises(ValueError, match="overflow"):
        KNNByproductImputer(metric="l2", device="cpu").fit(X, np.c_[y, y] / 3.0).transform(
            Xq.astype(np.float64) * 1e20, np.full((len(Xq), 2), np.nan)
        )


@pytest.mark.parametrize("bad", ["missing_id", "inf_distance"])
def test_invalid_faiss_results_raise_instead_of_predicting(data, monkeypatch, bad):
    X, y, Xq = data
    clf = FaissKNNClassifier(device="cpu").fit(X, y)
    real = _faiss.NeighborIndex._raw_search

    def broken(self, queries, k):
        distances, ids = real(self, queries, k)
        if bad == "missing_id":
            ids[3, -1] = -1
        else:
            distances[3, 0] = np.inf
        return distances, ids

    monkeypatch.setattr(_faiss.NeighborIndex, "_raw_search", broken)
    with pytest.raises(RuntimeError, match=r"1 of 40 queries \(first: row 3\)"):
        clf.predict(Xq)
