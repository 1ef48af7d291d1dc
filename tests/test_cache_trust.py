"""The embedding cache trusts no metadata: confinement, damaged manifests and configs, and lock waits."""

import hashlib
import json
import os
import re
import threading

import numpy as np
import pytest
from filelock import FileLock

from luab_sk.features import EmbeddingCache, FeatureExtractor, cache_info, clear_cache
from luab_sk.features import cache as cache_module
from luab_sk.features.cache import CacheCorruptionWarning, CacheLockWarning

TINY = "timm:test_vit"
LAYOUT = {"pooled": ("float32", (2,))}
IDS = [f"{i:032x}" for i in range(4)]
ROWS = np.arange(8, dtype=np.float32).reshape(4, 2)


def small_cache(root, what="trust", **kw):
    """A store with two committed shards of two rows each."""
    cache = EmbeddingCache(root, {"what": what}, outputs=("pooled",), layout=LAYOUT, **kw)
    cache.write_shard(IDS[:2], {"pooled": ROWS[:2]})
    cache.write_shard(IDS[2:], {"pooled": ROWS[2:]})
    return cache


def reopen(root):
    return EmbeddingCache(root, {"what": "trust"}, outputs=("pooled",), layout=LAYOUT)


def manifest(store):
    return json.loads((store / "manifest.json").read_text())


def edit_manifest(store, change):
    data = manifest(store)
    change(data["shards"])
    (store / "manifest.json").write_text(json.dumps(data))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served(cache):
    found = cache.lookup(IDS)
    return found, cache.gather(list(found), found)["pooled"] if found else None


@pytest.fixture
def extracted(tmp_path):
    """Eight images in a real FeatureExtractor cache (two shards of four) and their features."""
    images = np.random.default_rng(0).integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)
    fe = FeatureExtractor(TINY, pretrained=None, cache_dir=str(tmp_path / "cache"), shard_size=4)
    expected = np.array(fe.transform(images))
    return images, expected, tmp_path / "cache" / fe.cache_key_


def fresh_transform(store, images):
    fe = FeatureExtractor(TINY, pretrained=None, cache_dir=str(store.parent), shard_size=4)
    return fe, np.asarray(fe.transform(images))


# -- 3. confinement -------------------------------------------------------------------------------------
def test_traversal_name_in_manifest_never_deletes_outside(extracted, tmp_path):
    images, expected, store = extracted
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    rel = os.path.relpath(victim, store / "shards")
    # A checksum that cannot match: the old code dropped the shard and unlinked the named file.
    edit_manifest(store, lambda s: s[0]["files"]["pooled"].update(name=rel, sha256="0" * 64))
    with pytest.warns(CacheCorruptionWarning, match="manifest.json"):
        fe, out = fresh_transform(store, images)
    assert victim.read_text() == "precious"
    np.testing.assert_array_equal(out, expected)
    assert fe.n_cached_ == 8  # the rebuilt manifest re-lists both intact shards
    assert len(list(store.glob("manifest.json.corrupt-*"))) == 1


def test_outside_npy_is_never_served(extracted, tmp_path):
    images, expected, store = extracted
    outside = tmp_path / "outside.npy"
    np.save(outside, np.full((4, expected.shape[1]), 7.0, np.float32))
    before = outside.read_bytes()
    shard = manifest(store)["shards"][1]
    (store / "shards" / shard["files"]["pooled"]["name"]).unlink()  # only the outside copy is left
    edit_manifest(store, lambda s: s[1]["files"]["pooled"].update(name=str(outside), sha256=sha(outside)))
    with pytest.warns(CacheCorruptionWarning, match="manifest.json"):
        fe, out = fresh_transform(store, images)
    assert fe.n_encoded_ == 4 and fe.n_cached_ == 4  # recomputed, not read from outside
    np.testing.assert_array_equal(out, expected)
    assert not (out == 7.0).all(axis=1).any() and outside.read_bytes() == before


