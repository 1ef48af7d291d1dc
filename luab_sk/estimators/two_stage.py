"""Two-stage LUAB: a click-supervised attention probe finds the object ("where"), a linear probe on
features of an image crop around it names it ("what").

On scenes whose background predicts the label, deep-CNN tokens carry the background even under a sharp
attention map, so a one-stage attention probe keeps the shortcut. Cropping the image around the object
and encoding the crop removes most of the background from the features the label is read from. In
training the crop is centred on the human click (on the predicted point where the click is missing);
at test time on the point the attention probe predicts. See ``benchmarks/two_stage.py`` for what this
reaches on real-photo backgrounds.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d

from .._param_validation import HasMethods, Integral, Interval, Options, Real, StrOptions, _fit_context
from ..byproducts.geometry import center_crop_box, crop_points, uncrop_points
from ..features.images import load_image
from ._base import check_byproducts, check_click_points
from .classifier import LUABClassifier

__all__ = ["TwoStageLUABClassifier"]

POINT_METHODS = ("peak", "local", "soft_argmax", "topk")
# test-time crop offsets, in units of ``test_jitter`` times the crop side, for each ``test_crops``
TEST_OFFSETS = {
    1: np.zeros((1, 2)),
    5: np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float64),
    9: np.array([[dx, dy] for dy in (0, -1, 1) for dx in (0, -1, 1)], dtype=np.float64),
}


def default_locator(random_state=None):
    """The default "where" model: the click-supervised attention probe of the LUAB study."""
    return LUABClassifier(
        head="attention",
        byproduct_target="heatmap",
        hidden_size=64,
        n_components=64,
        max_iter=200,
        random_state=random_state,
    )


def default_classifier():
    """The default "what" model: a standardized logistic-regression probe on pooled crop features."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


