"""Batched JPEG decoding on the GPU (nvJPEG through torchvision), then the eval resize and crop there.

At ImageNet scale the CPU cannot decode JPEGs as fast as one GPU encodes them (100-200 images/s per core
against thousands of images/s for ViT-B/32 on an H100). This module moves decoding and the backbone's eval
resize + centre crop onto the extractor's device:

1. the file bytes are read on the CPU (plain ``readinto`` into a ``bytearray``, no decoding);
2. the JPEG header is inspected (no decoding) and only plain baseline/progressive 3-component YCbCr JPEGs
   without an EXIF rotation go on; everything else falls back *per image* to the CPU loader
   (:class:`~luab_sk.features.images.ImageDataset`, i.e. exactly what the CPU path does for that item);
3. :func:`torchvision.io.decode_jpeg` decodes the batch on ``device`` (one call for the whole batch);
   a batch that fails is retried image by image and the images that still fail go to the CPU loader, so a
   corrupt file is reported (or skipped under ``on_error="skip"``) as on the CPU path and never lost;
4. the torchvision ``Resize`` / ``CenterCrop`` steps of :meth:`Backbone.eval_resize` run on the decoded
   uint8 tensors (antialiased, same interpolation and geometry as the PIL path) and the batch is stacked
   as uint8 ``(B, H, W, 3)`` on the device, ready for :meth:`Backbone.normalize`.

The same pipeline runs with ``device="cpu"`` (libjpeg-turbo in torchvision, tensor resize), which is how
it is tested without a GPU.

Differences from the CPU (PIL) path, all small (cosine >= 0.99 of the features, see the tests and
``benchmarks/gpu_decode.py``): the CPU path decodes large JPEGs at a reduced DCT scale (``draft``) down
to the resize size while this path decodes at full size; nvJPEG's IDCT and chroma upsampling differ from
libjpeg's by a few grey levels; torch's antialiased bicubic differs from PIL's by rounding. Because of these
pixel-level differences the cache key records the decode path (``"decode"`` in the cache config, see
:func:`decode_cache_tag`).

EXIF orientation: :func:`~luab_sk.features.images.load_image` turns images as their EXIF orientation says,
after the draft decode. The tensor path reads the tag from the header and applies the same flip or
quarter turn to the decoded tensor (:func:`apply_orientation`, after the draft-geometry resize), so both
paths give the same upright pixels; an orientation outside 1-8 goes to the CPU loader.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DECODE_DEVICES",
    "TensorDecodeLoader",
    "apply_orientation",
    "decode_cache_tag",
    "inspect_jpeg",
    "jpeg_fallback_reason",
    "probe_decode",
    "resolve_decode_device",
]

DECODE_DEVICES = ("auto", "cpu", "cuda")
_SOF_OK = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every start-of-frame marker
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length


def _exif_orientation(segment: bytes) -> int | None:
    """The orientation tag (0x0112) of IFD0 in an APP1 ``Exif`` segment, None when absent."""
    tiff = segment[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        raise ValueError("bad TIFF byte order")
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        tag, _type = struct.unpack(order + "HH", entry[:4])
        if tag == 0x0112:
            return struct.unpack(order + "H", entry[8:10])[0]
    return None


def jpeg_fallback_reason(data: bytes | bytearray) -> str | None:
    """Why a file should go to the CPU loader instead of the tensor decoder; None when it need not.

    ``inspect_jpeg(data)[0]``.

    Examples
    --------
    >>> jpeg_fallback_reason(b"\\x89PNG\\r\\n\\x1a\\n")
    'not a JPEG'
    """
    return inspect_jpeg(data)[0]


def inspect_jpeg(data: bytes | bytearray) -> tuple[str | None, int]:
    """Whether the tensor path can decode a file, and its EXIF orientation.

    Reads the JPEG markers up to the start of scan (no decoding).

    Parameters
    ----------
    data : bytes
        The whole file.

    Returns
    -------
    reason : str or None
        Why it goes to the CPU loader: ``"not a JPEG"``, ``"unsupported JPEG coding"`` (12-bit, lossless,
        arithmetic, hierarchical), ``"greyscale/CMYK JPEG"`` (not 3 components), ``"RGB-coded JPEG"``
        (Adobe transform 0), ``"EXIF orientation"`` (a value outside 1-8), ``"truncated JPEG"`` (no
        end-of-image marker), or ``"unreadable JPEG header"``; None for a plain YCbCr JPEG.
    orientation : int
        The EXIF orientation (1 when absent).

    Examples
    --------
    >>> inspect_jpeg(b"\\x89PNG\\r\\n\\x1a\\n")
    ('not a JPEG', 1)
    """
    reason, orientation = _inspect(data)
    return reason, 1 if orientation is None else orientation


def _inspect(data):
    if data[:2] != b"\xff\xd8":
        return "not a JPEG", None
    if bytes(data[-4096:]).rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return "truncated JPEG", None
    sof = components = adobe = orientation = precision = None
    i, n = 2, len(data)
    try:
        while i + 4 <= n:
            if data[i] != 0xFF:
                return "unreadable JPEG header", None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _STANDALONE:
                i += 2
                continue
            if marker in (0xD9, 0xDA):  # end of image, start of scan
                break
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            segment = data[i + 4 : i + 2 + length]
            if marker in _SOF_ALL and sof is None:
                sof, precision, components = marker, segment[0], segment[5]
            elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and orientation is None:
                orientation = _exif_orientation(bytes(segment))
            elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
                adobe = segment[11]
            i += 2 + length
    except (struct.error, IndexError, ValueError):
        return "unreadable JPEG header", None
    if sof is None:
        return "unreadable JPEG header", None
    if sof not in _SOF_OK or precision != 8:  # 12-bit JPEGs too
        return "unsupported JPEG coding", orientation
    if components != 3:
        return "greyscale/CMYK JPEG", orientation
    if adobe == 0:
        return "RGB-coded JPEG", orientation
    if orientation is not None and not 1 <= orientation <= 8:
        return "EXIF orientation", orientation
    return None, orientation


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a ``(..., H, W)`` tensor upright as EXIF ``orientation`` says (as ``ImageOps.exif_transpose``).

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(6).reshape(1, 2, 3)
    >>> apply_orientation(x, 6).tolist()  # stored turned left: turn 90 degrees clockwise
    [[[3, 0], [4, 1], [5, 2]]]
    """
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, k=-1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, k=1, dims=(-2, -1))
    return image