def test_symlink_in_store_pointing_outside_is_dropped_not_followed(tmp_path):
    cache = small_cache(tmp_path / "cache")
    outside = tmp_path / "outside.npy"
    np.save(outside, np.full((2, 2), 7.0, np.float32))
    name = manifest(cache.path)["shards"][1]["files"]["pooled"]["name"]
    link = cache.path / "shards" / name
    link.unlink()
    link.symlink_to(outside)
    edit_manifest(cache.path, lambda s: s[1]["files"]["pooled"].update(sha256=sha(outside)))
    reader = reopen(tmp_path / "cache")
    with pytest.warns(CacheCorruptionWarning, match="structure check"):
        found, rows = served(reader)
    assert sorted(found) == IDS[:2] and not (rows == 7.0).any()
    assert outside.exists() and not os.path.lexists(link)


BAD_ENTRIES = {
    "absolute name": lambda s: s[0]["files"]["pooled"].update(name="/etc/passwd"),
    "separator in name": lambda s: s[0]["files"]["pooled"].update(name="sub/" + s[0]["id"] + ".pooled.npy"),
    "NUL in name": lambda s: s[0]["files"]["pooled"].update(name=s[0]["id"] + ".pooled.npy\x00"),
    "non-string name": lambda s: s[0]["files"]["pooled"].update(name=17),
    "unexpected output": lambda s: s[0]["files"].update(evil=dict(s[0]["files"]["pooled"])),
    "missing output": lambda s: s[0]["files"].pop("pooled"),
    "id with separator": lambda s: s[0].update(id="../" + s[0]["id"][3:]),
    "rows not an int": lambda s: s[0].update(rows="2"),
    "checksum not hex": lambda s: s[0]["files"]["ids"].update(sha256="x" * 64),
    "duplicate shard": lambda s: s.append(s[0]),
    "entry not an object": lambda s: s.append([1, 2]),
}


@pytest.mark.parametrize("damage", sorted(BAD_ENTRIES))
def test_invalid_manifest_entry_rebuilds_from_shards(tmp_path, damage):
    cache = small_cache(tmp_path / "cache")
    edit_manifest(cache.path, BAD_ENTRIES[damage])
    reader = reopen(tmp_path / "cache")
    with pytest.warns(CacheCorruptionWarning, match=r"manifest\.json' was damaged.*shard entry"):
        found, rows = served(reader)
    assert sorted(found) == IDS
    np.testing.assert_array_equal(rows, ROWS[[IDS.index(i) for i in found]])
    assert reader.info()["n_rows"] == 4 and reader.info()["damaged"] == []


def rewrite(cache, index, kind, array):
    """Replace a shard file with ``array`` and make the manifest's checksum agree (a forged shard)."""
    path = cache.path / "shards" / manifest(cache.path)["shards"][index]["files"][kind]["name"]
    np.save(path, array)
    edit_manifest(cache.path, lambda s: s[index]["files"][kind].update(sha256=sha(path)))


SHARD_DAMAGE = {
    "ids of wrong dtype": lambda c: rewrite(c, 1, "ids", np.arange(2)),
    "ids of wrong shape": lambda c: rewrite(c, 1, "ids", np.array([[b"a" * 32]] * 2, dtype="S32")),
    "too few rows": lambda c: rewrite(c, 1, "pooled", ROWS[:1]),
    "row count disagrees": lambda c: edit_manifest(c.path, lambda s: s[1].update(rows=3)),
    "wrong row shape": lambda c: rewrite(c, 1, "pooled", np.zeros((2, 5), np.float32)),
    "wrong dtype": lambda c: rewrite(c, 1, "pooled", ROWS[2:].astype(np.float64)),
}


@pytest.mark.parametrize("damage", sorted(SHARD_DAMAGE))
def test_inconsistent_shard_is_dropped_and_recomputed(tmp_path, damage):
    cache = small_cache(tmp_path / "cache")
    SHARD_DAMAGE[damage](cache)
    reader = reopen(tmp_path / "cache")
    with pytest.warns(CacheCorruptionWarning, match="structure check"):
        found, rows = served(reader)
    assert sorted(found) == IDS[:2]
    reader.write_shard(IDS[2:], {"pooled": ROWS[2:]})  # the caller recomputes the missing rows
    found, rows = served(reader)
    assert sorted(found) == IDS and reader.info()["n_shards"] == 2


