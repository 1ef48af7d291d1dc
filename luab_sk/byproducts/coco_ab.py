"""Stream COCO-AB annotation byproducts (one large JSON list of per-image records) into records.

The real file is about 400 MB. It is read incrementally: the top-level list is decoded one record at a
time with the standard library's C-accelerated ``json.JSONDecoder.raw_decode`` over a sliding text buffer, so
memory stays bounded by the buffer (``chunk_chars``) plus one record, whatever the file size.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings

import numpy as np

from ._records import (
    ByproductFormatError,
    ByproductRecords,
    COCOABRecord,
    ParseError,
    check_on_error,
    coco_key,
)

__all__ = ["iter_coco_ab", "read_coco_ab"]

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_TAIL = frozenset("0123456789.eE+-")
_KNOWN = {
    "image_id", "originalImageWidth", "originalImageHeight", "imageWidth", "imageHeight", "timeSpent",
    "worker_id", "hit_id", "page_id", "actionHistories", "categoryHistories", "mouseTracking",
}  # fmt: skip


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _StreamError(Exception):
    """The JSON text itself is broken (not one record): reading cannot go on."""

    def __init__(self, offset, reason):
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def _iter_json_list(f, chunk_chars, max_item_chars):
    """Yield ``(index, offset, value)`` for each item of the JSON list in text file ``f``, reading lazily."""
    raw_decode = json.JSONDecoder().raw_decode
    buf, pos, base, eof = "", 0, 0, False
    state = "open"  # expecting: "open" '[', "first" item or ']', "item" item, "sep" ',' or ']'
    index = 0
    while True:
        pos = _WHITESPACE.match(buf, pos).end()
        if pos >= len(buf) and not eof:
            base += pos
            buf, pos = f.read(chunk_chars), 0
            eof = not buf
            continue
        if pos >= len(buf):
            what = "empty file" if state == "open" else "file ends before the list is closed (truncated?)"
            raise _StreamError(base + pos, what)
        char = buf[pos]
        if state == "open":
            if char != "[":
                raise _StreamError(base + pos, f"the top level must be a JSON list, found {char!r}")
            pos, state = pos + 1, "first"
        elif state == "sep" or (state == "first" and char == "]"):
            if char == "]":
                return
            if char != ",":
                raise _StreamError(base + pos, f"expected ',' or ']' between records, found {char!r}")
            pos, state = pos + 1, "item"
        else:
            try:
                value, end = raw_decode(buf, pos)
                # Trust the value once the next token is in the buffer, and is not the rest of a number
                # cut by the buffer's end ("0." then "5", "1e" then "-3").
                nxt = _WHITESPACE.match(buf, end).end()
                cut_number = nxt == end < len(buf) and buf[end] in _NUMBER_TAIL and _is_number(value)
                complete = eof or (nxt < len(buf) and not cut_number)
            except json.JSONDecodeError as exc:
                if eof:
                    reason = f"record {index} is truncated or malformed: {exc.msg}"
                    raise _StreamError(base + exc.pos, reason) from None
                complete = False
            if not complete:
                if len(buf) - pos > max_item_chars:
                    raise _StreamError(
                        base + pos, f"record {index} is malformed or longer than {max_item_chars} characters"
                    )
                more = f.read(max(chunk_chars, len(buf) - pos))  # doubling: no quadratic re-decoding
                buf, base, pos = buf[pos:] + more, base + pos, 0
                eof = not more
                continue
            yield index, base + pos, value
            index += 1
            pos, state = end, "sep"


def _float(value):
    return math.nan if value is None else float(value)


def _point(value):
    if value is None:
        return (math.nan, math.nan)
    return (_float(value["x"]), _float(value["y"]))


def _name(value):
    """Intern repeated names (action and class names): one string object each, not one per record."""
    return sys.intern(value) if isinstance(value, str) else value


def _size(obj, width, height):
    return (_float(obj.get(width)), _float(obj.get(height)))


def _record(obj, traces):
    """Turn one decoded JSON object into a COCOABRecord (KeyError/TypeError/ValueError when malformed)."""
    if not isinstance(obj, dict):
        raise TypeError(f"a record must be a JSON object, found {type(obj).__name__}")
    if "image_id" not in obj:
        raise KeyError("image_id")
    actions = obj.get("actionHistories") or ()
    categories = obj.get("categoryHistories") or ()
    rec = COCOABRecord(
        image_id=coco_key(obj["image_id"]),
        original_image_size=_size(obj, "originalImageWidth", "originalImageHeight"),
        image_size=_size(obj, "imageWidth", "imageHeight"),
        time_spent=_float(obj.get("timeSpent")),
        worker_id=obj.get("worker_id"),
        hit_id=obj.get("hit_id"),
        page_id=_float(obj.get("page_id")),
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )
    if actions:
        rec.action_types = tuple(_name(a["actionType"]) for a in actions)
        rec.icon_types = tuple(_name(a.get("iconType")) for a in actions)
        rec.points_from = np.array([_point(a.get("pointFrom")) for a in actions], dtype=np.float64)
        rec.points_to = np.array([_point(a.get("pointTo")) for a in actions], dtype=np.float64)
        rec.action_times = np.array([_float(a.get("timeAt")) for a in actions], dtype=np.float64)
    if categories:
        rec.category_indices = np.array([_float(c.get("categoryIndex")) for c in categories])
        rec.category_names = tuple(_name(c.get("categoryName")) for c in categories)
        rec.category_times = np.array([_float(c.get("timeAt")) for c in categories])
        rec.category_using_keyboard = np.array([bool(c.get("usingKeyboard")) for c in categories])
    tracking = obj.get("mouseTracking") or ()
    if traces and tracking:
        rec.trace = np.array([(_float(m.get("timeAt")), _float(m["x"]), _float(m["y"])) for m in tracking])
    return rec


def iter_coco_ab(path, image_ids=None, *, on_error="raise", errors=None, traces=True, chunk_chars=1 << 20):
    """Stream the records of a COCO-AB JSON file, one at a time, in bounded memory.

    Parameters
    ----------
    path : str or os.PathLike
        The COCO-AB JSON file (a list of per-image records).
    image_ids : iterable, optional
        Only yield these images (ids, or COCO file names, see :func:`coco_key`); the rest are decoded and
        skipped.
    on_error : {"raise", "skip"}, default="raise"
        A malformed record (not an object, no ``image_id``, a non-numeric point, a duplicate ``image_id``)
        raises :class:`ByproductFormatError`, or is skipped and appended to ``errors``. Broken JSON text
        (including a truncated file) ends the stream after the last good record: raised, or appended.
    errors : list, optional
        Where ``on_error="skip"`` appends :class:`ParseError` entries (``path`` reads
        ``"<file> [record i]"`` or ``"<file> [char offset]"``). When None, each skipped problem is reported
        with a :class:`UserWarning` instead.
    traces : bool, default=True
        Build mouse-trace arrays (set False to save time and memory).
    chunk_chars : int, default=1048576
        Characters read at a time.

    Yields
    ------
    COCOABRecord

    Examples
    --------
    >>> import os, tempfile
    >>> from luab_sk.datasets.imagenet_ab_like import make_coco_ab_like
    >>> truth = make_coco_ab_like(os.path.join(tempfile.mkdtemp(), "ab.json"), n_images=5, random_state=0)
    >>> [rec.image_id for rec in iter_coco_ab(truth.path)] == truth.image_ids
    True
    """
    check_on_error(on_error)
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be a positive integer; got {chunk_chars!r}.")
    path = os.fspath(path)
    wanted = None if image_ids is None else {coco_key(i) for i in image_ids}
    seen = {}

    def fail(where, reason):
        if on_error == "raise":
            raise ByproductFormatError(where, reason)
        if errors is None:
            warnings.warn(f"skipped {where}: {reason}", UserWarning, stacklevel=3)
        else:
            errors.append(ParseError(where, reason))

    with open(path, encoding="utf-8") as f:
        items = _iter_json_list(f, chunk_chars, max_item_chars=max(64 * chunk_chars, 1 << 26))
        while True:
            try:
                index, _, obj = next(items)
            except StopIteration:
                return
            except _StreamError as exc:
                fail(f"{path} [char {exc.offset}]", exc.reason)
                return
            except UnicodeDecodeError as exc:
                fail(path, f"not UTF-8 text: {exc}")
                return
            if wanted is not None and isinstance(obj, dict) and "image_id" in obj:
                try:
                    if coco_key(obj["image_id"]) not in wanted:
                        continue
                except (TypeError, ValueError):
                    pass  # a bad image_id is reported below
            try:
                rec = _record(obj, traces)
            except KeyError as exc:
                fail(f"{path} [record {index}]", f"missing field {exc.args[0]!r}")
                continue
            except (TypeError, ValueError) as exc:
                fail(f"{path} [record {index}]", f"{type(exc).__name__}: {exc}")
                continue
            if rec.image_id in seen:
                first = seen[rec.image_id]
                fail(f"{path} [record {index}]", f"duplicate image_id {rec.image_id} (first: record {first})")
                continue
            seen[rec.image_id] = index
            yield rec


def read_coco_ab(path, image_ids=None, *, on_error="raise", traces=True, chunk_chars=1 << 20):
    """Read a COCO-AB JSON file into per-image records (streamed, see :func:`iter_coco_ab`).

    Parameters
    ----------
    path : str or os.PathLike
        The COCO-AB JSON file.
    image_ids : iterable, optional
        Only keep these images. Images without a record get None from ``records.align(image_ids)``, hence a
        missing Z row, not an error.
    on_error : {"raise", "skip"}, default="raise"
        Raise :class:`ByproductFormatError` on the first bad record or broken JSON, or skip and list them in
        ``records.errors``.
    traces : bool, default=True
        Build mouse-trace arrays.
    chunk_chars : int, default=1048576
        Characters read at a time.

    Returns
    -------
    ByproductRecords
        In file order, keyed by ``image_id``.

    Examples
    --------
    >>> import os, tempfile
    >>> from luab_sk.datasets.imagenet_ab_like import make_coco_ab_like
    >>> path = os.path.join(tempfile.mkdtemp(), "ab.json")
    >>> truth = make_coco_ab_like(path, n_images=4, truncate=True, random_state=0)
    >>> records = read_coco_ab(path, on_error="skip")
    >>> len(records), len(records.errors)
    (3, 1)
    """
    errors = []
    options = {"on_error": on_error, "errors": errors, "traces": traces, "chunk_chars": chunk_chars}
    records = list(iter_coco_ab(path, image_ids, **options))
    return ByproductRecords(records, fmt="coco_ab", errors=errors)