class TwoStageLUABClassifier(ClassifierMixin, BaseEstimator):
    """Two-stage LUAB on images: locate the object with click supervision, classify a crop around it.

    Stage 1 ("where"): ``locator``, by default a :class:`~luab_sk.estimators.LUABClassifier` attention
    probe with the heatmap loss, is fitted on the scene's patch tokens with the clicks Z as its
    byproducts; its attention map gives a point per image (``point_method``), optionally refined by a
    second look (``zoom``): a second locator reads a zoomed window around the first point.
    Stage 2 ("what"): ``classifier``, by default ``StandardScaler + LogisticRegression``, is fitted on
    the pooled features of square crops of side ``crop_size`` centred on the clicks (on the predicted
    point where a click is missing), and applied to crops centred on the predicted points at test time.

    Images and crops are encoded by ``extractor`` (cloned; its ``output`` is set here), so with a
    ``cache_dir`` nothing is encoded twice: the cache identifies images by content and the crops are
    deterministic (integer pixel windows cut from the images), so refits, grid-search candidates that
    share a crop size and reruns read them back from disk.

    Fitting with ``Z=None`` is the "no clicks" control (the locator learns from labels only, and the
    training crops are centred on its points); fitting with shuffled Z is the shuffled-click control.

    Parameters
    ----------
    extractor : FeatureExtractor, optional
        The feature extractor of scenes and crops (a :class:`~luab_sk.features.FeatureExtractor` or an
        object with ``set_params(output=...)`` and ``transform(images)``); None uses
        ``FeatureExtractor()`` (ImageNet EfficientNet-Lite0). Its ``output`` is overridden: ``"tokens"``
        for scenes (and zoom windows), ``"pooled"`` for crops; crops are encoded with ``layer=None`` and
        ``token_dim=None`` (the pooled embedding does not depend on them, so the crop cache is shared
        across token settings). The scene's patch tokens must cover the central ``crop_pct`` square
        of the image that the backbone's evaluation transform keeps; points are mapped through it (as
        :func:`luab_sk.study.to_backbone_frame` does).
    locator : estimator, optional
        The "where" model, cloned: fitted as ``locator.fit(tokens, y, Z=clicks in the backbone frame)``
        and read through ``locator.attention_maps(tokens)`` (one map per image). None uses
        ``LUABClassifier(head="attention", byproduct_target="heatmap", hidden_size=64,
        n_components=64, random_state=random_state)``. Tune it with ``locator__byproduct_weight`` etc.
    classifier : estimator, optional
        The "what" model, cloned, fitted on the crop features; it must have ``predict``, and
        ``predict_proba`` / ``decision_function`` for those methods. None uses
        ``make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))``.
    crop_size : float or tuple of float, default=0.3
        Side of the square region the backbone sees around a point, as a fraction of the image's shorter
        side (the window cut from the image is larger by ``1 / crop_pct``, the part the evaluation
        transform trims, and is shifted to stay inside the image). Several sizes: the features of every
        size are concatenated (multi-scale). The right size depends on the object size, which a click
        does not give: choose it by validation (``GridSearchCV`` over ``crop_size``).
    point_method : {"peak", "local", "soft_argmax", "topk"}, default="peak"
        How a point is read off an attention map: ``"peak"``, the centre of its highest cell;
        ``"local"``, the mass-weighted mean of the 3 x 3 cells around the peak (sub-cell precision);
        ``"soft_argmax"``, the map's mean position; ``"topk"``, the ``top_k`` highest cells, whose crop
        features are averaged (weighted by their attention) and whose weighted mean is the point.
    top_k : int, default=3
        Cells of ``point_method="topk"``.
    zoom : float or None, default=None
        Second look: the side (fraction of the shorter image side) of a window around the first point,
        whose tokens a second locator (a clone of ``locator``) reads to refine the point. It is trained
        on windows around the clicks, shifted at random by up to ``zoom_jitter`` times their side, with
        the clicks in the window as its Z. None: one look.
    zoom_jitter : float, default=0.25
        Largest random shift of the training windows of the second look, as a fraction of ``zoom``.
    n_train_crops : int, default=1
        Training crops per image for the "what" stage: the crop at the click (or predicted point) and
        ``n_train_crops - 1`` crops shifted at random by up to ``crop_jitter`` crop sides along x and y
        (and rescaled by up to ``scale_jitter``). They teach the classifier to read the object from crops
        that miss its centre by as much as the predicted points do at test time. The classifier is fitted
        on ``n_samples * n_train_crops`` rows (each image's label repeated).
    crop_jitter : float, default=0.15
        Largest random shift of the extra training crops, as a fraction of the crop side (uniform in
        ``[-crop_jitter, crop_jitter]`` along x and y). Unused with ``n_train_crops=1``.
    scale_jitter : float, default=0.0
        Largest relative change of the side of the extra training crops (the side is multiplied by a
        factor uniform in ``[1 - scale_jitter, 1 + scale_jitter]``); 0 keeps every crop at ``crop_size``.
    test_crops : {1, 5, 9}, default=1
        Crops read around each predicted point at prediction, whose pooled features are averaged: 1, the
        point; 5, the point and four crops shifted by ``test_jitter`` crop sides left, right, up and down;
        9, a 3 x 3 grid of shifts. With the default linear "what" model, averaging the features averages
        its decision scores.
    test_jitter : float, default=0.1
        Shift of the test-time crops, as a fraction of the crop side. Unused with ``test_crops=1``.
    test_scales : tuple of float or None, default=None
        Side factors of the test-time crops (each factor repeats the ``test_crops`` layout at that size,
        all averaged), e.g. ``(0.85, 1.0, 1.15)``; None is ``(1.0,)``.
    random_state : int, RandomState instance or None, default=None
        Seeds the default locator, the jitter of the second look's training windows and the shifts of the
        extra training crops (the only random crops: an int keeps every crop, and so the cache, the same
        across refits).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    locator_ : estimator
        The fitted "where" model.
    zoom_locator_ : estimator or None
        The fitted second-look model (``zoom`` set).
    classifier_ : estimator
        The fitted "what" model, on :meth:`crop_features` rows.
    crop_fraction_ : float
        The backbone's centre-crop fraction (``crop_pct``) used to map points into its frame.
    grid_shape_ : tuple of int
        The token grid of the scenes.
    train_points_ : ndarray of shape (n_samples, 2)
        The crop centres of the training images in image coordinates (clicks, else predicted points).
    n_imputed_points_ : int
        Training images whose crop was centred on a predicted point (no usable click).
    n_train_rows_ : int
        Rows the classifier was fitted on (``n_samples * n_train_crops``).

    Notes
    -----
    Model selection: there is no internal validation split. ``crop_size``, ``point_method``, ``zoom`` and
    the locator's parameters (``locator__byproduct_weight``...) are ordinary parameters for
    ``GridSearchCV``; Z is split with X (pass ``Z=Z`` to ``GridSearchCV.fit``, or ``twostage__Z=Z`` to a
    ``Pipeline``). Score on a group-balanced validation split (``PredefinedSplit``) when the training data
    carry a shortcut: cross-validation folds of a spurious training set reward the shortcut. Only
    ``point_method`` can be changed on a fitted model (it is read at prediction; in ``fit`` it only
    places the crops of images without a click).

    Measured on real-photo backgrounds (``benchmarks/results/two_stage.md``: 400 / 100 / 300 scenes,
    correlation 0.99, 3 model seeds), with the parameters chosen on the balanced validation split
    (``crop_size=0.15``, ``point_method="local"``, ``zoom=0.5``, ``n_train_crops=4``, ``crop_jitter=0.1``,
    ``test_crops=5``): 92.4 ± 1.4% worst-group accuracy (91.8% with one training and one test crop), a
    pointing game of 96.1%, against 98.6% for crops at the true object centres, 2.2% without clicks, 3.3%
    with shuffled clicks and 19.5% for the one-stage attention probe with clicks. Crops small enough to
    fit inside the object (0.15-0.2 of the side for objects of 0.2-0.3) did most of it: at 0.25-0.3 the
    crop holds the background again. The jittered training crops and the test-time crops won on the
    validation split (96% against 92% accuracy) but gave only +0.6 points on the test split (within the
    seed spread) and nothing on validation at 240 training scenes
    (``benchmarks/results/two_stage_240.md``), and they multiply the crops to encode (7.7x the one-stage
    probe's time, cold), so the defaults keep one crop each.

    Examples
    --------
    >>> import numpy as np
    >>> from luab_sk.features import FeatureExtractor
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 255, (12, 64, 64, 3), dtype=np.uint8)
    >>> y, Z = np.arange(12) % 2, rng.uniform(0.2, 0.8, (12, 2))
    >>> fe = FeatureExtractor("timm:test_vit", pretrained=None, token_dim=8)
    >>> clf = TwoStageLUABClassifier(
    ...     fe, locator=LUABClassifier(head="attention", hidden_size=8, n_components=8, max_iter=5)
    ... )
    >>> clf.fit(images, y, Z=Z).predict(images[:3]).shape, clf.predict_points(images[:3]).shape
    ((3,), (3, 2))
    """

    __metadata_request__fit = {"Z": True}

    _parameter_constraints: dict = {
        "extractor": [HasMethods(["transform", "set_params"]), None],
        "locator": [HasMethods(["fit", "attention_maps"]), None],
        "classifier": [HasMethods(["fit", "predict"]), None],
        "crop_size": [Interval(Real, 0, 1, closed="right"), tuple, list],
        "point_method": [StrOptions(set(POINT_METHODS))],
        "top_k": [Interval(Integral, 1, None, closed="left")],
        "zoom": [Interval(Real, 0, 1, closed="right"), None],
        "zoom_jitter": [Interval(Real, 0, 0.5, closed="both")],
        "n_train_crops": [Interval(Integral, 1, None, closed="left")],
        "crop_jitter": [Interval(Real, 0, 0.5, closed="both")],
        "scale_jitter": [Interval(Real, 0, 0.5, closed="both")],
        "test_crops": [Options(Integral, {1, 5, 9})],
        "test_jitter": [Interval(Real, 0, 0.5, closed="both")],
        "test_scales": [tuple, list, None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        extractor=None,
        *,
        locator=None,
        classifier=None,
        crop_size=0.3,
        point_method="peak",
        top_k=3,
        zoom=None,
        zoom_jitter=0.25,
        n_train_crops=1,
        crop_jitter=0.15,
        scale_jitter=0.0,
        test_crops=1,
        test_jitter=0.1,
        test_scales=None,
        random_state=None,
    ):
        self.extractor = extractor
        self.locator = locator
        self.classifier = classifier
        self.crop_size = crop_size
        self.point_method = point_method
        self.top_k = top_k
        self.zoom = zoom
        self.zoom_jitter = zoom_jitter
        self.n_train_crops = n_train_crops
        self.crop_jitter = crop_jitter
        self.scale_jitter = scale_jitter
        self.test_crops = test_crops
        self.test_jitter = test_jitter
        self.test_scales = test_scales
        self.random_state = random_state

    # ------------------------------------------------------------------ helpers
    def _crop_sizes(self):
        sizes = (self.crop_size,) if isinstance(self.crop_size, Real) else tuple(self.crop_size)
        return _check_reals(sizes, 1, "crop_size must be a fraction in (0, 1] or a non-empty tuple of them")

    def _test_scales(self):
        if self.test_scales is None:
            return (1.0,)
        return _check_reals(
            tuple(self.test_scales), 2, "test_scales must be None or a non-empty tuple of factors in (0, 2]"
        )

    def _test_layout(self):
        """Offsets (m, 2) in crop sides and side factors (m,) of the test-time crops around a point."""
        offsets = TEST_OFFSETS[int(self.test_crops)] * self.test_jitter
        scales = np.asarray(self._test_scales(), dtype=np.float64)
        return np.tile(offsets, (len(scales), 1)), np.repeat(scales, len(offsets))

    def _train_layout(self, n):
        """Offsets (k, n, 2) in crop sides and side factors (k, n) of the training crops around the clicks:
        crop 0 is the click itself, crops 1..k-1 are shifted and rescaled at random."""
        k = int(self.n_train_crops)
        offsets, factors = np.zeros((k, n, 2)), np.ones((k, n))
        if k > 1:
            rs = self.random_state
            if rs is None or isinstance(rs, (Integral, np.integer)):
                # its own stream, so the crops do not move with ``zoom`` (the other random draws)
                rng = np.random.default_rng(None if rs is None else [int(rs), 1])
            else:
                rng = check_random_state(rs)
            # (k - 1, n, 2) in this order: crop j is the same for every k > j (shared cache entries)
            offsets[1:] = rng.uniform(-1.0, 1.0, (k - 1, n, 2)) * self.crop_jitter
            if self.scale_jitter:
                factors[1:] = 1.0 + rng.uniform(-1.0, 1.0, (k - 1, n)) * self.scale_jitter
        return offsets, factors

    def _extractor(self, output):
        from ..features import FeatureExtractor

        ext = clone(self.extractor) if self.extractor is not None else FeatureExtractor()
        params = {"output": output}
        if output == "pooled" and {"layer", "token_dim"} <= set(ext.get_params(deep=False)):
            params.update(layer=None, token_dim=None)
        return ext.set_params(**params)

    def _tokens(self, images):
        ext = self._extractor("tokens")
        tokens = np.asarray(ext.transform(images), dtype=np.float32)
        if tokens.ndim != 3:
            raise ValueError(
                f"the extractor must return tokens (n, L, C) for output='tokens', got {tokens.shape}."
            )
        return tokens, ext

    def _pooled(self, crops):
        F = np.asarray(self._extractor("pooled").transform(crops), dtype=np.float32)
        return F.reshape(len(F), -1)

    def _locator(self):
        if self.locator is None:
            return default_locator(self.random_state)
        return clone(self.locator)

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=False)  # the locator and classifier validate themselves
    def fit(self, X, y, Z=None):
        """Fit the locator on the scenes' tokens with the clicks, then the classifier on crops around them.

        Parameters
        ----------
        X : sequence of images or uint8 array of shape (n_samples, H, W, 3)
            Paths, PIL images or uint8 (H, W, 3) arrays.
        y : array-like of shape (n_samples,)
            Class labels (binary or multi-class).
        Z : array-like of shape (n_samples, 2), optional
            Click points (x, y) in [0, 1] image coordinates (x right, y down), NaN where missing. Must be
            an array with one row per sample, so that cross-validation splits it with X.

        Returns
        -------
        self : TwoStageLUABClassifier
        """
        sizes = self._crop_sizes()
        self._test_scales()
        images = _check_images(X)
        n = len(images)
        y = column_or_1d(y, warn=True)
        if len(y) != n:
            raise ValueError(f"X has {n} images but y has {len(y)} labels.")
        check_classification_targets(y)
        if type_of_target(y) not in ("binary", "multiclass"):
            raise ValueError("TwoStageLUABClassifier supports binary and multi-class labels only.")
        Z = check_byproducts(Z, n, dtype=np.float64)
        if Z is not None:
            if Z.shape[1] != 2:
                raise ValueError(
                    f"Z must hold one click point (x, y) per image, shape (n_samples, 2); got {Z.shape[1]} "
                    "columns (per-class points are not supported)."
                )
            check_click_points(Z, 1)
            if np.isnan(Z).all():
                Z = None
        pixels = _Pixels(images)
        sizes_wh = pixels.sizes()

        tokens, scene_ext = self._tokens(images)
        self.crop_fraction_ = _crop_fraction(scene_ext)
        frames = _frames(sizes_wh, self.crop_fraction_)
        self.locator_ = self._locator()
        self.locator_.fit(tokens, y, **({} if Z is None else {"Z": crop_points(Z, frames, sizes_wh)}))
        self.grid_shape_ = _grid(self.locator_.attention_maps(tokens[:1]))
        points, _ = self._read(self.locator_, tokens, frames, sizes_wh)
        self.zoom_locator_ = None
        if self.zoom is not None:
            rng = check_random_state(self.random_state)
            centres = points.copy()
            if Z is not None:
                seen = ~np.isnan(Z).any(axis=1)
                shift = rng.uniform(-self.zoom_jitter, self.zoom_jitter, (n, 2)) * self.zoom
                centres[seen] = np.clip(Z[seen] + shift[seen], 0.0, 1.0)
            windows, boxes = _windows(pixels, centres, self.zoom, self.crop_fraction_)
            zoom_tokens, _ = self._tokens(windows)
            self.zoom_locator_ = self._locator()
            Z_zoom = None if Z is None else crop_points(Z, boxes, sizes_wh)
            if Z_zoom is not None and np.isnan(Z_zoom).all():
                Z_zoom = None
            self.zoom_locator_.fit(zoom_tokens, y, **({} if Z_zoom is None else {"Z": Z_zoom}))
            points, _ = self._second_look(pixels, points, sizes_wh)

        centres = points if Z is None else np.where(np.isnan(Z).any(axis=1, keepdims=True), points, Z)
        self.train_points_ = centres
        self.n_imputed_points_ = int(n if Z is None else np.isnan(Z).any(axis=1).sum())
        features, k = self._train_features(pixels, centres, sizes)
        self.n_train_rows_ = len(features)
        self.classifier_ = clone(self.classifier) if self.classifier is not None else default_classifier()
        self.classifier_.fit(features, np.tile(y, k))
        self.classes_ = self.classifier_.classes_
        return self

    # ------------------------------------------------------------------ points
    def _read(self, locator, tokens, frames, sizes_wh):
        """Points (n, 2) and, for "topk", candidates (n, k, 2) with weights (n, k), in image coordinates."""
        maps = locator.attention_maps(tokens)
        if maps.ndim != 3:
            raise ValueError(
                f"the locator must give one attention map per image, (n, h, w); got shape {maps.shape}."
            )
        n, gh, gw = maps.shape
        flat = maps.reshape(n, -1).astype(np.float64)
        cx = (np.arange(gw) + 0.5) / gw
        cy = (np.arange(gh) + 0.5) / gh
        xs, ys = np.tile(cx, gh), np.repeat(cy, gw)
        best = flat.argmax(axis=1)
        method = self.point_method
        if method == "peak":
            pts = np.stack([xs[best], ys[best]], axis=1)
        elif method == "soft_argmax":
            w = flat / flat.sum(axis=1, keepdims=True)
            pts = np.stack([w @ xs, w @ ys], axis=1)
        elif method == "local":
            r, c = np.divmod(best, gw)
            rows = np.clip(r[:, None] + np.array([-1, -1, -1, 0, 0, 0, 1, 1, 1]), 0, gh - 1)
            cols = np.clip(c[:, None] + np.array([-1, 0, 1] * 3), 0, gw - 1)
            idx = rows * gw + cols  # clipped neighbours repeat edge cells: count each cell once
            w = np.take_along_axis(flat, idx, axis=1)
            dup = np.zeros_like(w, dtype=bool)
            for j in range(1, 9):
                dup[:, j] = (idx[:, :j] == idx[:, j : j + 1]).any(axis=1)
            w = np.where(dup, 0.0, w)
            w = w / w.sum(axis=1, keepdims=True)
            pts = np.stack([(w * xs[idx]).sum(1), (w * ys[idx]).sum(1)], axis=1)
        else:  # topk
            k = min(self.top_k, gh * gw)
            top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
            w = np.take_along_axis(flat, top, axis=1)
            w = w / w.sum(axis=1, keepdims=True)
            cand = np.stack([xs[top], ys[top]], axis=-1)
            cand = uncrop_points(cand.reshape(n, -1), frames, sizes_wh).reshape(n, k, 2)
            return (w[..., None] * cand).sum(axis=1), (np.clip(cand, 0.0, 1.0), w)
        pts = np.clip(uncrop_points(pts, frames, sizes_wh), 0.0, 1.0)
        return pts, (pts[:, None, :], np.ones((n, 1)))

    def _second_look(self, pixels, points, sizes_wh):
        windows, boxes = _windows(pixels, points, self.zoom, self.crop_fraction_)
        tokens, _ = self._tokens(windows)
        refined, (cand, w) = self._read(self.zoom_locator_, tokens, boxes, sizes_wh)
        return refined, (cand, w)

    def _points(self, X):
        """Validated images, their pixels and sizes, and the (refined) points with top-k candidates."""
        check_is_fitted(self)
        images = _check_images(X)
        pixels = _Pixels(images)
        sizes_wh = pixels.sizes()
        tokens, _ = self._tokens(images)
        frames = _frames(sizes_wh, self.crop_fraction_)
        points, cand = self._read(self.locator_, tokens, frames, sizes_wh)
        if self.zoom_locator_ is not None:
            points, cand = self._second_look(pixels, points, sizes_wh)
        return pixels, points, cand

    def predict_points(self, X):
        """The predicted object centre of each image.

        Parameters
        ----------
        X : sequence of images or uint8 array of shape (n_samples, H, W, 3)

        Returns
        -------
        ndarray of shape (n_samples, 2)
            (x, y) in [0, 1] image coordinates (after the second look when ``zoom`` is set).
        """
        return self._points(X)[1]

    # ------------------------------------------------------------------ crops
    def crop_images(self, X, points, crop_size=None):
        """The crops the "what" stage encodes, centred on ``points``.

        Parameters
        ----------
        X : sequence of images or uint8 array of shape (n_samples, H, W, 3)
        points : array-like of shape (n_samples, 2)
            Centres (x, y) in [0, 1] image coordinates.
        crop_size : float, optional
            Side of the region the backbone sees; defaults to the (first) ``crop_size``.

        Returns
        -------
        crops : list of uint8 arrays (h, w, 3)
            The windows cut from the images (larger than the seen region by ``1 / crop_fraction_``).
        boxes : ndarray of shape (n_samples, 4)
            The seen regions, (left, top, width, height) in pixels of each image.
        """
        check_is_fitted(self)
        size = self._crop_sizes()[0] if crop_size is None else float(crop_size)
        images = _check_images(X)
        points = _check_points(points, len(images))
        return _windows(_Pixels(images), points, size, self.crop_fraction_)

    def _encode(self, pixels, rows, centres, sides):
        """Pooled features of the crops of images ``rows`` at ``centres`` (N, 2) with sides ``sides`` (N,)."""
        crops, _ = _windows(pixels, centres, sides, self.crop_fraction_, rows=rows)
        return self._pooled(crops)

    def _train_features(self, pixels, centres, sizes):
        """Training rows: ``n_train_crops`` crops per image around ``centres`` (n, 2), crop-major
        ((k * n, d): crop 0 of every image, then crop 1...); sizes concatenated. Returns (features, k)."""
        n = len(centres)
        offsets, factors = self._train_layout(n)
        k = len(offsets)
        unit = _unit_xy(pixels)
        rows = np.tile(np.arange(n), k)
        parts = []
        for size in sizes:
            at = np.clip(centres[None] + offsets * size * unit[None], 0.0, 1.0).reshape(-1, 2)
            parts.append(self._encode(pixels, rows, at, np.minimum(size * factors, 1.0).reshape(-1)))
        return np.hstack(parts).astype(np.float32), k

    def _features_at(self, pixels, cand, weights, sizes):
        """Pooled crop features at candidate centres (n, c, 2), each with the test-time crops around it
        (``test_crops``, ``test_scales``), averaged with ``weights`` (n, c) (equal over the test-time
        crops); sizes concatenated."""
        n, c, _ = cand.shape
        offsets, factors = self._test_layout()
        m = len(factors)
        w = (np.asarray(weights, dtype=np.float64)[:, :, None] / m * np.ones(m)).reshape(n, c * m)
        unit = _unit_xy(pixels)
        rows = np.repeat(np.arange(n), c * m)
        parts = []
        for size in sizes:
            at = cand[:, :, None, :] + offsets[None, None] * size * unit[:, None, None, :]
            at = np.clip(at, 0.0, 1.0).reshape(-1, 2)
            sides = np.tile(np.minimum(size * factors, 1.0), n * c)
            F = self._encode(pixels, rows, at, sides).reshape(n, c * m, -1)
            parts.append((w[..., None] * F).sum(axis=1) if c * m > 1 else F[:, 0])
        return np.hstack(parts).astype(np.float32)

    def crop_features(self, X, points=None):
        """The features the "what" stage reads: pooled features of crops around points.

        Parameters
        ----------
        X : sequence of images or uint8 array of shape (n_samples, H, W, 3)
        points : array-like of shape (n_samples, 2), optional
            Crop centres in [0, 1] image coordinates; None uses the predicted points (and, for
            ``point_method="topk"``, the weighted average over the top-k crops). Pass the true object
            centres to measure the crop-at-the-centre ceiling: ``classifier_.predict(crop_features(X, c))``.
            Either way the test-time crops (``test_crops``, ``test_scales``) around each point are averaged.

        Returns
        -------
        ndarray of shape (n_samples, n_crop_features)
        """
        check_is_fitted(self)
        sizes = self._crop_sizes()
        if points is None:
            pixels, _, (cand, w) = self._points(X)
        else:
            images = _check_images(X)
            pixels = _Pixels(images)
            cand, w = _check_points(points, len(images))[:, None, :], np.ones((len(images), 1))
        return self._features_at(pixels, cand, w, sizes)

    # ------------------------------------------------------------------ predict
    def decision_function(self, X):
        """Decision scores of the "what" classifier on crops around the predicted points.

        Parameters
        ----------
        X : sequence of images or uint8 array of shape (n_samples, H, W, 3)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_classes)
        """
        check_is_fitted(self)
        return self.classifier_.decision_function(self.crop_features(X))

    def predict_proba(self, X):
        """Class probabilities of the "what" classifier on crops around the predicted points.

        Parameters
        ----------
        X : sequence of images or uint8 array of shape (n_samples, H, W, 3)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        return self.classifier_.predict_proba(self.crop_features(X))

    def predict(self, X):
        """Class labels read from crops around the predicted points.

        Parameters
        ----------
        X : sequence of images or uint8 array of shape (n_samples, H, W, 3)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        return self.classifier_.predict(self.crop_features(X))

    def __sklearn_is_fitted__(self):
        return hasattr(self, "classifier_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.non_deterministic = self.random_state is None and (
            self.zoom is not None or self.n_train_crops > 1
        )
        return tags