# -- 4. damaged metadata ----------------------------------------------------------------------------------
DAMAGED_MANIFESTS = {
    "empty": b"",
    "truncated": b'{"format": 1, "shards": [{"id": "',
    "garbled": b"\x00\x13garbage{]",
    "not UTF-8": b'{"format": 1, "shards": [], "x": "\xff\xfe"}',
    "a list": b"[]",
    "missing shards": b'{"format": 1}',
    "missing format": b'{"shards": []}',
    "shards not a list": b'{"format": 1, "shards": {}}',
    "entry missing keys": b'{"format": 1, "shards": [{"id": "' + b"a" * 32 + b'"}]}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_MANIFESTS))
def test_damaged_manifest_is_quarantined_and_rebuilt(tmp_path, damage):
    cache = small_cache(tmp_path / "cache")
    path = cache.path / "manifest.json"
    path.write_bytes(DAMAGED_MANIFESTS[damage])
    (info,) = cache_info(tmp_path / "cache")  # works on the damaged store
    assert info["damaged"] == ["manifest.json"] and info["n_rows"] == 0
    reader = reopen(tmp_path / "cache")
    with pytest.warns(CacheCorruptionWarning, match=f"{re.escape(str(path))}' was damaged") as record:
        found, rows = served(reader)
    assert "moved aside" in str(record[0].message)
    assert sorted(found) == IDS
    np.testing.assert_array_equal(rows, ROWS[[IDS.index(i) for i in found]])
    (aside,) = cache.path.glob("manifest.json.corrupt-*")
    assert aside.read_bytes() == DAMAGED_MANIFESTS[damage]
    assert cache_info(tmp_path / "cache")[0]["n_rows"] == 4


def test_rebuild_keeps_only_shards_that_load_cleanly(extracted):
    images, expected, store = extracted
    shard = manifest(store)["shards"][1]
    victim = store / "shards" / shard["files"]["pooled"]["name"]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: it no longer loads
    (store / "manifest.json").write_bytes(b'{"format": 1, "sha')
    with pytest.warns(CacheCorruptionWarning, match="rebuilt from the 1 shard"):
        fe, out = fresh_transform(store, images)
    assert fe.n_cached_ == 4 and fe.n_encoded_ == 4
    np.testing.assert_array_equal(out, expected)


def test_manifest_that_is_a_directory_or_symlink_is_set_aside(tmp_path):
    cache = small_cache(tmp_path / "cache")
    path = cache.path / "manifest.json"
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(manifest(cache.path)))
    path.unlink()
    path.symlink_to(outside)
    with pytest.warns(CacheCorruptionWarning, match="not a regular file"):
        assert sorted(reopen(tmp_path / "cache").lookup(IDS)) == IDS
    assert outside.exists() and not path.is_symlink()


DAMAGED_CONFIGS = {
    "empty": b"",
    "garbled": b"{{{",
    "not UTF-8": b'{"format": 1, "config": "\xff"}',
    "a list": b"[1, 2]",
    "missing keys": b"{}",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_CONFIGS))
def test_damaged_config_does_not_break_info_clear_or_reuse(tmp_path, damage):
    root = tmp_path / "cache"
    cache = small_cache(root)
    path = cache.path / "config.json"
    path.write_bytes(DAMAGED_CONFIGS[damage])
    (info,) = cache_info(root)
    assert info["config"] is None and info["damaged"] == ["config.json"] and info["n_rows"] == 4
    with pytest.warns(CacheCorruptionWarning, match=f"{re.escape(str(path))}' was damaged"):
        reader = reopen(root)
    assert json.loads(path.read_text())["config"] == {"what": "trust"}
    assert sorted(reader.lookup(IDS)) == IDS and len(list(cache.path.glob("config.json.corrupt-*"))) == 1
    path.write_bytes(DAMAGED_CONFIGS[damage])
    assert clear_cache(root) == 1 and cache_info(root) == [] and root.exists()


