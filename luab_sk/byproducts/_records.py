"""Record types shared by the ImageNet-AB and COCO-AB readers, and the keyed collection they return."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np

__all__ = [
    "ByproductFormatError",
    "ByproductRecords",
    "COCOABRecord",
    "ImageNetABRecord",
    "ImageNetABTask",
    "ParseError",
    "coco_key",
    "imagenet_key",
]

_EMPTY_TRACE = np.empty((0, 3))
_EMPTY_TRACE.flags.writeable = False
_EMPTY_1D = np.empty(0)
_EMPTY_1D.flags.writeable = False
_EMPTY_2D = np.empty((0, 2))
_EMPTY_2D.flags.writeable = False


class ParseError(NamedTuple):
    """A file (or a record in a file) that could not be parsed: where, and why."""

    path: str
    reason: str


class ByproductFormatError(ValueError):
    """Raised by the readers with ``on_error="raise"`` for a malformed or truncated input.

    Attributes
    ----------
    path : str
        The file (for COCO-AB, the file and the record index) that failed.
    reason : str
        What was wrong with it.
    """

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def check_on_error(on_error):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}.")


# -- strict numbers -------------------------------------------------------------------------------------
# A plain decimal number: ASCII digits only, no underscores ("0_5"), no spaces, no hex, no "inf"/"nan".
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
# Spellings of non-finite values (XML text, JSON strings, or the JSON constants Infinity and NaN): they are
# numbers, but impossible ones, so they make a missing value rather than a malformed record.
_NON_FINITE = re.compile(r"[+-]?(?:inf|infinity|nan)", re.ASCII | re.IGNORECASE)

#: Allowed ranges of byproduct numbers: name -> (test, description).
DOMAINS = {
    "finite": (lambda v: True, "a finite number"),
    "unit": (lambda v: 0.0 <= v <= 1.0, "within [0, 1]"),
    "nonnegative": (lambda v: v >= 0.0, ">= 0"),
    "positive": (lambda v: v > 0.0, "> 0"),
}


class ImpossibleValue(ValueError):
    """A well-formed number that no byproduct can hold (non-finite, or outside its range).

    The readers turn the field into a missing value (NaN) and list the problem in ``errors`` (or raise,
    with ``on_error="raise"``); a malformed number (``"abc"``, ``"0_5"``) makes the whole record malformed.
    """


def strict_number(value, domain="finite"):
    """Parse one byproduct number strictly.

    Parameters
    ----------
    value : str, int or float
        Element text (XML) or a decoded JSON value. Strings must be plain decimal numbers
        (``[+-]digits[.digits][e[+-]digits]``): no underscores, spaces inside, hex or other digits.
        Booleans are not numbers.
    domain : {"finite", "unit", "nonnegative", "positive"}
        The allowed range; every domain requires a finite value.

    Returns
    -------
    float

    Raises
    ------
    ImpossibleValue
        For a non-finite value (``inf``, ``nan``, ``1e999``, JSON ``Infinity``/``NaN``) or one outside
        ``domain``.
    ValueError
        If ``value`` is not a number at all.

    Examples
    --------
    >>> strict_number("0.25", "unit"), strict_number(3)
    (0.25, 3.0)
    >>> strict_number("0_5")
    Traceback (most recent call last):
    ...
    ValueError: '0_5' is not a number
    >>> strict_number("1.7", "unit")
    Traceback (most recent call last):
    ...
    luab_sk.byproducts._records.ImpossibleValue: '1.7' is not within [0, 1]
    """
    if isinstance(value, str):
        text = value.strip()
        if _DECIMAL.fullmatch(text):
            number = float(text)
        elif _NON_FINITE.fullmatch(text):
            raise ImpossibleValue(f"{value!r} is not a finite number")
        else:
            raise ValueError(f"{value!r} is not a number")
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        try:
            number = float(value)
        except OverflowError:  # a huge JSON integer
            raise ImpossibleValue(f"{value!r} is not a finite number") from None
    else:
        raise ValueError(f"{value!r} ({type(value).__name__}) is not a number")
    if not math.isfinite(number):
        raise ImpossibleValue(f"{value!r} is not a finite number")
    test, description = DOMAINS[domain]
    if not test(number):
        raise ImpossibleValue(f"{value!r} is not {description}")
    return number


def summarize_problems(problems, limit=5):
    """One reason string for a file's or record's impossible values (the first ``limit``, then a count)."""
    shown = "; ".join(problems[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"impossible values read as missing: {shown}{more}"


def valid_unit_points(points):
    """Boolean mask of the rows of an ``(n, 2)`` array that are finite points inside ``[0, 1]^2``."""
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    with np.errstate(invalid="ignore"):
        return np.isfinite(points).all(axis=1) & ((points >= 0.0) & (points <= 1.0)).all(axis=1)


def imagenet_key(path_or_key):
    """The ``"wnid/wnid_id"`` key of an ImageNet training image, XML file or key.

    Parameters
    ----------
    path_or_key : str or os.PathLike
        An image path (``.../n01440764/n01440764_10026.JPEG``), an ImageNet-AB XML path, a file name
        (``n01440764_10026.JPEG``) or a key (``n01440764/n01440764_10026``).

    Returns
    -------
    str

    Examples
    --------
    >>> imagenet_key("train/n01440764/n01440764_10026.JPEG")
    'n01440764/n01440764_10026'
    """
    stem = os.path.basename(os.fspath(path_or_key)).split(".", 1)[0]
    wnid, sep, _ = stem.partition("_")
    if not sep or not wnid:
        raise ValueError(f"cannot derive an ImageNet key 'wnid/wnid_id' from {path_or_key!r}.")
    return f"{wnid}/{stem}"


_COCO_ID = re.compile(r"(\d+)(?:\.\w+)?$")


def coco_key(image_id_or_path):
    """The integer ``image_id`` of a COCO image, given the id or a COCO file name.

    Parameters
    ----------
    image_id_or_path : int or str
        ``123``, ``"123"`` or ``"train2014/COCO_train2014_000000000123.jpg"``.

    Returns
    -------
    int

    Examples
    --------
    >>> coco_key("COCO_train2014_000000000123.jpg")
    123
    """
    if isinstance(image_id_or_path, (int, np.integer)):
        return int(image_id_or_path)
    match = _COCO_ID.search(os.path.basename(os.fspath(image_id_or_path)))
    if match is None:
        raise ValueError(f"cannot derive a COCO image_id from {image_id_or_path!r}.")
    return int(match.group(1))


@dataclass(slots=True, eq=False)
class ImageNetABTask:
    """One ``<metadata>`` block of an ImageNet-AB XML: one task (page of images) the image appeared in.

    Times are numbers in milliseconds (``selected_time``, trace and hover times are epoch ms;
    ``estimate_time`` is a duration); absent numeric fields are NaN, absent strings are ``None``.

    Attributes
    ----------
    selected : bool
        Whether the annotator selected the image as showing the class.
    point : tuple of float
        ``(x, y)`` of the first selecting click in ``[0, 1]`` of the displayed image; NaN when absent.
    selected_time : float
        Epoch ms of that click.
    selected_count : float
        How many times the image was (de)selected.
    trace : ndarray of shape (t, 3)
        The mouse trace, columns ``[time_ms, x, y]``, in recorded order; empty for ``None``.
    hover_actions : tuple of str
        ``"enter"`` / ``"leave"`` events over the image.
    hover_times : ndarray of shape (h,)
        Epoch ms of those events.
    hovered_count, estimate_time : float
        Hover count, and ms hovered before selecting (0 in the raw data often means "not measured").
    image_size, original_image_size, image_position : tuple of float
        Displayed ``(width, height)``, original ``(width, height)``, displayed ``(x, y)`` position.
    image_idx, page_idx : float
        Position of the image in the task.
    worker_id, assignment_id, hit_id, imagenet_hit_id : str or None
        Crowd-sourcing identifiers.
    hit_submit_time : float
        Epoch ms of the submission (ISO strings are converted).
    extra : dict
        Any other child element, tag to text.

    Examples
    --------
    >>> task = ImageNetABTask(selected=True, point=(0.3, 0.6), estimate_time=850.0)
    >>> task.selected, task.trace.shape
    (True, (0, 3))
    """

    selected: bool = False
    point: tuple = (np.nan, np.nan)
    selected_time: float = np.nan
    selected_count: float = np.nan
    trace: np.ndarray = field(default_factory=lambda: _EMPTY_TRACE)
    hover_actions: tuple = ()
    hover_times: np.ndarray = field(default_factory=lambda: _EMPTY_1D)
    hovered_count: float = np.nan
    estimate_time: float = np.nan
    image_size: tuple = (np.nan, np.nan)
    original_image_size: tuple = (np.nan, np.nan)
    image_position: tuple = (np.nan, np.nan)
    image_idx: float = np.nan
    page_idx: float = np.nan
    worker_id: str | None = None
    assignment_id: str | None = None
    hit_id: str | None = None
    hit_submit_time: float = np.nan
    imagenet_hit_id: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class ImageNetABRecord:
    """Everything one ImageNet-AB XML holds about one training image.

    Attributes
    ----------
    key : str
        ``"wnid/wnid_id"`` (see :func:`imagenet_key`).
    path : str
        The XML file.
    tasks : tuple of ImageNetABTask
        One per ``<metadata>`` block, in file order.
    size : tuple of float
        ``(width, height)`` from the ILSVRC ``<size>`` element; NaN when absent.
    ilsvrc_boxes : ndarray of shape (m, 4)
        The original ILSVRC ``<object><bndbox>`` boxes ``[xmin, ymin, xmax, ymax]`` in pixels. These are
        not byproducts; they are kept because they are handy for evaluation.
    ilsvrc_names : tuple of str
        The ``<name>`` of each box.

    Examples
    --------
    >>> tasks = (ImageNetABTask(selected=True, point=(0.2, 0.4)), ImageNetABTask(selected=False),
    ...          ImageNetABTask(selected=True, point=(0.4, 0.6)))
    >>> ImageNetABRecord("n01440764/n01440764_18", "n01440764_18.xml", tasks).point.round(3).tolist()
    [0.3, 0.5]
    """

    key: str
    path: str
    tasks: tuple = ()
    size: tuple = (np.nan, np.nan)
    ilsvrc_boxes: np.ndarray = field(default_factory=lambda: np.empty((0, 4)))
    ilsvrc_names: tuple = ()

    @property
    def selected_points(self):
        """ndarray of shape (s, 2): the click point of every selected task.

        Tasks without a usable point are skipped: a missing (NaN), non-finite or out-of-``[0, 1]`` click
        (impossible on the displayed image) counts as missing.
        """
        pts = np.array([t.point for t in self.tasks if t.selected], dtype=float).reshape(-1, 2)
        return pts[valid_unit_points(pts)]

    @property
    def point(self):
        """ndarray of shape (2,): the reference loader's Z, the mean selected click (NaN if none)."""
        pts = self.selected_points
        return pts.mean(axis=0) if len(pts) else np.full(2, np.nan)


