"""The on-disk, content-addressed embedding cache.

Layout of a cache directory::

    <cache_dir>/<key>/config.json          what the key covers (backbone, weights, preprocessing, ...)
    <cache_dir>/<key>/manifest.json        the committed shards, with their row counts and SHA-256 checksums
    <cache_dir>/<key>/projection.npy       the token projection, when there is one
    <cache_dir>/<key>/shards/<id>.ids.npy  image identifiers of a shard's rows (fixed-width bytes)
    <cache_dir>/<key>/shards/<id>.<output>.npy   the rows ("pooled", "tokens")
    <cache_dir>/<key>/.lock                the file lock that serialises manifest updates
    <cache_dir>/<key>/.lock.owner          the process id of the lock's current holder (informative only)

``<key>`` is 32 hex digits (:func:`config_key`) and ``<id>`` is 32 hex digits.

What the cache promises
-----------------------
* **Atomic commits.** Every file is written to a temporary name and renamed into place, and a shard becomes
  visible only when the manifest that lists it is renamed into place: a process killed at any moment leaves
  at most unlisted files behind, and the next run recomputes exactly the rows that were not committed.
* **Verified rows.** A shard is served only after its files match the SHA-256 checksums of the manifest
  (once per process) and load with ``allow_pickle=False`` as arrays of the shard's row count: identifiers of
  dtype ``S32`` and one dimension, outputs of a numeric dtype (and of the row shape and dtype given by
  ``layout``, when the caller gives one). A shard that fails is dropped (its files deleted) with a
  :class:`CacheCorruptionWarning`, and its rows are recomputed.
* **Confinement.** Metadata is never trusted to name a path. The only files the cache reads, serves or
  deletes are ``config.json``, ``manifest.json``, ``.lock.owner`` and ``shards/<id>.<kind>.npy`` for a
  32-hex-digit ``<id>`` and a known ``<kind>``, and each must be a regular file (not a symlink) whose
  resolved path lies inside the store. A manifest entry that names any other file (absolute paths, ``..``,
  separators, NUL bytes, non-string names, unexpected outputs) makes the manifest damaged, see below.
  Deletion unlinks those names only and never follows a symlink; :func:`clear_cache` removes only
  directories under ``cache_dir`` that look like stores (a 32-hex-digit name and store files inside), never
  ``cache_dir`` itself and never through a symlink.
* **Recovery from damaged metadata.** A ``manifest.json`` that is not UTF-8 JSON of the expected shape
  (truncated, empty, garbled, a list, missing keys, wrong types, an invalid entry) or a ``config.json`` that
  does not describe its store is renamed aside inside the store (``manifest.json.corrupt-<time>-<tag>``) with
  a :class:`CacheCorruptionWarning` naming the file. The manifest is then rebuilt, under the lock, from the
  shards on disk that pass the structural checks above; their checksums were in the damaged file, so they are
  computed afresh. This trusts shards whose bytes changed after they were written as long as they still load
  with consistent row counts (and ``layout``): the rebuild defends against lost metadata, not against silent
  bit flips inside a shard. :func:`cache_info` and :func:`clear_cache` work whatever the metadata holds.
* **No unpickling.** Arrays are read with ``allow_pickle=False``, metadata is JSON.
* **Visible waiting.** A process that waits for another's lock for more than a few seconds emits a
  :class:`CacheLockWarning` naming the lock file and the holder's process id when known, and gives up after
  ``lock_timeout`` seconds with a :class:`TimeoutError` that says how to proceed.

File locks are unreliable on network filesystems; use a local ``cache_dir`` for concurrent writers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from .._io import atomic_write, write_json
from ._hashing import file_sha256

__all__ = ["CacheCorruptionWarning", "CacheLockWarning", "EmbeddingCache", "cache_info", "clear_cache"]

_FORMAT = 1
_ID_DTYPE = np.dtype("S32")
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_OUTPUT_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_LOCK_NOTICE_S = 5.0
_STORE_FILES = ("config.json", "manifest.json", "shards")


class CacheCorruptionWarning(RuntimeWarning):
    """A cache file was damaged or untrustworthy; it was set aside or dropped and its rows are recomputed."""


class CacheLockWarning(UserWarning):
    """This process is waiting for another process that holds a cache store's lock."""