# ---------------------------------------------------------------------- geometry and images
class _Pixels:
    """Decoded RGB pixels of the images, loaded once and only when a crop or a size is needed."""

    def __init__(self, images):
        self.images = images
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i not in self._cache:
            item = self.images[i]
            if (
                isinstance(item, np.ndarray)
                and item.dtype == np.uint8
                and item.ndim == 3
                and item.shape[2] == 3
            ):
                self._cache[i] = item
            else:
                self._cache[i] = np.asarray(load_image(item))
        return self._cache[i]

    def sizes(self):
        """(n, 2) image (width, height) in pixels."""
        if isinstance(self.images, np.ndarray) and self.images.ndim == 4:
            h, w = self.images.shape[1:3]
            return np.tile(np.array([w, h], dtype=np.float64), (len(self), 1))
        return np.array([[self[i].shape[1], self[i].shape[0]] for i in range(len(self))], dtype=np.float64)


def _unit_xy(pixels):
    """(n, 2) one shorter-image-side in [0, 1] image coordinates along x and y (shifts in crop sides)."""
    wh = pixels.sizes()
    return wh.min(axis=1, keepdims=True) / wh


def _frames(sizes_wh, crop_fraction):
    """(n, 4) boxes of the central square each image's backbone input covers."""
    return np.array([center_crop_box(tuple(s), crop_fraction=crop_fraction) for s in sizes_wh])


