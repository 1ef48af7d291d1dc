"""Read ImageNet-AB annotation-byproduct XML files (one per training image) into records.

The XML is untrusted input and is parsed with :mod:`defusedxml`.

The format (the public ImageNet-AB release of *Neglected Free Lunch*, Han et al., ICCV 2023): one XML file per
training image, ``train_xml/<wnid>/<wnid>_<id>.xml``; the archive also holds AppleDouble ``._*.xml`` junk,
which is skipped. The root element is ``<annotation>``. It may keep the original ILSVRC ``<size>`` and
``<object><bndbox>`` (not byproducts; kept as ``ilsvrc_boxes``), and holds one ``<metadata>`` block per task
(page of 48 images) the image appeared in, with:

- ``selected``: the strings ``True``/``False``;
- ``selectedRecord``: ``x``, ``y`` in ``[0, 1]`` of the displayed image and ``time`` (epoch ms) of the first
  selecting click, or the literal ``None``. Should a block hold several, the first one counts (as in the
  reference loader, which reads ``block.find("selectedRecord")``; the same holds for ``selected`` and for
  the ``x``/``y``/``time`` inside it); the others are ignored;
- ``selectedCount``, ``hoveredCount``, ``estimateTime`` (ms hovered before selecting; may be 0);
- ``mouseTracking``: repeated ``time``, ``x``, ``y`` (up to 60 Hz, stopping at the click), or ``None``/empty;
- ``hoveredRecord``: repeated ``action`` (``enter``/``leave``) and ``time``, or ``None``;
- ``imageWidth``/``imageHeight`` (displayed px), ``originalImageWidth``/``originalImageHeight``,
  ``imagePosition`` (``x``, ``y``), ``image_idx`` (0-47), ``page_idx`` (0-9);
- ``worker_id``, ``assignment_id``, ``hit_id``, ``imagenet_hit_id`` and ``hit_submit_time`` (epoch ms or an
  ISO-8601 date).

Numbers are parsed strictly (plain decimals; see :func:`luab_sk.byproducts._records.strict_number`). Text that
is not a number makes the file malformed. A number no byproduct can hold, that is non-finite (``inf``,
``nan``, ``1e999``) or out of range (coordinates outside ``[0, 1]``, negative times or counts, sizes <= 0),
is read as missing (NaN; for a click or trace sample, the whole point) and reported: listed in ``errors``
with the file and the field under ``on_error="skip"``, raised under ``on_error="raise"``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
import warnings
from datetime import datetime, timezone
from xml.etree.ElementTree import ParseError as _XMLSyntaxError

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from joblib import Parallel, delayed, effective_n_jobs
from joblib.parallel import get_active_backend

from ._records import (
    ByproductFormatError,
    ByproductRecords,
    ImageNetABRecord,
    ImageNetABTask,
    ImpossibleValue,
    ParseError,
    check_on_error,
    imagenet_key,
    strict_number,
    summarize_problems,
)

__all__ = ["iter_imagenet_ab_chunks", "list_imagenet_ab_files", "parse_imagenet_ab_xml", "read_imagenet_ab"]

_TRUE = {"True": True, "true": True, "1": True, "False": False, "false": False, "0": False}
# <metadata> children holding a number, and the ImageNetABTask attribute each fills.
_NUMBERS = {
    "selectedCount": "selected_count",
    "hoveredCount": "hovered_count",
    "estimateTime": "estimate_time",
    "image_idx": "image_idx",
    "page_idx": "page_idx",
}  # all counts, durations or indices: >= 0
_STRINGS = {
    "worker_id": "worker_id",
    "assignment_id": "assignment_id",
    "hit_id": "hit_id",
    "imagenet_hit_id": "imagenet_hit_id",
}
_PAIRS = {  # attribute: (first tag, second tag)
    "image_size": ("imageWidth", "imageHeight"),
    "original_image_size": ("originalImageWidth", "originalImageHeight"),
}
_PAIR_TAGS = {tag for pair in _PAIRS.values() for tag in pair}
_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
# <wnid>_<id>.xml: the only names an ImageNet-AB file can have.
_FILE_NAME = re.compile(r"[A-Za-z0-9]+_[A-Za-z0-9]+\.xml", re.ASCII)


def _number(text, tag, problems, domain="finite"):
    """A float from element text; None/empty/'None' is NaN.

    Text that is not a plain decimal number raises ValueError (the file is malformed); a number outside
    ``domain`` (or non-finite) is appended to ``problems`` and read as NaN.
    """
    if text is None:
        return math.nan
    text = text.strip()
    if not text or text == "None":
        return math.nan
    try:
        return strict_number(text, domain)
    except ImpossibleValue as exc:
        problems.append(f"<{tag}> {exc}")
        return math.nan
    except ValueError:
        raise ValueError(f"<{tag}> holds {text!r}, not a number") from None


def _time_ms(text, tag, problems):
    """Epoch milliseconds (>= 0) from a number or an ISO-8601 date (naive dates are taken as UTC)."""
    try:
        return _number(text, tag, problems, "nonnegative")
    except ValueError:
        stamp = text.strip()
        stamp = stamp[:-1] + "+00:00" if stamp.endswith("Z") else stamp
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError:
            raise ValueError(f"<{tag}> holds {text!r}, neither epoch ms nor an ISO-8601 date") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        ms = when.timestamp() * 1000.0
        if not ms >= 0:
            problems.append(f"<{tag}> {text.strip()!r} is before 1970 (negative epoch ms)")
            return math.nan
        return ms


def _xy(element, tag, problems, domain):
    """``(x, y, time)`` of an element with x/y/time children; a point with an impossible coordinate is NaN.

    The first ``x``, ``y`` and ``time`` child count (``Element.find``, as in the reference loader); repeats
    are ignored.
    """
    x = y = t = math.nan
    seen = set()
    for child in element:
        if child.tag in seen:
            continue
        if child.tag == "x":
            x = _number(child.text, f"{tag}/x", problems, domain)
        elif child.tag == "y":
            y = _number(child.text, f"{tag}/y", problems, domain)
        elif child.tag == "time":
            t = _time_ms(child.text, f"{tag}/time", problems)
        seen.add(child.tag)
    if math.isnan(x) or math.isnan(y):
        x = y = math.nan  # half a point is no point
    return x, y, t


def _parse_task(block, traces, problems):
    """One ``<metadata>`` block as an ImageNetABTask.

    ``selected`` and ``selectedRecord`` are taken from their *first* occurrence in the block, as the reference
    loader's ``block.find(...)`` does; a repeated ``selectedRecord`` (or ``selected``) is ignored, not
    parsed.
    """
    task = ImageNetABTask()
    first_seen = set()
    pairs = {}
    trace = []
    hover_actions = []
    hover_times = []
    for el in block:
        tag = el.tag
        if tag == "mouseTracking":
            if traces:
                # Samples come as repeated <mouseTracking><time/><x/><y/></mouseTracking> elements, or as one
                # element holding repeated time/x/y triples; a literal "None" has no children.
                sample = {}
                for child in el:
                    sample[child.tag] = child.text
                    if len(sample) == 3:
                        t = _time_ms(sample.get("time"), "mouseTracking/time", problems)
                        x = _number(sample.get("x"), "mouseTracking/x", problems, "unit")
                        y = _number(sample.get("y"), "mouseTracking/y", problems, "unit")
                        if math.isnan(x) or math.isnan(y):
                            x = y = math.nan
                        trace.append((t, x, y))
                        sample = {}
        elif tag == "hoveredRecord":
            if traces:
                action = None
                for child in el:
                    if child.tag == "action":
                        action = sys.intern((child.text or "").strip())
                    elif child.tag == "time":
                        hover_actions.append(action)
                        hover_times.append(_time_ms(child.text, "hoveredRecord/time", problems))
                        action = None
        elif tag in ("selected", "selectedRecord") and tag in first_seen:
            continue  # the reference loader reads the first one only
        elif tag == "selected":
            first_seen.add(tag)
            text = (el.text or "").strip()
            if text not in _TRUE:
                raise ValueError(f"<selected> holds {text!r}, not True/False")
            task.selected = _TRUE[text]
        elif tag == "selectedRecord":
            first_seen.add(tag)
            x, y, t = _xy(el, tag, problems, "unit")
            task.point = (x, y)
            task.selected_time = t
        elif tag == "imagePosition":
            x, y, _ = _xy(el, tag, problems, "finite")
            task.image_position = (x, y)
        elif tag in _NUMBERS:
            setattr(task, _NUMBERS[tag], _number(el.text, tag, problems, "nonnegative"))
        elif tag in _STRINGS:
            text = (el.text or "").strip()
            setattr(task, _STRINGS[tag], text if text and text != "None" else None)
        elif tag in _PAIR_TAGS:
            pairs[tag] = _number(el.text, tag, problems, "positive")
        elif tag == "hit_submit_time":
            task.hit_submit_time = _time_ms(el.text, tag, problems)
        else:
            task.extra[tag] = el.text
    for name, (a, b) in _PAIRS.items():
        if a in pairs or b in pairs:
            setattr(task, name, (pairs.get(a, math.nan), pairs.get(b, math.nan)))
    if trace:
        task.trace = np.array(trace, dtype=np.float64)
    if hover_times:
        task.hover_actions = tuple(hover_actions)
        task.hover_times = np.array(hover_times, dtype=np.float64)
    return task


def _check_file_name(path):
    name = os.path.basename(path)
    if not _FILE_NAME.fullmatch(name):
        raise ByproductFormatError(
            path, f"file name {name!r} is not <wnid>_<id>.xml: not an ImageNet-AB annotation file"
        )


def parse_imagenet_ab_xml(path, traces=True, *, on_error="raise", errors=None):
    """Parse one ImageNet-AB XML file.

    Parameters
    ----------
    path : str or os.PathLike
        ``.../<wnid>/<wnid>_<id>.xml``.
    traces : bool, default=True
        Parse mouse traces and hover records (set False for speed and memory when only clicks and timings
        are needed; ``trace`` and ``hover_times`` are then empty).
    on_error : {"raise", "skip"}, default="raise"
        What to do with impossible values (non-finite, or out of range, see the module docstring): raise
        :class:`ByproductFormatError`, or read them as missing and report them (one :class:`ParseError`
        per file, naming the fields) in ``errors``. A malformed file raises in both cases.
    errors : list, optional
        Where ``on_error="skip"`` appends that report; when None, a :class:`UserWarning` is issued instead.

    Returns
    -------
    ImageNetABRecord

    Raises
    ------
    ByproductFormatError
        If the file is not named ``<wnid>_<id>.xml``, is not well-formed XML, holds forbidden constructs
        (entities, external references), is not an ``<annotation>``, or a field does not parse (the message
        names the file and the field). ``OSError`` if it cannot be read.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> xml = ("<annotation><metadata><selected>True</selected>"
    ...        "<selectedRecord><x>0.25</x><y>0.5</y><time>1.6e12</time></selectedRecord>"
    ...        "<mouseTracking>None</mouseTracking></metadata></annotation>")
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "n01440764_1.xml"
    >>> _ = p.write_text(xml)
    >>> rec = parse_imagenet_ab_xml(p)
    >>> rec.key, rec.point.tolist(), rec.tasks[0].trace.shape
    ('n01440764/n01440764_1', [0.25, 0.5], (0, 3))
    """
    check_on_error(on_error)
    path = os.fspath(path)
    _check_file_name(path)
    with open(path, "rb") as f:
        data = f.read()
    problems = []
    try:
        root = fromstring(data)
        if root.tag != "annotation":
            raise ValueError(f"the root element is <{root.tag}>, not <annotation>: not an ImageNet-AB file")
        tasks = []
        boxes = []
        names = []
        size = (math.nan, math.nan)
        for el in root:
            tag = el.tag
            if tag == "metadata":
                tasks.append(_parse_task(el, traces, problems))
            elif tag == "object":
                box = el.find("bndbox")
                if box is not None:
                    boxes.append(
                        [_number(box.findtext(c), f"bndbox/{c}", problems, "nonnegative") for c in _BOX_TAGS]
                    )
                    names.append(el.findtext("name"))
            elif tag == "size":
                size = tuple(
                    _number(el.findtext(c), f"size/{c}", problems, "positive") for c in ("width", "height")
                )
    except (_XMLSyntaxError, DefusedXmlException, ValueError) as exc:
        raise ByproductFormatError(path, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure on one untrusted file is that file's error
        raise ByproductFormatError(path, f"{type(exc).__name__}: {exc}") from exc
    if problems:
        report = ParseError(path, summarize_problems(problems))
        if on_error == "raise":
            raise ByproductFormatError(*report)
        if errors is None:
            warnings.warn(f"{report.path}: {report.reason}", UserWarning, stacklevel=2)
        else:
            errors.append(report)
    return ImageNetABRecord(
        key=imagenet_key(path),
        path=path,
        tasks=tuple(tasks),
        size=size,
        ilsvrc_boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        ilsvrc_names=tuple(names),
    )


def list_imagenet_ab_files(directory):
    """All ImageNet-AB XML files under ``directory``, sorted, skipping AppleDouble ``._*`` files.

    Parameters
    ----------
    directory : str or os.PathLike

    Returns
    -------
    list of str

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "n1").mkdir()
    >>> for name in ("n1_2.xml", "n1_1.xml", "._n1_1.xml", "notes.txt"):
    ...     _ = (root / "n1" / name).write_text("<annotation/>")
    >>> [pathlib.Path(p).name for p in list_imagenet_ab_files(root)]
    ['n1_1.xml', 'n1_2.xml']
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"source directory {directory!r} does not exist or is not a directory.")
    found = []
    for dirpath, _, filenames in os.walk(directory):
        xmls = (n for n in filenames if n.endswith(".xml") and not n.startswith("._"))
        found.extend(os.path.join(dirpath, n) for n in xmls)
    found.sort()
    return found


