"""The LUAB study: do annotation byproducts make a frozen-feature classifier robust to a spurious background?

:func:`run_study` builds the Waterbirds-style benchmark of :mod:`luab_sk.datasets.spurious`, checks that the
backbone can recognise the foregrounds at all (:func:`check_decodability`), extracts features once (cached on
disk), then for several seeds compares

- a plain linear probe on pooled features (scikit-learn ``LogisticRegression``),
- an attention probe on the patch tokens trained without Z,
- LUAB: the same attention probe trained with the clicks Z (heatmap loss on its attention map),
- LUAB with shuffled Z (a control: the clicks of other images),
- LUAB with kNN-imputed Z (the missing clicks filled from the nearest training images),
- generalized distillation: a teacher sees the token under the click, a linear student sees pooled X,

reporting average accuracy, worst-group accuracy and the pointing game on the group-balanced test split, plus
a grid search over ``byproduct_weight`` on the group-balanced validation split. It writes a markdown table, a
JSON record and two plots.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import Bunch

from .byproducts.geometry import center_crop_box, crop_points
from .datasets.spurious import foreground_crops, make_spurious_benchmark
from .estimators.classifier import LUABClassifier
from .estimators.distill import GeneralizedDistillationClassifier
from .features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, FeatureExtractor, load_backbone
from .metrics import pointing_game, worst_group_accuracy

__all__ = [
    "DEFAULT_SEEDS",
    "METHODS",
    "PRESETS",
    "check_decodability",
    "output_names",
    "run_study",
    "to_backbone_frame",
]

METHODS = (
    "linear probe (pooled)",
    "attention probe, no Z",
    "LUAB, Z",
    "LUAB, shuffled Z",
    "LUAB, kNN-imputed Z",
    "generalized distillation",
)

DEFAULT_SEEDS = (0, 1, 2)
"""The model seeds of the main job: the default of :func:`run_study`, of ``PRESETS["default"]`` and of
``luab study``."""

PRESETS = {
    "quick": {"n_train": 200, "n_val": 50, "n_test": 100, "seeds": (0, 1)},
    "default": {"n_train": 600, "n_val": 200, "n_test": 400, "seeds": DEFAULT_SEEDS},
    "full": {"n_train": 1000, "n_val": 300, "n_test": 700, "seeds": (0, 1, 2, 3, 4)},
}
"""Study sizes: ``run_study(**PRESETS["quick"])`` for a first look (350 scenes), ``"default"`` (the main job,
1200 scenes, 3 seeds; also :func:`run_study`'s defaults) and ``"full"`` (2000 scenes, 5 seeds)."""

NO_Z_METHODS = METHODS[:2]
"""The methods that never see the byproducts (distillation uses them in training, through its teacher)."""

DEFAULT_LUAB_PARAMS = {
    "head": "attention",
    "byproduct_target": "heatmap",
    "hidden_size": 64,
    "n_components": 64,
}


def _pooled(features):
    return features["pooled"] if isinstance(features, dict) else features


def check_decodability(
    extractor, *, classes=("faces", "nonfaces"), n_samples=200, image_size=224, cv=5, random_state=0
):
    """Balanced accuracy of a linear probe that tells the foregrounds apart on foreground-only images.

    A spurious-correlation benchmark measures nothing if the backbone cannot recognise the foreground: this is
    the check to run (and pass, at about 0.9 or more) before any study.

    Parameters
    ----------
    extractor : FeatureExtractor
        Its ``transform`` must return pooled features (``output="pooled"`` or ``"both"``).
    classes : sequence of str, default=("faces", "nonfaces")
        Foregrounds, see :data:`luab_sk.datasets.spurious.FOREGROUNDS`.
    n_samples : int, default=200
        Images of :func:`~luab_sk.datasets.spurious.foreground_crops`.
    image_size : int, default=224
    cv : int, default=5
        Stratified folds of the cross-validation.
    random_state : int, default=0

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
    """
    images, y = foreground_crops(n_samples, classes=classes, image_size=image_size, random_state=random_state)
    X = np.asarray(_pooled(extractor.transform(images)), dtype=np.float64)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(cv, shuffle=True, random_state=random_state)
    return float(cross_val_score(probe, X, y, cv=folds, scoring="balanced_accuracy").mean())


def to_backbone_frame(scenes, backbone=DEFAULT_BACKBONE):
    """Clicks, boxes and images of scenes in the frame the backbone sees.

    The backbones' evaluation transform resizes and centre-crops (``crop_pct`` of the architecture, 0.875 for
    EfficientNet-Lite0), so the token grid covers the central part of a scene only. Clicks and boxes must be
    expressed in that crop before they supervise or score attention maps.

    Parameters
    ----------
    scenes : Bunch
        As returned by :func:`~luab_sk.datasets.spurious.make_spurious_scenes` (square ``images``, ``Z``,
        ``boxes``).
    backbone : str, default=DEFAULT_BACKBONE
        The extractor's backbone string (only its architecture's preprocessing matters).

    Returns
    -------
    seen : Bunch
        ``Z`` (clicks in the crop's [0, 1] coordinates, NaN where missing or outside the crop), ``boxes``
        (clipped to the crop), ``images`` (the cropped pixels, a view, for plotting) and ``crop_box``
        (left, top, width, height) in pixels of the scenes.

    Examples
    --------
    >>> from luab_sk.datasets.spurious import make_spurious_scenes
    >>> scenes = make_spurious_scenes(4, image_size=64, random_state=0)
    >>> seen = to_backbone_frame(scenes, "timm:resnet10t")
    >>> seen.crop_box, seen.images.shape
    ((4.0, 4.0, 56.0, 56.0), (4, 56, 56, 3))
    """
    size = scenes.images.shape[1]
    crop = load_backbone(backbone, None).data_config.get("crop_pct", 1.0)  # the architecture's, any weights
    box = center_crop_box((size, size), crop_fraction=crop)
    left, top, width, height = box
    boxes = np.clip(
        scenes.boxes, np.array([left, top] * 2) / size, np.array([left + width, top + height] * 2) / size
    )
    corners = [crop_points(boxes[:, k : k + 2], box, (size, size)) for k in (0, 2)]
    px = [int(round(v)) for v in box]
    return Bunch(
        Z=crop_points(scenes.Z, box, (size, size)),
        boxes=np.hstack(corners),
        images=scenes.images[:, px[1] : px[1] + px[3], px[0] : px[0] + px[2]],
        crop_box=box,
    )


def _clicked_tokens(tokens, clicks, grid):
    """The token under each click (NaN where the click is missing): privileged features for distillation."""
    h, w = grid
    out = np.full((len(tokens), tokens.shape[2]), np.nan, dtype=np.float64)
    seen = ~np.isnan(clicks).any(axis=1)
    col = np.minimum((clicks[seen, 0] * w).astype(int), w - 1)
    row = np.minimum((clicks[seen, 1] * h).astype(int), h - 1)
    out[seen] = tokens[np.flatnonzero(seen), row * w + col]
    return out


def _evaluate(model, X_test, test, attention=None):
    pred = model.predict(X_test)
    return {
        "accuracy": float(np.mean(pred == test.y)),
        "worst_group_accuracy": worst_group_accuracy(test.y, pred, test.group),
        "pointing_game": None if attention is None else pointing_game(attention, test.boxes_seen),
    }


def _summary(runs):
    table = []
    for method in METHODS:
        rows = [run[method] for run in runs if method in run]
        if not rows:
            continue
        entry = {"method": method}
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
        "| method | accuracy (%) | worst-group accuracy (%) | pointing game (%) | fit time (s) |",
        "|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['method']} | {cell(e['accuracy'])} | {cell(e['worst_group_accuracy'])} | "
            f"{cell(e['pointing_game'])} | {cell(e['fit_s'], pct=False)} |"
        )
    notes = [
        "",
        f"Mean ± standard deviation over seeds {list(meta['seeds'])} on the group-balanced test split "
        f"({meta['n_test']} scenes); training split of {meta['n_train']} scenes with background-label "
        f"correlation {meta['correlation']}. Foreground decodability (balanced linear probe on "
        f"foreground-only images): {100 * meta['decodability']:.1f}%. "
        f"byproduct_weight = {meta['byproduct_weight']} "
        f"(grid search on the balanced validation split). Backbone {meta['backbone']}.",
    ]
    worst = {e["method"]: e["worst_group_accuracy"][0] for e in table}
    no_z = [m for m in NO_Z_METHODS if m in worst]
    if no_z and "LUAB, Z" in worst:
        best = max(no_z, key=worst.get)
        gaps = [f"LUAB with Z {100 * (worst['LUAB, Z'] - worst[best]):+.1f}"]
        gaps += [f"{m} {100 * (worst[m] - worst[best]):+.1f}" for m in METHODS[3:] if m in worst]
        notes.append(
            f"\nWorst-group accuracy against the best method that never sees Z ({best}), in points: "
            + "; ".join(gaps)
            + "."
        )
    return "\n".join(lines + notes) + "\n"


