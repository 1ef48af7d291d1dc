"""Scale out on Ray: feature extraction, grid searches and byproduct reading on a cluster.

Everything here needs Ray (``pip install 'luab_sk[ray]'``, which installs ``ray[data]==2.60.0``); the rest of
luab_sk never imports it. ``address=None`` connects to the cluster named by ``RAY_ADDRESS`` (or an already
initialised one) and otherwise starts a local one; ``address="auto"`` joins the cluster of this node.

**Extraction.** :func:`extract_with_ray` encodes images with a :class:`~luab_sk.features.FeatureExtractor`
on a pool of Ray actors (Ray Data ``map_batches`` with a callable class: each actor loads the backbone once)
and returns the same arrays, bit for bit on the CPU and in input order, as ``extractor.transform(images)``::

    from luab_sk.distributed import extract_with_ray
    fe = FeatureExtractor(cache_dir="/shared/cache", on_error="skip")
    X = extract_with_ray(paths, fe, address="auto", num_actors=8, num_gpus_per_actor=1)
    fe.failed_, fe.n_encoded_, fe.n_cached_   # as after fe.transform(paths)

The results travel through the embedding cache, so ``cache_dir`` (and the image paths) must be visible under
the same path on every node (a shared filesystem). Each actor writes its own shards there without any file
lock, plus a small ``<shard>.entry.json`` receipt; only the driver lists shards in the manifest (one writer,
under a lock local to the driver's node). Killing an actor, a node or the driver loses at most the chunks in
flight: a rerun adopts the receipts of finished chunks whose results the driver never saw and computes only
the missing rows.

**Grid search on a cluster.** scikit-learn's joblib tasks run on Ray with the backend that Ray registers::

    from luab_sk.distributed import ray_parallel, shared_array
    with ray_parallel():   # = ray.init + ray.util.joblib.register_ray() + joblib.parallel_config("ray")
        GridSearchCV(LUABClassifier(), {"byproduct_weight": [0, 0.3, 1, 3]}, n_jobs=-1).fit(
            shared_array(X), y, Z=Z)

Z is sliced per fold exactly as with ``n_jobs=1``: ``cv_results_`` are identical to an ``n_jobs=1`` run with
the workers' torch thread count (1 by default; another thread count changes float reductions, so L-BFGS may
stop elsewhere: mean test scores moved by up to 7e-3 on a 2000 x 256 problem). Under the Ray backend joblib
does not memory-map large arguments: each batch of tasks carries its own pickled copy of X (a memory-mapped X
arrives as an in-memory copy). :func:`shared_array` wraps X so that every task carries only a reference: a
memory map from the cache is reopened as a memory map from its file (when the path exists on the worker's
node), any other array is put into Ray's object store once and read zero-copy by every task of a node. On
GPU nodes give each task a GPU and let the estimator use it: ``ray_parallel(ray_remote_args={"num_gpus": 1})``
with ``LUABClassifier(device="cuda")``. Ray starts each pool worker with ``OMP_NUM_THREADS`` equal to its
``num_cpus`` (1 by default), so torch uses as many threads as the CPUs Ray gives the task and does not
oversubscribe a node; ``ray_parallel(ray_remote_args={"num_cpus": 4})`` gives each fit 4 threads.

**Byproducts.** ``read_imagenet_ab(folder, n_jobs=-1)`` inside ``ray_parallel()`` parses its chunks of XML
files as Ray tasks (the folder must be visible to every node; pass an explicit ``n_jobs``: with
``n_jobs=None`` the reader parses in-process).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

__all__ = ["extract_with_ray", "init_ray", "ray_parallel", "shared_array"]

_INSTALL = "pip install 'luab_sk[ray]'"
_RECEIPT = re.compile(r"([0-9a-f]{32})\.entry\.json\Z")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"luab_sk.distributed needs Ray with Ray Data: {_INSTALL} (installs ray[data]==2.60.0)."
        ) from err
    return ray


def init_ray(address: str | None = None, **init_kwargs):
    """Connect to a Ray cluster (or start a local one) unless Ray is already initialised.

    Parameters
    ----------
    address : str or None, default=None
        ``None``: the cluster in ``RAY_ADDRESS``, else a new local one; ``"auto"``: the cluster this node
        belongs to; ``"ray://host:10001"`` or ``"host:6379"``: that cluster.
    **init_kwargs
        Passed to :func:`ray.init` (e.g. ``num_cpus=2, include_dashboard=False``).

    Returns
    -------
    module
        The ``ray`` module.
    """
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address, **init_kwargs)
    return ray


# ------------------------------------------------------------------------------------------------------------
# Distributed extraction
# ------------------------------------------------------------------------------------------------------------
def _actor_device(extractor, num_gpus_per_actor: float) -> str:
    """The device string actors use: "auto" becomes "cuda" when they get GPUs and "cpu" otherwise."""
    if extractor.device == "auto":
        return "cuda" if num_gpus_per_actor > 0 else "cpu"
    return extractor.device


def _plan(extractor, device: str) -> dict:
    """What ``extractor.transform`` would use on ``device``: the cache config, precision, projection, shapes.

    Runs where the actors will run (it resolves precision and the decode path on that device).
    """
    from ._utils import resolve_device
    from .features.extractor import _shared_backbone

    fe = extractor
    dev = resolve_device(device)
    precision = fe._precision(dev)
    pretrained = None if fe.pretrained is None else str(fe.pretrained)
    backbone = _shared_backbone(fe.backbone, pretrained, fe.layer)
    projection = fe._projection(backbone)
    return {
        "config": fe._store_config(backbone, projection, dev, precision),
        "precision": precision,
        "projection": projection,
        "grid": tuple(backbone.grid),
        "pooled_dim": int(backbone.pooled_dim),
        "token_dim": int(backbone.token_dim if projection is None else fe.token_dim),
    }


class _ExtractActor:
    """Ray Data callable class: loads the backbone once, then encodes chunks and writes their shards."""

    def __init__(self, params, cache_dir, plan, outputs, items=None, threads=1, sabotage=None):
        import torch

        from ._utils import resolve_device
        from .features.cache import EmbeddingCache
        from .features.extractor import FeatureExtractor, _shared_backbone

        torch.set_num_threads(max(1, int(threads)))
        self.fe = FeatureExtractor(**params)
        if items is not None and type(items).__name__ == "ObjectRef":
            import ray

            items = ray.get(items)
        self.items = items
        mine = _plan(self.fe, self.fe.device)
        if json.dumps(mine["config"], sort_keys=True) != json.dumps(plan["config"], sort_keys=True):
            raise RuntimeError(
                "This Ray worker would encode images differently from what the driver planned (cache config "
                f"{mine['config']} here, {plan['config']} on the driver): give every node the same library "
                "versions and device kind, or set precision= explicitly."
            )
        self.device = resolve_device(self.fe.device)
        self.precision = plan["precision"]
        self.projection = plan["projection"]
        pretrained = None if self.fe.pretrained is None else str(self.fe.pretrained)
        self.backbone = _shared_backbone(self.fe.backbone, pretrained, self.fe.layer)
        self.cache = EmbeddingCache(cache_dir, plan["config"], outputs)
        self.outputs = tuple(outputs)
        self.sabotage = sabotage or {}
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        entries, encoded, failures = [], [], []
        for task in batch["task"]:
            entry, n, failed = self._run(json.loads(str(task)))
            entries.append("" if entry is None else json.dumps(entry))
            encoded.append(n)
            failures.append(json.dumps(failed))
        return {"entry": np.array(entries), "n_encoded": np.array(encoded), "failed": np.array(failures)}

    def _run(self, task: dict):
        self.calls += 1
        if self.sabotage.get("after") is not None and self.calls > self.sabotage["after"]:
            if self.sabotage.get("how") == "exit":
                os._exit(1)  # a crashed worker process
            if self.sabotage.get("how") == "sleep":
                time.sleep(3600)  # hangs until the driver is killed
            raise RuntimeError("sabotaged extraction worker (test)")
        pos = task["pos"]
        items = task["paths"] if task["paths"] is not None else [self.items[p] for p in pos]
        rows: list[int] = []
        parts: dict[str, list] = {k: [] for k in self.outputs}

        def sink(local, arrays):
            rows.extend(local)
            for k, a in arrays.items():
                parts[k].append(a)

        failed: dict[int, tuple] = {}
        n = self.fe._encode(
            self.backbone,
            items,
            list(range(len(items))),
            device=self.device,
            precision=self.precision,
            projection=self.projection,
            sink=sink,
            failed=failed,
        )
        entry = None
        if rows:
            arrays = {k: np.concatenate(parts[k]) for k in self.outputs}
            entry = self.cache.write_shard_files([task["ids"][r] for r in rows], arrays)
            receipt = self.cache.path / "shards" / f"{entry['id']}.entry.json"
            _write_receipt(receipt, entry)
        return entry, int(n), [[pos[p], msg] for p, (_, _, msg) in failed.items()]


def _write_receipt(path: Path, entry: dict) -> None:
    from ._io import atomic_write

    atomic_write(path, lambda fh: fh.write(json.dumps(entry).encode()))


def _adopt_receipts(cache) -> int:
    """Commit the shards of receipts left by actors whose results the driver never received; returns rows."""
    adopted, stale = [], []
    shards = cache.path / "shards"
    for path in shards.iterdir():
        if not _RECEIPT.match(path.name) or path.is_symlink() or not path.is_file():
            continue
        try:
            entry = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(entry, dict) or entry.get("id") != path.name[:32]:
                raise ValueError("receipt does not name its own shard")
            adopted.append(entry)
        except (OSError, ValueError):
            pass
        stale.append(path)
    rows = 0
    for entry in adopted:  # one by one: a bad receipt must not block the good ones
        try:
            if cache.commit_shards([entry], verify=True):
                rows += entry["rows"]
        except ValueError:
            continue
    for path in stale:
        path.unlink(missing_ok=True)
    return rows


def _chunks(todo: list[int], rows_per_task: int) -> list[list[int]]:
    return [todo[i : i + rows_per_task] for i in range(0, len(todo), rows_per_task)]


def _root_cause(err: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kind):
            return err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def extract_with_ray(
    images,
    extractor,
    *,
    address: str | None = None,
    num_actors: int | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    batch_size: int | None = None,
    num_workers: int | None = None,
    rows_per_task: int | None = None,
    progress: bool = True,
    _sabotage: dict | None = None,
):
    """Encode ``images`` like ``extractor.transform(images)``, on a pool of Ray actors.

    Parameters
    ----------
    images : sequence, numpy.ndarray or torch.utils.data.Dataset
        What :meth:`FeatureExtractor.transform` accepts. Paths travel to the actors as strings (made
        absolute: they must exist under the same path on every node); other items are put once into Ray's
        object store.
    extractor : FeatureExtractor
        Its parameters define the encoding; ``cache_dir`` is required and must be shared by all nodes.
        Like ``transform``, this sets its fitted attributes (``failed_``, ``n_encoded_``, ``n_cached_``,
        ``cache_key_``, ``grid_``, ...); ``n_encoded_`` counts the images the actors ran through the backbone.
    address : str or None, default=None
        The cluster, see :func:`init_ray` (ignored when Ray is already initialised).
    num_actors : int or None, default=None
        Actors in the pool; None: as many as the cluster's GPUs (or CPUs) allow, and no more than chunks.
    num_cpus_per_actor : float, default=1
        CPUs reserved per actor; torch uses that many threads in it.
    num_gpus_per_actor : float, default=0
        GPUs per actor; with GPUs, ``device="auto"`` runs the backbone on the actor's GPU.
    batch_size : int or None, default=None
        Forward batch size (None: ``extractor.batch_size``).
    num_workers : int or None, default=None
        DataLoader decode processes inside each actor (None: ``extractor.num_workers``; 0 decodes in a
        background thread). Reserve CPUs for them with ``num_cpus_per_actor``.
    rows_per_task : int or None, default=None
        Images per Ray task, which is also the shard size and what a kill can lose; a multiple of the batch
        size (so that batches, hence results, are those of a local run). None: up to ``shard_size``, small
        enough to give every actor several tasks.
    progress : bool, default=True
        A tqdm progress bar on the driver (Ray Data's own bars are turned off).

    Returns
    -------
    numpy.ndarray or dict
        As :meth:`FeatureExtractor.transform` returns.

    Raises
    ------
    ValueError
        If ``extractor.cache_dir`` is None, or a setting is out of range.
    ImportError
        If Ray is not installed.
    """
    from tqdm.auto import tqdm

    from .features.cache import EmbeddingCache
    from .features.extractor import _Items

    ray = _import_ray()
    fe = extractor
    fe._validate_params()  # what transform checks (sklearn's parameter constraints)
    if fe.cache_dir is None:
        raise ValueError(
            "extract_with_ray writes its results through the embedding cache: set the extractor's cache_dir "
            "to a directory that every Ray node sees under the same path."
        )
    for name, value, low in (
        ("num_actors", num_actors, 1),
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("rows_per_task", rows_per_task, 1),
    ):
        bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
        if value is not None and bad:
            raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}.")
    if num_cpus_per_actor < 0 or num_gpus_per_actor < 0:
        raise ValueError("num_cpus_per_actor and num_gpus_per_actor must be >= 0.")
    items = _Items(images)
    init_ray(address)

    batch = int(batch_size or fe.batch_size)
    params = fe.get_params(deep=False)
    params.update(
        cache_dir=str(Path(fe.cache_dir).expanduser().absolute()),
        device=_actor_device(fe, num_gpus_per_actor),
        batch_size=batch,
        num_workers=fe.num_workers if num_workers is None else int(num_workers),
        verbose=0,
    )
    if num_gpus_per_actor > 0 and params["device"].startswith("cuda"):
        # resolve precision and the decode path on a GPU node, where the actors will run
        probe = ray.remote(num_gpus=num_gpus_per_actor, num_cpus=num_cpus_per_actor)(_plan)
        plan = ray.get(probe.remote(type(fe)(**params), params["device"]))
    else:
        plan = _plan(type(fe)(**params), params["device"])
    fe.grid_, fe.pooled_dim_, fe.token_dim_ = plan["grid"], plan["pooled_dim"], plan["token_dim"]
    fe.projection_ = plan["projection"]

    outputs = fe._outputs()
    layout = {k: (a.dtype, a.shape[1:]) for k, a in fe._nan_rows(0).items()}  # as transform checks shards
    timeout = getattr(fe, "cache_lock_timeout", 600.0)
    cache = EmbeddingCache(params["cache_dir"], plan["config"], outputs, lock_timeout=timeout, layout=layout)
    fe.cache_key_ = cache.key
    if plan["projection"] is not None:
        cache.write_projection(plan["projection"])

    failed: dict[int, tuple] = {}
    ids = fe._image_ids(items, failed)
    _adopt_receipts(cache)  # work finished by a previous, interrupted run
    found, missing = cache.lookup_missing(ids)
    todo = sorted(missing.values())

    n_encoded = 0
    if todo:
        n_encoded = _run_pool(
            ray, tqdm, items, ids, todo, fe, params, plan, outputs, cache, failed,
            num_actors=num_actors, num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor,
            rows_per_task=rows_per_task, progress=progress, sabotage=_sabotage,
        )  # fmt: skip

    fe.n_encoded_ = n_encoded
    fe.n_cached_ = sum(ident is not None and ident in found for ident in ids)
    rows = fe._served_rows(cache, items, ids, missing, failed)
    fe.failed_ = [failed[p] for p in sorted(failed)]
    return rows if fe.output == "both" else rows[fe.output]


def _run_pool(ray, tqdm, items, ids, todo, fe, params, plan, outputs, cache, failed, *, num_actors,
              num_cpus, num_gpus, rows_per_task, progress, sabotage):  # fmt: skip
    """Run the todo positions through the actor pool, committing shards as results arrive."""
    from .features.images import ImageLoadError, load_image

    batch = params["batch_size"]
    resources = ray.cluster_resources()
    if num_actors is None:
        if num_gpus > 0:
            num_actors = max(1, int(resources.get("GPU", 0) // num_gpus))
        else:
            num_actors = max(1, int(resources.get("CPU", 1) // max(num_cpus, 1e-9)))
    if rows_per_task is None:
        per_actor = math.ceil(len(todo) / (num_actors * 4))  # several tasks per actor balance the load
        rows_per_task = max(1, min(fe.shard_size, per_actor))
    rows_per_task = max(batch, rows_per_task // batch * batch)
    chunks = _chunks(todo, rows_per_task)
    num_actors = max(1, min(num_actors, len(chunks)))

    path_mode = all(isinstance(items[p], (str, os.PathLike)) for p in todo)
    tasks = []
    for chunk in chunks:
        paths = [str(Path(items[p]).expanduser().absolute()) for p in chunk] if path_mode else None
        tasks.append({"task": json.dumps({"pos": chunk, "ids": [ids[p] for p in chunk], "paths": paths})})
    shared_items = None if path_mode else ray.put(items)

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(
        _ExtractActor,
        fn_constructor_kwargs={
            "params": params,
            "cache_dir": params["cache_dir"],
            "plan": plan,
            "outputs": outputs,
            "items": shared_items,
            "threads": max(1, int(round(num_cpus))),
            "sabotage": sabotage,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
    )
    pending: list[dict] = []
    n_encoded, last_commit = 0, time.monotonic()
    try:
        with tqdm(total=len(todo), unit="img", disable=not progress, desc="encoding on ray") as bar:
            for row in ds.iter_rows():
                if row["entry"]:
                    pending.append(json.loads(str(row["entry"])))
                n_encoded += int(row["n_encoded"])
                for pos, message in json.loads(str(row["failed"])):
                    failed[pos] = _failure(items, pos, message, load_image, ImageLoadError)
                bar.update(int(row["n_encoded"]))
                if time.monotonic() - last_commit > 2.0:
                    _commit(cache, pending)
                    last_commit = time.monotonic()
    except Exception as err:
        cause = _root_cause(err, ImageLoadError)
        if cause is not None and fe.on_error == "raise":
            raise ImageLoadError(str(cause)) from err
        raise
    finally:
        _commit(cache, pending)
        _adopt_receipts(cache)
    return n_encoded


def _failure(items, pos, message, load_image, error_types):
    """The local ``failed_`` entry: the message the driver gets from the image, else the actor's."""
    from .features.images import describe_item

    item = items[pos]
    try:
        load_image(item)
    except (error_types, ValueError) as err:
        message = str(err)
    except Exception:  # noqa: BLE001 - keep the actor's message
        pass
    return (int(pos), describe_item(item), message)


def _commit(cache, pending: list[dict]) -> None:
    if not pending:
        return
    cache.commit_shards(pending)
    for entry in pending:
        (cache.path / "shards" / f"{entry['id']}.entry.json").unlink(missing_ok=True)
    pending.clear()


# ------------------------------------------------------------------------------------------------------------
# joblib on Ray: grid searches and byproduct reading
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_parallel(address: str | None = None, *, n_jobs: int | None = -1, ray_remote_args: dict | None = None,
                 **init_kwargs):  # fmt: skip
    """Run joblib (and hence scikit-learn's ``n_jobs``) on Ray inside the ``with`` block.

    ``init_ray(address)`` + ``ray.util.joblib.register_ray()`` + ``joblib.parallel_config(backend="ray",
    n_jobs=n_jobs, ray_remote_args=ray_remote_args)``.

    Parameters
    ----------
    address : str or None, default=None
        See :func:`init_ray`.
    n_jobs : int or None, default=-1
        Default ``n_jobs`` of joblib calls that leave it unset (-1: all the cluster's CPUs).
    ray_remote_args : dict or None, default=None
        Resources of each pool worker, e.g. ``{"num_gpus": 1}`` (with ``device="cuda"`` estimators) or
        ``{"num_cpus": 4}`` (torch then uses 4 threads per fit).
    **init_kwargs
        Passed to :func:`ray.init` when it starts Ray.

    Examples
    --------
    >>> with ray_parallel(num_cpus=2):  # doctest: +SKIP
    ...     GridSearchCV(LUABClassifier(), grid, n_jobs=2).fit(shared_array(X), y, Z=Z)
    """
    import joblib

    init_ray(address, **init_kwargs)
    from ray.util.joblib import register_ray

    register_ray()
    config = {"backend": "ray", "n_jobs": n_jobs}
    if ray_remote_args is not None:
        config["ray_remote_args"] = ray_remote_args
    with joblib.parallel_config(**config):
        yield


def _from_object_store(ref):
    import ray

    return ray.get(ref)


def _from_memmap(filename, dtype, shape, offset):
    return np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape), order="C")