def _tiny_jpeg() -> torch.Tensor:
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return encode_jpeg(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=gen), quality=90)


@functools.cache
def probe_decode(device: str) -> str | None:
    """Try :func:`torchvision.io.decode_jpeg` on ``device`` once per process.

    Returns
    -------
    str or None
        None when it works, else the error (e.g. nvJPEG missing from the torchvision build).
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            (out,) = decode_jpeg([_tiny_jpeg()], mode=ImageReadMode.RGB, device=device)
        if tuple(out.shape) != (3, 16, 16) or out.device.type != torch.device(device).type:
            return f"unexpected output {tuple(out.shape)} on {out.device}"
    except Exception as err:  # noqa: BLE001 - nvjpeg/CUDA failures come in many types
        return f"{type(err).__name__}: {err}"
    return None


def resolve_decode_device(decode_device: str, device: torch.device) -> torch.device | None:
    """Where the extractor decodes JPEGs: a CUDA device for the tensor path, or None for the CPU (PIL) path.

    Parameters
    ----------
    decode_device : {"auto", "cpu", "cuda"}
        ``"auto"``: decode on the GPU when the extractor runs on CUDA and torchvision's GPU decoder works
        (probed once; if it fails, a warning and the CPU path). ``"cpu"``: always PIL on the CPU.
        ``"cuda"``: always the GPU (the extractor's CUDA device, else the current one); an error if CUDA
        or the GPU decoder is missing.
    device : torch.device
        The extractor's (resolved) device.

    Returns
    -------
    torch.device or None

    Raises
    ------
    ValueError
        For an unknown ``decode_device``, or ``"cuda"`` without CUDA.
    RuntimeError
        For ``"cuda"`` when the GPU decoder does not work.

    Examples
    --------
    >>> import torch
    >>> resolve_decode_device("auto", torch.device("cpu")) is None
    True
    """
    if decode_device not in DECODE_DEVICES:
        raise ValueError(f"decode_device must be one of {DECODE_DEVICES}, got {decode_device!r}.")
    if decode_device == "cpu" or (decode_device == "auto" and device.type != "cuda"):
        return None
    if not torch.cuda.is_available():
        raise ValueError("decode_device='cuda' was requested but CUDA is not available; use 'auto' or 'cpu'.")
    target = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    error = probe_decode(str(target))
    if error is None:
        return target
    if decode_device == "cuda":
        raise RuntimeError(
            f"decode_device='cuda': torchvision cannot decode JPEGs on {target} ({error}); "
            "use decode_device='cpu' (or 'auto', which falls back with a warning)."
        )
    warnings.warn(
        f"GPU JPEG decoding is not available on {target} ({error}); decoding on the CPU instead.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def decode_cache_tag(decode_on: torch.device | None) -> str:
    """The ``"decode"`` entry of the cache config for a decode device from :func:`resolve_decode_device`.

    The CPU path's tag names the loader's rules (``"upright"``: EXIF orientation applied, 16-bit scaled,
    transparency composited, see :mod:`luab_sk.features.images`); caches written before those rules held
    (tag ``"jpeg-draft"``) are not reused, since their pixels may differ. The GPU path gets its own tag
    because its pixels differ slightly (full-size nvJPEG decode, torch resize).

    Examples
    --------
    >>> decode_cache_tag(None)
    'jpeg-draft+upright'
    """
    return "jpeg-draft+upright" if decode_on is None else f"jpeg-tensor+upright:{decode_on.type}"


@contextlib.contextmanager
def _decoder_warnings():
    """Turn the decoder's warnings into errors, except torchvision 0.29's deprecation of its image codecs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _read_bytes(path) -> bytearray:
    path = Path(path)
    buf = bytearray(path.stat().st_size)
    with open(path, "rb") as fh:
        got = fh.readinto(buf)
    return buf[:got] if got != len(buf) else buf


class TensorDecodeLoader:
    """Batches of uint8 ``(B, H, W, 3)`` pixels decoded and resized on ``device``; per-image CPU fallback.

    Iterating yields ``(pixels, ok)`` like the extractor's CPU loader: ``pixels`` is a uint8 tensor on
    ``device`` (the :meth:`Backbone.eval_resize` output of every image, for :meth:`Backbone.normalize`)
    and ``ok`` a boolean array (False for images the CPU loader skipped under ``on_error="skip"``). A batch
    that contains already-transformed float tensors (items of a torch Dataset) is yielded as a list of
    per-image samples, as the CPU collate does.

    Parameters
    ----------
    dataset : luab_sk.features.images.ImageDataset
        The CPU loader of the same items, with ``transform = Compose([eval_resize, np.asarray])``; its
        ``items`` are read directly when they are paths, and ``dataset[k]`` is the fallback for image k.
    backbone : Backbone
        Gives the resize and crop steps (:meth:`Backbone.eval_resize`).
    device : torch.device or str
        Where to decode and resize (``"cuda"``; ``"cpu"`` runs the same pipeline with libjpeg-turbo).
    batch_size : int

    Attributes
    ----------
    n_tensor_ : int
        Images decoded by the tensor path so far.
    fallbacks_ : collections.Counter
        Images sent to the CPU loader, by reason.
    """

    def __init__(self, dataset, backbone, device, batch_size: int):
        from torchvision import transforms

        self.dataset = dataset
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        resize, _ = backbone.eval_resize()
        steps = list(getattr(resize, "transforms", [resize]))
        supported = (transforms.Resize, transforms.CenterCrop)
        if all(type(s) in supported and getattr(s, "antialias", True) is not False for s in steps):
            self._steps = transforms.Compose(steps)
        else:  # e.g. timm's crop_mode="border": no tensor equivalent here, so every image takes the CPU path
            self._steps = None
            warnings.warn(
                f"The eval transform of {backbone.name!r} ({steps!r}) has no tensor equivalent; "
                "decoding on the CPU instead.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.n_tensor_ = 0
        self.fallbacks_: Counter = Counter()

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        for start in range(0, n, self.batch_size):
            yield self._batch(range(start, min(start + self.batch_size, n)))

    # -- one batch -----------------------------------------------------------------------------------
    def _batch(self, ks):
        items = self.dataset.items
        raw: dict[int, torch.Tensor] = {}
        orientations: dict[int, int] = {}
        for k in ks:
            item = items[k]
            if self._steps is None or not isinstance(item, (str, os.PathLike)):
                continue  # in-memory images: the CPU loader (no decoding needed anyway)
            try:
                data = _read_bytes(item)
            except OSError:
                self.fallbacks_["unreadable file"] += 1
                continue  # the CPU loader reports it (ImageLoadError naming the file)
            reason, orientations[k] = inspect_jpeg(data)
            if reason is not None:
                self.fallbacks_[reason] += 1
                continue
            raw[k] = torch.frombuffer(data, dtype=torch.uint8)
        decoded = self._decode(raw)
        pixels: dict[int, object] = {}
        ok = np.ones(len(ks), dtype=bool)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for j, k in enumerate(ks):
                if k in decoded:
                    upright = apply_orientation(self._draft(decoded[k]), orientations[k])
                    pixels[k] = self._steps(upright).permute(1, 2, 0).contiguous()
                    self.n_tensor_ += 1
                else:
                    pixels[k], ok[j] = self.dataset[k]  # the CPU path, with its on_error semantics
            rows = [pixels[k] for k in ks]
            if any(isinstance(r, torch.Tensor) and r.is_floating_point() for r in rows):
                return [
                    r.cpu().numpy() if isinstance(r, torch.Tensor) and r.dtype == torch.uint8 else r
                    for r in rows
                ], ok
            batch = torch.stack(
                [
                    r if isinstance(r, torch.Tensor) else torch.from_numpy(np.array(r)).to(self.device)
                    for r in rows
                ]
            )
        return batch, ok

    def _draft(self, image: torch.Tensor) -> torch.Tensor:
        """Reproduce the geometry of the CPU path's JPEG draft decoding on a full-size decoded image.

        The CPU path (:func:`~luab_sk.features.images.load_image` with ``min_size``) lets libjpeg decode at
        1/2, 1/4 or 1/8 scale, to ``ceil(W / s) x ceil(H / s)`` pixels, before the eval resize. Resizing to
        that same intermediate size (antialiased bicubic, rounded to uint8 as a decoded image is) makes the
        final resize and crop identical in geometry; without it the two paths' crops differ by up to a
        pixel, which on high-contrast photos moved features to a cosine of 0.979 (0.992 with it).
        """
        min_size = getattr(self.dataset, "min_size", None)
        if min_size is None:
            return image
        height, width = int(image.shape[-2]), int(image.shape[-1])
        scale = min_size / min(width, height)  # as load_image requests, and PIL's draft then picks s
        reduction = min(width // math.ceil(width * scale), height // math.ceil(height * scale))
        s = next(f for f in (8, 4, 2, 1) if reduction >= f)
        if s == 1:
            return image
        size = (-(-height // s), -(-width // s))
        x = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True)
        return x.round_().clamp_(0, 255).to(torch.uint8)[0]

    def _decode(self, raw: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Decode the batch in one call; on failure image by image. Images that fail are left out."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not raw:
            return {}
        keys = list(raw)
        try:
            with _decoder_warnings():  # a decoder warning means a damaged file: retry one by one
                out = decode_jpeg([raw[k] for k in keys], mode=ImageReadMode.RGB, device=self.device)
            return dict(zip(keys, out))
        except Exception:  # noqa: BLE001 - decoder errors are RuntimeErrors or warnings; retried per image
            pass
        result = {}
        for k in keys:
            try:
                with _decoder_warnings():
                    result[k] = decode_jpeg(raw[k], mode=ImageReadMode.RGB, device=self.device)
            except Exception:  # noqa: BLE001 - the CPU loader decides and reports
                self.fallbacks_["decode failure"] += 1
        return result