def run_study(
    *,
    n_train=600,
    n_val=200,
    n_test=400,
    correlation=0.99,
    classes=("faces", "nonfaces"),
    backgrounds=("grass", "brick"),
    object_scale=(0.2, 0.3),
    click_noise=0.15,
    missing_rate=0.14,
    image_size=224,
    seeds=DEFAULT_SEEDS,
    byproduct_weights=(0.0, 0.3, 1.0, 3.0, 10.0, 30.0),
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
    n_train, n_val, n_test : int, default=600, 200, 400
        Scenes per split (the validation and test splits are group-balanced).
    correlation : float, default=0.99
        Background-label agreement in the training split (0.99: 6 of the 600 default training scenes
        show a background of the other class). See ``benchmarks/results/`` for 0.95 and 0.98.
    classes, backgrounds, object_scale, click_noise, missing_rate, image_size
        Benchmark parameters, see :func:`~luab_sk.datasets.spurious.make_spurious_scenes`.
    seeds : sequence of int, default=DEFAULT_SEEDS
        Model seeds, (0, 1, 2); every method is fitted once per seed on the same features.
    byproduct_weights : sequence of float, default=(0, 0.3, 1, 3, 10, 30)
        Grid of ``GridSearchCV`` over ``byproduct_weight`` (LUAB with Z, accuracy on the validation split);
        the selected weight is used by every LUAB line.
    luab_params : dict, optional
        Parameters of the :class:`~luab_sk.estimators.classifier.LUABClassifier` lines, merged into
        :data:`DEFAULT_LUAB_PARAMS` (attention head, heatmap loss on the clicks).
    backbone, pretrained : str
        Feature extractor backbone (default: ImageNet EfficientNet-Lite0, offline).
    token_dim : int or None, default=256
        Width of the cached patch tokens (a fixed random orthogonal projection of the extractor, done once;
        the attention probes then reduce further with a PCA). None keeps the backbone's width.
    cache_dir : str or None, default=None
        Embedding cache of the extractor: a rerun reads the features from disk.
    output_dir : str or None, default=None
        Where to write ``<output_name>.md``, ``.json``, ``_weights.png`` (validation accuracy against the
        byproduct weight) and ``_attention.png`` (attention maps without Z, with Z and with shuffled Z on
        minority-group test scenes); None writes nothing. The folder is created (with its parents) and
        checked for writing before any work; existing files of the same names are replaced, each written
        atomically (see :func:`output_names`). ``luab study`` writes to ``./luab_output/`` by default; only
        ``benchmarks/luab_study.py`` writes the tracked ``benchmarks/results/``.
    output_name : str, default="luab_study"
        Stem of the output files (a plain file name, no folder).
    plots : bool, default=True
        Draw the plots (needs matplotlib) when ``output_dir`` is set.
    min_decodability : float, default=0.9
        Stop with an error when the backbone's foreground decodability is below this.
    n_decodability : int, default=200
        Foreground-only images of the decodability check (:func:`check_decodability`).
    data_seed : int, default=0
        Seed of the generated scenes.
    batch_size : int, default=64
        Feature extraction batch size.
    verbose : int, default=1
        Print progress and the table.

    Returns
    -------
    result : :class:`~sklearn.utils.Bunch`
        ``table`` (list of dict: method, then (mean, std) of accuracy, worst_group_accuracy, pointing_game
        (None without attention) and fit_s), ``markdown`` (str), ``runs`` (per-seed dicts), ``decodability``,
        ``byproduct_weight`` (selected), ``cv_results`` (the grid search's), ``files`` (written paths),
        ``timings`` (seconds per phase).

    Raises
    ------
    RuntimeError
        When the foreground decodability is below ``min_decodability``.

    Examples
    --------
    >>> result = run_study(
    ...     n_train=24, n_val=8, n_test=8, image_size=64, seeds=(0,), byproduct_weights=(0.0, 1.0),
    ...     backbone="timm:resnet10t", pretrained=None, n_decodability=20, min_decodability=0.0,
    ...     luab_params={"max_iter": 5, "n_components": 8, "hidden_size": 8}, verbose=0,
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
    params = {**DEFAULT_LUAB_PARAMS, **(luab_params or {})}
    if output_dir is not None:
        _prepare_output_dir(Path(output_dir), output_name, plots)
    log = print if verbose else (lambda *a, **k: None)
    timings = {}
    start = time.perf_counter()

    t0 = time.perf_counter()
    extractor = FeatureExtractor(
        backbone, pretrained, output="both", token_dim=token_dim, cache_dir=cache_dir, batch_size=batch_size
    )
    decodability = check_decodability(
        extractor, classes=classes, n_samples=n_decodability, image_size=image_size, random_state=data_seed
    )
    timings["decodability_s"] = time.perf_counter() - t0
    log(f"foreground decodability (balanced linear probe, 5-fold): {100 * decodability:.1f}%")
    if decodability < min_decodability:
        raise RuntimeError(
            f"the backbone {backbone!r} recognises the foregrounds {tuple(classes)} with balanced accuracy "
            f"{decodability:.3f} < min_decodability={min_decodability}: the benchmark would measure nothing. "
            "Choose other classes, a larger image_size or another backbone."
        )

    t0 = time.perf_counter()
    splits = make_spurious_benchmark(
        n_train,
        n_val,
        n_test,
        correlation=correlation,
        random_state=data_seed,
        classes=classes,
        backgrounds=backgrounds,
        object_scale=object_scale,
        click_noise=click_noise,
        missing_rate=missing_rate,
        image_size=image_size,
    )
    for split in splits.values():
        seen = to_backbone_frame(split, backbone)
        split.Z_seen, split.boxes_seen, split.images_seen = seen.Z, seen.boxes, seen.images
    feats = {name: extractor.transform(split.images) for name, split in splits.items()}
    grid = extractor.grid_
    timings["extract_s"] = time.perf_counter() - t0
    log(
        f"features of {n_train + n_val + n_test} scenes in {timings['extract_s']:.0f} s "
        f"(grid {grid}, {extractor.n_cached_} from cache in the last split)"
    )
    train, val, test = splits["train"], splits["val"], splits["test"]
    P = {name: np.asarray(f["pooled"]) for name, f in feats.items()}
    T = {name: np.asarray(f["tokens"]) for name, f in feats.items()}

    t0 = time.perf_counter()
    search = GridSearchCV(
        LUABClassifier(**params, random_state=seeds[0]),
        {"byproduct_weight": list(weights)},
        cv=PredefinedSplit(np.r_[np.full(n_train, -1), np.zeros(n_val)]),
        scoring="accuracy",
        refit=False,
    )
    search.fit(
        np.concatenate([T["train"], T["val"]]), np.r_[train.y, val.y], Z=np.vstack([train.Z_seen, val.Z_seen])
    )
    weight = float(search.best_params_["byproduct_weight"])
    timings["grid_search_s"] = time.perf_counter() - t0
    log(
        f"grid search over byproduct_weight {list(weights)}: validation accuracy "
        f"{np.round(search.cv_results_['mean_test_score'], 3).tolist()}, selected {weight} "
        f"({timings['grid_search_s']:.0f} s)"
    )

    privileged = _clicked_tokens(T["train"], train.Z_seen, grid)
    runs, maps = [], {}
    t0 = time.perf_counter()
    for seed in seeds:
        shuffled = train.Z_seen[np.random.default_rng(seed).permutation(n_train)]
        candidates = {
            "linear probe (pooled)": (LogisticRegression(max_iter=3000), P, None),
            "attention probe, no Z": (
                LUABClassifier(**{**params, "byproduct_weight": 0.0}, random_state=seed),
                T,
                None,
            ),
            "LUAB, Z": (
                LUABClassifier(**params, byproduct_weight=weight, random_state=seed),
                T,
                train.Z_seen,
            ),
            "LUAB, shuffled Z": (
                LUABClassifier(**params, byproduct_weight=weight, random_state=seed),
                T,
                shuffled,
            ),
            "LUAB, kNN-imputed Z": (
                LUABClassifier(**params, byproduct_weight=weight, impute_byproducts="knn", random_state=seed),
                T,
                train.Z_seen,
            ),
            "generalized distillation": (GeneralizedDistillationClassifier(teacher_input="z"), P, privileged),
        }
        run = {}
        for method, (model, X, Z) in candidates.items():
            fit_start = time.perf_counter()
            model.fit(X["train"], train.y) if Z is None else model.fit(X["train"], train.y, Z=Z)
            fit_s = time.perf_counter() - fit_start
            attention = model.attention_maps(X["test"]) if isinstance(model, LUABClassifier) else None
            run[method] = {**_evaluate(model, X["test"], test, attention), "fit_s": fit_s}
            if seed == seeds[0] and attention is not None:
                maps[method] = attention
            log(
                f"seed {seed} {method:26s} acc {run[method]['accuracy']:.3f} "
                f"worst {run[method]['worst_group_accuracy']:.3f} ({fit_s:.1f} s)"
            )
        runs.append(run)
    timings["fits_s"] = time.perf_counter() - t0

    table = _summary(runs)
    meta = {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "correlation": correlation,
        "classes": list(classes),
        "backgrounds": list(backgrounds),
        "object_scale": list(np.atleast_1d(object_scale).astype(float)),
        "click_noise": click_noise,
        "missing_rate": missing_rate,
        "image_size": image_size,
        "seeds": list(seeds),
        "byproduct_weight": weight,
        "decodability": decodability,
        "backbone": backbone,
        "pretrained": pretrained,
        "luab_params": params,
        "token_dim": token_dim,
        "grid": list(grid),
    }
    timings["total_s"] = time.perf_counter() - start
    markdown = _markdown(table, meta)
    log("\n" + markdown)
    result = Bunch(
        table=table,
        markdown=markdown,
        runs=runs,
        decodability=decodability,
        byproduct_weight=weight,
        cv_results=search.cv_results_,
        files=[],
        timings=timings,
    )
    if output_dir is not None:
        files = _write_outputs(Path(output_dir), output_name, result, meta, test, maps, plots)
        result.files = files
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


def _atomic_write(path, write):
    """Write ``path`` through ``write(temporary path)``, then rename it into place: no half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_outputs(out, name, result, meta, test, maps, plots):
    out.mkdir(parents=True, exist_ok=True)
    files = [out / n for n in output_names(name, plots)]
    header = "# LUAB study: spurious backgrounds, frozen features\n\n"
    _atomic_write(files[0], lambda tmp: Path(tmp).write_text(header + result.markdown, encoding="utf-8"))
    cv = result.cv_results
    record = {
        "config": meta,
        "table": result.table,
        "runs": result.runs,
        "grid_search": {
            "byproduct_weight": [float(w) for w in cv["param_byproduct_weight"]],
            "mean_val_accuracy": cv["mean_test_score"].tolist(),
        },
        "timings_s": result.timings,
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
    }
    _atomic_write(files[1], lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2), encoding="utf-8"))
    if plots:
        from .plotting import plot_attention_overlays, plot_byproduct_weight_curve

        ax = plot_byproduct_weight_curve(cv)
        ax.set_ylabel("validation accuracy (group-balanced)")
        ax.set_title("LUAB attention probe: accuracy vs byproduct weight")
        ax.figure.tight_layout()
        _atomic_write(files[2], lambda tmp: ax.figure.savefig(tmp, dpi=120, format="png"))
        minority = np.flatnonzero(test.y != test.background)[:6]
        shown = {
            k: maps[k][minority]
            for k in ("attention probe, no Z", "LUAB, Z", "LUAB, shuffled Z")
            if k in maps
        }
        fig = plot_attention_overlays(
            test.images_seen[minority],
            shown,
            boxes=test.boxes_seen[minority],
            titles=[test.class_names[c] for c in test.y[minority]],
        )
        _atomic_write(files[3], lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return [str(f) for f in files]