def test_clear_cache_only_removes_stores_and_never_follows_symlinks(tmp_path):
    root = tmp_path / "home"
    (root / "Documents").mkdir(parents=True)
    (root / "Documents" / "thesis.tex").write_text("keep")
    (root / ("b" * 32)).mkdir()  # a store-like name without store files
    (root / ("b" * 32) / "notes.txt").write_text("keep")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("keep")
    elsewhere = small_cache(tmp_path / "elsewhere", what="elsewhere")
    (root / elsewhere.key).symlink_to(elsewhere.path)  # a symlinked store is not followed
    cache = small_cache(root)
    (cache.path / "shards" / "evil").symlink_to(outside)  # symlinks inside a store are unlinked only
    (cache.path / "projection.npy").symlink_to(outside / "data.txt")
    (cache.path / ".lock").unlink()
    (cache.path / ".lock").symlink_to(outside / "data.txt")
    with pytest.warns(CacheCorruptionWarning, match="not a regular file"):
        assert clear_cache(root) == 1
    assert not cache.path.exists() and (outside / "data.txt").read_text() == "keep"
    assert (root / "Documents" / "thesis.tex").exists() and (root / ("b" * 32) / "notes.txt").exists()
    assert elsewhere.lookup(IDS).keys() == set(IDS)
    assert clear_cache(tmp_path / "missing") == 0 and cache_info(tmp_path / "missing") == []


def test_prune_unlinks_symlinks_without_following_them(tmp_path):
    cache = small_cache(tmp_path / "cache")
    outside = tmp_path / "outside.npy"
    np.save(outside, ROWS)
    (cache.path / "shards" / "stray.npy").symlink_to(outside)
    assert cache.prune(min_age=0) == 1 and outside.exists()
    assert sorted(cache.lookup(IDS)) == IDS


# -- lock waits ---------------------------------------------------------------------------------------------
@pytest.fixture
def held_lock(tmp_path):
    """A thread that holds a store's lock (through the cache's own locking) until told to release it."""
    cache = small_cache(tmp_path / "cache", lock_timeout=0.5)
    acquired, release = threading.Event(), threading.Event()

    def hold():
        with cache_module._locked(FileLock(str(cache.path / ".lock")), None):
            acquired.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert acquired.wait(10)
    yield cache, release
    release.set()
    thread.join()


def test_lock_timeout_names_the_lock_and_its_holder(held_lock, monkeypatch):
    cache, _ = held_lock
    monkeypatch.setattr(cache_module, "_LOCK_NOTICE_S", 0.1)
    lock_file, pid = re.escape(str(cache.path / ".lock")), os.getpid()
    with pytest.warns(CacheLockWarning, match=f"Waiting for the embedding cache lock '{lock_file}'.*{pid}"):
        with pytest.raises(TimeoutError, match=f"within 0.5 s: '{lock_file}' is held by process {pid}"):
            cache.write_shard(["f" * 32], {"pooled": ROWS[:1]})
    with pytest.raises(TimeoutError, match="lock_timeout"):
        clear_cache(cache.path.parent, lock_timeout=0.05)
    assert cache_info(cache.path.parent)[0]["n_rows"] == 4


def test_lock_wait_warns_then_proceeds(held_lock, monkeypatch):
    cache, release = held_lock
    monkeypatch.setattr(cache_module, "_LOCK_NOTICE_S", 0.1)
    cache.lock_timeout = 10
    threading.Timer(0.4, release.set).start()
    with pytest.warns(CacheLockWarning, match="up to 10 s"):
        cache.write_shard(["f" * 32], {"pooled": ROWS[:1]})
    assert cache.info()["n_rows"] == 5 and not (cache.path / ".lock.owner").exists()
