"""The LUAB study: do annotation byproducts make a frozen-feature classifier robust to a spurious background?

A study runs on a :class:`StudyData`: train / validation / test splits (plus, optionally, a group-balanced
training split for the oracle) with labels ``y`` and side information: clicks ``Z``, group labels for
worst-group accuracy, object boxes for the pointing game. It can hold

- your own images (paths, PIL images or arrays; :meth:`StudyData.from_images`, :meth:`StudyData.from_csv`),
  whose clicks and boxes are given in image coordinates and mapped into each backbone's frame automatically;
- precomputed features, pooled and/or patch tokens with their grid (:meth:`StudyData.from_features`,
  :meth:`StudyData.from_npz`), whose clicks are in the frame of the token grid;
- the built-in Waterbirds-style benchmark of :mod:`luab_sk.datasets.spurious`
(:meth:`StudyData.from_benchmark`;
  :func:`run_study` builds it when no data is given), with texture or real-photo backgrounds.

:func:`run_study` checks that the backbone can recognise the foregrounds at all (:func:`check_decodability`),
extracts features once (cached on disk), selects ``byproduct_weight`` by a grid search on the validation split
(widened automatically while the largest weight wins), then fits every :class:`Method` of a registry (default
:data:`METHODS`) for several seeds and reports accuracy, worst-group accuracy and the pointing game on the
test
split (:func:`evaluate_method`), mean ± sd. The default methods:

- a plain linear probe on pooled features (scikit-learn ``LogisticRegression``),
- an attention probe on the patch tokens trained without Z (the ``byproduct_weight=0`` control),
- LUAB: the same attention probe trained with the clicks Z (heatmap loss on its attention map),
- LUAB with shuffled Z (a control: the clicks of other images),
- LUAB with kNN-imputed Z (the missing clicks filled from the nearest training images),
- generalized distillation: a teacher sees the token under the click, a linear student sees pooled X,
- references that use more than labels and clicks: DFR (last-layer retraining on the group-balanced validation
  split, which needs group labels; Kirichenko et al., 2022) and an oracle (the linear probe trained on
  group-balanced training scenes: the ceiling of the backbone).

A notebook adds its own line with ``run_study(methods={**METHODS, "mine": Method(...)})``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import Bunch

from ._io import atomic_write
from .byproducts._records import strict_number
from .byproducts.geometry import center_crop_box, crop_points
from .datasets.spurious import DEFAULT_SCENE_PARAMS, foreground_crops, make_spurious_benchmark
from .estimators.classifier import LUABClassifier
from .estimators.distill import GeneralizedDistillationClassifier
from .features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, FeatureExtractor, load_backbone
from .metrics import pointing_game, worst_group_accuracy
from .nn import head_spec

__all__ = [
    "DEFAULT_BYPRODUCT_WEIGHTS",
    "DEFAULT_SEEDS",
    "METHODS",
    "Method",
    "PRESETS",
    "StudyData",
    "check_decodability",
    "default_methods",
    "evaluate_method",
    "output_names",
    "run_study",
    "select_byproduct_weight",
    "to_backbone_frame",
    "two_stage_methods",
]

DEFAULT_SEEDS = (0, 1, 2)
"""The model seeds of the main job: the default of :func:`run_study`, of ``PRESETS["default"]`` and of
``luab study``."""

DEFAULT_BYPRODUCT_WEIGHTS = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
"""The grid over ``byproduct_weight``; :func:`select_byproduct_weight` widens it while its top wins."""

PRESETS = {
    "quick": {"n_train": 200, "n_val": 50, "n_test": 100, "seeds": (0, 1)},
    "default": {"n_train": 600, "n_val": 200, "n_test": 400, "seeds": DEFAULT_SEEDS},
    "full": {"n_train": 1000, "n_val": 300, "n_test": 700, "seeds": (0, 1, 2, 3, 4)},
}
"""Study sizes: ``run_study(**PRESETS["quick"])`` for a first look (350 scenes), ``"default"`` (the main job,
1200 scenes, 3 seeds; also :func:`run_study`'s defaults) and ``"full"`` (2000 scenes, 5 seeds). The built-in
benchmark adds ``n_train`` group-balanced training scenes for the oracle reference."""

DEFAULT_LUAB_PARAMS = {
    "head": "attention",
    "byproduct_target": "heatmap",
    "hidden_size": 64,
    "n_components": 64,
}
"""The :class:`~luab_sk.estimators.classifier.LUABClassifier` of the LUAB lines on patch tokens."""

POOLED_LUAB_PARAMS = {"head": "mlp", "hidden_size": 64}
"""The LUAB lines on data without patch tokens: an MLP whose trunk also regresses the click point."""

SPLITS = ("train", "val", "test", "train_balanced")


# -- data ----------------------------------------------------------------------------------------------------
def _encode(values, what):
    """Integer codes and the sorted distinct values (as given) of a label column over all splits."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {values.shape}.")
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), names


