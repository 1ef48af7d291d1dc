"""``ByproductEncoder``: turn byproduct records into the Z arrays the estimators regress."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.preprocessing import RobustScaler
from sklearn.utils.validation import check_is_fitted

from .._param_validation import Integral, Interval, Real, StrOptions, _fit_context
from ._records import COCOABRecord, ImageNetABRecord, valid_unit_points
from .geometry import points_to_heatmap

__all__ = ["ByproductEncoder", "icon_positions"]

_KINDS = ("point", "points_per_class", "heatmap", "heatmaps_per_class", "trace", "timing")
_FORMAT_KINDS = {
    "imagenet_ab": {"point", "heatmap", "trace", "timing"},
    "coco_ab": {"points_per_class", "heatmap", "heatmaps_per_class", "trace", "timing"},
}
_PER_CLASS_KINDS = ("points_per_class", "heatmaps_per_class")
_AGGREGATES = ("last", "first", "mean")
_TIMING_NAMES = {
    "imagenet_ab": ("estimate_time", "hovered_count", "hover_time", "selected_count"),
    "coco_ab": ("time_spent", "n_add", "n_move", "n_remove"),
}


def icon_positions(record, position="add"):
    """Per-class icon positions of a COCO-AB record.

    Parameters
    ----------
    record : COCOABRecord
    position : {"add", "final"}, default="add"
        ``"add"``: the ``pointTo`` of every ``add`` action (the reference loader's choice). ``"final"``: where
        the icons are after replaying every ``move`` (which takes the icon of that class nearest to its
        ``pointFrom``) and ``remove`` (which deletes it); a class whose icons were all removed is absent.

    Returns
    -------
    dict
        Class name to an ``(m, 2)`` array of ``(x, y)`` points, one row per icon.

    Examples
    --------
    >>> import numpy as np
    >>> rec = COCOABRecord(1, action_types=("add", "move"), icon_types=("dog", "dog"),
    ...                    points_from=np.array([[np.nan, np.nan], [0.2, 0.2]]),
    ...                    points_to=np.array([[0.2, 0.2], [0.5, 0.6]]), action_times=np.zeros(2))
    >>> icon_positions(rec, "add")["dog"].tolist(), icon_positions(rec, "final")["dog"].tolist()
    ([[0.2, 0.2]], [[0.5, 0.6]])
    """
    if position not in ("add", "final"):
        raise ValueError(f"position must be 'add' or 'final'; got {position!r}.")
    icons = {}
    for action, name, p_from, p_to in zip(record.action_types, record.icon_types, record.points_from,
                                          record.points_to):
        mine = icons.setdefault(name, [])
        to_ok, from_ok = valid_unit_points(np.array([p_to, p_from]))  # off-image or non-finite: missing
        if action == "add":
            if to_ok:
                mine.append(p_to)
        elif position == "final" and action in ("move", "remove") and mine:
            if not from_ok:
                i = len(mine) - 1
            else:
                i = int(np.argmin([np.sum((p - p_from) ** 2) for p in mine]))
            if action == "remove":
                mine.pop(i)
            elif to_ok:
                mine[i] = p_to
    return {name: np.array(pts).reshape(-1, 2) for name, pts in icons.items() if pts}


def _as_record_list(records, name="records"):
    """A list of records (None allowed) and their format; precise errors for anything else."""
    if isinstance(records, (str, bytes, np.ndarray)) or not hasattr(records, "__len__"):
        raise TypeError(
            f"{name} must be a ByproductRecords or a list of ImageNetABRecord/COCOABRecord (None for a "
            f"missing image), e.g. from records.align(keys); got {type(records).__name__}."
        )
    items = list(records)
    formats = set()
    for i, rec in enumerate(items):
        if isinstance(rec, ImageNetABRecord):
            formats.add("imagenet_ab")
        elif isinstance(rec, COCOABRecord):
            formats.add("coco_ab")
        elif rec is not None:
            kind = type(rec).__name__
            raise TypeError(f"{name}[{i}] is a {kind}, not an ImageNetABRecord, COCOABRecord or None.")
    if len(formats) > 1:
        raise ValueError(f"{name} mixes ImageNet-AB and COCO-AB records.")
    return items, (formats.pop() if formats else None)


def _resample_trace(trace, length):
    """Resample a ``(t, 3)`` ``[time, x, y]`` trace to ``length`` points evenly spaced in time."""
    trace = trace[valid_unit_points(trace[:, 1:])]  # samples off the image, or non-finite, are missing
    if len(trace) == 0:
        return np.full((length, 2), np.nan)
    times = trace[:, 0]
    if len(trace) == 1 or not np.isfinite(times).all() or np.ptp(times) <= 0:
        times = np.arange(len(trace), dtype=float)  # no usable clock: space the samples evenly
    order = np.argsort(times, kind="stable")
    times, xy = times[order], trace[order, 1:]
    grid = np.linspace(times[0], times[-1], length)
    return np.column_stack([np.interp(grid, times, xy[:, 0]), np.interp(grid, times, xy[:, 1])])


def _hover_time(task):
    """Total ms between each hover ``enter`` and the next ``leave`` of one task (NaN when not recorded)."""
    if len(task.hover_times) == 0:
        return 0.0 if task.hovered_count == 0 else np.nan
    total, entered = 0.0, None
    for action, t in zip(task.hover_actions, task.hover_times):
        if action == "enter":
            entered = t
        elif action == "leave" and entered is not None:
            total += t - entered
            entered = None
    return total if np.isfinite(total) and total >= 0 else np.nan


def _nanmean(values):
    values = np.asarray(values, dtype=float)
    ok = ~np.isnan(values)
    return values[ok].mean() if ok.any() else np.nan


class ByproductEncoder(TransformerMixin, BaseEstimator):
    """Encode byproduct records as a Z array, NaN marking what is missing.

    Parameters
    ----------
    kind : str or sequence of str, default="point"
        What to encode; several kinds are concatenated in the given order (see ``feature_slices_`` and
        :meth:`get_feature_names_out` for the column layout):

        - ``"point"`` (ImageNet-AB), 2 columns ``[x, y]``: the reference loader's Z, the mean of the first
          selecting click of every selected task, in ``[0, 1]`` image coordinates.
        - ``"points_per_class"`` (COCO-AB), ``2 * K`` columns ``[x_0, y_0, x_1, y_1, ...]`` in ``classes``
          order: one icon position per class (see ``per_class_position``; several icons of one class are
          reduced as set by ``aggregate``); NaN for absent classes. Needs ``classes``.
        - ``"heatmap"``, ``H * W`` columns, row-major: a Gaussian around the click. COCO-AB: a mixture of
          Gaussians at *every* icon (not at the aggregated points, so two instances of a class give two
          peaks, never one on the background between them), each class weighing equally and sharing its
          weight equally among its icons; only the classes in ``classes`` when it is given. Each row sums
          to 1.
        - ``"heatmaps_per_class"`` (COCO-AB), ``K * H * W`` columns, class-major (class ``k`` owns columns
          ``k*H*W`` to ``(k+1)*H*W``): for each class of ``classes`` an equal mixture of Gaussians at every
          icon of that class, summing to 1; all NaN for an absent class. Needs ``classes``.
        - ``"trace"``, ``2 * trace_length`` columns ``[x_0, y_0, ...]``: the mouse trace resampled evenly in
          time. ImageNet-AB: the first selected task that has a trace, extended to end at its click;
          COCO-AB: the whole session.
        - ``"timing"``, 4 columns. ImageNet-AB: ``estimate_time`` (mean over selected tasks; 0 counts as
          missing), ``hovered_count``, ``hover_time`` (ms between enter and leave events) and
          ``selected_count`` (means over tasks). COCO-AB: ``time_spent``, ``n_add``, ``n_move``,
          ``n_remove``. Scaled as set by ``timing_scale``.

        The readers already turn impossible values into missing ones; the encoder also defends itself
        against records built by hand: a click, icon or trace point that is non-finite or outside
        ``[0, 1]`` (off the displayed image) counts as missing (a point, a per-class point and a heatmap
        are then NaN unless other valid points remain; trace samples are dropped), and a non-finite or
        negative timing is missing. Z never holds an infinity, and never a heatmap of an off-image click.

        Point-like blocks (point, points_per_class, trace) hold interleaved ``(x, y)`` pairs, so they can be
        moved through crops and flips with :mod:`luab_sk.byproducts.geometry`.
    per_class_position : {"add", "final"}, default="add"
        For COCO-AB points: the ``add`` drop (reference loader) or the icon's final position after moves and
        removes (see :func:`icon_positions`).
    aggregate : {"last", "first", "mean"}, default="last"
        How ``points_per_class`` reduces several icons of one class to one point: the last one (the
        reference loader's choice: a later ``add`` of a class overwrites an earlier one), the first one,
        or their mean (which can fall on the background between two instances). With
        ``per_class_position="final"``, "last" and "first" follow the order in which the surviving icons
        were added.
    classes : sequence of str, optional
        COCO class names, fixing the column order of ``points_per_class`` and ``heatmaps_per_class``:
        class ``classes[i]`` gets columns ``2i, 2i+1``. Pass the order of your label columns, e.g.
        ``classes=mlb.classes_`` for a fitted :class:`~sklearn.preprocessing.MultiLabelBinarizer`, so that
        label column ``i`` and its point line up. Required by the per-class kinds (the order cannot be
        inferred from the records: fitting without it raises); when ``fit`` also gets a 2-D label
        indicator ``y``, its width must equal ``len(classes)``.
    heatmap_shape : tuple of (H, W), default=(7, 7)
    heatmap_sigma : float, default=0.1
        Gaussian standard deviation, in normalised image units.
    trace_length : int, default=16
        Number of resampled trace points.
    timing_scale : {"robust", None}, default="robust"
        ``"robust"``: ``log1p`` then centre on the median and divide by the interquartile range learned in
        ``fit`` (NaN-aware). None: raw values (ms and counts).

    Attributes
    ----------
    format_ : {"imagenet_ab", "coco_ab"}
        The record format seen in ``fit``.
    kinds_ : tuple of str
    classes_ : ndarray of str
        ``classes`` as an array (empty when not given).
    feature_slices_ : dict
        Kind to the ``slice`` of its columns in Z.
    n_features_out_ : int
    timing_scaler_ : RobustScaler or None
        Fitted on log1p timings when ``"timing"`` is encoded with ``timing_scale="robust"``.

    Examples
    --------
    >>> import tempfile
    >>> from luab_sk.byproducts import read_imagenet_ab
    >>> from luab_sk.datasets.imagenet_ab_like import make_imagenet_ab_like
    >>> folder = tempfile.mkdtemp()
    >>> truth = make_imagenet_ab_like(folder, n_classes=2, n_per_class=5, random_state=0)
    >>> records = read_imagenet_ab(folder)
    >>> enc = ByproductEncoder(kind=["point", "timing"]).fit(records)
    >>> Z = enc.transform(records.align(truth.image_keys))
    >>> Z.shape, enc.feature_slices_["point"]
    ((10, 6), slice(0, 2, None))
    >>> bool(np.allclose(Z[:, :2], truth.points, equal_nan=True))
    True
    """

    def __init__(
        self,
        kind="point",
        *,
        per_class_position="add",
        aggregate="last",
        classes=None,
        heatmap_shape=(7, 7),
        heatmap_sigma=0.1,
        trace_length=16,
        timing_scale="robust",
    ):
        self.kind = kind
        self.per_class_position = per_class_position
        self.aggregate = aggregate
        self.classes = classes
        self.heatmap_shape = heatmap_shape
        self.heatmap_sigma = heatmap_sigma
        self.trace_length = trace_length
        self.timing_scale = timing_scale

    _parameter_constraints: dict = {
        "kind": [StrOptions(set(_KINDS)), list, tuple],
        "per_class_position": [StrOptions({"add", "final"})],
        "aggregate": [StrOptions(set(_AGGREGATES))],
        "classes": ["array-like", None],
        "heatmap_shape": [tuple, list],
        "heatmap_sigma": [Interval(Real, 0, None, closed="neither")],
        "trace_length": [Interval(Integral, 2, None, closed="left")],
        "timing_scale": [StrOptions({"robust"}), None],
    }

    def _check_params(self, fmt):
        """The checks ``_parameter_constraints`` cannot express; returns the kinds to encode."""
        kinds = (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)
        if not kinds or any(k not in _KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"kind must be one or more distinct values of {_KINDS}; got {self.kind!r}.")
        unsupported = [k for k in kinds if k not in _FORMAT_KINDS[fmt]]
        if unsupported:
            hint = " (use 'points_per_class')" if "point" in unsupported else " (use 'point')"
            raise ValueError(f"kind {unsupported} is not available for {fmt} records{hint}.")
        shape = tuple(self.heatmap_shape)
        valid = Interval(Integral, 1, None, closed="left")
        if len(shape) != 2 or not all(valid.is_satisfied_by(v) for v in shape):
            raise ValueError(f"heatmap_shape must be (H, W), positive integers; got {self.heatmap_shape!r}.")
        return kinds

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the format, the class list and the timing scale from records.

        Parameters
        ----------
        X : ByproductRecords or list of record or None
            Records, for example ``records.align(keys)``.
        y : array-like of shape (n_samples, n_labels), optional
            Not used for fitting; a 2-D label indicator is checked to have one column per class of
            ``classes`` when a per-class kind is encoded (catching a class list that does not match the
            labels).

        Returns
        -------
        self
        """
        items, fmt = _as_record_list(X, "X")
        if fmt is None:
            raise ValueError("X holds no record (only None): cannot learn what to encode.")
        self.kinds_ = self._check_params(fmt)
        self.format_ = fmt
        if self.classes is not None:
            classes = [str(c) for c in self.classes]
            if len(set(classes)) != len(classes) or not classes:
                raise ValueError(f"classes must be a non-empty list of distinct names; got {self.classes!r}.")
            self.classes_ = np.asarray(classes, dtype=object)
        else:
            self.classes_ = np.asarray([], dtype=object)
        per_class = [k for k in self.kinds_ if k in _PER_CLASS_KINDS]
        if per_class and len(self.classes_) == 0:
            names = sorted(
                {n for rec in items if rec is not None for a, n in zip(rec.action_types, rec.icon_types)
                 if a == "add" and n is not None}
            )  # fmt: skip
            seen = f" (the records name {names[:8]}{' ...' if len(names) > 8 else ''})" if names else ""
            raise ValueError(
                f"kind {per_class[0]!r} needs classes=: the class names in the order of your label columns "
                "(for a MultiLabelBinarizer, classes=mlb.classes_), so that Z columns 2i, 2i+1 hold the "
                f"point of label column i. The order cannot be inferred from the records{seen}."
            )
        if per_class and y is not None:
            y_shape = np.shape(y)
            if len(y_shape) == 2 and y_shape[1] != len(self.classes_):
                raise ValueError(
                    f"y has {y_shape[1]} label columns but classes has {len(self.classes_)} names: the "
                    "per-class Z columns would not line up with the labels; pass the classes of y's columns."
                )
        n_cells = int(np.prod(self.heatmap_shape))
        widths = {
            "point": 2,
            "points_per_class": 2 * len(self.classes_),
            "heatmap": n_cells,
            "heatmaps_per_class": len(self.classes_) * n_cells,
            "trace": 2 * self.trace_length,
            "timing": 4,
        }
        self.feature_slices_, start = {}, 0
        for k in self.kinds_:
            self.feature_slices_[k] = slice(start, start + widths[k])
            start += widths[k]
        self.n_features_out_ = start
        self.timing_scaler_ = None
        if "timing" in self.kinds_ and self.timing_scale == "robust":
            raw = np.log1p(self._timing(items))
            self.timing_scaler_ = RobustScaler().fit(raw)
        return self

    def transform(self, X):
        """Encode records as Z.

        Parameters
        ----------
        X : ByproductRecords or list of record or None
            None (an image without byproducts) gives a row of NaN.

        Returns
        -------
        Z : ndarray of shape (n_records, n_features_out_)
        """
        check_is_fitted(self)
        items, fmt = _as_record_list(X, "X")
        if fmt is not None and fmt != self.format_:
            raise ValueError(f"X holds {fmt} records but the encoder was fitted on {self.format_} records.")
        blocks = []
        for k in self.kinds_:
            if k == "point":
                blocks.append(np.array([r.point if r is not None else (np.nan, np.nan) for r in items]))
            elif k == "points_per_class":
                blocks.append(self._points_per_class(items))
            elif k == "heatmap":
                blocks.append(self._heatmap(items))
            elif k == "heatmaps_per_class":
                blocks.append(self._heatmaps_per_class(items))
            elif k == "trace":
                blocks.append(self._trace(items))
            else:
                raw = self._timing(items)
                blocks.append(self.timing_scaler_.transform(np.log1p(raw)) if self.timing_scaler_ else raw)
        return np.hstack([np.asarray(b, dtype=np.float64).reshape(len(items), -1) for b in blocks])

    def get_feature_names_out(self, input_features=None):
        """Column names of Z, for example ``point_x``, ``point_dog_y``, ``heatmap_3_4``, ``trace_15_x``.

        Parameters
        ----------
        input_features : ignored

        Returns
        -------
        ndarray of str
        """
        check_is_fitted(self)
        names = []
        for k in self.kinds_:
            if k == "point":
                names += ["point_x", "point_y"]
            elif k == "points_per_class":
                names += [f"point_{c}_{a}" for c in self.classes_ for a in "xy"]
            elif k == "heatmap":
                h, w = self.heatmap_shape
                names += [f"heatmap_{i}_{j}" for i in range(h) for j in range(w)]
            elif k == "heatmaps_per_class":
                h, w = self.heatmap_shape
                names += [f"heatmap_{c}_{i}_{j}" for c in self.classes_ for i in range(h) for j in range(w)]
            elif k == "trace":
                names += [f"trace_{t}_{a}" for t in range(self.trace_length) for a in "xy"]
            else:
                names += [f"timing_{n}" for n in _TIMING_NAMES[self.format_]]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.requires_fit = True
        tags.target_tags.required = False
        return tags

    # -- per-kind encoders -------------------------------------------------------------------------------

    def _class_points(self, rec):
        """(K, 2) icon position per class of one COCO record (reduced by ``aggregate``), NaN if absent."""
        icons = icon_positions(rec, self.per_class_position)
        reduce = {"last": lambda p: p[-1], "first": lambda p: p[0], "mean": lambda p: p.mean(axis=0)}
        pick = reduce[self.aggregate]
        return np.array([pick(icons[c]) if c in icons else (np.nan, np.nan) for c in self.classes_])

    def _mixture(self, points):
        """Equal mixture of Gaussians at ``points`` (m, 2) on the heatmap grid, summing to 1."""
        return points_to_heatmap(points, self.heatmap_shape, self.heatmap_sigma).mean(axis=0)

    def _points_per_class(self, items):
        out = np.full((len(items), 2 * len(self.classes_)), np.nan)
        for i, rec in enumerate(items):
            if rec is not None:
                out[i] = self._class_points(rec).ravel()
        return out

    def _heatmap(self, items):
        out = np.full((len(items), int(np.prod(self.heatmap_shape))), np.nan)
        for i, rec in enumerate(items):
            if rec is None:
                continue
            if self.format_ == "imagenet_ab":
                pts = rec.point[None]
                if valid_unit_points(pts)[0]:
                    out[i] = self._mixture(pts)
                continue
            icons = icon_positions(rec, self.per_class_position)  # only valid points
            names = [c for c in (self.classes_ if len(self.classes_) else icons) if c in icons]
            if names:
                out[i] = np.mean([self._mixture(icons[c]) for c in names], axis=0)
        return out

    def _heatmaps_per_class(self, items):
        cells = int(np.prod(self.heatmap_shape))
        out = np.full((len(items), len(self.classes_) * cells), np.nan)
        for i, rec in enumerate(items):
            if rec is None:
                continue
            icons = icon_positions(rec, self.per_class_position)
            for k, c in enumerate(self.classes_):
                if c in icons:
                    out[i, k * cells : (k + 1) * cells] = self._mixture(icons[c])
        return out

    def _trace(self, items):
        out = np.full((len(items), 2 * self.trace_length), np.nan)
        for i, rec in enumerate(items):
            if rec is None:
                continue
            if self.format_ == "coco_ab":
                trace = rec.trace
            else:
                task = next((t for t in rec.tasks if t.selected and len(t.trace)), None)
                if task is None:
                    continue
                trace = task.trace
                click = np.asarray(task.point, dtype=float)
                if valid_unit_points(click)[0] and not np.array_equal(trace[-1, 1:], click):
                    t_click = task.selected_time if task.selected_time >= trace[-1, 0] else trace[-1, 0]
                    trace = np.vstack([trace, [t_click, *click]])
            out[i] = _resample_trace(trace, self.trace_length).ravel()
        return out

    def _timing(self, items):
        out = np.full((len(items), 4), np.nan)
        for i, rec in enumerate(items):
            if rec is None:
                continue
            if self.format_ == "coco_ab":
                types = list(rec.action_types)
                out[i] = (rec.time_spent, types.count("add"), types.count("move"), types.count("remove"))
            elif rec.tasks:
                estimates = [t.estimate_time for t in rec.tasks if t.selected and t.estimate_time > 0]
                out[i] = (
                    _nanmean(estimates),
                    _nanmean([t.hovered_count for t in rec.tasks]),
                    _nanmean([_hover_time(t) for t in rec.tasks]),
                    _nanmean([t.selected_count for t in rec.tasks]),
                )
        with np.errstate(invalid="ignore"):
            out[~(np.isfinite(out) & (out >= 0))] = np.nan  # impossible timings are missing
        return out