class _Damaged(Exception):
    """Internal: a metadata file or shard does not have the expected form (the message says how)."""


def _is_regular(path: Path) -> bool:
    """Whether ``path`` itself (not a symlink's target) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_json(path: Path):
    """Parse a metadata file.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    _Damaged
        If it is not a regular file holding UTF-8 JSON.
    """
    if not os.path.lexists(path):
        raise FileNotFoundError(path)
    if not _is_regular(path):
        raise _Damaged("not a regular file (a symlink, a directory or a device)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _Damaged(f"not UTF-8 text ({err})") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise _Damaged(f"not valid JSON ({err})") from None
    except OSError as err:
        raise _Damaged(f"unreadable ({err})") from None


def _quarantine(path: Path) -> Path | None:
    """Rename a damaged file aside, next to itself; None when it has vanished meanwhile."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    return aside


def _entry_problem(shard, kinds: set[str] | None) -> str | None:
    """What is wrong with a manifest entry (None if nothing); ``kinds`` None accepts any output names."""
    if not isinstance(shard, dict) or set(shard) != {"id", "rows", "files"}:
        return "not an object with exactly the keys 'id', 'rows' and 'files'"
    sid, rows, files = shard["id"], shard["rows"], shard["files"]
    if not isinstance(sid, str) or not _HEX32.match(sid):
        return f"id {sid!r:.80} is not 32 hex digits"
    if type(rows) is not int or rows < 0:
        return f"rows {rows!r:.80} is not a row count"
    if not isinstance(files, dict) or "ids" not in files or (kinds is not None and set(files) != kinds):
        return f"files {files!r:.200} do not list exactly {sorted(kinds or ['ids', '...'])}"
    for kind, entry in files.items():
        name = f"{sid}.{kind}.npy"
        if (
            not _OUTPUT_NAME.match(kind)
            or not isinstance(entry, dict)
            or set(entry) != {"name", "sha256"}
            or entry["name"] != name
            or not isinstance(entry["sha256"], str)
            or not _HEX64.match(entry["sha256"])
        ):
            return f"file {kind!r:.80} is {entry!r:.200}, not {{'name': {name!r}, 'sha256': <64 hex digits>}}"
    return None


def _parse_manifest(obj, kinds: set[str] | None) -> list[dict]:
    """The shard entries of a parsed manifest; raises :class:`_Damaged` on anything unexpected."""
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT or not isinstance(obj.get("shards"), list):
        raise _Damaged(f"not an object {{'format': {_FORMAT}, 'shards': [...]}}")
    seen = set()
    for i, shard in enumerate(obj["shards"]):
        problem = _entry_problem(shard, kinds)
        if problem is None and shard["id"] in seen:
            problem = f"shard {shard['id']} is listed twice"
        if problem is not None:
            raise _Damaged(f"shard entry {i}: {problem}")
        seen.add(shard["id"])
    return obj["shards"]


def _lock_holder(lock_file: str) -> str:
    """Who holds a store lock, from the ``.lock.owner`` file its holder writes (best effort)."""
    with contextlib.suppress(OSError, _Damaged):
        owner = _read_json(Path(f"{lock_file}.owner"))
        if isinstance(owner, dict) and type(owner.get("pid")) is int:
            return f"process {owner['pid']} on host {str(owner.get('host'))[:100]!r}"
    return "another process (its pid is unknown)"


