"""The embedding cache: checksums, no unpickling, kills mid-extraction and concurrent writers."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from luab_sk.features import EmbeddingCache, FeatureExtractor, cache_info
from luab_sk.features.cache import CacheCorruptionWarning

TINY = "timm:test_vit"
N = 24


def make_images(n=N, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 48, 64, 3), dtype=np.uint8)


def shards(store):
    return json.loads((store / "manifest.json").read_text())["shards"]


def test_write_lookup_gather_roundtrip(tmp_path):
    cache = EmbeddingCache(tmp_path, {"what": "roundtrip"}, outputs=("pooled", "tokens"))
    ids = [f"{i:032x}" for i in range(5)]
    pooled = np.arange(10, dtype=np.float32).reshape(5, 2)
    tokens = np.arange(30, dtype=np.float16).reshape(5, 3, 2)
    cache.write_shard(ids[:3], {"pooled": pooled[:3], "tokens": tokens[:3]})
    cache.write_shard(ids[3:], {"pooled": pooled[3:], "tokens": tokens[3:]})
    order = [ids[4], ids[0], ids[3]]
    found = cache.lookup(order + ["f" * 32, None])
    assert set(found) == set(order)
    rows = cache.gather(order, found)
    np.testing.assert_array_equal(rows["pooled"], pooled[[4, 0, 3]])
    np.testing.assert_array_equal(rows["tokens"], tokens[[4, 0, 3]])
    assert json.loads((cache.path / "config.json").read_text())["config"] == {"what": "roundtrip"}
    assert cache.info()["n_rows"] == 5 and cache.info()["n_shards"] == 2
    with pytest.raises(ValueError, match="write_shard needs"):
        cache.write_shard(ids[:1], {"pooled": pooled[:2], "tokens": tokens[:2]})
    cache.clear()
    assert cache.lookup(ids) == {} and cache.info()["n_rows"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_shard_is_detected_and_recomputed(tmp_path, damage):
    images = make_images(8)
    fe = FeatureExtractor(TINY, pretrained=None, cache_dir=str(tmp_path), shard_size=4)
    expected = np.array(fe.transform(images))
    store = tmp_path / fe.cache_key_
    victim = store / "shards" / shards(store)[1]["files"]["pooled"]["name"]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        victim.unlink()
    fresh = FeatureExtractor(TINY, pretrained=None, cache_dir=str(tmp_path), shard_size=4)
    with pytest.warns(RuntimeWarning, match="failed their checksum"):
        out = fresh.transform(images)
    assert fresh.n_encoded_ == 4 and fresh.n_cached_ == 4
    np.testing.assert_array_equal(out, expected)
    assert cache_info(tmp_path)[0]["n_rows"] == 8


def test_cache_never_unpickles(tmp_path):
    """Even a shard whose manifest checksum matches a pickled object array is dropped, not executed."""
    cache = EmbeddingCache(tmp_path, {"what": "pickle"}, outputs=("pooled",))
    ident = "a" * 32
    cache.write_shard([ident], {"pooled": np.zeros((1, 2), np.float32)})
    (entry,) = shards(cache.path)
    target = cache.path / "shards" / entry["files"]["pooled"]["name"]
    np.save(target, np.array([{"evil": 1}], dtype=object), allow_pickle=True)

    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["shards"][0]["files"]["pooled"]["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    reader = EmbeddingCache(tmp_path, {"what": "pickle"}, outputs=("pooled",))
    with pytest.warns(CacheCorruptionWarning, match="failed their checksum or structure check"):
        assert reader.lookup([ident]) == {}
    assert not target.exists() and reader.info()["n_shards"] == 0


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from luab_sk.features import Backbone, FeatureExtractor

    cache_dir, seed, reverse, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
    original = Backbone.forward

    def slow(self, images, **kw):
        time.sleep(delay)
        return original(self, images, **kw)

    Backbone.forward = slow
    images = np.random.default_rng(seed).integers(0, 255, ({n}, 48, 64, 3), dtype=np.uint8)
    if reverse:
        images = images[::-1]
    fe = FeatureExtractor("{tiny}", pretrained=None, cache_dir=cache_dir, batch_size=2, shard_size=2)
    fe.transform(images)
    print("encoded", fe.n_encoded_)
    """
).format(n=N, tiny=TINY)


def spawn(tmp_path, *args):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed_rows(cache_dir):
    info = cache_info(cache_dir)
    return info[0]["n_rows"] if info else 0


def test_killed_extraction_resumes_without_duplicates(tmp_path):
    cache_dir = tmp_path / "cache"
    proc = spawn(tmp_path, cache_dir, 0, 0, 0.15)
    deadline = time.time() + 120
    while committed_rows(cache_dir) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = committed_rows(cache_dir)
    assert 6 <= done < N, f"the child was not killed mid-run ({done} rows committed)"
    images = make_images()
    fe = FeatureExtractor(TINY, pretrained=None, cache_dir=str(cache_dir), batch_size=2, shard_size=2)
    out = fe.transform(images)
    assert fe.n_encoded_ == N - done and fe.n_cached_ == done
    assert committed_rows(cache_dir) == N  # nothing duplicated, nothing missing
    store = cache_dir / fe.cache_key_
    listed = {e["name"] for shard in shards(store) for e in shard["files"].values()}
    config = json.loads((store / "config.json").read_text())["config"]
    reopened = EmbeddingCache(cache_dir, config, outputs=("pooled",))
    assert reopened.key == fe.cache_key_ and reopened.prune(min_age=3600) == 0
    reopened.prune(min_age=0)
    assert {p.name for p in (store / "shards").iterdir()} == listed
    np.testing.assert_allclose(out, FeatureExtractor(TINY, pretrained=None).transform(images), atol=1e-5)


def test_concurrent_extractions_do_not_corrupt_the_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    procs = [spawn(tmp_path, cache_dir, 0, reverse, 0.02) for reverse in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    images = make_images()
    fe = FeatureExtractor(TINY, pretrained=None, cache_dir=str(cache_dir))
    out = fe.transform(images)
    assert fe.n_encoded_ == 0 and fe.n_cached_ == N
    np.testing.assert_allclose(out, FeatureExtractor(TINY, pretrained=None).transform(images), atol=1e-5)
    (info,) = cache_info(cache_dir)
    assert N <= info["n_rows"] <= 2 * N and not list((cache_dir / fe.cache_key_).glob("**/*.tmp"))
