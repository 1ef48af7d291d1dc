"""Stream COCO-AB annotation byproducts (one large JSON list of per-image records) into records.

The real file is about 400 MB. It is read incrementally: the top-level list is decoded one record at a
time with the standard library's C-accelerated ``json.JSONDecoder.raw_decode`` over a sliding text buffer, so
memory stays bounded by the buffer (``chunk_chars``) plus one record, whatever the file size.

Numbers are checked strictly: a JSON number, or a string holding a plain decimal number (see
:func:`luab_sk.byproducts._records.strict_number`); booleans and other strings make the record malformed.
A value no byproduct can hold, that is the JSON constants ``Infinity``/``-Infinity``/``NaN`` (which Python's
``json`` accepts), an overflowing ``1e999``, or a number out of range (coordinates outside ``[0, 1]``,
negative times or indices, sizes <= 0), is read as missing (NaN; for a point, both coordinates) and reported
with the record and the field: in ``errors`` under ``on_error="skip"``, raised under ``on_error="raise"``.
The same constants in fields the reader does not know (``extra``) become None and are reported too.
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
    ImpossibleValue,
    ParseError,
    check_on_error,
    coco_key,
    strict_number,
    summarize_problems,
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


class _Constant:
    """What the JSON constants ``Infinity``, ``-Infinity`` and ``NaN`` decode to: not a number, so that no
    impossible value passes for a float unnoticed (see ``parse_constant`` of :class:`json.JSONDecoder`)."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


class _BadItem:
    """A list item that could not be decoded (nested too deeply for the decoder): skipped, not fatal."""

    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason


_STRUCTURE = re.compile(r'[\[\]{}"]')
_STRING_TAIL = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)


def _value_end(buf, pos):
    """End of the JSON array/object starting at ``buf[pos]``, found by bracket counting; -1 if not in ``buf``.

    Used to step over an item the decoder gave up on (RecursionError), without recursion.
    """
    depth, i = 0, pos
    while True:
        match = _STRUCTURE.search(buf, i)
        if match is None:
            return -1
        char, i = match.group(), match.end()
        if char == '"':
            tail = _STRING_TAIL.match(buf, i)
            if tail is None:
                return -1
            i = tail.end()
        elif char in "[{":
            depth += 1
        else:
            depth -= 1
        if depth <= 0:
            return i


class _StreamError(Exception):
    """The JSON text itself is broken (not one record): reading cannot go on."""

    def __init__(self, offset, reason):
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def _iter_json_list(f, chunk_chars, max_item_chars):
    """Yield ``(index, offset, value)`` for each item of the JSON list in text file ``f``, reading lazily."""
    raw_decode = json.JSONDecoder(parse_constant=_Constant).raw_decode
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
            except (RecursionError, MemoryError) as exc:
                # Too deep (or too big) for the decoder: step over the item by counting brackets.
                end = _value_end(buf, pos)
                complete = end >= 0
                if complete:
                    value = _BadItem(f"{type(exc).__name__}: record {index} is nested too deeply to decode")
                elif eof:
                    raise _StreamError(base + pos, f"record {index} is truncated or malformed") from None
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


class _Fields:
    """Strict readers of one record's fields, collecting impossible values (field, problem) as they go."""

    def __init__(self):
        self.problems = []

    def number(self, value, field, domain="finite"):
        """A float; None is NaN; an impossible value is NaN and noted; a non-number raises ValueError."""
        if value is None:
            return math.nan
        if isinstance(value, _Constant):
            self.problems.append(f"{field} holds {value.name}, not a finite number")
            return math.nan
        try:
            return strict_number(value, domain)
        except ImpossibleValue as exc:
            self.problems.append(f"{field}: {exc}")
            return math.nan
        except ValueError:
            raise ValueError(f"{field} holds {value!r}, not a number") from None

    def point(self, value, field):
        """``(x, y)`` in [0, 1]; None is missing; a point with an impossible coordinate is missing."""
        if value is None:
            return (math.nan, math.nan)
        if not isinstance(value, dict):
            raise TypeError(f"{field} must be an object with x and y, found {type(value).__name__}")
        x = self.number(value["x"], f"{field}.x", "unit")
        y = self.number(value["y"], f"{field}.y", "unit")
        return (math.nan, math.nan) if math.isnan(x) or math.isnan(y) else (x, y)

    def text(self, value, field, intern=False):
        """A string or None (integers, as ids sometimes are, become strings)."""
        if value is None or isinstance(value, str):
            return sys.intern(value) if intern and value is not None else value
        if isinstance(value, _Constant):
            self.problems.append(f"{field} holds {value.name}, not a string")
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{field} holds {value!r}, not a string")

    def flag(self, value, field):
        if value is None:
            return False
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ValueError(f"{field} holds {value!r}, not true/false")

    def plain(self, value, field):
        """An unknown field's value, JSON constants (anywhere inside, found without recursion) as None."""
        if isinstance(value, _Constant):
            self.problems.append(f"{field} holds {value.name}")
            return None
        stack = [value] if isinstance(value, (dict, list)) else []
        while stack:
            container = stack.pop()
            for k, v in list(container.items() if isinstance(container, dict) else enumerate(container)):
                if isinstance(v, _Constant):
                    self.problems.append(f"{field} holds {v.name}")
                    container[k] = None
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        return value


def _sequence(value, field):
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TypeError(f"{field} must be a list, found {type(value).__name__}")
    return value


def _entry(value, field):
    if not isinstance(value, dict):
        raise TypeError(f"{field} must be an object, found {type(value).__name__}")
    return value