def _windows(pixels, centres, side, crop_fraction, rows=None):
    """Cut square windows around centres (image [0, 1] coordinates) so that the backbone sees ``side``.

    The cut window is ``side / crop_fraction`` of the shorter image side (capped at that side), rounded to
    whole pixels and shifted to lie inside the image: deterministic, so the crops' cache ids repeat.
    Returns the crops (contiguous uint8 copies) and the seen boxes (left, top, width, height) in pixels.
    """
    rows = np.arange(len(centres)) if rows is None else rows
    sides = np.broadcast_to(np.asarray(side, dtype=np.float64), (len(centres),))
    crops, boxes = [], np.empty((len(centres), 4))
    for j, (i, (x, y)) in enumerate(zip(rows, centres)):
        img = pixels[int(i)]
        h, w = img.shape[:2]
        short = min(w, h)
        side = float(sides[j])
        win = int(min(short, max(1, round(side * short / crop_fraction))))
        left = int(np.clip(round(x * w - win / 2), 0, w - win))
        top = int(np.clip(round(y * h - win / 2), 0, h - win))
        crops.append(np.ascontiguousarray(img[top : top + win, left : left + win]))
        seen = win * crop_fraction
        margin = (win - seen) / 2
        boxes[j] = (left + margin, top + margin, seen, seen)
    return crops, boxes