def _parse_chunk(paths, traces):
    records, errors = [], []
    for path in paths:
        try:
            records.append(parse_imagenet_ab_xml(path, traces=traces, on_error="skip", errors=errors))
        except ByproductFormatError as exc:
            errors.append(ParseError(exc.path, exc.reason))
        except OSError as exc:
            errors.append(ParseError(path, f"{type(exc).__name__}: {exc.strerror or exc}"))
        except Exception as exc:  # noqa: BLE001 - one bad file must not end the run under on_error="skip"
            errors.append(ParseError(path, f"{type(exc).__name__}: {exc}"))
    return records, errors


def _unique_by_key(paths):
    """Drop repeated paths; a second file for the same image key, or a badly named file, is an error."""
    first, unique, errors = {}, [], []
    for path in paths:
        try:
            _check_file_name(path)
        except ByproductFormatError as exc:
            errors.append(ParseError(exc.path, exc.reason))
            continue
        key = imagenet_key(path)
        if key not in first:
            first[key] = path
            unique.append(path)
        elif first[key] != path:
            errors.append(ParseError(path, f"duplicate key {key!r}: {first[key]!r} is read instead"))
    return unique, errors


def _resolve_paths(source, keys):
    """The XML paths to read, in order, one per image key, and errors for repeated keys."""
    if isinstance(source, (str, os.PathLike)):
        if keys is not None:
            folder = os.fspath(source)
            if not os.path.isdir(folder):
                raise ValueError(f"source directory {folder!r} does not exist or is not a directory.")
            paths = [os.path.join(folder, imagenet_key(k) + ".xml") for k in keys]
            paths = [p for p in paths if os.path.isfile(p)]
        else:
            paths = list_imagenet_ab_files(source)
    else:
        paths = [os.fspath(p) for p in source if not os.path.basename(os.fspath(p)).startswith("._")]
        if keys is not None:
            by_key = {}
            for p in paths:
                if _FILE_NAME.fullmatch(os.path.basename(p)):  # badly named files cannot match a key
                    by_key.setdefault(imagenet_key(p), p)
            paths = [by_key[k] for k in (imagenet_key(k) for k in keys) if k in by_key]
    return _unique_by_key(paths)