def _points(values, n, width, what):
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n, width):
        raise ValueError(f"{what} must have shape ({n}, {width}) (one row per sample), got {arr.shape}.")
    finite = arr[~np.isnan(arr)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(f"{what} must be in [0, 1] image coordinates (NaN where missing).")
    return arr


class StudyData:
    """Train / validation / test splits and their side information, the input of :func:`run_study`.

    Each split is a :class:`~sklearn.utils.Bunch` with ``y`` (int class codes into ``class_names``) and, where
    given, ``images`` (a sequence of paths, PIL images or uint8 arrays, or an (n, H, W, 3) array), ``pooled``
    ((n, d) features), ``tokens`` ((n, L, C) patch tokens on the grid ``grid``), ``group`` (int group codes
    for
    worst-group accuracy), ``Z`` ((n, 2) clicks (x, y) in [0, 1], NaN where missing), ``boxes`` ((n, 4)
    object boxes (x0, y0, x1, y1) in [0, 1] for the pointing game). With images, ``Z`` and ``boxes`` are in
    image coordinates and :meth:`featurize` maps them into the backbone's frame (``Z_seen``, ``boxes_seen``);
    with features only, they are in the frame of the features (the token grid) already.

    The splits ``"train"``, ``"val"`` (group-balanced, if groups are given: it selects ``byproduct_weight``
    and
    trains the DFR reference) and ``"test"`` are required; ``"train_balanced"`` (group-balanced training
    samples) is optional and enables the oracle reference.

    Build one with :meth:`from_images`, :meth:`from_features`, :meth:`from_csv`, :meth:`from_npz` or
    :meth:`from_benchmark`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> data = StudyData.from_features(
    ...     ["cat", "dog"] * 6, ["train"] * 6 + ["val"] * 2 + ["test"] * 4,
    ...     pooled=rng.normal(size=(12, 5)), group=[0, 1, 1, 0] * 3,
    ... )
    >>> data.class_names, len(data["train"].y), data.has("Z")
    (['cat', 'dog'], 6, False)
    """

    def __init__(self, splits, *, class_names=None, grid=None, name="data", info=None):
        missing = {"train", "val", "test"} - set(splits)
        unknown = set(splits) - set(SPLITS)
        if missing or unknown:
            raise ValueError(
                f"a study needs the splits 'train', 'val' and 'test' (and optionally 'train_balanced'); "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}."
            )
        self.splits = {}
        for key in SPLITS:
            if key not in splits:
                continue
            split = Bunch(**dict(splits[key]))
            n = len(split.y)
            if n == 0:
                raise ValueError(f"the split {key!r} is empty.")
            split.y = np.asarray(split.y)
            for attr in ("group", "images", "pooled", "tokens", "Z", "boxes"):
                split.setdefault(attr, None)
            split.Z = _points(split.Z, n, 2, f"Z of the split {key!r}")
            split.boxes = _points(split.boxes, n, 4, f"boxes of the split {key!r}")
            for attr in ("images", "pooled", "tokens", "group"):
                value = split[attr]
                if value is not None and len(value) != n:
                    raise ValueError(f"{attr} of the split {key!r} has {len(value)} rows for {n} labels.")
            if split.images is None and split.pooled is None and split.tokens is None:
                raise ValueError(f"the split {key!r} has neither images nor features.")
            if split.images is None:  # features: Z and boxes are in their frame already
                split.setdefault("Z_seen", split.Z)
                split.setdefault("boxes_seen", split.boxes)
            self.splits[key] = split
        self.class_names = list(class_names) if class_names is not None else None
        self.grid = None if grid is None else tuple(int(g) for g in grid)
        self.name = name
        self.info = dict(info or {})
        if self.has("tokens") and self.grid is None and self["train"].images is None:
            side = int(round(np.sqrt(self["train"].tokens.shape[1])))
            if side * side != self["train"].tokens.shape[1]:
                raise ValueError("tokens need their grid (height, width) unless the grid is square.")
            self.grid = (side, side)

    def __getitem__(self, key):
        return self.splits[key]

    def __contains__(self, key):
        return key in self.splits

    def has(self, what):
        """Whether the study data holds ``what``: ``"images"``, ``"pooled"``, ``"tokens"``, ``"Z"``,
        ``"group"``, ``"boxes"`` (in every required split) or ``"train_balanced"``."""
        if what == "train_balanced":
            return "train_balanced" in self.splits
        needed = ("train", "test") if what in ("Z", "boxes") else ("train", "val", "test")
        if what == "Z":
            return all(self[k].Z is not None for k in ("train", "val"))
        if what == "boxes":
            return self["test"].boxes is not None
        return all(self[k][what] is not None for k in needed)

    def __repr__(self):
        sizes = ", ".join(f"{k}={len(v.y)}" for k, v in self.splits.items())
        have = [w for w in ("images", "pooled", "tokens", "Z", "group", "boxes") if self.has(w)]
        return f"StudyData({self.name!r}, {sizes}, with {', '.join(have)})"

    # -- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def _from_columns(cls, y, split, columns, *, class_names=None, grid=None, name="data"):
        split = np.asarray(split).astype(str)
        codes, names = _encode(y, "y")
        if len(split) != len(codes):
            raise ValueError(f"split has {len(split)} entries for {len(codes)} labels.")
        if class_names is None:
            class_names = [str(v) for v in names]
        elif np.issubdtype(np.asarray(y).dtype, np.integer):
            codes = np.asarray(y, dtype=np.int64)
        if columns.get("group") is not None:
            columns["group"] = _encode(columns["group"], "group")[0]
        splits = {}
        for key in np.unique(split):
            rows = np.flatnonzero(split == key)
            part = {"y": codes[rows]}
            for attr, value in columns.items():
                if value is None:
                    continue
                if isinstance(value, np.ndarray):
                    part[attr] = value[rows]
                else:
                    part[attr] = [value[i] for i in rows]
            splits[str(key)] = part
        return cls(splits, class_names=class_names, grid=grid, name=name)

    @classmethod
    def from_images(
        cls, images, y, split, *, group=None, Z=None, boxes=None, class_names=None, name="images"
    ):
        """Study data from images (paths, PIL images, uint8 arrays) with one split name per image.

        ``Z`` (clicks (x, y)) and ``boxes`` (x0, y0, x1, y1) are in [0, 1] coordinates of each full image, NaN
        where missing; :func:`run_study` maps them into the backbone's frame (its resize and centre crop).
        """
        n = len(y)
        columns = {
            "images": images if isinstance(images, np.ndarray) else list(images),
            "group": group,
            "Z": _points(Z, n, 2, "Z"),
            "boxes": _points(boxes, n, 4, "boxes"),
        }
        return cls._from_columns(y, split, columns, class_names=class_names, name=name)

    @classmethod
    def from_features(
        cls,
        y,
        split,
        *,
        pooled=None,
        tokens=None,
        grid=None,
        group=None,
        Z=None,
        boxes=None,
        class_names=None,
        name="features",
    ):
        """Study data from precomputed features: ``pooled`` (n, d) and/or ``tokens`` (n, L, C) on ``grid``.

        ``Z`` and ``boxes`` are in [0, 1] coordinates of the frame the features see (the token grid's).
        """
        n = len(y)
        columns = {
            "pooled": None if pooled is None else np.asarray(pooled),
            "tokens": None if tokens is None else np.asarray(tokens),
            "group": group,
            "Z": _points(Z, n, 2, "Z"),
            "boxes": _points(boxes, n, 4, "boxes"),
        }
        return cls._from_columns(y, split, columns, class_names=class_names, grid=grid, name=name)

    @classmethod
    def from_csv(cls, path):
        """Study data from a CSV file, one image per row.

        Columns: ``path`` (relative to the CSV's folder, or absolute), ``label``, ``split`` (``train``,
        ``val``,
        ``test`` or ``train_balanced``) and optionally ``group``, ``click_x``, ``click_y`` and ``box_x0``,
        ``box_y0``, ``box_x1``, ``box_y1``, all coordinates in [0, 1] of the image (an empty cell: missing).
        """
        path = Path(path)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{str(path)!r} holds no rows.")
        fields = set(rows[0])
        missing = {"path", "label", "split"} - fields
        if missing:
            raise ValueError(f"{str(path)!r} lacks the columns {sorted(missing)} (see StudyData.from_csv).")

        def number(row, line, column):
            text = (row[column] or "").strip()
            if not text:
                return np.nan
            try:
                return strict_number(text, "unit")
            except ValueError as err:  # ImpossibleValue included
                raise ValueError(
                    f"{str(path)!r} line {line}, column {column!r}: {text!r} is not a number in [0, 1] "
                    "(image coordinates; leave the cell empty for a missing value)."
                ) from err

        def numbers(names):
            if not set(names) <= fields:
                return None
            return np.array([[number(r, line, c) for c in names] for line, r in enumerate(rows, start=2)])

        root = path.parent
        images = [str(p if (p := Path(r["path"])).is_absolute() else root / p) for r in rows]
        return cls.from_images(
            images,
            [r["label"] for r in rows],
            [r["split"].strip() for r in rows],
            group=[r["group"] for r in rows] if "group" in fields else None,
            Z=numbers(("click_x", "click_y")),
            boxes=numbers(("box_x0", "box_y0", "box_x1", "box_y1")),
            name=path.stem,
        )

    @classmethod
    def from_npz(cls, path):
        """Study data from an ``.npz`` of features: ``y``, ``split`` and ``pooled`` and/or ``tokens`` (with
        ``grid``), optionally ``group``, ``Z``, ``boxes`` (in the features' frame) and ``class_names``."""
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (ValueError, OSError, EOFError) as err:  # object arrays (pickles) are refused, never loaded
            raise ValueError(f"{str(path)!r} is not a readable .npz of plain arrays: {err}") from err
        missing = {"y", "split"} - set(arrays)
        if missing or not {"pooled", "tokens"} & set(arrays):
            raise ValueError(
                f"{str(path)!r} needs the arrays 'y', 'split' and 'pooled' and/or 'tokens' (see "
                "StudyData.from_npz)."
            )
        return cls.from_features(
            arrays["y"],
            arrays["split"],
            **{k: arrays.get(k) for k in ("pooled", "tokens", "grid", "group", "Z", "boxes", "class_names")},
            name=Path(path).stem,
        )

    @classmethod
    def from_benchmark(
        cls, n_train=600, n_val=200, n_test=400, *, n_train_balanced=None, random_state=0, **scene_params
    ):
        """The built-in spurious-background benchmark (:func:`~luab_sk.datasets.make_spurious_benchmark`).

        ``n_train_balanced`` (default ``n_train``; 0 for none) group-balanced training scenes feed the oracle.
        ``scene_params`` default to :data:`~luab_sk.datasets.spurious.DEFAULT_SCENE_PARAMS`; foregrounds
        (``classes``) and ``backgrounds`` may be names, folders or lists of images (``backgrounds="photos"``:
        real-photo backgrounds).
        """
        params = {**DEFAULT_SCENE_PARAMS, **scene_params}
        balanced = n_train if n_train_balanced is None else n_train_balanced
        splits = make_spurious_benchmark(
            n_train, n_val, n_test, random_state=random_state, n_train_balanced=balanced, **params
        )
        train = splits["train"]
        info = {"background_names": list(train.background_names), "data_seed": random_state}
        return cls(splits, class_names=train.class_names, name="benchmark", info=info)

    # -- features --------------------------------------------------------------------------------------------
    def featurize(self, extractor):
        """A copy whose image splits carry ``pooled`` / ``tokens`` of ``extractor`` (``output="both"`` or one
        of
        them) and their clicks and boxes in the backbone's frame (``Z_seen``, ``boxes_seen``,
        ``crop_box``)."""
        splits = {}
        for key, split in self.splits.items():
            split = Bunch(**split)
            if split.images is not None:
                feats = extractor.transform(split.images)
                if isinstance(feats, dict):
                    split.pooled, split.tokens = np.asarray(feats["pooled"]), np.asarray(feats["tokens"])
                elif extractor.output == "tokens":
                    split.tokens = np.asarray(feats)
                else:
                    split.pooled = np.asarray(feats)
                seen = to_backbone_frame(split, extractor.backbone)
                split.Z_seen, split.boxes_seen, split.crop_box = seen.Z, seen.boxes, seen.crop_box
            splits[key] = split
        grid = getattr(extractor, "grid_", None) if self.has("images") else self.grid
        return StudyData(splits, class_names=self.class_names, grid=grid, name=self.name, info=self.info)


