"""FaissKNNClassifier: sklearn conformance, agreement with exact search, DINO weighting, IVF, errors."""

import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_blobs
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from luab_sk.estimators import _faiss
from luab_sk.estimators.knn import FaissKNNClassifier


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:1200], y[:1200], X[1200:1500], y[1200:1500]


@pytest.mark.parametrize(("metric", "sk_metric"), [("l2", "euclidean"), ("cosine", "cosine")])
def test_kneighbors_match_sklearn_brute(digits, metric, sk_metric):
    X, _, Xq, _ = digits
    dist, ind = FaissKNNClassifier(n_neighbors=8, metric=metric).fit(X, np.zeros(len(X))).kneighbors(Xq)
    ref = NearestNeighbors(n_neighbors=9, algorithm="brute", metric=sk_metric).fit(X)
    sk_dist, sk_ind = ref.kneighbors(Xq)
    np.testing.assert_allclose(dist, sk_dist[:, :8], rtol=1e-5, atol=1e-6)
    # Neighbour ids agree wherever the distances (including the 9th) are not tied.
    untied = np.abs(np.diff(sk_dist, axis=1)).min(axis=1) > 1e-6
    sk_ind = sk_ind[:, :8]
    assert untied.mean() > 0.8  # digits are integer-valued: L2 ties are common
    np.testing.assert_array_equal(ind[untied], sk_ind[untied])
    assert dist.dtype == np.float64 and ind.dtype == np.int64


def test_uniform_l2_matches_kneighbors_classifier(digits):
    X, y, Xq, _ = digits
    ours = FaissKNNClassifier(n_neighbors=5, metric="l2", weights="uniform").fit(X, y)
    ref = KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(X, y)
    # Digits' squared distances are integers, but a tie at the 5th neighbour may be broken differently by
    # the two libraries: compare the queries whose neighbour set is unique.
    d2 = np.sort(((Xq[:, None, :] - X[None, :, :]) ** 2).sum(axis=2), axis=1)
    untied = d2[:, 4] < d2[:, 5]
    assert untied.mean() > 0.5
    np.testing.assert_allclose(ours.predict_proba(Xq)[untied], ref.predict_proba(Xq)[untied])
    np.testing.assert_array_equal(ours.predict(Xq)[untied], ref.predict(Xq)[untied])


def test_temperature_votes_are_dino_weights(digits):
    X, y, Xq, _ = digits
    T, k = 0.07, 20
    clf = FaissKNNClassifier(n_neighbors=k, temperature=T).fit(X, y)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    qn = Xq[:10] / np.linalg.norm(Xq[:10], axis=1, keepdims=True)
    sims = qn @ Xn.T
    top = np.argsort(-sims, axis=1)[:, :k]
    expected = np.zeros((10, 10))
    for i in range(10):
        for j in top[i]:
            expected[i, y[j]] += np.exp(sims[i, j] / T)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(clf.predict_proba(Xq[:10]), expected, rtol=1e-6, atol=1e-9)


def test_accuracy_and_string_labels(digits):
    X, y, Xq, yq = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    clf = FaissKNNClassifier().fit(X, names[y])
    assert clf.score(Xq, names[yq]) > 0.9
    assert set(clf.predict(Xq)) <= set(names)
    np.testing.assert_allclose(clf.predict_proba(Xq).sum(axis=1), 1.0)


def test_results_do_not_depend_on_query_batching(digits):
    X, y, Xq, _ = digits
    clf = FaissKNNClassifier(n_neighbors=10).fit(X, y)
    full = clf.predict_proba(Xq[:40])
    one_by_one = np.vstack([clf.predict_proba(Xq[i : i + 1]) for i in range(40)])
    np.testing.assert_array_equal(full, one_by_one)


def test_grid_search_and_pipeline(digits):
    X, y, Xq, yq = digits
    pipe = make_pipeline(StandardScaler(), FaissKNNClassifier())
    grid = {"faissknnclassifier__n_neighbors": [1, 10], "faissknnclassifier__temperature": [0.02, 0.1]}
    search = GridSearchCV(pipe, grid, cv=3).fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_params_["faissknnclassifier__n_neighbors"] == 10
    assert search.best_score_ > 0.85
    assert search.score(Xq, yq) > 0.85


def _clusters(n=6000, d=32, n_centers=50, seed=0):
    X, y = make_blobs(n_samples=n, n_features=d, centers=n_centers, cluster_std=2.0, random_state=seed)
    return X.astype(np.float32), y


