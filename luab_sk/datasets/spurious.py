"""A Waterbirds-style spurious-correlation benchmark built from photos that ship with scikit-image.

Every scene is a real object photo (the *foreground*, which alone determines the label) pasted at a random
position and scale onto a tinted texture (the *background*, whose group agrees with the label in a chosen
share of the training images and is independent of it at test time). Each scene carries simulated annotation
byproducts with ImageNet-AB-like statistics: a click near the object (Gaussian noise proportional to the
object size, about 14% missing), and optionally the hover time before the click and the mouse trace that led
to it. The object box of every scene is known, so the pointing game can be scored.

Everything is deterministic given ``random_state``.
"""

from __future__ import annotations

import numbers

import numpy as np
from PIL import Image, ImageEnhance
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "FOREGROUNDS",
    "BACKGROUNDS",
    "make_spurious_scenes",
    "make_spurious_benchmark",
    "foreground_crops",
]

# Foreground name -> region (left, top, right, bottom) of the ``skimage.data`` photo that holds the object;
# None for the two halves of ``skimage.data.lfw_subset`` (100 photos each, one drawn per scene).
FOREGROUNDS = {
    "chelsea": (40, 0, 420, 300),  # a cat's face
    "coffee": (70, 0, 490, 400),  # a cup of coffee on a saucer
    "astronaut": (30, 0, 380, 512),  # a person in a space suit
    "rocket": (270, 110, 380, 427),  # a rocket on its launch pad
    "faces": None,  # the 100 face crops of ``skimage.data.lfw_subset`` (25 x 25, grey)
    "nonfaces": None,  # its 100 non-face crops
}

# Background group -> (grey texture in ``skimage.data``, RGB tint).
BACKGROUNDS = {
    "grass": ("grass", (0.45, 0.85, 0.35)),
    "brick": ("brick", (0.40, 0.55, 0.95)),
    "gravel": ("gravel", (0.95, 0.75, 0.45)),
}


def _load_photos(name):
    """The list of source photos of a foreground class."""
    from skimage import data

    if name not in FOREGROUNDS:
        raise ValueError(f"classes contains {name!r}; choose foregrounds among {sorted(FOREGROUNDS)}.")
    if name in ("faces", "nonfaces"):
        lfw = data.lfw_subset()
        part = lfw[:100] if name == "faces" else lfw[100:]
        return [Image.fromarray(np.uint8(255 * img)).convert("RGB") for img in part]
    return [Image.fromarray(getattr(data, name)()).convert("RGB").crop(FOREGROUNDS[name])]


def _load_texture(name):
    from skimage import data

    if name not in BACKGROUNDS:
        raise ValueError(f"backgrounds contains {name!r}; choose among {sorted(BACKGROUNDS)}.")
    texture, tint = BACKGROUNDS[name]
    grey = np.asarray(getattr(data, texture)(), dtype=np.float32) / 255.0
    return grey, np.asarray(tint, dtype=np.float32)


def _augment_object(photo, rng, *, side):
    """A strongly augmented view of ``photo`` whose longer side is ``side`` pixels."""
    w, h = photo.size
    area = rng.uniform(0.55, 1.0) * w * h
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(round(min(w, np.sqrt(area * aspect))))
    ch = int(round(min(h, np.sqrt(area / aspect))))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    view = photo.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = view.rotate(rng.uniform(-12.0, 12.0), resample=Image.Resampling.BILINEAR)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.5, 1.5))
    scale = side / max(cw, ch)
    size = (max(1, int(round(cw * scale))), max(1, int(round(ch * scale))))
    return view.resize(size, Image.Resampling.BILINEAR)