# -- frames --------------------------------------------------------------------------------------------------
def _image_sizes(images):
    """(n, 2) widths and heights of images as the extractor decodes them (EXIF orientation applied)."""
    if isinstance(images, np.ndarray) and images.ndim >= 3 and images.dtype != object:
        return np.tile([images.shape[2], images.shape[1]], (len(images), 1)).astype(np.float64)
    from PIL import Image

    sizes = []
    for item in images:
        if isinstance(item, np.ndarray):
            sizes.append((item.shape[1], item.shape[0]))
        elif isinstance(item, Image.Image):
            sizes.append(item.size)
        else:
            with Image.open(item) as img:
                w, h = img.size
                turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: a quarter turn
            sizes.append((h, w) if turned else (w, h))
    return np.asarray(sizes, dtype=np.float64)


def to_backbone_frame(scenes, backbone=DEFAULT_BACKBONE):
    """Clicks, boxes and images of scenes in the frame the backbone sees.

    The backbones' evaluation transform resizes and centre-crops (``crop_pct`` of the architecture, 0.875 for
    EfficientNet-Lite0; a non-square image loses the sides of its longer axis too), so the token grid covers
    the central part of an image only. Clicks and boxes must be expressed in that crop before they supervise
    or score attention maps. :func:`run_study` (:meth:`StudyData.featurize`) calls this for you.

    Parameters
    ----------
    scenes : Bunch
        ``images`` (an (n, H, W, 3) array, or a sequence of paths, PIL images or arrays of any sizes), and
        ``Z`` ((n, 2) clicks) and ``boxes`` ((n, 4)) in [0, 1] image coordinates; either may be None.
    backbone : str, default=DEFAULT_BACKBONE
        The extractor's backbone string (only its architecture's preprocessing matters).

    Returns
    -------
    seen : Bunch
        ``Z`` (clicks in the crop's [0, 1] coordinates, NaN where missing or outside the crop), ``boxes``
        (clipped to the crop), ``images`` (the cropped pixels, a view, for plotting; None unless ``images`` is
        one array) and ``crop_box`` (left, top, width, height) in pixels of the images: one tuple when all
        images have the same size, else an (n, 4) array.

    Examples
    --------
    >>> from luab_sk.datasets.spurious import make_spurious_scenes
    >>> scenes = make_spurious_scenes(4, image_size=64, random_state=0)
    >>> seen = to_backbone_frame(scenes, "timm:resnet10t")
    >>> seen.crop_box, seen.images.shape
    ((4.0, 4.0, 56.0, 56.0), (4, 56, 56, 3))
    """
    config = load_backbone(backbone, None).data_config  # the architecture's, any weights
    sizes = _image_sizes(scenes.images)
    if config.get("crop_mode") == "squash":  # the whole image, resized: normalised coordinates unchanged
        boxes = np.column_stack([np.zeros_like(sizes), sizes])
    else:
        boxes = np.array(
            [center_crop_box(tuple(s), crop_fraction=config.get("crop_pct", 1.0)) for s in sizes]
        )
    left, top, width, height = boxes.T
    w, h = sizes.T
    Z = scenes.get("Z")
    obj = scenes.get("boxes")
    if obj is not None:
        lo = np.column_stack([left / w, top / h] * 2)
        hi = np.column_stack([(left + width) / w, (top + height) / h] * 2)
        clipped = np.clip(obj, lo, hi)
        obj = np.hstack([crop_points(clipped[:, k : k + 2], boxes, sizes) for k in (0, 2)])
    uniform = bool(len(boxes)) and np.all(boxes == boxes[0]) and np.all(sizes == sizes[0])
    images = None
    if uniform and isinstance(scenes.images, np.ndarray) and scenes.images.ndim == 4:
        px = [int(round(v)) for v in boxes[0]]
        images = scenes.images[:, px[1] : px[1] + px[3], px[0] : px[0] + px[2]]
    return Bunch(
        Z=None if Z is None else crop_points(Z, boxes, sizes),
        boxes=obj,
        images=images,
        crop_box=tuple(float(v) for v in boxes[0]) if uniform else boxes,
    )


def _frame_images(split, index, size=224):
    """The pixels the backbone sees of some images of a split, resized to a common square, for plotting."""
    from .features.images import load_image

    crop = np.asarray(split.crop_box, dtype=np.float64)
    out = []
    for i in index:
        left, top, width, height = crop if crop.ndim == 1 else crop[i]
        img = load_image(split.images[i]).crop((left, top, left + width, top + height))
        out.append(np.asarray(img.resize((size, size))))
    return np.stack(out)


# -- decodability --------------------------------------------------------------------------------------------
def _pooled(features):
    return features["pooled"] if isinstance(features, dict) else features


def _box_crops(images, boxes, margin):
    """The object of each image (its box widened by ``margin`` of its size), as PIL images."""
    from .features.images import load_image

    crops = []
    for item, (x0, y0, x1, y1) in zip(images, boxes):
        img = load_image(item)
        w, h = img.size
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        box = (max(0.0, x0 - mx) * w, max(0.0, y0 - my) * h, min(1.0, x1 + mx) * w, min(1.0, y1 + my) * h)
        crops.append(img.crop(tuple(int(round(v)) for v in box)))
    return crops