def test_ivf_recall_against_exact():
    X, y = _clusters()
    exact = FaissKNNClassifier(n_neighbors=10, index="flat").fit(X, y)
    ivf = FaissKNNClassifier(n_neighbors=10, index="ivf", random_state=0).fit(X, y)
    assert exact.index_.kind == "flat" and ivf.index_.kind == "ivf"
    assert ivf.index_.index.nlist == min(int(4 * np.sqrt(len(X))), len(X) // 39)
    _, i_exact = exact.kneighbors(X[:500])
    _, i_ivf = ivf.kneighbors(X[:500])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_exact, i_ivf)])
    assert recall > 0.9
    assert (ivf.predict(X[:500]) == exact.predict(X[:500])).mean() > 0.97


def test_ivf_returns_k_neighbours_when_probed_lists_are_short():
    X, y = _clusters(n=2000)
    clf = FaissKNNClassifier(n_neighbors=300, index="ivf", nlist=40, nprobe=1, random_state=0).fit(X, y)
    dist, ind = clf.kneighbors(X[:20])
    assert (ind >= 0).all() and np.isfinite(dist).all()
    assert all(len(set(row)) == 300 for row in ind)


def test_auto_index_switches_to_ivf_for_large_n(monkeypatch):
    X, y = _clusters(n=1000)
    assert FaissKNNClassifier(n_neighbors=5).fit(X, y).index_.kind == "flat"
    monkeypatch.setattr(_faiss, "IVF_AUTO_MIN_SAMPLES", 500)
    assert FaissKNNClassifier(n_neighbors=5).fit(X, y).index_.kind == "ivf"


def test_ivf_is_reproducible_with_random_state():
    X, y = _clusters(n=3000)
    a = FaissKNNClassifier(index="ivf", nprobe=2, random_state=3).fit(X, y).kneighbors(X[:100])[1]
    b = FaissKNNClassifier(index="ivf", nprobe=2, random_state=3).fit(X, y).kneighbors(X[:100])[1]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_pickle_round_trip(digits, index):
    X, y, Xq, _ = digits
    clf = FaissKNNClassifier(index=index, nprobe=4, random_state=0).fit(X, y)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(Xq), clf.predict_proba(Xq))
    if index == "ivf":
        assert restored.index_.index.nprobe == 4


def test_n_jobs_sets_and_restores_faiss_threads(digits, monkeypatch):
    X, y, Xq, _ = digits
    seen = []
    real_search = _faiss.NeighborIndex.search

    def spy(self, queries, k):
        seen.append(_faiss.faiss.omp_get_max_threads())
        return real_search(self, queries, k)

    monkeypatch.setattr(_faiss.NeighborIndex, "search", spy)
    before = _faiss.faiss.omp_get_max_threads()
    FaissKNNClassifier(n_jobs=1).fit(X, y).predict(Xq)
    assert seen == [1]
    assert _faiss.faiss.omp_get_max_threads() == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_neighbors": 0},
        {"n_neighbors": 2.5},
        {"metric": "manhattan"},
        {"weights": "softmax"},
        {"temperature": 0.0},
        {"index": "hnsw"},
        {"nlist": -3},
        {"nprobe": True},
        {"device": 0},
        {"device": "tpu"},
    ],
)
def test_bad_params_name_the_argument(kwargs):
    X, y = _clusters(n=100)
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"The '{name}' parameter of FaissKNNClassifier must be"):
        FaissKNNClassifier(**kwargs).fit(X, y)


def test_bad_inputs_raise_precise_errors():
    X, y = _clusters(n=100, d=8)
    msg = r"n_neighbors=20 is larger than the number of training samples \(n_samples=15\)"
    with pytest.raises(ValueError, match=msg):
        FaissKNNClassifier().fit(X[:15], y[:15])
    X_nan = X.copy()
    X_nan[7] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        FaissKNNClassifier(n_neighbors=3).fit(X_nan, y)
    clf = FaissKNNClassifier(n_neighbors=3).fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but FaissKNNClassifier is expecting 8"):
        clf.predict(X[:, :5])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        clf.predict(X_nan[:10])
    with pytest.raises(ValueError, match=r"n_neighbors must be an integer in \[1, 100\]"):
        clf.kneighbors(X[:2], n_neighbors=101)
    with pytest.raises(ValueError, match="nlist=200 IVF lists need at least as many indexed rows, got 100"):
        FaissKNNClassifier(n_neighbors=3, index="ivf", nlist=200).fit(X, y)
    with pytest.raises(ValueError, match="Unknown label type"):
        FaissKNNClassifier(n_neighbors=3).fit(X, np.linspace(0, 1, len(X)))
