"""The ``luab`` command: ``study`` (the main job), ``demo``, ``extract`` and ``fit``.

Run ``luab --help`` (or ``python -m luab_sk.cli --help``) for the options of each subcommand.

Errors
------
A user error (a missing or unreadable input, an array of the wrong shape, an unknown backbone, an output that
cannot be written, ...) prints one line ``luab: error: ...`` on stderr and exits with status 1; ``--debug``
prints the traceback as well. Outputs are checked before any work starts: their folder must exist and be
writable, the suffix is normalised (the path printed is the path written), an existing output is replaced only
with ``--force``, and files are written atomically (a temporary file renamed into place), so an interrupted
run leaves no half-written output.

Security
--------
``luab fit`` saves the model with joblib, that is, as a **pickle**: loading a ``.joblib`` file runs code
stored in it. Load only models you made yourself or got from someone you trust.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from luab_sk import __version__
from luab_sk._io import atomic_write

DEFAULT_STUDY_DIR = "luab_output"
"""Where ``luab study`` writes its table and plots by default (relative to the working directory; git ignores
it). Only ``benchmarks/luab_study.py`` writes ``benchmarks/results/``."""

_PICKLE_WARNING = (
    "A .joblib model is a pickle: loading it runs code stored in it, so load only models you made yourself "
    "or got from someone you trust."
)
_MODEL_SUFFIXES = (".joblib", ".pkl", ".pickle")
# Pillow plugins that only identify a format (stubs), or need an external program, are no photos to encode.
_NON_PHOTO_FORMATS = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS"}
_MAX_LISTED_FAILURES = 5


class CLIError(Exception):
    """A user error: ``main`` prints it as one line ``luab: error: <message>`` and returns 1."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one-line :class:`CLIError` (exit status 1, not 2)."""

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')")