def check_decodability(
    extractor,
    images=None,
    y=None,
    *,
    boxes=None,
    classes=DEFAULT_SCENE_PARAMS["classes"],
    n_samples=200,
    image_size=224,
    cv=5,
    random_state=0,
    margin=0.1,
):
    """Balanced accuracy of a linear probe that tells the foregrounds apart on foreground-only images.

    A spurious-correlation benchmark measures nothing if the backbone cannot recognise the foreground: this is
    the check to run (and pass, at about 0.9 or more) before any study.

    Parameters
    ----------
    extractor : FeatureExtractor
        Its ``transform`` must return pooled features (``output="pooled"`` or ``"both"``).
    images : sequence, optional
        Your own images (paths, PIL images, uint8 arrays) with their labels ``y``; cut to their object
        ``boxes`` when given (scenes), used whole otherwise (already foreground-only). Default: augmented
        foreground-only views of the built-in ``classes``.
    y : array-like, optional
        Labels of ``images``.
    boxes : array-like of shape (n, 4), optional
        Object boxes (x0, y0, x1, y1) in [0, 1] of each image; rows with NaN are left out.
    classes : sequence, default=("faces", "nonfaces")
        Without ``images``: foregrounds (names of :data:`~luab_sk.datasets.spurious.FOREGROUNDS`, folders or
        lists of images), drawn by :func:`~luab_sk.datasets.spurious.foreground_crops`.
    n_samples : int, default=200
        Without ``images``: number of foreground-only images.
    image_size : int, default=224
    cv : int, default=5
        Stratified folds of the cross-validation (fewer when a class has fewer images).
    random_state : int, default=0
    margin : float, default=0.1
        Widening of each box, as a fraction of its size.

    Returns
    -------
    float
        Mean cross-validated balanced accuracy of ``StandardScaler + LogisticRegression``.

    Examples
    --------
    >>> fe = FeatureExtractor("timm:resnet10t", pretrained=None)
    >>> score = check_decodability(fe, classes=("chelsea", "coffee"), n_samples=20, image_size=64, cv=2)
    >>> 0.0 <= score <= 1.0
    True
    >>> images, labels = foreground_crops(12, classes=("chelsea", "coffee"), image_size=48, random_state=0)
    >>> 0.0 <= check_decodability(fe, list(images), labels, cv=2) <= 1.0
    True
    """
    if images is None:
        images, y = foreground_crops(
            n_samples, classes=classes, image_size=image_size, random_state=random_state
        )
    else:
        if y is None or len(y) != len(images):
            raise ValueError("check_decodability needs one label y per image.")
        y = np.asarray(y)
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float64)
            keep = ~np.isnan(boxes).any(axis=1)
            images = _box_crops([images[i] for i in np.flatnonzero(keep)], boxes[keep], margin)
            y = y[keep]
        elif isinstance(images, np.ndarray):
            images = list(images)
    X = np.asarray(_pooled(extractor.transform(images)), dtype=np.float64)
    return _probe_score(X, y, cv, random_state)


def _probe_score(X, y, cv=5, random_state=0):
    """Cross-validated balanced accuracy of a standardised logistic regression."""
    folds = min(cv, int(np.unique(y, return_counts=True)[1].min()))
    if folds < 2:
        raise ValueError("check_decodability needs at least two images of every class.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=random_state)
    return float(cross_val_score(probe, X, y, cv=splitter, scoring="balanced_accuracy").mean())


def _clicked_tokens(tokens, clicks, grid):
    """The token under each click (NaN where the click is missing): privileged features for distillation."""
    h, w = grid
    out = np.full((len(tokens), tokens.shape[2]), np.nan, dtype=np.float64)
    seen = ~np.isnan(clicks).any(axis=1)
    col = np.minimum((clicks[seen, 0] * w).astype(int), w - 1)
    row = np.minimum((clicks[seen, 1] * h).astype(int), h - 1)
    out[seen] = tokens[np.flatnonzero(seen), row * w + col]
    return out


# -- methods -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One line of the study table: a way to fit on the training data and predict the test split.

    Parameters
    ----------
    fit_predict : callable
        ``fit_predict(data, seed, context)`` fits on ``data`` (a featurized :class:`StudyData`) with the model
        seed ``seed`` and returns a :class:`~sklearn.utils.Bunch` with ``pred`` (test predictions, class
        codes)
        and optionally ``attention`` ((n_test, h*w) maps on ``data.grid``, for the pointing game) and
        ``model``. ``context`` is a Bunch with ``byproduct_weight`` (selected on the validation split),
        ``luab_params`` (the LUAB classifier's parameters for the data's input), ``input`` (``"tokens"`` or
        ``"pooled"``), ``grid`` and ``extractor`` (the :class:`~luab_sk.features.FeatureExtractor`, None on
        precomputed features; a method that crops images, such as a two-stage "where, then what" classifier,
        encodes its crops with it).
    requires : tuple of str, default=()
        What the data must hold, among ``"pooled"``, ``"tokens"``, ``"Z"``, ``"group"``, ``"boxes"``,
        ``"images"``, ``"train_balanced"``; :func:`run_study` skips (and reports) a method whose needs are not
        met.
    uses : str, default="labels"
        What it learns from, for the table: ``"labels"``, ``"labels + Z"``, ``"labels + shuffled Z"``, ...
    kind : {"method", "control", "reference"}, default="method"
        Controls (shuffled Z, weight 0) test a claim; references use information a method without group
        labels lacks (DFR's group labels, the oracle's balanced training data).

    Examples
    --------
    >>> from sklearn.neighbors import KNeighborsClassifier
    >>> def knn(data, seed, context):
    ...     model = KNeighborsClassifier(5).fit(data["train"].pooled, data["train"].y)
    ...     return Bunch(pred=model.predict(data["test"].pooled), model=model)
    >>> methods = {**METHODS, "5-NN (pooled)": Method(knn, requires=("pooled",))}
    >>> list(methods)[-1]
    '5-NN (pooled)'
    """

    fit_predict: Callable
    requires: tuple = ()
    uses: str = "labels"
    kind: str = "method"
    description: str = field(default="", compare=False)

    def missing(self, data):
        """The requirements ``data`` does not meet (an empty list when the method can run)."""
        return [need for need in self.requires if not data.has(need)]


def _luab_input(data):
    return "tokens" if data.has("tokens") else "pooled"


def _fit_luab(data, seed, context, Z, **extra):
    key = context.input
    params = {**context.luab_params, "byproduct_weight": context.byproduct_weight, **extra}
    model = LUABClassifier(**params, random_state=seed)
    train, test = data["train"], data["test"]
    model.fit(train[key], train.y) if Z is None else model.fit(train[key], train.y, Z=Z)
    attention = model.attention_maps(test[key]) if head_spec(model.head).spatial else None
    return Bunch(pred=model.predict(test[key]), attention=attention, model=model)


def _linear_probe(data, seed, context):
    model = LogisticRegression(max_iter=3000).fit(data["train"].pooled, data["train"].y)
    return Bunch(pred=model.predict(data["test"].pooled), model=model)


def _attention_no_z(data, seed, context):
    return _fit_luab(data, seed, context, None, byproduct_weight=0.0)


def _luab_z(data, seed, context):
    return _fit_luab(data, seed, context, data["train"].Z_seen)


def _luab_shuffled_z(data, seed, context):
    Z = data["train"].Z_seen
    return _fit_luab(data, seed, context, Z[np.random.default_rng(seed).permutation(len(Z))])


def _luab_knn_z(data, seed, context):
    return _fit_luab(data, seed, context, data["train"].Z_seen, impute_byproducts="knn")


def _distillation(data, seed, context):
    train = data["train"]
    privileged = _clicked_tokens(train.tokens, train.Z_seen, data.grid)
    model = GeneralizedDistillationClassifier(teacher_input="z").fit(train.pooled, train.y, Z=privileged)
    return Bunch(pred=model.predict(data["test"].pooled), model=model)


def _balanced_subset(group, rng):
    """Indices of a group-balanced subsample: every group cut to the size of the smallest one."""
    groups, counts = np.unique(group, return_counts=True)
    return np.sort(
        np.concatenate([rng.choice(np.flatnonzero(group == g), counts.min(), replace=False) for g in groups])
    )


def _dfr(data, seed, context):
    """Deep feature reweighting (Kirichenko et al., 2022) on frozen features: a logistic regression on pooled
    features of a group-balanced subsample of the validation split (standardised, C by 5-fold CV on it)."""
    val = data["val"]
    rows = _balanced_subset(val.group, np.random.default_rng(seed))
    folds = min(5, int(np.unique(val.y[rows], return_counts=True)[1].min()))
    model = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        {"logisticregression__C": [0.01, 0.03, 0.1, 0.3, 1.0]},
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
    )
    model.fit(val.pooled[rows], val.y[rows])
    return Bunch(pred=model.predict(data["test"].pooled), model=model)


def _oracle(data, seed, context):
    train = data["train_balanced"]
    model = LogisticRegression(max_iter=3000).fit(train.pooled, train.y)
    return Bunch(pred=model.predict(data["test"].pooled), model=model)


def default_methods():
    """A fresh, ordered dict of the study's default :class:`Method` lines (a copy of :data:`METHODS`)."""
    return {
        "linear probe (pooled)": Method(_linear_probe, ("pooled",), "labels"),
        "attention probe, no Z": Method(
            _attention_no_z, ("tokens",), "labels", "control", "LUAB's probe with byproduct_weight=0"
        ),
        "LUAB, Z": Method(_luab_z, ("Z",), "labels + Z"),
        "LUAB, shuffled Z": Method(
            _luab_shuffled_z, ("Z",), "labels + shuffled Z", "control", "the clicks of other images"
        ),
        "LUAB, kNN-imputed Z": Method(_luab_knn_z, ("Z",), "labels + Z"),
        "generalized distillation": Method(_distillation, ("pooled", "tokens", "Z"), "labels + Z"),
        "DFR (group-balanced val)": Method(
            _dfr,
            ("pooled", "group"),
            "labels + groups",
            "reference",
            "last-layer retraining on the group-balanced validation split",
        ),
        "oracle (balanced training)": Method(
            _oracle,
            ("pooled", "train_balanced"),
            "balanced training",
            "reference",
            "the linear probe trained on group-balanced training data: the backbone's ceiling",
        ),
    }


def two_stage_methods(**params):
    """Study lines for the two-stage "where, then what" classifier and its shuffled-click control.

    :class:`~luab_sk.estimators.two_stage.TwoStageLUABClassifier` locates the object with a click-supervised
    attention probe, then classifies features of an image crop around it, encoded by the study's extractor.
    It needs images (not precomputed features) and clicks, in image coordinates (it maps them itself). Not in
    :data:`METHODS` (it encodes crops for every fit): add it with
    ``run_study(methods={**METHODS, **two_stage_methods(**params)})``. The example's parameters are those
    ``benchmarks/two_stage.py`` selected on its balanced validation split
    (``benchmarks/results/two_stage.md``): small crops (0.15 of the side) around a local-maximum point refined
    by a zoomed second look, four jittered training crops and five averaged test crops;
    ``benchmarks/luab_study.py --two-stage`` runs the study table with them.

    Parameters
    ----------
    **params
        Parameters of :class:`~luab_sk.estimators.two_stage.TwoStageLUABClassifier` (not ``extractor`` or
        ``random_state``, which the study sets).

    Examples
    --------
    >>> lines = two_stage_methods(
    ...     crop_size=0.15, point_method="local", zoom=0.5, n_train_crops=4, crop_jitter=0.1, test_crops=5
    ... )
    >>> methods = {**METHODS, **lines}
    >>> list(lines), lines["two-stage, shuffled Z"].kind
    (['two-stage, Z', 'two-stage, shuffled Z'], 'control')
    """
    from .estimators.two_stage import TwoStageLUABClassifier

    def fit_predict(shuffle):
        def run(data, seed, context):
            train = data["train"]
            Z = train.Z if not shuffle else train.Z[np.random.default_rng(seed).permutation(len(train.Z))]
            model = TwoStageLUABClassifier(context.extractor, random_state=seed, **params)
            model.fit(train.images, train.y, Z=Z)
            return Bunch(pred=model.predict(data["test"].images), model=model)

        return run

    return {
        "two-stage, Z": Method(fit_predict(False), ("images", "Z"), "labels + Z"),
        "two-stage, shuffled Z": Method(
            fit_predict(True), ("images", "Z"), "labels + shuffled Z", "control", "the clicks of other images"
        ),
    }


METHODS = MappingProxyType(default_methods())
"""The default lines of the study table, name -> :class:`Method` (read-only; extend with
``{**METHODS, "name": Method(...)}``). The two-stage "where, then what" classifier (crops around clicks) and
its shuffled-click control are two more entries: ``{**METHODS, **two_stage_methods()}``."""

NO_Z_METHODS = ("linear probe (pooled)", "attention probe, no Z")
"""The default methods that never see the byproducts (distillation uses them in training, through its
teacher)."""


def _resolve_methods(methods):
    if methods is None:
        return dict(METHODS)
    if isinstance(methods, dict) or isinstance(methods, MappingProxyType):
        bad = [k for k, m in methods.items() if not isinstance(m, Method)]
        if bad:
            raise ValueError(f"methods must map names to Method objects; not so for {bad}.")
        return dict(methods)
    names = list(methods)
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown}; choose among {list(METHODS)} or pass a dict of Method.")
    return {n: METHODS[n] for n in names}