class _SharedArray(np.ndarray):
    """An array that pickles as a reference (object store, or memory-mapped file) instead of its bytes."""

    def __array_finalize__(self, obj):
        self._luab_source = None  # views and copies made from it pickle normally

    def __reduce_ex__(self, protocol):
        if self._luab_source is None:
            return np.asarray(self).__reduce_ex__(protocol)
        return self._luab_source

    def __reduce__(self):
        return self.__reduce_ex__(2)


def _memmap_source(X: np.ndarray):
    """``(filename, dtype, shape, offset)`` of a C-contiguous view of a read-only file memory map, or None."""
    root = X
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root, np.memmap) or getattr(root, "filename", None) is None:
        return None
    if not X.flags.c_contiguous or root.mode not in ("r", "c") and root.mode != "readonly":
        return None
    delta = X.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return (str(root.filename), X.dtype.str, X.shape, int(root.offset) + int(delta))


def shared_array(X, mode: str = "auto"):
    """Wrap X so that joblib tasks on Ray carry a reference to it rather than a copy.

    Parameters
    ----------
    X : numpy.ndarray
        E.g. features from :func:`extract_with_ray` or ``FeatureExtractor.transform`` (a read-only memory
        map when they come from one cache shard).
    mode : {"auto", "memmap", "object_store"}, default="auto"
        ``"memmap"``: tasks reopen X's file as a read-only memory map (X must be a C-contiguous view of a
        file memory map, and the file must exist under the same path on every node: a shared cache_dir).
        ``"object_store"``: X is put into Ray's object store once; tasks read it zero-copy (one copy per
        node). ``"auto"``: "memmap" when X is such a view, else "object_store".

    Returns
    -------
    numpy.ndarray
        A view of X (an ndarray subclass) that behaves as X on this machine; views and copies made from it
        are ordinary arrays. Pickling it outside Ray (``"object_store"`` mode) needs a running Ray.
    """
    if not isinstance(X, np.ndarray):
        X = np.asarray(X)
    if mode not in ("auto", "memmap", "object_store"):
        raise ValueError(f"mode must be 'auto', 'memmap' or 'object_store', got {mode!r}.")
    source = _memmap_source(X) if mode != "object_store" else None
    if mode == "memmap" and source is None:
        raise ValueError("mode='memmap' needs a C-contiguous view of a read-only file memory map.")
    if source is not None:
        rebuild = (_from_memmap, source)
    else:
        ray = init_ray()
        rebuild = (_from_object_store, (ray.put(np.ascontiguousarray(X)),))
    out = X.view(_SharedArray)
    out._luab_source = rebuild
    return out