@dataclass(slots=True, eq=False)
class COCOABRecord:
    """One COCO-AB annotation session of one image.

    Attributes
    ----------
    image_id : int
        COCO-2014 image id (the key).
    original_image_size, image_size : tuple of float
        Original and displayed ``(width, height)``.
    time_spent : float
        ms spent on the image.
    worker_id, hit_id : str or None
        Crowd-sourcing identifiers.
    page_id : float
        Page of the task.
    action_types : tuple of str
        ``"add"``, ``"move"`` or ``"remove"`` for every icon action, in order.
    icon_types : tuple of str
        COCO class name of the icon of every action.
    points_from, points_to : ndarray of shape (a, 2)
        ``pointFrom`` / ``pointTo`` ``(x, y)`` in ``[0, 1]`` (NaN when absent).
    action_times : ndarray of shape (a,)
        ``timeAt`` of every action, ms.
    category_indices : ndarray of shape (c,)
        ``categoryIndex`` of every category event.
    category_names : tuple of str
    category_times : ndarray of shape (c,)
    category_using_keyboard : ndarray of bool, shape (c,)
    trace : ndarray of shape (t, 3)
        Mouse trace, columns ``[time_ms, x, y]``.
    extra : dict
        Any other top-level field, as decoded from JSON.

    Examples
    --------
    >>> import numpy as np
    >>> rec = COCOABRecord(42, action_types=("add",), icon_types=("dog",), points_to=np.array([[0.5, 0.4]]))
    >>> rec.key, rec.icon_types
    (42, ('dog',))
    """

    image_id: int
    original_image_size: tuple = (np.nan, np.nan)
    image_size: tuple = (np.nan, np.nan)
    time_spent: float = np.nan
    worker_id: str | None = None
    hit_id: str | None = None
    page_id: float = np.nan
    action_types: tuple = ()
    icon_types: tuple = ()
    points_from: np.ndarray = field(default_factory=lambda: _EMPTY_2D)
    points_to: np.ndarray = field(default_factory=lambda: _EMPTY_2D)
    action_times: np.ndarray = field(default_factory=lambda: _EMPTY_1D)
    category_indices: np.ndarray = field(default_factory=lambda: _EMPTY_1D)
    category_names: tuple = ()
    category_times: np.ndarray = field(default_factory=lambda: _EMPTY_1D)
    category_using_keyboard: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    trace: np.ndarray = field(default_factory=lambda: _EMPTY_TRACE)
    extra: dict = field(default_factory=dict)

    @property
    def key(self):
        """int: the ``image_id``."""
        return self.image_id