def _parse_in_parallel(chunks, traces, n_jobs):
    """Parse chunks with joblib, in order, streaming the results when the backend can.

    Backends that cannot return a generator (Ray's joblib backend) get windows of a few chunks per worker
    from one pool, so that memory stays bounded there too.
    """
    backend, _ = get_active_backend()
    if getattr(backend, "supports_return_generator", True):
        yield from Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_parse_chunk)(chunk, traces) for chunk in chunks
        )
        return
    window = 4 * max(1, effective_n_jobs(n_jobs))
    with Parallel(n_jobs=n_jobs) as parallel:
        for start in range(0, len(chunks), window):
            window_chunks = chunks[start : start + window]
            yield from parallel(delayed(_parse_chunk)(chunk, traces) for chunk in window_chunks)


def iter_imagenet_ab_chunks(
    source, keys=None, *, on_error="raise", traces=True, n_jobs=None, chunk_size=2000
):
    """Read ImageNet-AB XML files chunk by chunk, so that memory stays bounded on the full 1.28M files.

    Parameters are those of :func:`read_imagenet_ab`; each chunk holds the records of ``chunk_size``
    consecutive files. With ``n_jobs``, chunks are parsed in parallel processes and come back in order.
    Parsed records take a few kB each, so the whole ImageNet-AB held at once takes several GB: encode each
    chunk and keep only Z (see the example).

    Yields
    ------
    ByproductRecords
        One per chunk, with that chunk's ``errors`` (with ``on_error="raise"``, the first chunk holding a bad
        file raises :class:`ByproductFormatError` instead).

    Examples
    --------
    >>> import tempfile
    >>> from luab_sk.byproducts import ByproductEncoder
    >>> from luab_sk.datasets.imagenet_ab_like import make_imagenet_ab_like
    >>> folder = tempfile.mkdtemp()
    >>> truth = make_imagenet_ab_like(folder, n_classes=2, n_per_class=5, random_state=0)
    >>> enc = ByproductEncoder().fit(read_imagenet_ab(folder, truth.image_keys[:6]))  # fit on a sample
    >>> row = {key: i for i, key in enumerate(truth.image_keys)}
    >>> Z = np.full((len(row), enc.n_features_out_), np.nan)
    >>> for chunk in iter_imagenet_ab_chunks(folder, chunk_size=4):
    ...     Z[[row[key] for key in chunk.keys]] = enc.transform(chunk)
    >>> bool(np.allclose(Z, truth.points, equal_nan=True))
    True
    """
    check_on_error(on_error)
    if not (isinstance(chunk_size, numbers.Integral) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
    paths, errors = _resolve_paths(source, keys)
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    if effective_n_jobs(n_jobs) == 1 or len(chunks) <= 1:  # None: joblib's parallel_config (default 1)
        results = (_parse_chunk(chunk, traces) for chunk in chunks)
    else:
        results = _parse_in_parallel(chunks, traces, n_jobs)
    for records, chunk_errors in results:
        errors += chunk_errors
        if errors and on_error == "raise":
            raise ByproductFormatError(*errors[0])
        yield ByproductRecords(records, fmt="imagenet_ab", errors=errors)
        errors = []


def read_imagenet_ab(source, keys=None, *, on_error="raise", traces=True, n_jobs=None, chunk_size=2000):
    """Read ImageNet-AB XML files into per-image records.

    Parameters
    ----------
    source : str, os.PathLike or iterable of paths
        A folder laid out as ``<wnid>/<wnid>_<id>.xml`` (searched recursively; AppleDouble ``._*.xml`` files
        are skipped), or a list of XML paths.
    keys : iterable, optional
        Only read the files of these images (image paths, file names or ``"wnid/wnid_id"`` keys, see
        :func:`imagenet_key`). An image without a file gets no record, not an error: after
        ``records.align(keys)`` its entry is None and the encoders give it a missing Z row.
    on_error : {"raise", "skip"}, default="raise"
        What to do with a malformed, truncated or unreadable file, a file not named ``<wnid>_<id>.xml``
        (a stray ``README.xml``) or not holding an ``<annotation>``, or a second file for the same image:
        raise :class:`ByproductFormatError` naming the first one, in path order, or skip it and list it,
        with the reason, in ``records.errors``. Any failure on one file is that file's error. A file with
        impossible values (non-finite or out-of-range numbers) is kept with those values missing and is
        listed in ``records.errors`` too (it raises under ``"raise"``).
    traces : bool, default=True
        Parse mouse traces and hover records.
    n_jobs : int, optional
        Processes to parse with (joblib); -1 all cores. None follows joblib's current setting: 1, unless
        inside ``joblib.parallel_config(n_jobs=...)`` (which also selects the backend, e.g. Ray's).
    chunk_size : int, default=2000
        Files per joblib task.

    Returns
    -------
    ByproductRecords
        In the order of ``keys`` when given, else in sorted path order. For the full ImageNet-AB, prefer
        :func:`iter_imagenet_ab_chunks`, which bounds memory.

    Examples
    --------
    >>> import tempfile
    >>> from luab_sk.datasets.imagenet_ab_like import make_imagenet_ab_like
    >>> folder = tempfile.mkdtemp()
    >>> truth = make_imagenet_ab_like(folder, n_classes=2, n_per_class=3, random_state=0)
    >>> records = read_imagenet_ab(folder, on_error="skip")
    >>> len(records) + len(records.errors) == len(truth.image_keys)
    True
    """
    options = {"on_error": on_error, "traces": traces, "n_jobs": n_jobs, "chunk_size": chunk_size}
    chunks = list(iter_imagenet_ab_chunks(source, keys, **options))
    records = [rec for chunk in chunks for rec in chunk]
    errors = [err for chunk in chunks for err in chunk.errors]
    return ByproductRecords(records, fmt="imagenet_ab", errors=errors)