def _background(texture, tint, rng, *, size):
    """A random crop of a grey texture, flipped, resized and tinted: (size, size, 3) floats in [0, 1]."""
    full = texture.shape[0]
    crop = int(rng.integers(full // 3, full + 1))
    top, left = (int(v) for v in rng.integers(0, full - crop + 1, size=2))
    patch = Image.fromarray(np.uint8(255 * texture[top : top + crop, left : left + crop]))
    if rng.random() < 0.5:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    grey = np.asarray(patch.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    jitter = np.clip(tint * rng.uniform(0.85, 1.15, size=3), 0.0, 1.0)
    return 0.15 + 0.85 * grey[..., None] * jitter


def _simulate_clicks(boxes, rng, *, click_noise, missing_rate):
    """One click per box: the box centre plus Gaussian noise of ``click_noise`` box sizes; some missing."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    extent = boxes[:, 2:] - boxes[:, :2]
    clicks = np.clip(centre + click_noise * extent * rng.standard_normal(centre.shape), 0.0, 1.0)
    clicks[rng.random(len(boxes)) < missing_rate] = np.nan
    return clicks


def _simulate_traces(clicks, rng):
    """Hover times (ms) and 60 Hz minimum-jerk mouse traces [t_ms, x, y] that end on each click."""
    n = len(clicks)
    hover_ms = rng.lognormal(mean=np.log(1200.0), sigma=0.6, size=n)
    traces = []
    for click, hover in zip(clicks, hover_ms):
        if np.isnan(click).any():
            traces.append(np.empty((0, 3)))
            continue
        start = rng.random(2)
        t = np.arange(0.0, hover + 1e-9, 1000.0 / 60.0)
        s = t / t[-1] if t[-1] > 0 else np.ones_like(t)
        s = 10 * s**3 - 15 * s**4 + 6 * s**5
        xy = (
            start + s[:, None] * (click - start) + 0.005 * rng.standard_normal((len(t), 2)) * (1 - s[:, None])
        )
        traces.append(np.column_stack([t, np.clip(xy, 0.0, 1.0)]))
    hover_ms[np.isnan(clicks).any(axis=1)] = np.nan
    return hover_ms, traces


def _check_fraction(value, name):
    if not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")


def _check_scale(object_scale):
    message = (
        f"object_scale must be a fraction in (0, 1] or a pair 0 < low <= high <= 1, got {object_scale!r}."
    )
    try:
        lo, hi = (object_scale, object_scale) if isinstance(object_scale, numbers.Real) else object_scale
        valid = 0 < lo <= hi <= 1
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not valid:
        raise ValueError(message)
    return float(lo), float(hi)


def make_spurious_scenes(
    n_samples=200,
    *,
    correlation=0.95,
    classes=("chelsea", "coffee"),
    backgrounds=("grass", "brick"),
    object_scale=(0.3, 0.45),
    image_size=224,
    click_noise=0.15,
    missing_rate=0.14,
    with_trace=False,
    random_state=None,
):
    """Generate scenes whose label is the foreground photo and whose background is a spurious cue.

    Labels are balanced. Scene ``i`` with label ``k`` gets background group ``k`` with probability
    ``correlation`` and one of the other groups (uniformly) otherwise, so ``correlation = 1 / n_classes``
    makes background and label independent (a balanced test set) and ``correlation = 0.95`` mimics
    Waterbirds' training split.

    Parameters
    ----------
    n_samples : int, default=200
        Number of scenes.
    correlation : float in [0, 1], default=0.95
        Probability that a scene's background group equals its label.
    classes : sequence of str, default=("chelsea", "coffee")
        Foreground of each class, among :data:`FOREGROUNDS`: single photos (``"chelsea"``, a cat;
        ``"coffee"``; ``"astronaut"``; ``"rocket"``) or the 100 face / non-face crops of scikit-image's
        ``lfw_subset`` (``"faces"``, ``"nonfaces"``).
    backgrounds : sequence of str, default=("grass", "brick")
        Background group aligned with each class, among :data:`BACKGROUNDS`; same length as ``classes``.
    object_scale : float or (float, float), default=(0.3, 0.45)
        Longer side of the pasted object as a fraction of the image side, drawn uniformly in the range.
    image_size : int, default=224
        Side of the square scenes in pixels.
    click_noise : float >= 0, default=0.15
        Standard deviation of the click around the object centre, in units of the object's width and height.
    missing_rate : float in [0, 1], default=0.14
        Share of scenes without a click (ImageNet-AB: about 14%); their click row is NaN.
    with_trace : bool, default=False
        Also simulate the hover time before the click and the 60 Hz mouse trace leading to it.
    random_state : int, RandomState instance or None, default=None
        Seed; the scenes are deterministic given an int.

    Returns
    -------
    scenes : :class:`~sklearn.utils.Bunch`
        ``images`` (n, S, S, 3) uint8; ``y`` (n,) int label; ``background`` (n,) int background group;
        ``group`` (n,) int ``y * n_classes + background``; ``boxes`` (n, 4) object boxes (x0, y0, x1, y1) in
        [0, 1]; ``Z`` (n, 2) click points (x, y) in [0, 1], NaN where missing; ``class_names`` and
        ``background_names``. With ``with_trace``: ``hover_ms`` (n,) and ``traces``, a list of (m, 3) arrays
        of [time in ms, x, y] ending on the click (empty where the click is missing).

    Notes
    -----
    Measured with ImageNet EfficientNet-Lite0 features (see ``benchmarks/luab_study.py``): the default cat
    vs coffee pair is so distinct that a linear probe on pooled features ignores the background even at
    ``correlation=0.95`` (100% worst-group accuracy); ``classes=("faces", "nonfaces")`` with
    ``object_scale=(0.2, 0.3)`` and ``correlation`` of 0.98 or more is the setting where the background
    shortcut wins (:func:`luab_sk.study.run_study` uses these classes with ``correlation=0.99`` by default).
    Both pass the foreground decodability check (>= 98%).

    Examples
    --------
    >>> scenes = make_spurious_scenes(8, image_size=64, random_state=0)
    >>> scenes.images.shape, scenes.Z.shape, scenes.boxes.shape
    ((8, 64, 64, 3), (8, 2), (8, 4))
    >>> bool((scenes.boxes[:, 2:] > scenes.boxes[:, :2]).all())
    True
    """
    if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if not isinstance(image_size, numbers.Integral) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}.")
    _check_fraction(correlation, "correlation")
    _check_fraction(missing_rate, "missing_rate")
    if not isinstance(click_noise, numbers.Real) or not click_noise >= 0:
        raise ValueError(f"click_noise must be a non-negative real number, got {click_noise!r}.")
    lo, hi = _check_scale(object_scale)
    classes, backgrounds = tuple(classes), tuple(backgrounds)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes must name at least two distinct foregrounds, got {classes!r}.")
    if len(backgrounds) != len(classes) or len(set(backgrounds)) != len(backgrounds):
        raise ValueError(
            f"backgrounds must name {len(classes)} distinct groups, one per class, got {backgrounds!r}."
        )
    photos = [_load_photos(name) for name in classes]
    textures = [_load_texture(name) for name in backgrounds]
    rng = check_random_state(random_state)
    rng = np.random.default_rng(rng.randint(np.iinfo(np.int32).max))

    k = len(classes)
    y = rng.permutation(np.arange(n_samples) % k)
    other = (y + rng.integers(1, k, size=n_samples)) % k
    background = np.where(rng.random(n_samples) < correlation, y, other)

    images = np.empty((n_samples, image_size, image_size, 3), dtype=np.uint8)
    boxes = np.empty((n_samples, 4))
    for i in range(n_samples):
        canvas = _background(*textures[background[i]], rng, size=image_size)
        obj = _augment_object(
            photos[y[i]][rng.integers(len(photos[y[i]]))],
            rng,
            side=int(round(rng.uniform(lo, hi) * image_size)),
        )
        ow, oh = obj.size
        left = int(rng.integers(0, image_size - ow + 1))
        top = int(rng.integers(0, image_size - oh + 1))
        canvas[top : top + oh, left : left + ow] = np.asarray(obj, dtype=np.float32) / 255.0
        images[i] = np.uint8(np.round(255 * np.clip(canvas, 0.0, 1.0)))
        boxes[i] = np.array([left, top, left + ow, top + oh]) / image_size

    clicks = _simulate_clicks(boxes, rng, click_noise=click_noise, missing_rate=missing_rate)
    scenes = Bunch(
        images=images,
        y=y,
        background=background,
        group=y * k + background,
        boxes=boxes,
        Z=clicks,
        class_names=classes,
        background_names=backgrounds,
    )
    if with_trace:
        scenes.hover_ms, scenes.traces = _simulate_traces(clicks, rng)
    return scenes


def make_spurious_benchmark(
    n_train=600, n_val=200, n_test=400, *, correlation=0.95, random_state=0, **scene_params
):
    """Train / validation / test splits: spurious training set, group-balanced validation and test sets.

    Parameters
    ----------
    n_train, n_val, n_test : int, default=600, 200, 400
        Number of scenes in each split.
    correlation : float in [0, 1], default=0.95
        Background-label agreement in the training split; validation and test use ``1 / n_classes``
        (background independent of the label).
    random_state : int, default=0
        Seed; each split draws from its own stream derived from it.
    **scene_params
        Passed to :func:`make_spurious_scenes` (``classes``, ``object_scale``, ``click_noise``, ...).

    Returns
    -------
    splits : dict of str to Bunch
        ``"train"``, ``"val"`` and ``"test"``, each as returned by :func:`make_spurious_scenes`.

    Examples
    --------
    >>> splits = make_spurious_benchmark(8, 4, 4, image_size=32, random_state=0)
    >>> sorted(splits), splits["train"].images.shape
    (['test', 'train', 'val'], (8, 32, 32, 3))
    """
    if not isinstance(random_state, numbers.Integral):
        raise ValueError(
            f"random_state must be an int so that the splits are reproducible, got {random_state!r}."
        )
    k = len(tuple(scene_params.get("classes", ("chelsea", "coffee"))))
    seeds = np.random.SeedSequence(int(random_state)).generate_state(3)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {
        name: make_spurious_scenes(
            size,
            correlation=correlation if name == "train" else 1.0 / k,
            random_state=int(seed),
            **scene_params,
        )
        for (name, size), seed in zip(sizes.items(), seeds)
    }


def foreground_crops(n_samples=200, *, classes=("chelsea", "coffee"), image_size=224, random_state=None):
    """Foreground-only images (augmented object views on a neutral grey canvas) for the decodability check.

    The objects go through the same augmentation as in :func:`make_spurious_scenes`, but fill most of the
    image and sit on a plain grey background, so a linear probe on these features measures whether the
    backbone can recognise the foregrounds at all.

    Parameters
    ----------
    n_samples : int, default=200
        Number of images (balanced over classes).
    classes : sequence of str, default=("chelsea", "coffee")
        Foreground photos, among :data:`FOREGROUNDS`.
    image_size : int, default=224
        Side of the square images in pixels.
    random_state : int, RandomState instance or None, default=None
        Seed.

    Returns
    -------
    images : ndarray of shape (n_samples, image_size, image_size, 3), dtype uint8
    y : ndarray of shape (n_samples,)
        Class index into ``classes``.

    Examples
    --------
    >>> images, y = foreground_crops(4, image_size=32, random_state=0)
    >>> images.shape, sorted(set(y.tolist()))
    ((4, 32, 32, 3), [0, 1])
    """
    if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    photos = [_load_photos(name) for name in classes]
    rng = np.random.default_rng(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    y = rng.permutation(np.arange(n_samples) % len(photos))
    images = np.full((n_samples, image_size, image_size, 3), 127, dtype=np.uint8)
    for i in range(n_samples):
        obj = _augment_object(
            photos[y[i]][rng.integers(len(photos[y[i]]))],
            rng,
            side=int(round(rng.uniform(0.8, 1.0) * image_size)),
        )
        ow, oh = obj.size
        left, top = (image_size - ow) // 2, (image_size - oh) // 2
        images[i, top : top + oh, left : left + ow] = np.asarray(obj)
    return images, y
