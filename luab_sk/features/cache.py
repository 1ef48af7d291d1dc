"""The on-disk, content-addressed embedding cache.

Layout of a cache directory::

    <cache_dir>/<key>/config.json          what the key covers (backbone, weights, preprocessing, ...)
    <cache_dir>/<key>/manifest.json        the committed shards, with their row counts and SHA-256 checksums
    <cache_dir>/<key>/projection.npy       the token projection, when there is one
    <cache_dir>/<key>/shards/<id>.ids.npy  image identifiers of a shard's rows (fixed-width bytes)
    <cache_dir>/<key>/shards/<id>.<output>.npy   the rows ("pooled", "tokens")
    <cache_dir>/<key>/.lock                the file lock that serialises manifest updates

Every file is written to a temporary name and renamed into place, and a shard becomes visible only when the
manifest that lists it is renamed into place: a process killed at any moment leaves at most unlisted files
behind, and the next run recomputes exactly the rows that were not committed. Shards are verified against
their checksums before use (once per process); a corrupt or truncated shard is dropped and recomputed.
Nothing is ever unpickled: arrays are read with ``allow_pickle=False``, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
from filelock import FileLock

from ._hashing import file_sha256

__all__ = ["EmbeddingCache", "cache_info", "clear_cache"]

_FORMAT = 1
_ID_DTYPE = "S32"


def _atomic_write(path: Path, write) -> None:
    """Write a file through ``write(fileobj)`` to a temporary name, fsync it, and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def config_key(config: dict) -> str:
    """The 32-hex-digit key of a cache configuration (SHA-256 of its canonical JSON).

    Examples
    --------
    >>> config_key({"a": 1, "b": [2, 3]}) == config_key({"b": [2, 3], "a": 1})
    True
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]


class EmbeddingCache:
    """One configuration's store of embeddings, keyed by image identifiers.

    Parameters
    ----------
    cache_dir : str or path-like
        The cache root; created if needed.
    config : dict
        JSON-serialisable description of everything that determines the embeddings (backbone, weights,
        preprocessing, outputs, layer, projection, dtype, library version). Its hash is the store's key.
    outputs : sequence of str
        The arrays each row holds (e.g. ``("pooled",)``).
    lock_timeout : float, default=600
        Seconds to wait for another process holding the manifest lock.

    Attributes
    ----------
    key : str
    path : pathlib.Path
        The store directory ``cache_dir / key``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> cache = EmbeddingCache(tempfile.mkdtemp(), {"backbone": "demo"}, outputs=("pooled",))
    >>> cache.write_shard(["a" * 32, "b" * 32], {"pooled": np.eye(2, dtype=np.float32)})
    >>> rows = cache.lookup(["b" * 32, "c" * 32])
    >>> sorted(rows), cache.gather(["b" * 32], rows)["pooled"].tolist()
    (['bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'], [[0.0, 1.0]])
    """

    def __init__(self, cache_dir, config: dict, outputs, lock_timeout: float = 600.0):
        self.config = config
        self.outputs = tuple(outputs)
        self.key = config_key(config)
        self.path = Path(cache_dir).expanduser() / self.key
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path / ".lock"), timeout=lock_timeout)
        if not (self.path / "config.json").exists():
            _write_json(self.path / "config.json", {"format": _FORMAT, "key": self.key, "config": config})
        self._index: dict[str, tuple[str, int]] = {}
        self._index_stamp = None
        self._verified: set[str] = set()
        self._shard_meta: dict[str, dict] = {}

    # -- manifest ---------------------------------------------------------------------------------------
    def _read_manifest(self) -> list[dict]:
        try:
            with open(self.path / "manifest.json", "rb") as fh:
                return json.load(fh)["shards"]
        except FileNotFoundError:
            return []

    def _refresh(self) -> None:
        """Reload the id -> (shard, row) index when the manifest changed on disk."""
        try:
            st = (self.path / "manifest.json").stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._index_stamp:
            return
        index: dict[str, tuple[str, int]] = {}
        meta: dict[str, dict] = {}
        for shard in self._read_manifest():
            meta[shard["id"]] = shard
            ids_file = self.path / "shards" / shard["files"]["ids"]["name"]
            try:
                ids = np.load(ids_file, allow_pickle=False)
            except (OSError, ValueError):
                continue  # damaged ids file: the shard fails verification below and is recomputed
            for row, ident in enumerate(ids.tolist()):
                index.setdefault(ident.decode(), (shard["id"], row))  # first committed copy wins
        self._index, self._shard_meta, self._index_stamp = index, meta, stamp

    def _verify(self, shard_id: str) -> bool:
        if shard_id in self._verified:
            return True
        shard = self._shard_meta[shard_id]
        for kind in ("ids", *self.outputs):
            entry = shard["files"].get(kind)
            path = self.path / "shards" / entry["name"] if entry else None
            try:
                if entry is None or file_sha256(path) != entry["sha256"]:
                    return False
            except OSError:
                return False
        self._verified.add(shard_id)
        return True

    def _drop(self, shard_ids: set[str]) -> None:
        with self._lock:
            kept, dropped = [], []
            for shard in self._read_manifest():
                (dropped if shard["id"] in shard_ids else kept).append(shard)
            _write_json(self.path / "manifest.json", {"format": _FORMAT, "shards": kept})
            for shard in dropped:
                for entry in shard["files"].values():
                    (self.path / "shards" / entry["name"]).unlink(missing_ok=True)
        self._index_stamp = "stale"

    # -- public API -------------------------------------------------------------------------------------
    def lookup(self, ids) -> dict[str, tuple[str, int]]:
        """Map the cached ones among ``ids`` to ``(shard, row)``, after verifying their shards.

        Shards that fail their checksum are removed from the cache (with a warning), so that their rows
        are reported missing and get recomputed.
        """
        self._refresh()
        found = {i: self._index[i] for i in ids if i is not None and i in self._index}
        bad = {s for s, _ in found.values() if not self._verify(s)}
        if bad:
            warnings.warn(
                f"Embedding cache {str(self.path)!r}: shard(s) {sorted(bad)} failed their checksum "
                "(corrupt or truncated); they are dropped and their rows will be recomputed.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._drop(bad)
            return self.lookup(ids)
        return found

    def write_shard(self, ids, arrays: dict[str, np.ndarray]) -> None:
        """Commit rows atomically: write the shard files, then list them in the manifest under the lock."""
        ids = np.asarray(ids, dtype=_ID_DTYPE)
        if set(arrays) != set(self.outputs) or any(len(a) != len(ids) for a in arrays.values()):
            raise ValueError(f"write_shard needs {self.outputs} arrays of {len(ids)} rows each.")
        shard_id = uuid.uuid4().hex
        files = {}
        for kind, arr in (("ids", ids), *arrays.items()):
            name = f"{shard_id}.{kind}.npy"
            path = self.path / "shards" / name
            _atomic_write(path, lambda fh, a=arr: np.save(fh, np.ascontiguousarray(a), allow_pickle=False))
            files[kind] = {"name": name, "sha256": file_sha256(path)}
        entry = {"id": shard_id, "rows": len(ids), "files": files}
        with self._lock:
            shards = self._read_manifest()
            shards.append(entry)
            _write_json(self.path / "manifest.json", {"format": _FORMAT, "shards": shards})
        self._verified.add(shard_id)

    def gather(self, ids, found: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
        """Rows of ``ids`` (all present in ``found``) read from memory-mapped shards.

        When all rows are one contiguous run of a single shard the result is a read-only memory map;
        otherwise the rows are copied into a new array.
        """
        loc = [found[i] for i in ids]
        shards = {s for s, _ in loc}
        result = {}
        for kind in self.outputs:
            maps = {
                s: np.load(
                    self.path / "shards" / self._shard_meta[s]["files"][kind]["name"],
                    mmap_mode="r",
                    allow_pickle=False,
                )
                for s in shards
            }
            if len(shards) == 1 and loc:
                rows = np.fromiter((r for _, r in loc), dtype=np.int64, count=len(loc))
                if np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
                    result[kind] = maps[loc[0][0]][rows[0] : rows[0] + len(rows)]
                    continue
            first = next(iter(maps.values()))
            out = np.empty((len(ids), *first.shape[1:]), dtype=first.dtype)
            for s, mm in maps.items():
                pos = [p for p, (ls, _) in enumerate(loc) if ls == s]
                out[pos] = mm[[loc[p][1] for p in pos]]
            result[kind] = out
        return result

    def prune(self, min_age: float = 3600.0) -> int:
        """Delete files under ``shards/`` that no committed shard lists (left by killed writers).

        Parameters
        ----------
        min_age : float, default=3600
            Only files not modified for this many seconds are deleted, so that a shard another process
            is committing right now is left alone.

        Returns
        -------
        int
            The number of files deleted.
        """
        removed = 0
        with self._lock:
            listed = {e["name"] for shard in self._read_manifest() for e in shard["files"].values()}
            for path in (self.path / "shards").iterdir():
                if path.name not in listed and time.time() - path.stat().st_mtime >= min_age:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def info(self) -> dict:
        """Key, configuration, number of rows and shards, and bytes on disk of this store."""
        return _store_info(self.path)

    def clear(self) -> None:
        """Delete this store's shards and manifest (the store is recreated empty)."""
        _remove_store(self.path)
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        _write_json(self.path / "config.json", {"format": _FORMAT, "key": self.key, "config": self.config})
        self._index_stamp = "stale"
        self._verified.clear()