def evaluate_method(method, data, *, seed=0, context=None, byproduct_weight=1.0, luab_params=None):
    """Fit one :class:`Method` on featurized study data and score it on the test split.

    Parameters
    ----------
    method : Method
    data : StudyData
        With features (:meth:`StudyData.featurize` for images).
    seed : int, default=0
    context : Bunch, optional
        As described in :class:`Method`; by default built from ``byproduct_weight`` and ``luab_params``
        (merged into :data:`DEFAULT_LUAB_PARAMS`, or :data:`POOLED_LUAB_PARAMS` without tokens).
    byproduct_weight : float, default=1.0
    luab_params : dict, optional

    Returns
    -------
    metrics : dict
        ``accuracy``, ``worst_group_accuracy`` (None without groups), ``pointing_game`` (None without
        attention or boxes), ``fit_s``; and ``output``, the method's Bunch (predictions, attention, model).
    """
    context = context if context is not None else _context(data, byproduct_weight, luab_params, None)
    missing = method.missing(data)
    if missing:
        raise ValueError(f"this method needs {missing}, which the study data lacks.")
    start = time.perf_counter()
    out = method.fit_predict(data, seed, context)
    fit_s = time.perf_counter() - start
    test = data["test"]
    pred = np.asarray(out.pred)
    attention = out.get("attention")
    boxes = test.get("boxes_seen")
    return {
        "accuracy": float(np.mean(pred == test.y)),
        "worst_group_accuracy": None
        if test.group is None
        else worst_group_accuracy(test.y, pred, test.group),
        "pointing_game": None
        if attention is None or boxes is None
        else pointing_game(np.asarray(attention), boxes, grid=data.grid),
        "fit_s": fit_s,
        "output": out,
    }


def _context(data, weight, luab_params, extractor):
    key = _luab_input(data)
    base = DEFAULT_LUAB_PARAMS if key == "tokens" else POOLED_LUAB_PARAMS
    return Bunch(
        byproduct_weight=weight,
        luab_params={**base, **(luab_params or {})},
        input=key,
        grid=data.grid,
        extractor=extractor,
    )


def _next_weight(top):
    """The next grid step above ``top`` on the 1, 3, 10, 30 ladder."""
    if top <= 0:
        return 1.0
    lead = top / 10 ** np.floor(np.log10(top))
    return float(top * (10 / 3 if lead >= 2.5 else 3.0))