@contextlib.contextmanager
def _locked(lock: FileLock, timeout: float | None):
    """Hold ``lock`` (re-entrant in one thread), warning after a few seconds of waiting.

    Raises
    ------
    TimeoutError
        If the lock is still held by another process after ``timeout`` seconds (None waits indefinitely).
    """
    if os.path.lexists(lock.lock_file) and not _is_regular(Path(lock.lock_file)):
        aside = _quarantine(Path(lock.lock_file))  # a symlink or a directory cannot be locked
        warnings.warn(
            f"{lock.lock_file!r} was not a regular file; moved aside to {aside}.",
            CacheCorruptionWarning,
            stacklevel=4,
        )
    notice = _LOCK_NOTICE_S if timeout is None else min(_LOCK_NOTICE_S, timeout)
    try:
        lock.acquire(timeout=notice)
    except Timeout:
        holder = _lock_holder(lock.lock_file)
        try:
            if timeout is not None and timeout <= notice:
                raise
            warnings.warn(
                f"Waiting for the embedding cache lock {lock.lock_file!r}, held by {holder} "
                f"(waiting up to {'forever' if timeout is None else f'{timeout:g} s'}).",
                CacheLockWarning,
                stacklevel=4,
            )
            lock.acquire(timeout=-1 if timeout is None else timeout - notice)
        except Timeout:
            raise TimeoutError(
                f"Could not lock the embedding cache within {timeout:g} s: {lock.lock_file!r} is held by "
                f"{holder}. Wait for that process to finish (the lock is released when it exits, so do not "
                "delete the lock file), allow a longer wait with lock_timeout (None waits indefinitely), "
                "or use another cache_dir."
            ) from None
    owner = Path(f"{lock.lock_file}.owner")
    try:
        if lock.lock_counter == 1:
            owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield
    finally:
        if lock.lock_counter == 1:
            owner.unlink(missing_ok=True)
        lock.release()


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
        The arrays each row holds (e.g. ``("pooled",)``); lowercase names of letters, digits and ``_``.
    lock_timeout : float or None, default=600
        Seconds to wait for another process holding the store's lock before raising :class:`TimeoutError`;
        None waits indefinitely. A :class:`CacheLockWarning` is emitted after a few seconds of waiting.
    layout : dict or None, default=None
        ``{output: (dtype, row_shape)}``: every shard must hold rows of exactly this dtype and shape (a shard
        that does not is dropped and recomputed). None checks only that outputs are numeric.

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

    def __init__(self, cache_dir, config: dict, outputs, lock_timeout: float | None = 600.0, layout=None):
        self.config = config
        self.outputs = tuple(outputs)
        if not self.outputs or not all(isinstance(k, str) and _OUTPUT_NAME.match(k) for k in self.outputs):
            raise ValueError(f"outputs must be lowercase names such as 'pooled', got {self.outputs!r}.")
        self.lock_timeout = lock_timeout
        self.layout = None if layout is None else {k: (np.dtype(d), tuple(s)) for k, (d, s) in layout.items()}
        if self.layout is not None and set(self.layout) != set(self.outputs):
            raise ValueError(
                f"layout must describe exactly the outputs {self.outputs}, got {sorted(self.layout)}."
            )
        self.key = config_key(config)
        self.path = Path(cache_dir).expanduser() / self.key
        self._manifest = self.path / "manifest.json"
        self._shards = self.path / "shards"
        self._lock = FileLock(str(self.path / ".lock"))
        self._prepare_store()
        self._index: dict[str, tuple[str, int]] = {}
        self._index_stamp = None
        self._unreadable: set[str] = set()
        self._verified: set[str] = set()
        self._shard_meta: dict[str, dict] = {}

    def _warn(self, message: str) -> None:
        warnings.warn(f"Embedding cache {str(self.path)!r}: {message}", CacheCorruptionWarning, stacklevel=4)

    def _prepare_store(self) -> None:
        """Create the store; set aside a ``shards`` that is not a directory and a damaged ``config.json``."""
        self.path.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(self._shards) and (self._shards.is_symlink() or not self._shards.is_dir()):
            aside = _quarantine(self._shards)
            self._warn(f"{str(self._shards)!r} is not a directory; moved aside to {aside}.")
        self._shards.mkdir(exist_ok=True)
        self._shards_real = self._shards.resolve()
        path = self.path / "config.json"
        expected = json.loads(json.dumps({"format": _FORMAT, "key": self.key, "config": self.config}))
        try:
            problem = None if _read_json(path) == expected else "it describes another configuration"
        except FileNotFoundError:
            write_json(path, expected)
            return
        except _Damaged as err:
            problem = str(err)
        if problem is not None:
            aside = _quarantine(path)
            write_json(path, expected)
            self._warn(f"{str(path)!r} was damaged ({problem}); moved aside to {aside} and rewritten.")

    # -- files and shards -------------------------------------------------------------------------------
    def _file(self, shard_id: str, kind: str) -> Path:
        """The path of a shard file, which must be a regular file inside ``shards/`` (raises _Damaged)."""
        path = self._shards / f"{shard_id}.{kind}.npy"
        if not _is_regular(path) or path.resolve().parent != self._shards_real:
            raise _Damaged(f"{path} is not a regular file inside the store")
        return path

    def _load_checked(self, shard_id: str, rows: int | None = None) -> np.ndarray:
        """Load a shard's ids and check its files' structure (row counts, dtypes); raises _Damaged.

        Returns
        -------
        numpy.ndarray
            The identifiers (dtype ``S32``).
        """
        try:
            ids = np.load(self._file(shard_id, "ids"), mmap_mode="r", allow_pickle=False)
            if ids.dtype != _ID_DTYPE or ids.ndim != 1 or (rows is not None and len(ids) != rows):
                raise _Damaged(f"shard {shard_id}: ids are {ids.dtype} {ids.shape}, not S32 ({rows} rows)")
            for kind in self.outputs:
                arr = np.load(self._file(shard_id, kind), mmap_mode="r", allow_pickle=False)
                spec = (arr.dtype, arr.shape[1:])
                wrong = spec != self.layout[kind] if self.layout else arr.dtype.kind not in "biufc"
                if arr.ndim < 1 or len(arr) != len(ids) or wrong:
                    raise _Damaged(f"shard {shard_id}: {kind} is {arr.dtype} {arr.shape} for {len(ids)} ids")
        except _Damaged:
            raise
        except Exception as err:  # numpy's header parser raises several kinds on crafted files
            raise _Damaged(f"shard {shard_id}: {type(err).__name__}: {err}") from None
        return ids

    # -- manifest ---------------------------------------------------------------------------------------
    def _load_manifest(self) -> tuple[list[dict], _Damaged | None]:
        try:
            return _parse_manifest(_read_json(self._manifest), {"ids", *self.outputs}), None
        except FileNotFoundError:
            return [], None
        except _Damaged as err:
            return [], err

    def _read_manifest(self) -> list[dict]:
        """The committed shard entries; a damaged manifest is set aside and rebuilt under the lock."""
        shards, damage = self._load_manifest()
        if damage is None:
            return shards
        with _locked(self._lock, self.lock_timeout):  # another process may have repaired it meanwhile
            shards, damage = self._load_manifest()
            return shards if damage is None else self._rebuild(damage)

    def _rebuild(self, damage: _Damaged) -> list[dict]:
        """Set the damaged manifest aside and list the shards on disk that load cleanly (lock held)."""
        aside = _quarantine(self._manifest)
        shards = []
        for path in sorted(self._shards.glob("*.ids.npy")):
            shard_id = path.name[: -len(".ids.npy")]
            if not _HEX32.match(shard_id):
                continue
            try:
                rows = len(self._load_checked(shard_id))
                kinds = ("ids", *self.outputs)
                files = {
                    k: {"name": f"{shard_id}.{k}.npy", "sha256": file_sha256(self._file(shard_id, k))}
                    for k in kinds
                }
            except (_Damaged, OSError):
                continue
            shards.append({"id": shard_id, "rows": rows, "files": files})
        write_json(self._manifest, {"format": _FORMAT, "shards": shards})
        self._warn(
            f"{str(self._manifest)!r} was damaged ({damage}); moved aside to {aside}. The manifest was "
            f"rebuilt from the {len(shards)} shard(s) on disk that load cleanly (checksums recomputed); "
            "other rows will be recomputed."
        )
        return shards

    def _refresh(self) -> None:
        """Reload the id -> (shard, row) index when the manifest changed on disk."""
        try:
            st = os.lstat(self._manifest)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._index_stamp:
            return
        index: dict[str, tuple[str, int]] = {}
        meta: dict[str, dict] = {}
        unreadable = set()
        for shard in self._read_manifest():
            meta[shard["id"]] = shard
            try:
                ids = self._load_checked(shard["id"], shard["rows"])
            except _Damaged:
                unreadable.add(shard["id"])  # dropped by the next lookup
                continue
            for row, ident in enumerate(ids.tolist()):
                index.setdefault(ident.decode("latin-1"), (shard["id"], row))  # first committed copy wins
        self._index, self._shard_meta, self._unreadable, self._index_stamp = index, meta, unreadable, stamp

    def _verify(self, shard_id: str) -> bool:
        if shard_id in self._verified:
            return True
        shard = self._shard_meta[shard_id]
        try:
            for kind in ("ids", *self.outputs):
                if file_sha256(self._file(shard_id, kind)) != shard["files"][kind]["sha256"]:
                    return False
            self._load_checked(shard_id, shard["rows"])
        except (_Damaged, OSError):
            return False
        self._verified.add(shard_id)
        return True

    def _drop(self, shard_ids: set[str]) -> None:
        """Unlist shards and delete their files (only ``shards/<id>.<kind>.npy``, never through a symlink)."""
        with _locked(self._lock, self.lock_timeout):
            kept = [shard for shard in self._read_manifest() if shard["id"] not in shard_ids]
            write_json(self._manifest, {"format": _FORMAT, "shards": kept})
            for shard_id in shard_ids:
                for kind in ("ids", *self.outputs):
                    path = self._shards / f"{shard_id}.{kind}.npy"
                    if _is_regular(path) or path.is_symlink():
                        path.unlink(missing_ok=True)
        self._index_stamp = "stale"

    # -- public API -------------------------------------------------------------------------------------
    def lookup(self, ids) -> dict[str, tuple[str, int]]:
        """Map the cached ones among ``ids`` to ``(shard, row)``, after verifying their shards.

        Shards that fail their checksum or structural checks are removed from the cache (with a
        :class:`CacheCorruptionWarning`), so that their rows are reported missing and get recomputed.
        """
        self._refresh()
        found = {i: self._index[i] for i in ids if i is not None and i in self._index}
        bad = {s for s, _ in found.values() if not self._verify(s)} | self._unreadable
        if bad:
            self._warn(
                f"shard(s) {sorted(bad)} failed their checksum or structure check (corrupt, truncated or "
                "not regular files); they are dropped and their rows will be recomputed."
            )
            self._drop(bad)
            return self.lookup(ids)
        return found

    def lookup_missing(self, ids) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
        """:meth:`lookup`, plus the identifiers to compute, each mapped to its first position in ``ids``.

        None identifiers (unreadable items) are neither found nor missing.

        Examples
        --------
        >>> import tempfile
        >>> cache = EmbeddingCache(tempfile.mkdtemp(), {"model": "demo"}, ("pooled",))
        >>> cache.write_shard(["a"], {"pooled": np.zeros((1, 2), np.float32)})
        >>> found, missing = cache.lookup_missing(["b", "a", None, "b", "c"])
        >>> sorted(found), missing
        (['a'], {'b': 0, 'c': 4})
        """
        found = self.lookup(ids)
        missing: dict[str, int] = {}
        for i, ident in enumerate(ids):
            if ident is not None and ident not in found:
                missing.setdefault(ident, i)
        return found, missing

    def write_projection(self, projection: np.ndarray) -> None:
        """Store the token projection as ``projection.npy`` (once; a record for the user, never read back)."""
        path = self.path / "projection.npy"
        if not path.exists():
            atomic_write(path, lambda fh: np.save(fh, projection, allow_pickle=False))

    def write_shard(self, ids, arrays: dict[str, np.ndarray]) -> None:
        """Commit rows atomically: write the shard files, then list them in the manifest under the lock."""
        entry = self._write_files(ids, arrays, "write_shard")
        shard_id = entry["id"]
        with _locked(self._lock, self.lock_timeout):
            shards = self._read_manifest()
            if all(shard["id"] != shard_id for shard in shards):  # a rebuild may have listed it already
                shards.append(entry)
            write_json(self._manifest, {"format": _FORMAT, "shards": shards})
        self._verified.add(shard_id)

    def write_shard_files(self, ids, arrays: dict[str, np.ndarray]) -> dict:
        """Write a shard's files atomically without listing them in the manifest; return its entry.

        For writers that must not take the store's lock, such as the workers of a distributed extraction
        on other machines (:mod:`luab_sk.distributed`): one process later lists the entries with
        :meth:`commit_shards`. Until then the files are invisible to :meth:`lookup` (and :meth:`prune`
        deletes them once they are old).

        Returns
        -------
        dict
            The manifest entry: ``{"id", "rows", "files": {kind: {"name", "sha256"}}}`` (JSON-serialisable).
        """
        return self._write_files(ids, arrays, "write_shard_files")

    def _write_files(self, ids, arrays: dict[str, np.ndarray], method: str) -> dict:
        """Write a shard's files (each atomically, with its checksum); return its manifest entry."""
        ids = np.asarray(ids, dtype=_ID_DTYPE)
        if set(arrays) != set(self.outputs) or any(len(a) != len(ids) for a in arrays.values()):
            raise ValueError(f"{method} needs {self.outputs} arrays of {len(ids)} rows each.")
        shard_id = uuid.uuid4().hex
        files = {}
        for kind, arr in (("ids", ids), *arrays.items()):
            path = self._shards / f"{shard_id}.{kind}.npy"
            atomic_write(path, lambda fh, a=arr: np.save(fh, np.ascontiguousarray(a), allow_pickle=False))
            files[kind] = {"name": path.name, "sha256": file_sha256(path)}
        return {"id": shard_id, "rows": len(ids), "files": files}

    def commit_shards(self, entries, verify: bool = False) -> list[str]:
        """List shards written by :meth:`write_shard_files` (anywhere) in the manifest, under the lock.

        Parameters
        ----------
        entries : iterable of dict
            Entries returned by :meth:`write_shard_files`. Entries already listed are ignored.
        verify : bool, default=False
            Check each shard's checksums and structure now and leave out those that fail (without it,
            :meth:`lookup` checks them before use and drops bad ones).

        Returns
        -------
        list of str
            The ids of the shards newly listed.

        Raises
        ------
        ValueError
            If an entry is malformed (it is never trusted to name a file outside ``shards/``).
        """
        kinds = {"ids", *self.outputs}
        entries = list(entries)
        for entry in entries:
            problem = _entry_problem(entry, kinds)
            if problem is not None:
                raise ValueError(f"commit_shards: invalid shard entry ({problem}).")
        if verify:
            good = []
            for entry in entries:
                try:
                    files = entry["files"].items()
                    if all(file_sha256(self._file(entry["id"], k)) == f["sha256"] for k, f in files):
                        self._load_checked(entry["id"], entry["rows"])
                        good.append(entry)
                except (_Damaged, OSError):
                    continue
            entries = good
        if not entries:
            return []
        with _locked(self._lock, self.lock_timeout):
            shards = self._read_manifest()
            listed = {shard["id"] for shard in shards}
            new = [entry for entry in entries if entry["id"] not in listed]
            if new:
                shards.extend(new)
                write_json(self._manifest, {"format": _FORMAT, "shards": shards})
        return [entry["id"] for entry in new]

    def gather(self, ids, found: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
        """Rows of ``ids`` (all present in ``found``) read from memory-mapped shards.

        When all rows are one contiguous run of a single shard the result is a read-only memory map;
        otherwise the rows are copied into a new array.
        """
        loc = [found[i] for i in ids]
        shards = {s for s, _ in loc}
        result = {}
        for kind in self.outputs:
            maps = {s: np.load(self._file(s, kind), mmap_mode="r", allow_pickle=False) for s in shards}
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
            The number of files deleted (symlinks are removed themselves, never their targets).
        """
        removed = 0
        with _locked(self._lock, self.lock_timeout):
            listed = {
                f"{shard['id']}.{kind}.npy" for shard in self._read_manifest() for kind in shard["files"]
            }
            for path in self._shards.iterdir():
                st = os.lstat(path)
                stale = time.time() - st.st_mtime >= min_age
                if path.name not in listed and stale and not stat.S_ISDIR(st.st_mode):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def info(self) -> dict:
        """This store's key, configuration, rows, shards, bytes and damaged files (see :func:`cache_info`)."""
        return _store_info(self.path)

    def clear(self) -> None:
        """Delete this store's shards and manifest (the store is recreated empty)."""
        _remove_store(self.path, self.lock_timeout)
        self._prepare_store()
        self._index_stamp = "stale"
        self._verified.clear()


def _remove_store(store: Path, lock_timeout: float | None) -> None:
    """Delete a store without following symlinks out of it (a symlinked store loses the link only)."""
    if store.is_symlink():
        store.unlink()
        return
    with _locked(FileLock(str(store / ".lock")), lock_timeout):
        for child in store.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    shutil.rmtree(store, ignore_errors=True)


def _store_info(path: Path) -> dict:
    damaged = []
    try:
        meta = _read_json(path / "config.json")
        config = meta["config"] if isinstance(meta, dict) and isinstance(meta.get("config"), dict) else None
    except (OSError, _Damaged):
        config = None
    if config is None:
        damaged.append("config.json")
    try:
        shards = _parse_manifest(_read_json(path / "manifest.json"), None)
    except FileNotFoundError:
        shards = []
    except (OSError, _Damaged):
        shards = []
        damaged.append("manifest.json")
    size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(folder, name))
                size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return {
        "key": path.name,
        "path": str(path),
        "config": config,
        "n_rows": sum(s["rows"] for s in shards),
        "n_shards": len(shards),
        "bytes": size,
        "damaged": damaged,
    }


