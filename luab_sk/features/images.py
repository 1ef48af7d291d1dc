"""Loading images from paths, PIL images and uint8 arrays, with errors that name the culprit.

:func:`load_image` is the one image decoder of the package: the feature extractor and the fine-tuner both go
through it, so that an image gives the same pixels for training and for extraction. It decodes an image as
the annotators saw it in a browser (clicks were made on the displayed image):

- the EXIF orientation is applied (a phone photo stored sideways is turned upright, as browsers show it);
  JPEG reduced-scale ("draft") decoding happens first, on the stored image, then the turn;
- 16-bit greyscale (modes ``I;16*``, and ``I``, where Pillow puts 16-bit PNG and TIFF pixels) is scaled to
  8 bits by dividing by 257 (65535 -> 255), values outside ``[0, 65535]`` clipped;
- float images (mode ``F``) holding values within ``[0, 1]`` are scaled by 255, other float images are taken
  on the 0-255 scale (Pillow's convention) and clipped; NaN becomes 0;
- transparency (alpha channels, and ``transparency`` of palette, grey and RGB images) is composited over a
  background, white by default (as on the annotation pages), so hidden colour under transparent pixels
  never shows;
- CMYK, YCbCr, palette, 1-bit and other modes are converted with Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = ["DEFAULT_BACKGROUND", "ImageLoadError", "ImageDataset", "load_image", "describe_item"]

_ON_ERROR = ("raise", "skip")

#: RGB colour behind transparent pixels (the white of the annotation pages).
DEFAULT_BACKGROUND = (255, 255, 255)

_EXIF_ORIENTATION = 0x0112  # 1 upright; 2-8 mirrored and/or turned
_ORIENT = range(1, 9)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageLoadError(OSError):
    """An image could not be read or decoded; the message names the file (or the item)."""


def describe_item(item) -> str:
    """A short human-readable name for an image item (its path, or its type and shape).

    Examples
    --------
    >>> import numpy as np
    >>> describe_item("a/b.jpg"), describe_item(np.zeros((4, 5, 3), np.uint8))
    ("'a/b.jpg'", 'uint8 array of shape (4, 5, 3)')
    """
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, np.ndarray):
        return f"{item.dtype} array of shape {item.shape}"
    if isinstance(item, Image.Image):
        return f"PIL image ({item.mode}, {item.size[0]}x{item.size[1]})"
    return f"{type(item).__name__} object"


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of ``img``; 1 when absent or unreadable (browsers ignore broken EXIF)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value in _ORIENT else 1
    except Exception:  # noqa: BLE001 - malformed EXIF must not make an otherwise good image unreadable
        return 1


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (a no-op for orientation 1).

    :func:`PIL.ImageOps.exif_transpose` also removes the orientation from the result's metadata, so that
    loading a loaded image again does not turn it twice.
    """
    if _orientation(img) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image, background: tuple) -> Image.Image:
    """``img`` as 8-bit RGB, scaled and composited as described in the module docstring."""
    mode, alpha = img.mode, None
    transparency = img.info.get("transparency")
    if mode in _SIXTEEN_BIT or mode == "F":
        values = np.asarray(img).astype(np.float64)
        if mode == "F":
            finite = values[np.isfinite(values)]
            in_unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
            values = np.nan_to_num(values * (255.0 if in_unit else 1.0), nan=0.0, posinf=255.0, neginf=0.0)
        else:
            if isinstance(transparency, (int, np.integer)):  # a tRNS grey value, in 16-bit units
                alpha = np.where(np.asarray(img) == transparency, 0, 255).astype(np.uint8)
            values = values / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        if alpha is not None:
            img.putalpha(Image.fromarray(alpha, mode="L"))
            mode, transparency = "LA", None
        else:
            mode = "L"
    if mode in _ALPHA_MODES or transparency is not None:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _check_background(background) -> tuple:
    try:
        values = tuple(int(v) for v in background)
        ok = len(values) == 3 and all(0 <= v <= 255 and v == c for v, c in zip(values, background))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"background must be an (R, G, B) tuple of ints in [0, 255], got {background!r}.")
    return values