def _check_reals(values: tuple, upper: float, message: str) -> tuple:
    """``values`` when non-empty and all real numbers (not booleans) in ``(0, upper]``; else ValueError."""
    valid = all(isinstance(v, Real) and not isinstance(v, bool) and 0 < v <= upper for v in values)
    if not values or not valid:
        raise ValueError(f"{message}, got {values!r}.")
    return values


def _crop_fraction(extractor) -> float:
    """The centre-crop fraction of the extractor's evaluation transform (1.0 if it does not say)."""
    from ..features.extractor import FeatureExtractor, _shared_backbone

    if isinstance(extractor, FeatureExtractor):
        pretrained = None if extractor.pretrained is None else str(extractor.pretrained)
        backbone = _shared_backbone(extractor.backbone, pretrained, extractor.layer)
        return float(backbone.data_config.get("crop_pct", 1.0))
    return float(getattr(extractor, "crop_fraction", 1.0))


def _grid(maps):
    return tuple(int(s) for s in maps.shape[-2:])


def _check_points(points, n):
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (n, 2) or not np.isfinite(points).all():
        raise ValueError(f"points must be finite (x, y) pairs of shape ({n}, 2), got shape {points.shape}.")
    return np.clip(points, 0.0, 1.0)


def _check_images(X):
    """A sequence of image items or a uint8 array (n, H, W, 3); a single image is an error."""
    if isinstance(X, (str, bytes, os.PathLike)) or hasattr(X, "getpixel"):
        raise TypeError(
            "X must be a sequence of images (paths, PIL images or uint8 arrays), not a single one."
        )
    if isinstance(X, np.ndarray):
        if X.dtype == object:
            return list(X)
        if X.dtype != np.uint8 or X.ndim != 4 or X.shape[-1] != 3:
            raise ValueError(
                f"X as an array must be uint8 images of shape (n_samples, H, W, 3), got {X.dtype} {X.shape}."
            )
        return X
    if not hasattr(X, "__len__") or not hasattr(X, "__getitem__"):
        raise TypeError(f"X must be a sequence of images, got {type(X).__name__}.")
    if len(X) == 0:
        raise ValueError("X holds no images.")
    return list(X)