def select_byproduct_weight(
    data, weights=DEFAULT_BYPRODUCT_WEIGHTS, *, luab_params=None, seed=0, extend=True, max_extensions=3
):
    """Grid search over ``byproduct_weight`` of LUAB with Z: fit on the training split, accuracy on the
    validation split; while the largest weight wins, widen the grid (x3, x10/3: 300, 1000, 3000, ...).

    Returns
    -------
    Bunch
        ``weight`` (selected), ``weights`` and ``scores`` (every weight tried, ascending, and its validation
        accuracy), ``extended`` (the weights added because the top won), ``interior`` (False when the
        selected weight is still the largest tried) and ``cv_results`` (``param_byproduct_weight`` and
        ``mean_test_score``, for :func:`~luab_sk.plotting.plot_byproduct_weight_curve`).
    """
    context = _context(data, 0.0, luab_params, None)
    key = context.input
    train, val = data["train"], data["val"]
    X = np.concatenate([train[key], val[key]])
    y = np.r_[train.y, val.y]
    Z = np.vstack([train.Z_seen, val.Z_seen])
    fold = PredefinedSplit(np.r_[np.full(len(train.y), -1), np.zeros(len(val.y))])
    scores = {}

    def search(grid):
        gs = GridSearchCV(
            LUABClassifier(**context.luab_params, random_state=seed),
            {"byproduct_weight": list(grid)},
            cv=fold,
            scoring="accuracy",
            refit=False,
        )
        gs.fit(X, y, Z=Z)
        scores.update(zip(grid, gs.cv_results_["mean_test_score"].tolist()))

    search(sorted(set(float(w) for w in weights)))
    extended = []
    while extend and len(extended) < max_extensions:
        ranked = sorted(scores)
        best = max(ranked, key=lambda w: (scores[w], -w))  # ties go to the smaller weight
        if best != ranked[-1] or best == 0:
            break
        nxt = _next_weight(best)
        extended.append(nxt)
        search([nxt])
    ranked = sorted(scores)
    best = max(ranked, key=lambda w: (scores[w], -w))
    return Bunch(
        weight=best,
        weights=ranked,
        scores=[scores[w] for w in ranked],
        extended=extended,
        interior=best != ranked[-1] or len(ranked) == 1,
        cv_results={
            "param_byproduct_weight": np.array(ranked, dtype=object),
            "mean_test_score": np.array([scores[w] for w in ranked]),
            "params": [{"byproduct_weight": w} for w in ranked],
        },
    )


# -- the study -----------------------------------------------------------------------------------------------
def _summary(runs, methods):
    table = []
    for name, method in methods.items():
        rows = [run["results"][name] for run in runs if name in run["results"]]
        if not rows:
            continue
        entry = {"method": name, "uses": method.uses, "kind": method.kind, "n_runs": len(rows)}
        for metric in ("accuracy", "worst_group_accuracy", "pointing_game", "fit_s"):
            values = [r[metric] for r in rows if r[metric] is not None]
            entry[metric] = (float(np.mean(values)), float(np.std(values))) if values else None
        table.append(entry)
    return table