# -- argument types --------------------------------------------------------------------------------
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _cv_folds(text: str) -> int:
    value = _int_at_least(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (no cross-validation) or at least 2 folds, got '1'")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


# -- outputs ----------------------------------------------------------------------------------------------
def _check_folder(folder: Path, arg: str, target: Path) -> None:
    if not folder.exists():
        raise CLIError(f"{arg} {str(target)!r}: the folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise CLIError(f"{arg} {str(target)!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{arg} {str(target)!r}: the folder {str(folder)!r} is not writable")


def _output_file(text: str, suffixes: tuple[str, ...], force: bool, arg: str = "--out") -> Path:
    """The checked output path: suffix normalised, folder writable, no silent overwrite."""
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir() or not path.name:
        raise CLIError(
            f"{arg} {text!r} is a folder; give a file name (e.g. {str(path / ('out' + suffixes[0]))!r})"
        )
    if path.suffix.lower() not in suffixes:
        path = path.with_name(path.name + suffixes[0])
    _check_folder(path.parent, arg, path)
    if path.is_dir():
        raise CLIError(f"{arg} {str(path)!r} is a folder; give a file name")
    if path.exists() and not force:
        raise CLIError(f"{arg} {str(path)!r} exists; pass --force to overwrite it")
    return path


def _output_dir(text: str, names: list[str], force: bool, arg: str = "--output-dir") -> Path:
    """The checked output folder (created if missing, its parent must exist); no silent overwrite."""
    folder = Path(text).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CLIError(f"{arg} {text!r} is not a folder")
        _check_folder(folder, arg, folder)
    else:
        _check_folder(folder.parent, arg, folder)
    clash = [name for name in names if (folder / name).exists()]
    if clash and not force:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise CLIError(
            f"{arg} {text!r} already holds {clash[0]!r}{more} from an earlier run; pass --force to "
            "overwrite, or choose another --output-dir"
        )
    folder.mkdir(exist_ok=True)
    return folder


# -- inputs -------------------------------------------------------------------------------------------------
def _load_array(arg: str, text: str) -> np.ndarray:
    """A ``.npy`` array (never unpickled), or a one-line error naming the argument and the file."""
    path = Path(text).expanduser()
    if not path.exists():
        raise CLIError(f"{arg} {text!r}: no such file")
    if path.is_dir():
        raise CLIError(f"{arg} {text!r} is a folder, not a .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise CLIError(
                f"{arg} {text!r} holds Python objects (a pickle); save a numeric or string array"
            ) from err
        raise CLIError(f"{arg} {text!r} is not a readable .npy file: {err}") from err
    except (OSError, EOFError) as err:
        raise CLIError(f"{arg} {text!r} is not a readable .npy file: {err}") from err
    if not isinstance(array, np.ndarray):  # an .npz archive
        names = list(array.files)
        array.close()
        raise CLIError(
            f"{arg} {text!r} is an .npz archive (arrays {names}); pass one array saved as .npy, e.g. "
            f"np.save('X.npy', np.load({text!r})[{names[0] if names else 'name'!r}])"
        )
    return array


def _check_fit_inputs(X, y, Z, args) -> None:
    if X.ndim not in (2, 3) or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise CLIError(
            f"--X {args.X!r} must hold numbers of shape (n, d) or (n, L, C), got {X.dtype} of shape {X.shape}"
        )
    n = len(X)
    if n == 0:
        raise CLIError(f"--X {args.X!r} holds no samples")
    if y.ndim != 1:
        raise CLIError(f"--y {args.y!r} must be one label per sample, shape ({n},), got shape {y.shape}")
    if len(y) != n:
        raise CLIError(f"--y {args.y!r} holds {len(y)} labels but --X holds {n} samples")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        raise CLIError(f"--y {args.y!r} holds NaN or infinite labels")
    if Z is not None:
        if Z.ndim != 2 or not (np.issubdtype(Z.dtype, np.number) or Z.dtype == bool):
            raise CLIError(
                f"--Z {args.Z!r} must hold numbers of shape ({n}, k) (NaN for missing), "
                f"got {Z.dtype} of shape {Z.shape}"
            )
        if len(Z) != n:
            raise CLIError(f"--Z {args.Z!r} holds {len(Z)} rows but --X holds {n} samples")
    from luab_sk.nn import head_spec

    if head_spec(args.head).spatial and X.ndim != 3:
        raise CLIError(
            f"--head {args.head} needs patch tokens of shape (n, L, C) in --X, got shape {X.shape}"
        )


def _image_suffixes() -> set[str]:
    """Extensions of the image formats Pillow can open here (``.jpg``, ``.png``, ``.webp``, ``.tif``, ...)."""
    from PIL import Image

    return {
        ext.lower()
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt not in _NON_PHOTO_FORMATS
    }


def _read_images(paths: list[str]) -> list[str]:
    """Image files named or found (recursively, hidden files skipped) under the given paths."""
    suffixes = _image_suffixes()
    files = []
    for text in paths:
        p = Path(text).expanduser()
        if p.is_dir():
            found, ignored = [], []
            for f in sorted(p.rglob("*")):
                if not f.is_file():
                    continue
                hidden = any(part.startswith(".") for part in f.relative_to(p).parts)
                (found if f.suffix.lower() in suffixes and not hidden else ignored).append(f)
            files.extend(str(f) for f in found)
            if ignored:
                print(
                    f"luab: note: ignored {len(ignored)} file(s) under {text!r} that are hidden or not "
                    f"images Pillow can open (e.g. {str(ignored[0])!r})",
                    file=sys.stderr,
                )
        elif p.exists():
            files.append(str(p))
        else:
            raise CLIError(f"image path {text!r} does not exist")
    if not files:
        raise CLIError(
            f"no images found under {paths} (looked for files Pillow can open: .jpg, .jpeg, .png, .webp, "
            ".tif, .bmp, .gif, ...)"
        )
    return files


# -- the subcommands ----------------------------------------------------------------------------------------
def _demo(args) -> int:
    """Synthetic embeddings with informative byproducts: accuracy without Z, with Z, with shuffled Z."""
    from sklearn.model_selection import train_test_split

    from luab_sk.datasets.synthetic import make_embedding_classification
    from luab_sk.estimators.classifier import LUABClassifier

    if args.train_size >= args.n_samples:
        raise CLIError(f"--train-size {args.train_size} must be smaller than --n-samples {args.n_samples}")
    rows = {"no Z (byproduct_weight=0)": [], "LUAB with Z": [], "LUAB with shuffled Z (control)": []}
    for seed in range(args.seeds):
        X, y, Z = make_embedding_classification(
            args.n_samples, 256, n_classes=10, signal_strength=0.2, random_state=seed
        )
        X_tr, X_te, y_tr, y_te, Z_tr, _ = train_test_split(
            X, y, Z, train_size=args.train_size, stratify=y, random_state=seed
        )
        shuffled = np.random.default_rng(seed).permutation(Z_tr)
        for name, weight, z in (
            ("no Z (byproduct_weight=0)", 0.0, None),
            ("LUAB with Z", args.byproduct_weight, Z_tr),
            ("LUAB with shuffled Z (control)", args.byproduct_weight, shuffled),
        ):
            clf = LUABClassifier(
                head="linear", hidden_size=8, byproduct_weight=weight, max_iter=300, random_state=seed
            )
            rows[name].append(clf.fit(X_tr, y_tr, Z=z).score(X_te, y_te))
    print(
        f"Synthetic CLIP-like embeddings, {args.train_size} labelled training samples, 10 classes, "
        f"{args.seeds} seeds (test accuracy, mean +- std):"
    )
    for name, scores in rows.items():
        print(f"  {name:<34} {np.mean(scores):.3f} +- {np.std(scores):.3f}")
    return 0


def _study_plan(args) -> tuple[dict, str]:
    """The preset (its seeds unless ``--seeds``) and the output stem of ``luab study``."""
    from luab_sk.study import PRESETS

    name = "quick" if args.quick else "default"
    preset = dict(PRESETS[name])
    if args.seeds is not None:
        preset["seeds"] = tuple(range(args.seeds))
    return preset, "luab_study" if name == "default" else f"luab_study_{name}"


def _study(args) -> int:
    try:
        from luab_sk.study import output_names, run_study
    except ImportError as err:
        raise CLIError(f"luab study needs the 'study' extra (pip install 'luab_sk[study]'): {err}") from err

    preset, stem = _study_plan(args)
    data = args.data or args.features
    if args.data and args.features:
        raise CLIError("give --data (a CSV of images) or --features (an .npz of features), not both")
    if data is not None:
        if not Path(data).is_file():
            raise CLIError(f"{'--data' if args.data else '--features'} {data!r} is not a file")
        preset = {"seeds": preset["seeds"]}  # the scene sizes belong to the built-in benchmark
        stem = f"luab_study_{Path(data).stem}"
    elif args.backgrounds != "textures":
        preset["backgrounds"] = args.backgrounds
        stem = stem.replace("luab_study", f"luab_study_{args.backgrounds}", 1)
    folder = _output_dir(args.output_dir, output_names(stem), args.force)
    result = run_study(
        data=data, **preset, cache_dir=args.cache_dir, output_dir=str(folder), output_name=stem, verbose=1
    )
    print(f"wrote {', '.join(result.files)}")
    return 0


def _extract(args) -> int:
    from luab_sk.features import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, FeatureExtractor
    from luab_sk.features.extractor import _shared_backbone

    out = _output_file(args.out, (".npz",), args.force)
    if args.ray is not None:
        _check_ray_args(args)
    files = _read_images(args.images)
    backbone = DEFAULT_BACKBONE if args.backbone is None else args.backbone
    pretrained = DEFAULT_PRETRAINED if args.pretrained is None else args.pretrained
    pretrained = None if pretrained.lower() == "none" else pretrained
    fe = FeatureExtractor(
        backbone=backbone,
        pretrained=pretrained,
        output=args.output,
        layer=args.layer,
        token_dim=args.token_dim,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        on_error="skip",
        verbose=1,
    )
    try:
        fe.fit()
    except ValueError as err:
        raise CLIError(str(err)) from err
    try:
        _shared_backbone(backbone, pretrained, args.layer)  # fail now on a bad name; the extractor reuses it
    except (ValueError, OSError, RuntimeError, ImportError) as err:
        raise CLIError(f"--backbone {backbone!r} with --pretrained {str(pretrained)!r}: {err}") from err
    try:
        features = fe.fit_transform(files) if args.ray is None else _extract_on_ray(fe, files, args)
    except ValueError as err:  # e.g. a --token-dim wider than the backbone's tokens
        raise CLIError(str(err)) from err
    failed = fe.failed_
    if len(failed) == len(files):
        _, item, message = failed[0]
        raise CLIError(
            f"none of the {len(files)} images could be read (first: {item}: {message}); nothing was written"
        )
    arrays = features if isinstance(features, dict) else {args.output: features}
    payload = {"paths": np.array(files), **{k: np.asarray(v) for k, v in arrays.items()}}
    atomic_write(out, lambda fh: np.savez(fh, **payload))
    shapes = ", ".join(f"{k} {np.shape(v)}" for k, v in arrays.items())
    print(f"wrote {shapes} for {len(files)} images to {out}")
    if failed:
        print(
            f"luab: warning: {len(failed)} of {len(files)} images could not be read; their rows are NaN:",
            file=sys.stderr,
        )
        for position, item, message in failed[:_MAX_LISTED_FAILURES]:
            print(f"  image {position} {item}: {' '.join(message.split())}", file=sys.stderr)
        if len(failed) > _MAX_LISTED_FAILURES:
            print(f"  ... and {len(failed) - _MAX_LISTED_FAILURES} more", file=sys.stderr)
    return 0


def _check_ray_args(args) -> None:
    if args.cache_dir is None:
        raise CLIError(
            "--ray needs --cache-dir: the Ray workers write their shards there (a folder every node sees "
            "under the same path)"
        )
    if args.ray and os.path.exists(args.ray):
        raise CLIError(
            f"--ray took {args.ray!r} as the cluster address, but it is a file or folder; "
            "write --ray=ADDRESS, or put --ray after the images"
        )


def _extract_on_ray(fe, files, args):
    try:
        from luab_sk.distributed import extract_with_ray

        return extract_with_ray(
            files,
            fe,
            address=args.ray or None,
            num_actors=args.ray_actors,
            num_cpus_per_actor=args.ray_cpus_per_actor,
            num_gpus_per_actor=args.ray_gpus_per_actor,
            progress=True,
        )
    except (ImportError, ConnectionError) as err:
        raise CLIError(str(err)) from err


def _fit(args) -> int:
    import joblib
    from sklearn.model_selection import cross_val_score

    from luab_sk.estimators.classifier import LUABClassifier

    out = _output_file(args.out, _MODEL_SUFFIXES, args.force)
    X = _load_array("--X", args.X)
    y = _load_array("--y", args.y)
    Z = None if args.Z is None else _load_array("--Z", args.Z)
    _check_fit_inputs(X, y, Z, args)
    clf = LUABClassifier(
        head=args.head, byproduct_weight=args.byproduct_weight, random_state=args.random_state
    )
    if args.cv:
        try:
            scores = cross_val_score(
                clf, X, y, cv=args.cv, params=None if Z is None else {"Z": Z}, error_score="raise"
            )
        except (ValueError, TypeError) as err:
            raise CLIError(f"--cv {args.cv}: cross-validation failed: {err}") from err
        print(f"{args.cv}-fold accuracy: {scores.mean():.4f} +- {scores.std():.4f}")
    try:
        clf.fit(X, y, Z=Z)
    except (ValueError, TypeError) as err:
        raise CLIError(f"LUABClassifier could not be fitted: {err}") from err
    scores = clf.predict_proba(X) if hasattr(clf, "predict_proba") else clf.decision_function(X)
    if not np.isfinite(scores).all():
        raise CLIError(
            "the fitted model predicts NaN or infinite scores on the training features, so it was not saved; "
            "try a smaller --byproduct-weight, or check --X and --Z for extreme values"
        )
    atomic_write(out, lambda fh: joblib.dump(clf, fh))
    print(f"saved the fitted LUABClassifier to {out}")
    return 0


# -- the parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``luab`` command."""
    parser = _Parser(
        prog="luab",
        description=__doc__.splitlines()[0],
        epilog="Every user error prints one line 'luab: error: ...' and exits with status 1 (--debug shows "
        "the traceback). " + _PICKLE_WARNING,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of an error"
    )
    writes = _Parser(add_help=False)
    writes.add_argument("--force", action="store_true", help="overwrite existing outputs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "study",
        parents=[common, writes],
        help="the LUAB study on the spurious-correlation benchmark (the main job)",
        description="The LUAB study on the spurious-correlation benchmark (the main job; --backgrounds "
        "photos for real-photo backgrounds), or on your own images (--data data.csv) or features "
        "(--features feats.npz). It writes its "
        f"table and plots to --output-dir (default ./{DEFAULT_STUDY_DIR}/), never to benchmarks/results/ "
        "(only benchmarks/luab_study.py writes there).",
    )
    p.add_argument(
        "--output-dir",
        "--out",
        dest="output_dir",
        default=DEFAULT_STUDY_DIR,
        help=f"folder for the table and plots (default: ./{DEFAULT_STUDY_DIR}/; created if missing)",
    )
    p.add_argument("--cache-dir", default=".cache/luab", help="embedding cache (images are encoded once)")
    p.add_argument(
        "--seeds",
        type=_int_at_least(1),
        default=None,
        help="number of model seeds (default: the preset's, luab_sk.study.PRESETS)",
    )
    p.add_argument("--quick", action="store_true", help="a small, fast configuration (smoke test)")
    p.add_argument(
        "--backgrounds",
        choices=("textures", "photos"),
        default="textures",
        help="built-in benchmark: tinted textures (grass vs brick) or real photos (china.jpg, flower.jpg)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="your images: a CSV with columns path,label,split[,group,click_x,click_y,box_x0,box_y0,box_x1,"
        "box_y1] (coordinates in [0, 1] of the image; paths relative to the CSV), see StudyData.from_csv",
    )
    p.add_argument(
        "--features",
        default=None,
        help="precomputed features: an .npz with y, split, pooled and/or tokens (+ grid), optional group, Z, "
        "boxes, class_names, see StudyData.from_npz",
    )
    p.set_defaults(func=_study)

    p = sub.add_parser(
        "demo", parents=[common], help="synthetic embeddings: accuracy with and without byproducts"
    )
    p.add_argument("--n-samples", type=_int_at_least(20), default=2500)
    p.add_argument("--train-size", type=_int_at_least(10), default=500)
    p.add_argument("--byproduct-weight", type=_nonnegative_float, default=1.0)
    p.add_argument("--seeds", type=_int_at_least(1), default=5)
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "extract",
        parents=[common, writes],
        help="encode images (files or folders) into an .npz of features",
        description="Encode images into an .npz holding 'paths' and the features. Folders are searched "
        "recursively for every format Pillow opens (.jpg, .png, .webp, .tif, ...); unreadable images get NaN "
        "rows and are listed on stderr, and the command fails when none can be read.",
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output .npz (the suffix is added if missing)")
    p.add_argument(
        "--backbone",
        default=None,
        help="'family:architecture' (default: luab_sk.features.DEFAULT_BACKBONE, ImageNet "
        "EfficientNet-Lite0)",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="tag, checkpoint path, or 'none' (random init); default: luab_sk.features.DEFAULT_PRETRAINED",
    )
    p.add_argument("--output", choices=["pooled", "tokens", "both"], default="pooled")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--token-dim", type=_int_at_least(1), default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--batch-size", type=_int_at_least(1), default=32)
    p.add_argument("--num-workers", type=_int_at_least(0), default=0)
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="encode on Ray actors (needs the 'ray' extra and a --cache-dir every node sees under the same "
        "path): ADDRESS as for ray.init ('auto', 'host:6379', 'ray://host:10001'); without it, "
        "RAY_ADDRESS or a new local Ray. Write --ray=ADDRESS or put --ray after the images",
    )
    p.add_argument(
        "--ray-actors",
        type=_int_at_least(1),
        default=None,
        help="Ray actors (default: as many as the cluster's CPUs, or GPUs, allow)",
    )
    p.add_argument("--ray-cpus-per-actor", type=_nonnegative_float, default=1.0)
    p.add_argument("--ray-gpus-per-actor", type=_nonnegative_float, default=0.0)
    p.set_defaults(func=_extract)

    p = sub.add_parser(
        "fit",
        parents=[common, writes],
        help="fit a LUABClassifier on .npy features, labels and byproducts",
        description="Fit a LUABClassifier on .npy arrays and save it with joblib. " + _PICKLE_WARNING,
    )
    p.add_argument("--X", required=True, help=".npy features (n, d) or tokens (n, L, C)")
    p.add_argument("--y", required=True, help=".npy labels (n,)")
    p.add_argument("--Z", default=None, help=".npy byproducts (n, k), NaN for missing")
    p.add_argument("--head", default="mlp", choices=["linear", "mlp", "attention"])
    p.add_argument("--byproduct-weight", type=_nonnegative_float, default=1.0)
    p.add_argument(
        "--cv", type=_cv_folds, default=0, help="also report k-fold cross-validated accuracy (k >= 2)"
    )
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument(
        "--out",
        required=True,
        help="output model, .joblib (added if the name has no .joblib/.pkl suffix); a pickle: load only "
        "your own",
    )
    p.set_defaults(func=_fit)
    return parser


def _message(err: BaseException) -> str:
    if isinstance(err, CLIError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err} (--debug shows the traceback)"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``luab`` command; returns the exit status (0, or 1 after a one-line error)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    except KeyboardInterrupt:
        print("luab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"luab: error: {_message(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
