"""Loading images from paths, PIL images and uint8 arrays, with errors that name the culprit."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["ImageLoadError", "ImageDataset", "load_image", "describe_item"]

_ON_ERROR = ("raise", "skip")


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


def load_image(item, min_size: int | None = None) -> Image.Image:
    """Return ``item`` as a fully decoded RGB :class:`PIL.Image.Image`.

    Parameters
    ----------
    item : str, path-like, PIL.Image.Image or numpy.ndarray
        A path to an image file; a PIL image (any mode, converted to RGB); or a uint8 array of shape
        (H, W, 3) (RGB) or (H, W) (grey, replicated to RGB).
    min_size : int or None, default=None
        For JPEG files: decode at the smallest reduced DCT scale (1/2, 1/4 or 1/8, see
        :meth:`PIL.Image.Image.draft`) whose shorter side is still at least ``min_size`` pixels, which
        is several times faster for large photos that are resized down afterwards anyway. None (and
        every other kind of item) decodes at full size.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, decoded (not lazily backed by an open file).

    Raises
    ------
    ImageLoadError
        If the file is missing, unreadable, truncated or not an image; the message names the file.
    ValueError
        If an array has the wrong dtype or shape, or ``item`` is of an unsupported type.

    Examples
    --------
    >>> import numpy as np
    >>> load_image(np.zeros((4, 5, 3), np.uint8)).size
    (5, 4)
    """
    if min_size is not None and (isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1):
        raise ValueError(f"min_size must be None or a positive int, got {min_size!r}.")
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            with Image.open(path) as img:
                if min_size is not None and img.format == "JPEG":
                    scale = min_size / min(img.size)  # draft keeps both sides >= the requested ones
                    img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
                img.load()
                return img.convert("RGB")
        except FileNotFoundError as err:
            raise ImageLoadError(f"Image file not found: {str(path)!r}.") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(
                f"Could not read image file {str(path)!r} (corrupt, truncated or not an image): {err}"
            ) from err
    if isinstance(item, Image.Image):
        return item.convert("RGB") if item.mode != "RGB" else item
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
