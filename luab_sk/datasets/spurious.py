"""A Waterbirds-style spurious-correlation benchmark built from photos that ship with scikit-image.

Every scene is a real object photo (the *foreground*, which alone determines the label) pasted at a random
position and scale onto a background (whose group agrees with the label in a chosen share of the training
images and is independent of it at test time): a tinted texture (``backgrounds="textures"``, grass vs brick),
a random crop of a real scene photo (``backgrounds="photos"``: scikit-learn's ``china.jpg`` temple scene vs
its ``flower.jpg``), or random crops of your own photos (a folder, or a list of images, per group).
Foregrounds, too, can be built-in names, folders or lists of images. Each scene carries simulated annotation
byproducts with ImageNet-AB-like statistics: a click near the object (Gaussian noise proportional to the
object size, about 14% missing), and optionally the hover time before the click and the mouse trace that led
to it. The object box of every scene is known, so the pointing game can be scored.

Everything is deterministic given ``random_state``.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "FOREGROUNDS",
    "BACKGROUNDS",
    "BACKGROUND_SETS",
    "DEFAULT_SCENE_PARAMS",
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

# Background group -> ("texture", grey texture in ``skimage.data``, RGB tint) or ("photo", source, name):
# a real photo that ships offline, cut into random crops (one crop per scene).
BACKGROUNDS = {
    "grass": ("texture", "grass", (0.45, 0.85, 0.35)),
    "brick": ("texture", "brick", (0.40, 0.55, 0.95)),
    "gravel": ("texture", "gravel", (0.95, 0.75, 0.45)),
    "china": ("photo", "sklearn", "china.jpg"),  # a temple among trees under a blue sky (640 x 427)
    "flower": ("photo", "sklearn", "flower.jpg"),  # a pink flower among green leaves (640 x 427)
    "hubble": ("photo", "skimage", "hubble_deep_field"),  # galaxies on black (1000 x 872)
    "motorcycle": ("photo", "skimage", "stereo_motorcycle"),  # a motorcycle in a workshop (741 x 500)
}

BACKGROUND_SETS = {
    "textures": ("grass", "brick"),
    "photos": ("china", "flower"),
}
"""Named pairs of background groups: ``backgrounds="photos"`` is ``("china", "flower")``: random crops of
scikit-learn's two sample photos, a real-photo background shortcut much stronger than tinted textures."""