def _markdown(table, meta):
    def cell(v, pct=True):
        if v is None:
            return "n/a"
        return f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}" if pct else f"{v[0]:.1f}"

    lines = [
        "| method | learns from | accuracy (%) | worst-group accuracy (%) | pointing game (%) "
        "| fit time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for e in table:
        name = e["method"] + {"control": " (control)", "reference": " (reference)"}.get(e["kind"], "")
        lines.append(
            f"| {name} | {e['uses']} | {cell(e['accuracy'])} | {cell(e['worst_group_accuracy'])} | "
            f"{cell(e['pointing_game'])} | {cell(e['fit_s'], pct=False)} |"
        )
    draws = meta["data_seeds"]
    runs = meta["n_runs"]
    dec = meta["decodability"]
    selected = meta["byproduct_weight_selected"]
    notes = [
        "",
        f"Mean ± standard deviation over {runs} runs: model seeds {list(meta['seeds'])}"
        + (f" x scene draws (data_seed) {list(draws)}" if meta["source"] == "benchmark" else "")
        + f", on the test split ({meta['n_test']} samples"
        + (", group-balanced" if meta["source"] == "benchmark" else "")
        + f"); training split of {meta['n_train']} samples"
        + (
            f" with background-label correlation {meta['correlation']}, backgrounds "
            f"{meta['backgrounds']}, foregrounds {meta['classes']}"
            if meta["source"] == "benchmark"
            else f" ({meta['data']})"
        )
        + ". Foreground decodability (balanced linear probe on foreground-only images): "
        + ("not checked" if dec is None else f"{100 * dec:.1f}%")
        + (
            ""
            if meta.get("background_decodability") is None
            else f"; background decodability from whole-scene pooled features (test split, 5-fold): "
            f"{100 * meta['background_decodability']:.1f}%"
        )
        + f". byproduct_weight selected on the validation split from {meta['byproduct_weights_tried']}: "
        + ", ".join(f"{w:g}" for w in selected)
        + (" (per scene draw)" if len(selected) > 1 else "")
        + (
            f"; the grid was widened to {sorted(set(meta['byproduct_weights_extended']))} because its top won"
            if meta["byproduct_weights_extended"]
            else ""
        )
        + ("" if meta["weight_interior"] else "; the selected weight is still the largest tried")
        + f". Backbone {meta['backbone']}.",
    ]
    if meta.get("skipped"):
        notes.append(
            "\nSkipped (the data lacks what they need): "
            + "; ".join(f"{k} ({', '.join(v)})" for k, v in meta["skipped"].items())
            + "."
        )
    worst = {e["method"]: e["worst_group_accuracy"][0] for e in table if e["worst_group_accuracy"]}
    no_z = [e["method"] for e in table if e["uses"] == "labels" and e["method"] in worst]
    if no_z and "LUAB, Z" in worst:
        best = max(no_z, key=worst.get)
        gaps = [f"{m} {100 * (worst[m] - worst[best]):+.1f}" for m in worst if m not in no_z]
        notes.append(
            f"\nWorst-group accuracy against the best method that learns from labels only ({best}), "
            "in points: " + "; ".join(gaps) + "."
        )
    return "\n".join(lines + notes) + "\n"


def _load_data(data):
    if isinstance(data, StudyData):
        return data
    path = Path(data)
    if path.suffix.lower() == ".csv":
        return StudyData.from_csv(path)
    if path.suffix.lower() == ".npz":
        return StudyData.from_npz(path)
    raise ValueError(f"data must be a StudyData, a .csv or a .npz file, got {data!r}.")


def run_study(
    data=None,
    *,
    methods=None,
    n_train=600,
    n_val=200,
    n_test=400,
    n_train_balanced=None,
    correlation=DEFAULT_SCENE_PARAMS["correlation"],
    classes=DEFAULT_SCENE_PARAMS["classes"],
    backgrounds=DEFAULT_SCENE_PARAMS["backgrounds"],
    object_scale=DEFAULT_SCENE_PARAMS["object_scale"],
    click_noise=DEFAULT_SCENE_PARAMS["click_noise"],
    missing_rate=DEFAULT_SCENE_PARAMS["missing_rate"],
    image_size=DEFAULT_SCENE_PARAMS["image_size"],
    seeds=DEFAULT_SEEDS,
    data_seeds=None,
    byproduct_weights=DEFAULT_BYPRODUCT_WEIGHTS,
    extend_weights=True,
    luab_params=None,
    backbone=DEFAULT_BACKBONE,
    pretrained=DEFAULT_PRETRAINED,
    token_dim=256,
    cache_dir=None,
    output_dir=None,
    output_name="luab_study",
    plots=True,
    min_decodability=0.9,
    n_decodability=200,
    data_seed=0,
    batch_size=64,
    verbose=1,
):
    """Run the LUAB study and return its results table; optionally write markdown, JSON and plots.

    Parameters
    ----------
    data : StudyData, str or None, default=None
        Your data (a :class:`StudyData`, a CSV file of images as in :meth:`StudyData.from_csv`, or an
        ``.npz`` of features as in :meth:`StudyData.from_npz`); None builds the built-in benchmark from the
        scene parameters below.
    methods : dict of str to Method, or sequence of str, optional
        The table's lines (default :data:`METHODS`); names pick a subset of :data:`METHODS`.
    n_train, n_val, n_test : int, default=600, 200, 400
        Built-in benchmark: scenes per split (the validation and test splits are group-balanced).
    n_train_balanced : int, optional
        Built-in benchmark: group-balanced training scenes of the oracle (default ``n_train``; 0: no oracle).
    correlation : float, default=0.99
        Background-label agreement in the training split (0.99: 6 of the 600 default training scenes
        show a background of the other class). See ``benchmarks/results/`` for 0.95 and 0.98.
    classes, backgrounds, object_scale, click_noise, missing_rate, image_size
        Built-in benchmark, see :func:`~luab_sk.datasets.spurious.make_spurious_scenes` (defaults:
        :data:`~luab_sk.datasets.spurious.DEFAULT_SCENE_PARAMS`). ``backgrounds="photos"``: random crops of
        two real photos (scikit-learn's ``china.jpg`` temple vs ``flower.jpg``); foregrounds and backgrounds
        may also be folders or lists of images.
    seeds : sequence of int, default=DEFAULT_SEEDS
        Model seeds, (0, 1, 2); every method is fitted once per seed on the same features.
    data_seeds : sequence of int, optional
        Built-in benchmark: scene draws (default ``(data_seed,)``); each draw gets its own features, weight
        search and fits, and the table pools all draws x seeds.
    byproduct_weights : sequence of float, default=DEFAULT_BYPRODUCT_WEIGHTS
        Grid over ``byproduct_weight`` (LUAB with Z, accuracy on the validation split, see
        :func:`select_byproduct_weight`); the selected weight is used by every LUAB line.
    extend_weights : bool, default=True
        Widen the grid while its largest weight is selected (up to three steps; reported).
    luab_params : dict, optional
        Parameters of the :class:`~luab_sk.estimators.classifier.LUABClassifier` lines, merged into
        :data:`DEFAULT_LUAB_PARAMS` (attention head, heatmap loss on the clicks), or into
        :data:`POOLED_LUAB_PARAMS` on data without patch tokens.
    backbone, pretrained : str
        Feature extractor backbone (default: ImageNet EfficientNet-Lite0, offline); unused on features.
    token_dim : int or None, default=256
        Width of the cached patch tokens (a fixed random orthogonal projection of the extractor, done once;
        the attention probes then reduce further with a PCA). None keeps the backbone's width.
    cache_dir : str or None, default=None
        Embedding cache of the extractor: a rerun reads the features from disk.
    output_dir : str or None, default=None
        Where to write ``<output_name>.md``, ``.json``, ``_weights.png`` (validation accuracy against the
        byproduct weight) and ``_attention.png`` (attention maps without Z, with Z and with shuffled Z on
        test samples of the rarest training groups); None writes nothing. The folder is created (with its
        parents) and checked for writing before any work; existing files of the same names are replaced, each
        written atomically (see :func:`output_names`). ``luab study`` writes to ``./luab_output/`` by default;
        only ``benchmarks/luab_study.py`` writes the tracked ``benchmarks/results/``.
    output_name : str, default="luab_study"
        Stem of the output files (a plain file name, no folder).
    plots : bool, default=True
        Draw the plots (needs matplotlib) when ``output_dir`` is set.
    min_decodability : float, default=0.9
        Stop with an error when the backbone's foreground decodability is below this (checked on the
        built-in foregrounds, or on your images cut to their boxes; not checked without boxes or images).
    n_decodability : int, default=200
        Images of the decodability check (:func:`check_decodability`).
    data_seed : int, default=0
        Seed of the generated scenes (when ``data_seeds`` is not given).
    batch_size : int, default=64
        Feature extraction batch size.
    verbose : int, default=1
        Print progress and the table.

    Returns
    -------
    result : :class:`~sklearn.utils.Bunch`
        ``table`` (list of dict: method, uses, kind, n_runs, then (mean, std) of accuracy,
        worst_group_accuracy, pointing_game (None without attention) and fit_s), ``markdown`` (str), ``runs``
        (one dict per scene draw and seed: ``data_seed``, ``seed``, ``results`` per method), ``decodability``,
        ``byproduct_weight`` (selected on the first draw) and ``weight_searches`` (one
        :func:`select_byproduct_weight` result per draw), ``cv_results`` (the first draw's), ``skipped``
        (methods the data cannot run, with what they lack), ``files`` (written paths), ``timings`` (seconds).

    Raises
    ------
    RuntimeError
        When the foreground decodability is below ``min_decodability``.

    Examples
    --------
    >>> result = run_study(
    ...     n_train=24, n_val=8, n_test=8, image_size=64, seeds=(0,), byproduct_weights=(0.0, 1.0),
    ...     backbone="timm:resnet10t", pretrained=None, n_decodability=20, min_decodability=0.0,
    ...     luab_params={"max_iter": 5, "n_components": 8, "hidden_size": 8}, extend_weights=False, verbose=0,
    ...     methods=["linear probe (pooled)", "attention probe, no Z", "LUAB, Z"], n_train_balanced=0,
    ... )
    >>> [row["method"] for row in result.table][:2]
    ['linear probe (pooled)', 'attention probe, no Z']
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed.")
    weights = tuple(float(w) for w in byproduct_weights)
    if not weights or min(weights) < 0:
        raise ValueError(
            f"byproduct_weights must be a non-empty sequence of non-negative numbers, got {weights}."
        )
    reserved = {"byproduct_weight", "random_state", "impute_byproducts"} & set(luab_params or {})
    if reserved:
        raise ValueError(
            f"luab_params must not set {sorted(reserved)}: the study sets them (byproduct_weights, seeds, "
            "the kNN-imputed line)."
        )
    methods = _resolve_methods(methods)
    user = None if data is None else _load_data(data)
    if user is not None and data_seeds is not None:
        raise ValueError("data_seeds draws scenes of the built-in benchmark; it does not apply to your data.")
    draws = (int(data_seed),) if data_seeds is None else tuple(int(s) for s in data_seeds)
    if not draws:
        raise ValueError("data_seeds must hold at least one seed.")
    if output_dir is not None:
        _prepare_output_dir(Path(output_dir), output_name, plots)
    log = print if verbose else (lambda *a, **k: None)
    timings = {"decodability_s": 0.0, "extract_s": 0.0, "grid_search_s": 0.0, "fits_s": 0.0}
    start = time.perf_counter()
    scene_params = {
        "correlation": correlation,
        "classes": classes,
        "backgrounds": backgrounds,
        "object_scale": object_scale,
        "click_noise": click_noise,
        "missing_rate": missing_rate,
        "image_size": image_size,
    }
    needs_images = user is None or user.has("images")
    extractor = None
    if needs_images:
        extractor = FeatureExtractor(
            backbone,
            pretrained,
            output="both",
            token_dim=token_dim,
            cache_dir=cache_dir,
            batch_size=batch_size,
        )

    decodability = None
    t0 = time.perf_counter()
    if user is None:
        decodability = check_decodability(
            extractor, classes=classes, n_samples=n_decodability, image_size=image_size, random_state=draws[0]
        )
    elif user.has("images") and user["train"].boxes is not None:
        train = user["train"]
        rows = np.random.default_rng(0).permutation(len(train.y))[:n_decodability]
        images = [train.images[i] for i in rows]
        decodability = check_decodability(extractor, images, train.y[rows], boxes=train.boxes[rows])
    timings["decodability_s"] = time.perf_counter() - t0
    if decodability is not None:
        log(f"foreground decodability (balanced linear probe, 5-fold): {100 * decodability:.1f}%")
        if decodability < min_decodability:
            raise RuntimeError(
                f"the backbone {backbone!r} recognises the foregrounds with balanced accuracy "
                f"{decodability:.3f} < min_decodability={min_decodability}: the benchmark would measure "
                "nothing. Choose other classes, a larger image_size or another backbone."
            )

    runs, searches, maps, first, shortcut = [], [], {}, None, None
    skipped = {}
    for draw in draws if user is None else (None,):
        t0 = time.perf_counter()
        if user is None:
            study = StudyData.from_benchmark(
                n_train, n_val, n_test, n_train_balanced=n_train_balanced, random_state=draw, **scene_params
            )
        else:
            study = user
        if study.has("images"):
            study = study.featurize(extractor)
        timings["extract_s"] += time.perf_counter() - t0
        sizes = {k: len(v.y) for k, v in study.splits.items()}
        log(f"data {study.name} {sizes}: features in {time.perf_counter() - t0:.0f} s (grid {study.grid})")
        if first is None:
            first = study
            test = study["test"]
            if test.get("background") is not None and test.pooled is not None:  # how strong is the shortcut?
                shortcut = _probe_score(np.asarray(test.pooled, dtype=np.float64), test.background)
                log(f"background decodability from whole-scene pooled features: {100 * shortcut:.1f}%")

        search = None
        t0 = time.perf_counter()
        if study.has("Z"):
            search = select_byproduct_weight(
                study, weights, luab_params=luab_params, seed=seeds[0], extend=extend_weights
            )
            searches.append(search)
            log(
                f"byproduct_weight {search.weights}: validation accuracy "
                f"{np.round(search.scores, 3).tolist()}, "
                f"selected {search.weight:g}"
                + (f" (grid widened by {search.extended})" if search.extended else "")
                + f" ({time.perf_counter() - t0:.0f} s)"
            )
        timings["grid_search_s"] += time.perf_counter() - t0
        context = _context(study, None if search is None else search.weight, luab_params, extractor)

        t0 = time.perf_counter()
        for seed in seeds:
            results = {}
            for name, method in methods.items():
                missing = method.missing(study)
                if missing:
                    skipped[name] = missing
                    continue
                metrics = evaluate_method(method, study, seed=seed, context=context)
                out = metrics.pop("output")
                if study is first and seed == seeds[0] and out.get("attention") is not None:
                    maps[name] = np.asarray(out.attention)
                results[name] = metrics
                wga = metrics["worst_group_accuracy"]
                log(
                    f"data {draw} seed {seed} {name:28s} acc {metrics['accuracy']:.3f} "
                    + ("" if wga is None else f"worst {wga:.3f} ")
                    + f"({metrics['fit_s']:.1f} s)"
                )
            runs.append({"data_seed": draw, "seed": seed, "results": results})
        timings["fits_s"] += time.perf_counter() - t0
        if skipped:
            log(f"skipped (missing data): {skipped}")

    table = _summary(runs, methods)
    source = "benchmark" if user is None else "data"
    tried = sorted({w for s in searches for w in s.weights})
    meta = {
        "source": source,
        "data": None if user is None else repr(user),
        "n_train": len(first["train"].y),
        "n_val": len(first["val"].y),
        "n_test": len(first["test"].y),
        "n_train_balanced": len(first["train_balanced"].y) if "train_balanced" in first else 0,
        "seeds": list(seeds),
        "data_seeds": list(draws) if user is None else [],
        "n_runs": len(runs),
        "byproduct_weight": None if not searches else searches[0].weight,
        "byproduct_weight_selected": [s.weight for s in searches],
        "byproduct_weights_tried": tried,
        "byproduct_weights_extended": [w for s in searches for w in s.extended],
        "weight_interior": all(s.interior for s in searches),
        "decodability": decodability,
        "background_decodability": shortcut,
        "backbone": backbone if extractor is not None else "precomputed features",
        "pretrained": pretrained if extractor is not None else None,
        "luab_params": _context(first, None, luab_params, None).luab_params,
        "token_dim": token_dim,
        "grid": None if first.grid is None else list(first.grid),
        "methods": {
            n: {"uses": m.uses, "kind": m.kind, "description": m.description} for n, m in methods.items()
        },
        "skipped": skipped,
    }
    if user is None:
        meta.update(
            correlation=correlation,
            classes=[str(c) for c in first.class_names],
            backgrounds=first.info["background_names"],
            object_scale=list(np.atleast_1d(object_scale).astype(float)),
            click_noise=click_noise,
            missing_rate=missing_rate,
            image_size=image_size,
        )
    timings["total_s"] = time.perf_counter() - start
    markdown = _markdown(table, meta)
    log("\n" + markdown)
    result = Bunch(
        table=table,
        markdown=markdown,
        runs=runs,
        decodability=decodability,
        byproduct_weight=meta["byproduct_weight"],
        weight_searches=searches,
        cv_results=searches[0].cv_results if searches else None,
        skipped=skipped,
        meta=meta,
        files=[],
        timings=timings,
    )
    if output_dir is not None:
        result.files = _write_outputs(Path(output_dir), output_name, result, meta, first, maps, plots)
    return result


def output_names(output_name="luab_study", plots=True):
    """The names of the files :func:`run_study` writes into ``output_dir``.

    Examples
    --------
    >>> output_names("luab_study_quick")
    ['luab_study_quick.md', 'luab_study_quick.json', 'luab_study_quick_weights.png',
     'luab_study_quick_attention.png']
    >>> output_names(plots=False)
    ['luab_study.md', 'luab_study.json']
    """
    names = [f"{output_name}.md", f"{output_name}.json"]
    return names + ([f"{output_name}_weights.png", f"{output_name}_attention.png"] if plots else [])


def _prepare_output_dir(out, name, plots):
    """Before any work: a plain stem, the folder created and writable, matplotlib present for the plots."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"output_name must be a plain file name without a folder, got {name!r}.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"output_dir {str(out)!r} cannot be created: {err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir {str(out)!r} is not writable.")
    if plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "the study's plots need matplotlib (pip install 'luab_sk[study]'), or pass plots=False."
            )