_FORMATS = {"imagenet_ab": imagenet_key, "coco_ab": coco_key}


class ByproductRecords(Sequence):
    """Per-image byproduct records, in reading order, keyed for alignment with an image list.

    Parameters
    ----------
    records : iterable of ImageNetABRecord or COCOABRecord
        One record per image; keys must be unique.
    fmt : {"imagenet_ab", "coco_ab"}
        Which reader produced them (decides how keys are normalised).
    errors : list of ParseError, default=()
        Inputs that could not be parsed (with ``on_error="skip"``).

    Attributes
    ----------
    format : str
    errors : list of ParseError
    keys : list
        ``"wnid/wnid_id"`` strings (ImageNet-AB) or integer ``image_id`` (COCO-AB), in order.

    Examples
    --------
    >>> recs = ByproductRecords([ImageNetABRecord("n1/n1_1", "a.xml")], fmt="imagenet_ab")
    >>> [r is None for r in recs.align(["x/n1/n1_1.JPEG", "n1_2.JPEG"])]
    [False, True]
    """

    def __init__(self, records: Iterable, fmt: str, errors: Sequence[ParseError] = ()):
        if fmt not in _FORMATS:
            raise ValueError(f"fmt must be one of {sorted(_FORMATS)}; got {fmt!r}.")
        self.format = fmt
        self._records = list(records)
        self.errors = list(errors)
        self._index = {}
        for i, rec in enumerate(self._records):
            if rec.key in self._index:
                raise ValueError(f"duplicate key {rec.key!r} in records {self._index[rec.key]} and {i}.")
            self._index[rec.key] = i

    def __len__(self):
        return len(self._records)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return ByproductRecords(self._records[item], self.format)
        return self._records[item]

    def __repr__(self):
        return f"ByproductRecords(format={self.format!r}, n_records={len(self)}, n_errors={len(self.errors)})"

    @property
    def keys(self):
        """list: the key of every record, in order."""
        return [rec.key for rec in self._records]

    def normalize_key(self, key):
        """Turn an image path, file name, id or key into this collection's key type."""
        return _FORMATS[self.format](key)

    def get(self, key, default=None):
        """The record for ``key`` (normalised with :meth:`normalize_key`), or ``default``."""
        i = self._index.get(self.normalize_key(key))
        return default if i is None else self._records[i]

    def align(self, keys):
        """Records in the order of ``keys``, with None where an image has no record (a missing Z row).

        Parameters
        ----------
        keys : iterable
            Image paths, file names, ids or keys (see :func:`imagenet_key`, :func:`coco_key`).

        Returns
        -------
        list of record or None
        """
        return [self.get(k) for k in keys]

    def to_dataframe(self):
        """A tidy pandas DataFrame: one row per (image, task) for ImageNet-AB, per image for COCO-AB.

        Scalar fields become columns (pairs are split into ``_x``/``_y`` or ``_width``/``_height``), arrays
        stay as object columns. Needs pandas.

        Returns
        -------
        pandas.DataFrame
        """
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("ByproductRecords.to_dataframe needs pandas: pip install pandas") from exc
        rows = []
        for rec in self._records:
            if self.format == "imagenet_ab":
                base = {"key": rec.key, "path": rec.path}
                for i, task in enumerate(rec.tasks):
                    rows.append({**base, "task": i, **_flatten(task)})
            else:
                rows.append(_flatten(rec))
        return pd.DataFrame(rows)


_PAIR_NAMES = {"point": ("x", "y"), "image_position": ("x", "y")}


def _flatten(obj):
    row = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == "extra":
            row.update(value)
        elif isinstance(value, tuple) and len(value) == 2 and f.name.endswith(("size", "point", "position")):
            a, b = _PAIR_NAMES.get(f.name, ("width", "height"))
            row[f"{f.name}_{a}"], row[f"{f.name}_{b}"] = value
        else:
            row[f.name] = value
    return row