def _stores(root: Path) -> list[Path]:
    """The directories directly under ``root`` that look like stores (symlinks excluded)."""
    if not root.is_dir():
        return []
    return [
        p
        for p in sorted(root.iterdir())
        if _HEX32.match(p.name)
        and p.is_dir()
        and not p.is_symlink()
        and any(os.path.lexists(p / name) for name in _STORE_FILES)
    ]


def cache_info(cache_dir) -> list[dict]:
    """Describe every store under ``cache_dir``, whatever state its metadata is in.

    Parameters
    ----------
    cache_dir : str or path-like

    Returns
    -------
    list of dict
        One per store: ``key``, ``path``, ``config`` (None when ``config.json`` is unreadable), ``n_rows``
        (committed rows), ``n_shards``, ``bytes`` (regular files only) and ``damaged`` (the names of
        metadata files that cannot be read; the store repairs them when next opened).

    Examples
    --------
    >>> import tempfile
    >>> cache_info(tempfile.mkdtemp())
    []
    """
    return [_store_info(p) for p in _stores(Path(cache_dir).expanduser())]


def clear_cache(cache_dir, key: str | None = None, lock_timeout: float | None = 600.0) -> int:
    """Delete every store under ``cache_dir`` (or only the one with ``key``).

    Only directories directly under ``cache_dir`` that look like stores (a 32-hex-digit name, not a
    symlink, holding ``config.json``, ``manifest.json`` or ``shards``) are removed, whatever their metadata
    holds; ``cache_dir`` itself and anything else in it are left alone, and symlinks are never followed.

    Parameters
    ----------
    cache_dir : str or path-like
    key : str or None, default=None
    lock_timeout : float or None, default=600
        Seconds to wait for a process that holds a store's lock (None waits indefinitely).

    Returns
    -------
    int
        The number of stores removed.

    Raises
    ------
    TimeoutError
        If a store stays locked by another process for ``lock_timeout`` seconds.

    Examples
    --------
    >>> import tempfile
    >>> clear_cache(tempfile.mkdtemp())
    0
    """
    removed = 0
    for store in _stores(Path(cache_dir).expanduser()):
        if key is None or store.name == key:
            _remove_store(store, lock_timeout)
            removed += 1
    return removed