DEFAULT_SCENE_PARAMS = {
    "correlation": 0.99,
    "classes": ("faces", "nonfaces"),
    "backgrounds": ("grass", "brick"),
    "object_scale": (0.2, 0.3),
    "image_size": 224,
    "click_noise": 0.15,
    "missing_rate": 0.14,
}
"""The one source of the benchmark's defaults: :func:`make_spurious_scenes`, :func:`make_spurious_benchmark`
and :func:`luab_sk.study.run_study` all use these (faces vs non-faces at 20-30% of the scene side on grass vs
brick, background-label correlation 0.99 in training)."""


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _user_images(spec, what):
    """The PIL images of a user-given source: a folder, an image file, an array (one image or a stack), a PIL
    image, or a list of any of these but folders. Returns None when ``spec`` is a name (a plain string that
    names no existing file or folder)."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"{what}: the folder {str(path)!r} holds no image files.")
            spec = files
        elif path.is_file():
            spec = [path]
        else:
            return None
    from ..features.images import load_image

    if isinstance(spec, np.ndarray) and spec.ndim == 4 or isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        items = [spec]
    if not items:
        raise ValueError(f"{what}: an empty list of images.")
    return [load_image(item) for item in items]


def _source_name(spec, index, prefix):
    if isinstance(spec, str) and spec in (FOREGROUNDS if prefix == "class" else BACKGROUNDS):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return Path(spec).name or str(spec)
    return f"{prefix}{index}"


def _load_photos(spec):
    """The list of source photos of a foreground class: a name of :data:`FOREGROUNDS`, or images."""
    from skimage import data

    if isinstance(spec, str) and spec in FOREGROUNDS:
        if spec in ("faces", "nonfaces"):
            lfw = data.lfw_subset()
            part = lfw[:100] if spec == "faces" else lfw[100:]
            return [Image.fromarray(np.uint8(255 * img)).convert("RGB") for img in part]
        return [Image.fromarray(getattr(data, spec)()).convert("RGB").crop(FOREGROUNDS[spec])]
    photos = _user_images(spec, "classes")
    if photos is None:
        raise ValueError(
            f"classes contains {spec!r}; choose foregrounds among {sorted(FOREGROUNDS)}, or give a folder or "
            "a list of images."
        )
    return photos


def _builtin_photo(source, name):
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name)).convert("RGB")
    from skimage import data

    photo = getattr(data, name)()
    if isinstance(photo, tuple):  # stereo pairs: the left view
        photo = photo[0]
    return Image.fromarray(np.asarray(photo)).convert("RGB")


def _load_background(spec):
    """("texture", grey array, tint) or ("photo", list of PIL images) for one background group."""
    from skimage import data

    if isinstance(spec, str) and spec in BACKGROUNDS:
        kind, *args = BACKGROUNDS[spec]
        if kind == "texture":
            texture, tint = args
            grey = np.asarray(getattr(data, texture)(), dtype=np.float32) / 255.0
            return ("texture", grey, np.asarray(tint, dtype=np.float32))
        return ("photo", [_builtin_photo(*args)])
    photos = _user_images(spec, "backgrounds")
    if photos is None:
        raise ValueError(
            f"backgrounds contains {spec!r}; choose among {sorted(BACKGROUNDS)} (or "
            f"backgrounds={sorted(BACKGROUND_SETS)}), or give a folder or a list of images per group."
        )
    return ("photo", photos)


def _resolve_backgrounds(backgrounds):
    if isinstance(backgrounds, str) and backgrounds in BACKGROUND_SETS:
        return BACKGROUND_SETS[backgrounds]
    if isinstance(backgrounds, (str, os.PathLike, np.ndarray, Image.Image)):
        raise ValueError(
            f"backgrounds must be one of {sorted(BACKGROUND_SETS)} or a sequence with one group per class, "
            f"got {backgrounds!r:.80}."
        )
    return tuple(backgrounds)


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


def _background(source, rng, *, size):
    """A background canvas (size, size, 3) of floats in [0, 1] from a loaded background group."""
    if source[0] == "texture":
        return _texture_background(*source[1:], rng, size=size)
    photos = source[1]
    return _photo_background(photos[int(rng.integers(len(photos)))], rng, size=size)


def _photo_background(photo, rng, *, size):
    """A random square crop (a third to all of the short side) of a photo, flipped, resized, jittered."""
    w, h = photo.size
    short = min(w, h)
    crop = int(rng.integers(max(1, short // 3), short + 1))
    left = int(rng.integers(0, w - crop + 1))
    top = int(rng.integers(0, h - crop + 1))
    patch = photo.crop((left, top, left + crop, top + crop))
    if rng.random() < 0.5:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rgb = np.asarray(patch.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return np.clip(rgb * rng.uniform(0.85, 1.15), 0.0, 1.0)


def _texture_background(texture, tint, rng, *, size):
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


def _check_sources(classes, backgrounds):
    """Foreground and background specs as tuples; names must be distinct (images are not compared)."""
    if isinstance(classes, (str, os.PathLike, np.ndarray, Image.Image)):
        raise ValueError(f"classes must be a sequence with one foreground per class, got {classes!r:.80}.")
    classes, backgrounds = tuple(classes), _resolve_backgrounds(backgrounds)
    names = [c for c in classes if isinstance(c, str)]
    if len(classes) < 2 or len(set(names)) != len(names):
        raise ValueError(f"classes must name at least two distinct foregrounds, got {classes!r:.200}.")
    names = [b for b in backgrounds if isinstance(b, str)]
    if len(backgrounds) != len(classes) or len(set(names)) != len(names):
        raise ValueError(
            f"backgrounds must give {len(classes)} distinct groups, one per class, got {backgrounds!r:.200}."
        )
    return classes, backgrounds


def make_spurious_scenes(
    n_samples=200,
    *,
    correlation=DEFAULT_SCENE_PARAMS["correlation"],
    classes=DEFAULT_SCENE_PARAMS["classes"],
    backgrounds=DEFAULT_SCENE_PARAMS["backgrounds"],
    object_scale=DEFAULT_SCENE_PARAMS["object_scale"],
    image_size=DEFAULT_SCENE_PARAMS["image_size"],
    click_noise=DEFAULT_SCENE_PARAMS["click_noise"],
    missing_rate=DEFAULT_SCENE_PARAMS["missing_rate"],
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
    correlation : float in [0, 1], default=0.99
        Probability that a scene's background group equals its label.
    classes : sequence, default=("faces", "nonfaces")
        Foreground of each class: a name among :data:`FOREGROUNDS` (single photos ``"chelsea"``, a cat;
        ``"coffee"``; ``"astronaut"``; ``"rocket"``; or the 100 face / non-face crops of scikit-image's
        ``lfw_subset``, ``"faces"``, ``"nonfaces"``), a folder of images, an image file, or a list of images
        (paths, PIL images, uint8 arrays; one is drawn per scene and strongly augmented).
    backgrounds : str or sequence, default=("grass", "brick")
        ``"textures"`` (grass vs brick), ``"photos"`` (random crops of scikit-learn's ``china.jpg`` vs
        ``flower.jpg``, see :data:`BACKGROUND_SETS`), or one background group per class: a name among
        :data:`BACKGROUNDS` (tinted textures or built-in photos), a folder of photos, an image, or a list of
        images (each scene takes a random square crop of one of them).
    object_scale : float or (float, float), default=(0.2, 0.3)
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
    Measured with ImageNet EfficientNet-Lite0 features (see ``benchmarks/luab_study.py``): the cat vs coffee
    pair (``classes=("chelsea", "coffee")``) is so distinct that a linear probe on pooled features ignores the
    background even at ``correlation=0.95`` (100% worst-group accuracy); the defaults, faces vs non-faces with
    ``object_scale=(0.2, 0.3)`` and ``correlation`` of 0.98 or more, are the setting where the background
    shortcut wins. Both pass the foreground decodability check (>= 98%).

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
    classes, backgrounds = _check_sources(classes, backgrounds)
    photos = [_load_photos(spec) for spec in classes]
    sources = [_load_background(spec) for spec in backgrounds]
    rng = check_random_state(random_state)
    rng = np.random.default_rng(rng.randint(np.iinfo(np.int32).max))

    k = len(classes)
    y = rng.permutation(np.arange(n_samples) % k)
    other = (y + rng.integers(1, k, size=n_samples)) % k
    background = np.where(rng.random(n_samples) < correlation, y, other)

    images = np.empty((n_samples, image_size, image_size, 3), dtype=np.uint8)
    boxes = np.empty((n_samples, 4))
    for i in range(n_samples):
        canvas = _background(sources[background[i]], rng, size=image_size)
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
        class_names=tuple(_source_name(c, i, "class") for i, c in enumerate(classes)),
        background_names=tuple(_source_name(b, i, "background") for i, b in enumerate(backgrounds)),
    )
    if with_trace:
        scenes.hover_ms, scenes.traces = _simulate_traces(clicks, rng)
    return scenes


def make_spurious_benchmark(
    n_train=600,
    n_val=200,
    n_test=400,
    *,
    correlation=DEFAULT_SCENE_PARAMS["correlation"],
    random_state=0,
    n_train_balanced=0,
    **scene_params,
):
    """Train / validation / test splits: spurious training set, group-balanced validation and test sets.

    Parameters
    ----------
    n_train, n_val, n_test : int, default=600, 200, 400
        Number of scenes in each split.
    correlation : float in [0, 1], default=0.99
        Background-label agreement in the training split; validation and test use ``1 / n_classes``
        (background independent of the label).
    random_state : int, default=0
        Seed; each split draws from its own stream derived from it.
    n_train_balanced : int, default=0
        When positive, also a ``"train_balanced"`` split of that many group-balanced training scenes (the
        oracle reference of the study: the same probe trained without the shortcut). The other splits do not
        change with it.
    **scene_params
        Passed to :func:`make_spurious_scenes` (``classes``, ``object_scale``, ``click_noise``, ...).

    Returns
    -------
    splits : dict of str to Bunch
        ``"train"``, ``"val"`` and ``"test"`` (and ``"train_balanced"``), each as returned by
        :func:`make_spurious_scenes`.

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
    k = len(tuple(scene_params.get("classes", DEFAULT_SCENE_PARAMS["classes"])))
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if n_train_balanced:
        sizes["train_balanced"] = n_train_balanced
    seeds = np.random.SeedSequence(int(random_state)).generate_state(len(sizes))  # prefix-stable
    return {
        name: make_spurious_scenes(
            size,
            correlation=correlation if name == "train" else 1.0 / k,
            random_state=int(seed),
            **scene_params,
        )
        for (name, size), seed in zip(sizes.items(), seeds)
    }


def foreground_crops(
    n_samples=200, *, classes=DEFAULT_SCENE_PARAMS["classes"], image_size=224, random_state=None
):
    """Foreground-only images (augmented object views on a neutral grey canvas) for the decodability check.

    The objects go through the same augmentation as in :func:`make_spurious_scenes`, but fill most of the
    image and sit on a plain grey background, so a linear probe on these features measures whether the
    backbone can recognise the foregrounds at all.

    Parameters
    ----------
    n_samples : int, default=200
        Number of images (balanced over classes).
    classes : sequence, default=("faces", "nonfaces")
        Foreground of each class, as in :func:`make_spurious_scenes` (names, folders or lists of images).
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
    >>> images, y = foreground_crops(4, classes=("chelsea", "coffee"), image_size=32, random_state=0)
    >>> images.shape, sorted(set(y.tolist()))
    ((4, 32, 32, 3), [0, 1])
    """
    if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    classes = _check_sources(classes, [f"b{i}" for i in range(len(tuple(classes)))])[0]
    photos = [_load_photos(spec) for spec in classes]
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