def _remove_store(store: Path) -> None:
    with FileLock(str(store / ".lock")):
        for child in store.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    shutil.rmtree(store, ignore_errors=True)


def _store_info(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    try:
        shards = json.loads((path / "manifest.json").read_text())["shards"]
    except FileNotFoundError:
        shards = []
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "key": path.name,
        "path": str(path),
        "config": config["config"],
        "n_rows": sum(s["rows"] for s in shards),
        "n_shards": len(shards),
        "bytes": size,
    }


def cache_info(cache_dir) -> list[dict]:
    """Describe every store under ``cache_dir``.

    Parameters
    ----------
    cache_dir : str or path-like

    Returns
    -------
    list of dict
        One per store: ``key``, ``path``, ``config``, ``n_rows`` (committed rows), ``n_shards``, ``bytes``.

    Examples
    --------
    >>> import tempfile
    >>> cache_info(tempfile.mkdtemp())
    []
    """
    root = Path(cache_dir).expanduser()
    if not root.is_dir():
        return []
    return [_store_info(p) for p in sorted(root.iterdir()) if (p / "config.json").is_file()]


def clear_cache(cache_dir, key: str | None = None) -> int:
    """Delete every store under ``cache_dir`` (or only the one with ``key``).

    Only directories that look like stores (holding a ``config.json``) are removed.

    Parameters
    ----------
    cache_dir : str or path-like
    key : str or None, default=None

    Returns
    -------
    int
        The number of stores removed.

    Examples
    --------
    >>> import tempfile
    >>> clear_cache(tempfile.mkdtemp())
    0
    """
    removed = 0
    for info in cache_info(cache_dir):
        if key is None or info["key"] == key:
            _remove_store(Path(info["path"]))
            removed += 1
    return removed