def _write_outputs(out, name, result, meta, data, maps, plots):
    out.mkdir(parents=True, exist_ok=True)
    files = [out / n for n in output_names(name, plots)]
    header = "# LUAB study: spurious backgrounds, frozen features\n\n"
    atomic_write(files[0], lambda fh: fh.write((header + result.markdown).encode("utf-8")))
    record = {
        "config": meta,
        "table": result.table,
        "runs": result.runs,
        "grid_search": [
            {
                "data_seed": seed,
                "byproduct_weight": [float(w) for w in s.weights],
                "mean_val_accuracy": [float(v) for v in s.scores],
                "selected": s.weight,
                "extended": s.extended,
            }
            for seed, s in zip(meta["data_seeds"] or [None], result.weight_searches)
        ],
        "timings_s": result.timings,
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
    }
    atomic_write(files[1], lambda fh: fh.write(json.dumps(record, indent=2).encode("utf-8")))
    if plots:
        import matplotlib.pyplot as plt

        from .plotting import plot_attention_overlays, plot_byproduct_weight_curve

        if result.cv_results is not None:
            ax = plot_byproduct_weight_curve(result.cv_results)
            ax.set_ylabel("validation accuracy")
            ax.set_title("LUAB: accuracy vs byproduct weight")
            fig = ax.figure
        else:
            fig, ax = plt.subplots()
            ax.text(0.5, 0.5, "no clicks Z: no weight search", ha="center")
        fig.tight_layout()
        atomic_write(files[2], lambda fh: fig.savefig(fh, dpi=120, format="png"))
        plt.close(fig)
        test = data["test"]
        shown = {k: maps[k] for k in ("attention probe, no Z", "LUAB, Z", "LUAB, shuffled Z") if k in maps}
        if shown and test.images is not None:
            index = _rare_group_samples(data, 6)
            fig = plot_attention_overlays(
                _frame_images(test, index),
                {k: v[index] for k, v in shown.items()},
                boxes=None if test.get("boxes_seen") is None else test.boxes_seen[index],
                grid=data.grid,
                titles=[str(data.class_names[c]) for c in test.y[index]],
            )
        else:
            fig, ax = plt.subplots()
            ax.text(0.5, 0.5, "no attention maps on images", ha="center")
        atomic_write(files[3], lambda fh: fig.savefig(fh, dpi=100, format="png"))
        plt.close(fig)
    return [str(f) for f in files]


def _rare_group_samples(data, k):
    """Test samples of the groups rarest in training (the minority groups), or the first ones."""
    train, test = data["train"], data["test"]
    if test.group is None or train.group is None:
        return np.arange(min(k, len(test.y)))
    counts = np.bincount(train.group, minlength=int(max(train.group.max(), test.group.max())) + 1)
    order = np.argsort(counts[test.group], kind="stable")
    return order[:k]