def _record(obj, traces):
    """One decoded JSON object as a COCOABRecord, and its impossible values (field: problem).

    Raises KeyError, TypeError or ValueError when the record is malformed.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"a record must be a JSON object, found {type(obj).__name__}")
    if "image_id" not in obj:
        raise KeyError("image_id")
    image_id = obj["image_id"]
    if isinstance(image_id, (bool, float, _Constant)) or (isinstance(image_id, int) and image_id < 0):
        raise ValueError(f"image_id holds {image_id!r}, not a COCO image id")
    f = _Fields()
    actions = [
        _entry(a, f"actionHistories[{i}]")
        for i, a in enumerate(_sequence(obj.get("actionHistories"), "actionHistories"))
    ]
    categories = [
        _entry(c, f"categoryHistories[{i}]")
        for i, c in enumerate(_sequence(obj.get("categoryHistories"), "categoryHistories"))
    ]
    rec = COCOABRecord(
        image_id=coco_key(image_id),
        original_image_size=(
            f.number(obj.get("originalImageWidth"), "originalImageWidth", "positive"),
            f.number(obj.get("originalImageHeight"), "originalImageHeight", "positive"),
        ),
        image_size=(
            f.number(obj.get("imageWidth"), "imageWidth", "positive"),
            f.number(obj.get("imageHeight"), "imageHeight", "positive"),
        ),
        time_spent=f.number(obj.get("timeSpent"), "timeSpent", "nonnegative"),
        worker_id=f.text(obj.get("worker_id"), "worker_id"),
        hit_id=f.text(obj.get("hit_id"), "hit_id"),
        page_id=f.number(obj.get("page_id"), "page_id", "nonnegative"),
        extra={k: f.plain(v, k) for k, v in obj.items() if k not in _KNOWN},
    )
    if actions:
        types = []
        for i, a in enumerate(actions):
            kind = a["actionType"]
            if not isinstance(kind, str):
                raise ValueError(f"actionHistories[{i}].actionType holds {kind!r}, not a string")
            types.append(sys.intern(kind))
        rec.action_types = tuple(types)
        where = [f"actionHistories[{i}]" for i in range(len(actions))]
        rec.icon_types = tuple(
            f.text(a.get("iconType"), f"{w}.iconType", True) for a, w in zip(actions, where)
        )
        rec.points_from = np.array(
            [f.point(a.get("pointFrom"), f"{w}.pointFrom") for a, w in zip(actions, where)], dtype=np.float64
        )
        rec.points_to = np.array(
            [f.point(a.get("pointTo"), f"{w}.pointTo") for a, w in zip(actions, where)], dtype=np.float64
        )
        rec.action_times = np.array(
            [f.number(a.get("timeAt"), f"{w}.timeAt", "nonnegative") for a, w in zip(actions, where)],
            dtype=np.float64,
        )
    if categories:
        where = [f"categoryHistories[{i}]" for i in range(len(categories))]
        rec.category_indices = np.array(
            [
                f.number(c.get("categoryIndex"), f"{w}.categoryIndex", "nonnegative")
                for c, w in zip(categories, where)
            ],
            dtype=np.float64,
        )
        rec.category_names = tuple(
            f.text(c.get("categoryName"), f"{w}.categoryName", True) for c, w in zip(categories, where)
        )
        rec.category_times = np.array(
            [f.number(c.get("timeAt"), f"{w}.timeAt", "nonnegative") for c, w in zip(categories, where)],
            dtype=np.float64,
        )
        rec.category_using_keyboard = np.array(
            [f.flag(c.get("usingKeyboard"), f"{w}.usingKeyboard") for c, w in zip(categories, where)],
            dtype=bool,
        )
    tracking = _sequence(obj.get("mouseTracking"), "mouseTracking")
    if traces and tracking:
        samples = []
        for i, m in enumerate(tracking):
            m = _entry(m, f"mouseTracking[{i}]")
            t = f.number(m.get("timeAt"), f"mouseTracking[{i}].timeAt", "nonnegative")
            x, y = f.point(m, f"mouseTracking[{i}]")
            samples.append((t, x, y))
        rec.trace = np.array(samples, dtype=np.float64).reshape(-1, 3)
    return rec, f.problems


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
        A malformed record (not an object, no ``image_id``, a non-numeric point, a duplicate ``image_id``,
        nested too deeply to decode; any failure on one record) raises :class:`ByproductFormatError` naming
        the record, or is skipped and appended to ``errors``. A record with impossible values (non-finite or
        out of range, see the module docstring) raises, or is kept with those values missing and listed in
        ``errors``. Broken JSON text (including a truncated file) ends the stream after the last good record:
        raised, or appended.
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
            where = f"{path} [record {index}]"
            if isinstance(obj, _BadItem):
                fail(where, obj.reason)
                continue
            if wanted is not None and isinstance(obj, dict) and "image_id" in obj:
                try:
                    if coco_key(obj["image_id"]) not in wanted:
                        continue
                except (TypeError, ValueError):
                    pass  # a bad image_id is reported below
            try:
                rec, problems = _record(obj, traces)
            except KeyError as exc:
                fail(where, f"missing field {exc.args[0]!r}")
                continue
            except Exception as exc:  # noqa: BLE001 - any failure on one record is that record's error
                fail(where, f"{type(exc).__name__}: {exc}")
                continue
            if rec.image_id in seen:
                first = seen[rec.image_id]
                fail(where, f"duplicate image_id {rec.image_id} (first: record {first})")
                continue
            seen[rec.image_id] = index
            if problems:
                fail(where, summarize_problems(problems))  # raises under on_error="raise"
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