def load_image(item, min_size: int | None = None, *, background=DEFAULT_BACKGROUND) -> Image.Image:
    """Return ``item`` as a fully decoded RGB :class:`PIL.Image.Image`, as a browser would display it.

    Parameters
    ----------
    item : str, path-like, PIL.Image.Image or numpy.ndarray
        A path to an image file; a PIL image (any mode); or a uint8 array of shape (H, W, 3) (RGB) or
        (H, W) (grey, replicated to RGB). Files and PIL images are decoded as described in the module
        docstring: EXIF orientation applied (PIL images keep theirs in their EXIF metadata, which
        :func:`PIL.ImageOps.exif_transpose` removes, so an already-turned image is not turned twice),
        16-bit and float images scaled to 8 bits, transparency composited over ``background``.
    min_size : int or None, default=None
        For JPEG files: decode at the smallest reduced DCT scale (1/2, 1/4 or 1/8, see
        :meth:`PIL.Image.Image.draft`) whose shorter side is still at least ``min_size`` pixels, which
        is several times faster for large photos that are resized down afterwards anyway. None (and
        every other kind of item) decodes at full size. Applied to the stored image, before the EXIF turn.
    background : tuple of 3 int, default=(255, 255, 255)
        RGB colour behind transparent pixels.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, decoded (not lazily backed by an open file).

    Raises
    ------
    ImageLoadError
        If the file (or PIL image) is missing, unreadable, truncated, not an image, or too large to decode
        (Pillow's decompression-bomb guard, ``PIL.Image.MAX_IMAGE_PIXELS``, or out of memory); any failure
        on one item is raised as this error, and the message names the file.
    ValueError
        If an array has the wrong dtype or shape, or ``item`` is of an unsupported type.

    Examples
    --------
    >>> import numpy as np
    >>> load_image(np.zeros((4, 5, 3), np.uint8)).size
    (5, 4)
    >>> from PIL import Image
    >>> load_image(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0))  # transparent: the white background
    (255, 255, 255)
    """
    if min_size is not None and (isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1):
        raise ValueError(f"min_size must be None or a positive int, got {min_size!r}.")
    background = _check_background(background)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            with Image.open(path) as img:
                if min_size is not None and img.format == "JPEG":
                    scale = min_size / min(img.size)  # draft keeps both sides >= the requested ones
                    img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
                img.load()
                return _to_rgb(_upright(img), background)
        except FileNotFoundError as err:
            raise ImageLoadError(f"Image file not found: {str(path)!r}.") from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as err:
            raise ImageLoadError(
                f"Could not read image file {str(path)!r}: too large to decode safely "
                f"({type(err).__name__}: {err}; the limit is PIL.Image.MAX_IMAGE_PIXELS)."
            ) from err
        except Exception as err:  # noqa: BLE001 - any failure on one file is that file's error
            raise ImageLoadError(
                f"Could not read image file {str(path)!r} (corrupt, truncated or not an image): "
                f"{type(err).__name__}: {err}"
            ) from err
    if isinstance(item, Image.Image):
        try:
            return _to_rgb(_upright(item), background)
        except Exception as err:  # noqa: BLE001 - e.g. a lazily opened image whose file is truncated
            raise ImageLoadError(
                f"Could not decode {describe_item(item)}: {type(err).__name__}: {err}"
            ) from err
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"Image arrays must be uint8 (H, W, 3) or (H, W), got dtype {item.dtype}.")
        if item.ndim == 2:
            item = np.repeat(item[:, :, None], 3, axis=2)
        if item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(f"Image arrays must have shape (H, W, 3) or (H, W), got {item.shape}.")
        return Image.fromarray(np.ascontiguousarray(item), mode="RGB")
    raise ValueError(
        f"Unsupported image item of type {type(item).__name__}: "
        "expected a path, a PIL image or a uint8 array."
    )


class ImageDataset(Dataset):
    """A :class:`torch.utils.data.Dataset` over image items, decoding them on access.

    Use it with a :class:`torch.utils.data.DataLoader` so that decoding happens in worker processes.

    Parameters
    ----------
    items : sequence or numpy.ndarray
        Paths, PIL images or uint8 arrays (a uint8 array of shape (n, H, W, 3) is a sequence of images).
        Float tensors are taken as already transformed and returned as they are.
    transform : callable or None, default=None
        Applied to the RGB PIL image (e.g. :meth:`Backbone.eval_transform`). None returns the PIL image.
    on_error : {"raise", "skip"}, default="raise"
        ``"raise"``: an unreadable item raises :class:`ImageLoadError` naming it. ``"skip"``: the item is
        replaced by a black placeholder (passed through ``transform``, so batches keep their shape) and
        flagged as not ok.
    min_size : int or None, default=None
        Passed to :func:`load_image`: JPEG files are decoded at a reduced scale whose shorter side is at
        least ``min_size`` (set it to the size ``transform`` resizes the shorter side to).

    Notes
    -----
    Each ``dataset[i]`` is ``(image, ok)``; ``ok`` is False for a skipped item.

    Examples
    --------
    >>> import numpy as np
    >>> ds = ImageDataset(np.zeros((2, 8, 8, 3), np.uint8))
    >>> img, ok = ds[1]
    >>> img.size, ok, len(ds)
    ((8, 8), True, 2)
    """

    def __init__(
        self,
        items: Sequence,
        transform: Callable | None = None,
        on_error: str = "raise",
        min_size: int | None = None,
    ):
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}.")
        self.items = items
        self.transform = transform
        self.on_error = on_error
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item, True  # already transformed
        try:
            img, ok = load_image(item, self.min_size), True
        except (ImageLoadError, ValueError):
            if self.on_error == "raise":
                raise
            img, ok = Image.new("RGB", (32, 32)), False
        return (self.transform(img) if self.transform is not None else img), ok
