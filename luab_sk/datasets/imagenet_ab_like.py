"""Write synthetic ImageNet-AB-format XML files and COCO-AB-format JSON with known ground truth.

The files reproduce the quirks of the real releases (several ``<metadata>`` blocks, ``True``/``False``
strings, literal ``None`` traces, ``estimateTime`` of 0, AppleDouble ``._*.xml`` junk, the original ILSVRC
``<object><bndbox>``, ISO submit times; COCO ``add``/``move``/``remove`` icon actions), optionally with
malformed and truncated inputs, so that readers, encoders and whole pipelines can be tested against known
answers. Other engineers can pass their own synthetic images (and object positions) to get matching
byproducts.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from xml.sax.saxutils import escape

import numpy as np
from sklearn.utils import Bunch, check_random_state

__all__ = ["make_coco_ab_like", "make_imagenet_ab_like"]

_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # resource-fork header
_EPOCH_MS = 1_633_000_000_000.0  # October 2021, when the ImageNet-AB tasks ran
_GRID_COLS = 8  # 48 images per page, 6 rows of 8
_THUMB = 150  # displayed height in px
# A small "billion laughs" document: defusedxml must refuse it.
_ENTITY_BOMB = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n'
    "<annotation><metadata><selected>&lol2;</selected></metadata></annotation>\n"
)


def _el(tag, value):
    return f"<{tag}>{escape(str(value))}</{tag}>"


def _simulate_trace(rng, click, t_click, duration_ms):
    """A mouse trace that wanders into the image and stops at the click, sampled at 10-60 Hz."""
    n = max(2, int(duration_ms / rng.uniform(16.7, 100.0)))
    times = np.sort(t_click - rng.uniform(0.0, duration_ms, size=n - 1))
    start = rng.uniform(0.0, 1.0, size=2)
    frac = ((times - times[0]) / max(t_click - times[0], 1.0))[:, None]
    wobble = rng.normal(0.0, 0.02, size=(n - 1, 2)) * (1 - frac)
    path = start + (np.asarray(click) - start) * frac**0.7 + wobble
    path = np.clip(path, 0.0, 1.0)
    return np.vstack([np.column_stack([times, path]), [t_click, *click]])


def _metadata_block(rng, *, selected, click, page, image_idx, size, hovers):
    """One ``<metadata>`` block as XML text, and the click it records (or None)."""
    scale = _THUMB / size[1]
    parts = [_el("selected", "True" if selected else "False")]
    t_page = _EPOCH_MS + rng.uniform(0, 3e9)
    estimate = 0.0 if rng.uniform() < 0.05 else float(np.round(rng.lognormal(6.7, 0.6)))
    if selected:
        t_click = t_page + rng.uniform(2e3, 6e4)
        parts.append(
            "<selectedRecord>" + _el("x", f"{click[0]:.6f}") + _el("y", f"{click[1]:.6f}")
            + _el("time", f"{t_click:.0f}") + "</selectedRecord>"
        )
        parts.append(_el("selectedCount", 1 + int(rng.uniform() < 0.1)))
        if rng.uniform() < 0.1:
            parts.append("<mouseTracking>None</mouseTracking>")
        elif rng.uniform() < 0.05:
            parts.append("<mouseTracking />")
        else:
            trace = _simulate_trace(rng, click, t_click, max(estimate, 300.0) * rng.uniform(1.0, 2.0))
            parts.extend(
                "<mouseTracking>" + _el("time", f"{t:.0f}") + _el("x", f"{x:.6f}") + _el("y", f"{y:.6f}")
                + "</mouseTracking>"
                for t, x, y in trace
            )
    else:
        parts.append("<selectedRecord>None</selectedRecord>")
        parts.append(_el("selectedCount", 0))
        parts.append("<mouseTracking>None</mouseTracking>")
    if hovers:
        t = t_page + rng.uniform(1e3, 5e4)
        for _ in range(hovers):
            for action, gap in (("enter", 1500), ("leave", 3000)):
                event = _el("action", action) + _el("time", f"{t:.0f}")
                parts.append(f"<hoveredRecord>{event}</hoveredRecord>")
                t += rng.uniform(50, gap)
    else:
        parts.append("<hoveredRecord>None</hoveredRecord>")
    submit = datetime.fromtimestamp((t_page + 9e4) / 1000.0, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts += [
        _el("hoveredCount", hovers),
        _el("estimateTime", f"{estimate:.0f}"),
        _el("imageWidth", round(size[0] * scale)),
        _el("imageHeight", _THUMB),
        _el("originalImageWidth", size[0]),
        _el("originalImageHeight", size[1]),
        "<imagePosition>" + _el("x", 20 + (image_idx % _GRID_COLS) * 170)
        + _el("y", 120 + (image_idx // _GRID_COLS) * 170) + "</imagePosition>",
        _el("image_idx", image_idx),
        _el("page_idx", page),
        _el("worker_id", f"W{rng.randint(10**6):06d}"),
        _el("assignment_id", f"A{rng.randint(10**9):09d}"),
        _el("hit_id", f"H{rng.randint(10**9):09d}"),
        _el("hit_submit_time", submit),
        _el("imagenet_hit_id", int(rng.randint(10**5))),
    ]
    return "<metadata>" + "".join(parts) + "</metadata>"


def _box_around(rng, point, size):
    """An ILSVRC-style pixel box that contains the point."""
    w, h = size
    cx, cy = point[0] * w, point[1] * h
    bw, bh = rng.uniform(0.2, 0.7) * w, rng.uniform(0.2, 0.7) * h
    x0 = np.clip(cx - rng.uniform(0.2, 0.8) * bw, 0, w - 1)
    y0 = np.clip(cy - rng.uniform(0.2, 0.8) * bh, 0, h - 1)
    return (int(x0), int(y0), int(min(w - 1, max(cx + 1, x0 + bw))), int(min(h - 1, max(cy + 1, y0 + bh))))


def _check_images(images, n_fields, name):
    images = list(images)
    for i, item in enumerate(images):
        if not isinstance(item, (tuple, list)) or len(item) not in n_fields:
            raise ValueError(
                f"{name}[{i}] must be a tuple of {' or '.join(map(str, n_fields))} fields; got {item!r}."
            )
    return images


def make_imagenet_ab_like(
    directory,
    images=None,
    *,
    n_classes=3,
    n_per_class=4,
    p_selected=0.86,
    max_tasks=3,
    click_noise=0.03,
    apple_double=True,
    n_malformed=0,
    random_state=None,
):
    """Write an ImageNet-AB-like folder of XML files, one per image, with known click ground truth.

    Parameters
    ----------
    directory : str or os.PathLike
        Root folder; files go to ``<directory>/<wnid>/<wnid>_<id>.xml`` (created if needed).
    images : iterable of tuple, optional
        ``(wnid, image_id, (width, height), point)`` or ``(wnid, image_id, (width, height), point, box)``
        per image: ``point`` is the object's ``(x, y)`` in ``[0, 1]`` (annotators click near it) or None (no
        annotator selected the image); ``box`` is an ILSVRC ``(xmin, ymin, xmax, ymax)`` pixel box to embed.
        When omitted, ``n_classes * n_per_class`` images are drawn at random, a fraction ``p_selected`` of
        them with a point and about half of those with a box around it.
    n_classes, n_per_class : int, default=3, 4
        Size of the random image list (ignored when ``images`` is given).
    p_selected : float, default=0.86
        Fraction of random images with a point (ImageNet-AB: about 86%).
    max_tasks : int, default=3
        Each image appears in 1 to ``max_tasks`` tasks (``<metadata>`` blocks); an image with a point is
        selected in at least one of them.
    click_noise : float, default=0.03
        Standard deviation of the clicks around ``point``, in normalised units.
    apple_double : bool, default=True
        Also write AppleDouble ``._<wnid>_<id>.xml`` junk files for about a third of the images.
    n_malformed : int, default=0
        Turn the last ``n_malformed`` images' files into bad inputs, cycling through: truncated XML, a
        non-numeric click coordinate, an entity-expansion ("billion laughs") document.
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    Bunch
        ``image_keys`` (list of ``"wnid/wnid_id"``), ``paths`` (XML paths), ``image_sizes`` (n, 2),
        ``true_points`` (n, 2) the given object points (NaN for None), ``points`` (n, 2) the expected
        reference Z (mean of the selected clicks written; NaN when none or malformed), ``ilsvrc_boxes``
        (list of (m, 4) arrays), ``malformed`` (paths of bad files), ``junk`` (AppleDouble paths).

    Examples
    --------
    >>> import tempfile
    >>> truth = make_imagenet_ab_like(tempfile.mkdtemp(), n_classes=2, n_per_class=2, random_state=0)
    >>> len(truth.image_keys), truth.points.shape
    (4, (4, 2))
    """
    rng = check_random_state(random_state)
    directory = os.fspath(directory)
    if images is None:
        images = []
        for c in range(n_classes):
            wnid = f"n{rng.randint(1, 10**8):08d}"
            for i in range(n_per_class):
                size = (int(rng.randint(200, 640)), int(rng.randint(200, 640)))
                point = tuple(rng.uniform(0.15, 0.85, size=2)) if rng.uniform() < p_selected else None
                box = _box_around(rng, point, size) if point is not None and rng.uniform() < 0.5 else None
                images.append((wnid, 1000 * c + i, size, point, box))
    images = _check_images(images, (4, 5), "images")
    if not 0 <= n_malformed <= len(images):
        raise ValueError(f"n_malformed must lie in [0, {len(images)}]; got {n_malformed!r}.")
    if max_tasks < 1:
        raise ValueError(f"max_tasks must be at least 1; got {max_tasks!r}.")
    keys, paths, sizes, true_points, points, boxes, malformed, junk = [], [], [], [], [], [], [], []
    for n, item in enumerate(images):
        wnid, image_id, size, point = item[:4]
        box = item[4] if len(item) == 5 else None
        stem = f"{wnid}_{image_id}"
        folder = os.path.join(directory, wnid)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, stem + ".xml")
        n_tasks = int(rng.randint(1, max_tasks + 1))
        selected = [False] * n_tasks
        if point is not None:
            selected = list(rng.uniform(size=n_tasks) < 0.8)
            selected[rng.randint(n_tasks)] = True
        blocks, clicks = [], []
        for s in selected:
            click = np.clip(np.asarray(point) + rng.normal(0, click_noise, 2), 0, 1) if s else None
            if s:
                clicks.append(np.round(click, 6))
            blocks.append(
                _metadata_block(
                    rng, selected=s, click=click, page=int(rng.randint(10)), image_idx=int(rng.randint(48)),
                    size=size, hovers=int(rng.poisson(1.0)),
                )
            )
        head = _el("folder", wnid) + _el("filename", stem)
        head += "<size>" + _el("width", size[0]) + _el("height", size[1]) + _el("depth", 3) + "</size>"
        if box is not None:
            head += (
                "<object>" + _el("name", wnid) + "<bndbox>"
                + "".join(_el(t, v) for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
                + "</bndbox></object>"
            )
        text = "<annotation>" + head + "".join(blocks) + "</annotation>\n"
        expected = np.mean(clicks, axis=0) if clicks else np.full(2, np.nan)
        kind = n - (len(images) - n_malformed)
        if kind >= 0:
            if kind % 3 == 0:
                text = text[: len(text) // 2]
            elif kind % 3 == 1:
                text = text.replace("<x>", "<x>abc", 1) if "<x>" in text else text[:-10]
            else:
                text = _ENTITY_BOMB
            malformed.append(path)
            expected = np.full(2, np.nan)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if apple_double and rng.uniform() < 1 / 3:
            junk_path = os.path.join(folder, "._" + stem + ".xml")
            with open(junk_path, "wb") as f:
                f.write(_APPLE_DOUBLE + bytes(rng.randint(0, 256, 64, dtype=np.uint8)))
            junk.append(junk_path)
        keys.append(f"{wnid}/{stem}")
        paths.append(path)
        sizes.append(size)
        true_points.append(point if point is not None else (np.nan, np.nan))
        points.append(expected)
        boxes.append(np.asarray(box, dtype=float).reshape(-1, 4) if box is not None else np.empty((0, 4)))
    return Bunch(
        image_keys=keys,
        paths=paths,
        image_sizes=np.asarray(sizes, dtype=float).reshape(-1, 2),
        true_points=np.asarray(true_points, dtype=float).reshape(-1, 2),
        points=np.asarray(points, dtype=float).reshape(-1, 2),
        ilsvrc_boxes=boxes,
        malformed=malformed,
        junk=junk,
    )


def _coco_record(rng, image_id, size, objects, classes, click_noise, p_move, p_remove):
    """One COCO-AB record (a dict ready for JSON) and the per-class add / final points it encodes."""
    t = 0.0
    actions, categories, tracking = [], [], []
    icons = {}  # class -> list of current icon positions
    adds = {}  # class -> list of add positions
    pos = rng.uniform(0, 1, 2)

    def move_mouse(target, t):
        """Wander to ``target`` for 0.3-2 s, sampled at about 20 Hz."""
        n = int(rng.uniform(300, 2000) / 50)
        for f in np.linspace(0, 1, n)[1:] ** 0.5:
            t += rng.uniform(30, 70)
            p = np.clip(pos + (target - pos) * f + rng.normal(0, 0.01, 2), 0, 1)
            tracking.append({"x": round(float(p[0]), 5), "y": round(float(p[1]), 5), "timeAt": round(t)})
        return t

    order = list(objects.items())
    rng.shuffle(order)
    distractors = [c for c in classes if c not in objects]
    for name, pts in order:
        pts = [pts] if np.ndim(pts) == 1 else list(pts)
        t += rng.uniform(300, 2000)
        categories.append({"categoryIndex": classes.index(name), "categoryName": name, "timeAt": round(t),
                           "usingKeyboard": bool(rng.uniform() < 0.3)})
        for p in pts:
            drop = np.round(np.clip(np.asarray(p) + rng.normal(0, 3 * click_noise, 2), 0, 1), 5)
            t = move_mouse(drop, t)
            pos = drop
            actions.append({"actionType": "add", "iconType": name, "pointFrom": None,
                            "pointTo": {"x": float(drop[0]), "y": float(drop[1])}, "timeAt": round(t)})
            icons.setdefault(name, []).append(drop)
            adds.setdefault(name, []).append(drop)
            if rng.uniform() < p_move:
                new = np.round(np.clip(np.asarray(p) + rng.normal(0, click_noise, 2), 0, 1), 5)
                t = move_mouse(new, t)
                pos = new
                actions.append({"actionType": "move", "iconType": name,
                                "pointFrom": {"x": float(drop[0]), "y": float(drop[1])},
                                "pointTo": {"x": float(new[0]), "y": float(new[1])}, "timeAt": round(t)})
                icons[name][-1] = new
    if distractors and rng.uniform() < p_remove:
        name = distractors[rng.randint(len(distractors))]
        wrong = np.round(rng.uniform(0, 1, 2), 5)
        t = move_mouse(wrong, t)
        actions.append({"actionType": "add", "iconType": name, "pointFrom": None,
                        "pointTo": {"x": float(wrong[0]), "y": float(wrong[1])}, "timeAt": round(t)})
        adds.setdefault(name, []).append(wrong)
        t += rng.uniform(200, 1500)
        actions.append({"actionType": "remove", "iconType": name,
                        "pointFrom": {"x": float(wrong[0]), "y": float(wrong[1])}, "pointTo": None,
                        "timeAt": round(t)})
    display = (round(size[0] * 480 / max(size)), round(size[1] * 480 / max(size)))
    record = {
        "image_id": int(image_id),
        "originalImageWidth": int(size[0]),
        "originalImageHeight": int(size[1]),
        "imageWidth": display[0],
        "imageHeight": display[1],
        "timeSpent": round(t + rng.uniform(500, 3000)),
        "worker_id": f"W{rng.randint(10**6):06d}",
        "hit_id": f"H{rng.randint(10**9):09d}",
        "page_id": int(rng.randint(20)),
        "actionHistories": actions,
        "categoryHistories": categories,
        "mouseTracking": tracking,
    }
    return record, adds, icons


def make_coco_ab_like(
    path,
    images=None,
    *,
    classes=None,
    n_images=20,
    click_noise=0.02,
    p_move=0.3,
    p_remove=0.2,
    n_malformed=0,
    truncate=False,
    random_state=None,
):
    """Write a COCO-AB-like JSON file (a list of per-image records) with known per-class ground truth.

    Parameters
    ----------
    path : str or os.PathLike
        The JSON file to write.
    images : iterable of tuple, optional
        ``(image_id, (width, height), objects)`` per image, where ``objects`` maps a class name to the
        object's ``(x, y)`` in ``[0, 1]`` or to a list of such points (several instances). Annotators drop one
        icon per instance near it (``add``), sometimes ``move`` it closer, and sometimes drop a wrong class
        and ``remove`` it. When omitted, ``n_images`` images with 1-3 random classes are drawn.
    classes : list of str, optional
        The class vocabulary (``categoryIndex`` is the position in it). Default: the classes in ``images``,
        sorted, or eight COCO classes for random images.
    n_images : int, default=20
        Number of random images (ignored when ``images`` is given).
    click_noise : float, default=0.02
        Standard deviation of a moved icon around the object; first drops are three times noisier.
    p_move, p_remove : float, default=0.3, 0.2
        Probability of a corrective move per icon, and of an added-then-removed wrong icon per image.
    n_malformed : int, default=0
        Replace the last ``n_malformed`` records with bad ones, cycling through: no ``image_id``, a
        non-numeric ``pointTo``, a non-object entry.
    truncate : bool, default=False
        Cut the file in the middle of its last record, as an interrupted download would.
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    Bunch
        ``path``, ``image_ids`` (list of int), ``classes``, ``labels`` (n, K) the 0/1 ground-truth label
        indicator (the classes of ``objects``; an added-then-removed wrong icon is not a label),
        ``true_points`` (n, 2K) object points (the mean over instances), ``add_points`` (n, 2K) the mean
        ``add`` position per class (NaN if none), ``last_add_points`` / ``first_add_points`` (n, 2K) the
        last / first ``add`` position per class (the reference loader keeps the last), ``final_points``
        (n, 2K) the mean icon position per class after all moves and removes, and ``malformed`` (indices of
        the bad records, including the truncated one). Columns are ``[x_0, y_0, x_1, y_1, ...]`` (and
        ``labels`` columns) in ``classes`` order.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "coco_ab.json")
    >>> truth = make_coco_ab_like(path, n_images=3, random_state=0)
    >>> len(truth.image_ids), truth.add_points.shape
    (3, (3, 16))
    """
    rng = check_random_state(random_state)
    if images is None:
        classes = list(classes) if classes is not None else [
            "person", "bicycle", "car", "dog", "cat", "chair", "cup", "pizza"
        ]
        images = []
        for i in range(n_images):
            k = int(rng.randint(1, min(3, len(classes)) + 1))
            chosen = rng.choice(len(classes), size=k, replace=False)
            size = (int(rng.randint(300, 640)), int(rng.randint(300, 640)))
            objects = {classes[c]: tuple(rng.uniform(0.1, 0.9, 2)) for c in chosen}
            images.append((100_000 + 7 * i, size, objects))
    images = _check_images(images, (3,), "images")
    if classes is None:
        classes = sorted({name for _, _, objects in images for name in objects})
    classes = list(classes)
    for i, (_, _, objects) in enumerate(images):
        unknown = set(objects) - set(classes)
        if unknown:
            raise ValueError(f"images[{i}] has classes {sorted(unknown)} that are not in classes.")
    if not 0 <= n_malformed <= len(images):
        raise ValueError(f"n_malformed must lie in [0, {len(images)}]; got {n_malformed!r}.")
    n, k = len(images), len(classes)
    true_points, add_points, final_points, last_add, first_add = (
        np.full((n, 2 * k), np.nan) for _ in range(5)
    )
    labels = np.zeros((n, k), dtype=np.int64)
    records, malformed = [], []
    for i, (image_id, size, objects) in enumerate(images):
        record, adds, icons = _coco_record(
            rng, image_id, size, objects, classes, click_noise, p_move, p_remove
        )
        bad = i - (n - n_malformed)
        if bad >= 0:
            malformed.append(i)
            if bad % 3 == 0:
                del record["image_id"]
            elif bad % 3 == 1:
                if record["actionHistories"]:
                    record["actionHistories"][0]["pointTo"] = {"x": "abc", "y": 0.5}
                else:
                    record["image_id"] = "not-an-id"
            else:
                record = [record["image_id"]]
        records.append(record)
        if bad >= 0:
            continue
        for c, name in enumerate(classes):
            if name in objects:
                labels[i, c] = 1
                true_points[i, 2 * c : 2 * c + 2] = np.mean(np.reshape(objects[name], (-1, 2)), axis=0)
            if name in adds:
                add_points[i, 2 * c : 2 * c + 2] = np.mean(adds[name], axis=0)
                last_add[i, 2 * c : 2 * c + 2] = adds[name][-1]
                first_add[i, 2 * c : 2 * c + 2] = adds[name][0]
            if icons.get(name):
                final_points[i, 2 * c : 2 * c + 2] = np.mean(icons[name], axis=0)
    parts = [json.dumps(record) for record in records]
    if truncate and parts:
        parts[-1] = parts[-1][: len(parts[-1]) // 2]
        if n - 1 not in malformed:
            malformed.append(n - 1)
            for arr in (true_points, add_points, final_points, last_add, first_add):
                arr[n - 1] = np.nan
    text = "[" + ", ".join(parts) + ("" if truncate else "]")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Bunch(
        path=os.fspath(path),
        image_ids=[int(image_id) for image_id, _, _ in images],
        classes=classes,
        labels=labels,
        true_points=true_points,
        add_points=add_points,
        last_add_points=last_add,
        first_add_points=first_add,
        final_points=final_points,
        malformed=malformed,
    )
