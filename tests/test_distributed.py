"""luab_sk.distributed: extraction on Ray actors, grid search and XML reading on the joblib Ray backend."""

import json
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import joblib  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402

from luab_sk.byproducts import ByproductEncoder, read_imagenet_ab  # noqa: E402
from luab_sk.datasets.imagenet_ab_like import make_imagenet_ab_like  # noqa: E402
from luab_sk.datasets.synthetic import make_embedding_classification  # noqa: E402
from luab_sk.distributed import extract_with_ray, ray_parallel, shared_array  # noqa: E402
from luab_sk.estimators import LUABClassifier  # noqa: E402
from luab_sk.features import FeatureExtractor, cache_info  # noqa: E402

TINY = "timm:test_vit"  # random init (pretrained=None), 160 px


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """16 small PNGs, a copy of the first (a duplicate image) and one corrupt file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, arr in enumerate(rng.integers(0, 255, (16, 40, 56, 3), dtype=np.uint8)):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    bad = folder / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paths.insert(5, str(bad))
    paths.append(paths[0])
    return paths


def _extractor(cache_dir=None, **kw):
    return FeatureExtractor(TINY, pretrained=None, batch_size=4, on_error="skip", cache_dir=cache_dir, **kw)


def _rows_in_cache(cache_dir):
    return sum(store["n_rows"] for store in cache_info(cache_dir))


def test_equals_local_extraction_bit_for_bit(tmp_path, image_files):
    local = _extractor()
    expected = local.transform(image_files)
    fe = _extractor(str(tmp_path / "cache"))
    got = extract_with_ray(image_files, fe, num_actors=2, rows_per_task=4, progress=False)
    assert got.dtype == expected.dtype and got.shape == expected.shape == (18, 64)
    np.testing.assert_array_equal(got, expected)  # bit for bit, in input order; NaN row of the corrupt file
    assert fe.failed_ == local.failed_ and [f[0] for f in fe.failed_] == [5]
    assert "corrupt.png" in fe.failed_[0][1] and "corrupt" in fe.failed_[0][2]
    assert fe.n_encoded_ == 17 and fe.n_cached_ == 0  # the duplicate is encoded once, like locally
    assert fe.grid_ == (10, 10) and fe.cache_key_ == cache_info(tmp_path / "cache")[0]["key"]
    served = _extractor(str(tmp_path / "cache")).transform(image_files)  # local extraction shares the store
    np.testing.assert_array_equal(served, expected)
    assert not list((tmp_path / "cache").glob("*/shards/*.entry.json"))  # receipts are cleaned up


def test_in_memory_images_and_tokens(tmp_path):
    images = np.random.default_rng(1).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    params = {"output": "both", "token_dim": 8}
    expected = _extractor(**params).transform(images)
    got = extract_with_ray(images, _extractor(str(tmp_path), **params), num_actors=1, progress=False)
    for key in ("pooled", "tokens"):
        np.testing.assert_array_equal(got[key], expected[key])


def test_a_failed_worker_loses_only_its_chunk_and_a_rerun_computes_the_rest(tmp_path, image_files):
    cache_dir = str(tmp_path / "cache")
    fe = _extractor(cache_dir)
    with pytest.raises(Exception, match="sabotaged"):  # the worker raises on its 3rd task of 4 images
        extract_with_ray(
            image_files, fe, num_actors=1, rows_per_task=4, progress=False, _sabotage={"after": 2}
        )
    assert _rows_in_cache(cache_dir) == 4 + 3  # two finished tasks were committed (one held the corrupt file)
    got = extract_with_ray(image_files, fe, num_actors=1, rows_per_task=4, progress=False)
    assert fe.n_encoded_ == 17 - 7  # the rerun runs only the 10 other distinct images through the backbone
    assert fe.n_cached_ == 7 + 1  # (the duplicate of a committed image is served from the cache)
    assert "corrupt" in fe.failed_[0][2]
    np.testing.assert_array_equal(got, _extractor().transform(image_files))
    assert [f[0] for f in fe.failed_] == [5]


def test_receipts_of_a_killed_driver_are_adopted(tmp_path, image_files):
    """Shards an actor finished but the driver never committed (driver killed) are adopted by the rerun."""
    from luab_sk.distributed import _actor_device, _plan
    from luab_sk.features.cache import EmbeddingCache

    cache_dir = str(tmp_path / "cache")
    fe = _extractor(cache_dir)
    plan = _plan(fe, _actor_device(fe, 0))
    cache = EmbeddingCache(cache_dir, plan["config"], ("pooled",))
    first = np.asarray(fe.transform(image_files[:4]))  # the rows an actor would have written
    assert fe.cache_key_ == cache.key  # the plan's cache config is transform's
    cache.clear()
    entry = cache.write_shard_files(fe._image_ids(image_files[:4], {}), {"pooled": first})
    (cache.path / "shards" / f"{entry['id']}.entry.json").write_text(json.dumps(entry))
    bogus = dict(entry, id="0" * 32)  # a receipt naming missing files is ignored
    (cache.path / "shards" / f"{'0' * 32}.entry.json").write_text(json.dumps(bogus))
    got = extract_with_ray(image_files, fe, num_actors=1, progress=False)
    assert fe.n_cached_ == 4 + 1 and fe.n_encoded_ == 17 - 4
    np.testing.assert_array_equal(got, _extractor().transform(image_files))
    assert not list(cache.path.glob("shards/*.entry.json"))


def test_settings_are_checked(tmp_path, image_files):
    with pytest.raises(ValueError, match="cache_dir"):
        extract_with_ray(image_files, _extractor(None))
    with pytest.raises(ValueError, match="num_actors"):
        extract_with_ray(image_files, _extractor(str(tmp_path)), num_actors=0)


def test_import_error_names_the_extra(monkeypatch):
    from luab_sk import distributed

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"luab_sk\[ray\]"):
        distributed._import_ray()


# -- joblib on Ray -------------------------------------------------------------------------------------------
def test_grid_search_on_ray_matches_n_jobs_1():
    X, y, Z = make_embedding_classification(240, 32, n_classes=3, signal_strength=0.3, random_state=0)
    est = LUABClassifier(head="linear", hidden_size=8, max_iter=30, random_state=0)
    grid = {"byproduct_weight": [0.0, 3.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: other thread counts change float reductions
        try:
            local = GridSearchCV(est, grid, cv=3, n_jobs=1).fit(X, y, Z=Z)
        finally:
            torch.set_num_threads(threads)
        with ray_parallel():
            remote = GridSearchCV(est, grid, cv=3, n_jobs=2).fit(shared_array(X), y, Z=Z)
    np.testing.assert_allclose(
        remote.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"], rtol=0, atol=1e-6
    )
    assert remote.best_params_ == local.best_params_


def test_shared_array_keeps_memmaps_and_uses_the_object_store(tmp_path):
    def _probe(a):  # nested: pickled by value for the Ray workers
        import os

        import torch

        threads = torch.get_num_threads()
        return type(a).__name__, getattr(a, "filename", None), float(a.sum()), threads, os.getpid()

    X = np.arange(600, dtype=np.float32).reshape(200, 3)
    np.save(tmp_path / "X.npy", X)
    view = np.load(tmp_path / "X.npy", mmap_mode="r")[50:150]  # what the cache's gather returns
    arrays = [shared_array(view), shared_array(X), view] * 2
    with ray_parallel():
        out = joblib.Parallel(n_jobs=2, batch_size=1)(joblib.delayed(_probe)(a) for a in arrays)
    mm, store, copied = out[0::3], out[1::3], out[2::3]
    assert {r[:3] for r in mm} == {("memmap", str(tmp_path / "X.npy"), float(view.sum()))}
    assert {r[:3] for r in store} == {("ndarray", None, float(X.sum()))}
    assert {r[0] for r in copied} == {"memmap"} and {r[1] for r in copied} == {None}  # a copy, not a map
    assert {r[3] for r in mm + store} == {1}  # torch threads = the task's CPUs (Ray sets OMP_NUM_THREADS)
    wrapped = shared_array(X)
    assert type(wrapped[:5] + 1) is not type(wrapped) or wrapped[:5]._luab_source is None
    np.testing.assert_array_equal(np.asarray(wrapped), X)


def test_read_imagenet_ab_on_the_ray_backend(tmp_path):
    truth = make_imagenet_ab_like(tmp_path, n_classes=2, n_per_class=5, n_malformed=2, random_state=0)
    local = read_imagenet_ab(tmp_path, on_error="skip", chunk_size=3)
    with ray_parallel():
        remote = read_imagenet_ab(tmp_path, on_error="skip", chunk_size=3, n_jobs=2)
    assert remote.keys == local.keys and len(remote) + len(remote.errors) == len(truth.image_keys)
    assert [e[0] for e in remote.errors] == [e[0] for e in local.errors] and len(remote.errors) == 2
    encode = ByproductEncoder(kind="point").fit(local).transform
    np.testing.assert_array_equal(encode(remote), encode(local))


def test_luab_extract_on_ray_writes_what_local_extraction_writes(tmp_path, image_files, capsys):
    from luab_sk.cli import main

    args = ["extract", *image_files[:6], "--backbone", TINY, "--pretrained", "none", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    ray_args = ["--cache-dir", str(tmp_path / "cache"), "--ray-actors", "1", "--out", str(tmp_path / "ray")]
    assert main([*args, "--ray", *ray_args]) == 0
    local, on_ray = np.load(tmp_path / "local.npz"), np.load(tmp_path / "ray.npz")
    np.testing.assert_array_equal(on_ray["pooled"], local["pooled"])  # the corrupt file's NaN row included
    assert "1 of 6 images could not be read" in capsys.readouterr().err
